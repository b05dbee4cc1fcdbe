"""OpenVINO IR: openvino.convert_model from the PyTorch model, FP32/FP16 weights, rt_info metadata, a CPU session."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgeKDError, exception_line
from edgekd.export.artifact import INPUT_NAME, OUTPUT_NAME, ArtifactSession, ExportContext
from edgekd.runtime.backends import compile_for_cpu, openvino_rt_metadata
from edgekd.runtime.bundle import RT_INFO_SECTION, metadata_strings, parse_metadata_strings

INFERENCE_PRECISION = "f32"
"""OpenVINO CPU math precision for every artifact (as edgekd.runtime compiles them): FP16/INT8 IRs differ only
by their weights, so parity measures the export, not the CPU's default bf16/fp16 arithmetic."""


def convert_openvino(ctx: ExportContext):
    """The FP32 ov.Model of the PyTorch model (converted once per export, cloned per precision)."""
    if "ov_fp32" in ctx.cache:
        return ctx.cache["ov_fp32"].clone()
    import openvino as ov
    import torch

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = ov.convert_model(ctx.model, example_input=ctx.example_input(), input=[(-1, *ctx.input_shape)])
    except Exception as err:
        raise EdgeKDError(f"openvino conversion failed for {type(ctx.model).__name__}: "
                          f"{exception_line(err, 160)}") from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise EdgeKDError(f"openvino: expected one input and one output, got {len(model.inputs)} and {len(model.outputs)}")
    # The converter names tensors after the forward() argument ('x'); the bundle contract fixes the names.
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    ctx.cache["ov_fp32"] = model
    return model.clone()


def export_openvino_artifact(ctx: ExportContext, precision: str, path: Path) -> dict[str, Any]:
    """The OpenVINO format's exporter: fp32 as converted, fp16 by weight compression, int8 by NNCF PTQ."""
    import openvino as ov

    model = convert_openvino(ctx)
    info: dict[str, Any] = {}
    if precision == "int8":
        from edgekd.export.quantize import calibration_progress, quantize_openvino

        with calibration_progress(ctx, "openvino int8") as advance:
            model, info = quantize_openvino(model, ctx, advance)
    elif precision not in ("fp32", "fp16"):
        raise EdgeKDError(f"openvino: unsupported precision '{precision}'")
    embed_openvino_metadata(model, {**ctx.metadata, "format": "openvino", "precision": precision})
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(path), compress_to_fp16=precision == "fp16")
    # Some CPUs default to bf16/fp16 arithmetic; the artifact is checked (and run by edgekd.runtime) in f32 math.
    info["inference_precision_hint"] = INFERENCE_PRECISION
    return info


def embed_openvino_metadata(model, metadata: dict[str, Any]) -> None:
    for key, value in metadata_strings(metadata).items():
        model.set_rt_info(value, [RT_INFO_SECTION, key])


def read_openvino_metadata(path: str | Path) -> dict[str, Any]:
    import openvino as ov

    return parse_metadata_strings(openvino_rt_metadata(ov.Core().read_model(str(path))))


def open_openvino(path: Path, precision: str, threads: int | None) -> ArtifactSession:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = compile_for_cpu(core, model, config)
    output = compiled.outputs[0]

    def dims(partial_shape) -> list[int | None]:
        return [None if d.is_dynamic else d.get_length() for d in partial_shape]

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(compiled(np.ascontiguousarray(x, dtype=np.float32))[output])

    return ArtifactSession([i.get_any_name() for i in model.inputs], [o.get_any_name() for o in model.outputs],
                           dims(model.inputs[0].get_partial_shape()), dims(model.outputs[0].get_partial_shape()), run)
