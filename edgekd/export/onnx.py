"""ONNX: torch.onnx export with a dynamic batch axis, checker, onnxslim, metadata_props, an ONNX Runtime session."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgeKDError, exception_line
from edgekd.export.artifact import INPUT_NAME, OUTPUT_NAME, ArtifactSession, ExportContext
from edgekd.runtime.bundle import metadata_strings, parse_metadata_strings


def export_onnx(ctx: ExportContext, path: Path) -> dict[str, Any]:
    """Trace the model to an FP32 ONNX file (input "input", output "logits", dynamic batch), check, simplify."""
    import onnx
    import torch

    cfg = ctx.profile.onnx
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=cfg.opset,
                                  dynamo=cfg.dynamo)
    if cfg.dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    else:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(ctx.model, (ctx.example_input(),), str(path), **kwargs)
    except ModuleNotFoundError as err:
        raise EdgeKDError(f"onnx export: {err} (onnx.dynamo: true needs `pip install onnxscript`)") from None
    except Exception as err:
        raise EdgeKDError(f"onnx export failed for {type(ctx.model).__name__}: "
                          f"{exception_line(err, 160)}") from None
    model = onnx.load(str(path))
    if cfg.simplify:
        model = _simplify(model, ctx)
    onnx.checker.check_model(model, full_check=True)
    save_onnx(model, path, ctx.metadata, "fp32")
    return {"opset": _opset(model)}


def _simplify(model, ctx: ExportContext):
    """onnxslim folds constants and fuses ops; a failure keeps the traced graph (it is valid, only larger)."""
    try:
        import onnxslim

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return onnxslim.slim(model)
    except Exception as err:  # onnxslim raises assorted errors on unusual graphs
        ctx.log(f"onnx: onnxslim failed ({type(err).__name__}), keeping the unsimplified graph")
        return model


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def save_onnx(model, path: Path, metadata: dict[str, Any], precision: str) -> None:
    """Write the model with the bundle metadata (plus this artifact's format and precision) in metadata_props."""
    import onnx

    del model.metadata_props[:]
    for key, value in metadata_strings({**metadata, "format": "onnx", "precision": precision}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "edgekd"
    onnx.save(model, str(path))


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return parse_metadata_strings({p.key: p.value for p in model.metadata_props})


def export_onnx_artifact(ctx: ExportContext, precision: str, path: Path) -> dict[str, Any]:
    """The ONNX format's exporter: fp32 by tracing, int8 by ONNX Runtime static QDQ quantization of the fp32 graph."""
    if precision == "fp32":
        info = export_onnx(ctx, path)
        ctx.cache["onnx_fp32"] = path
        return info
    if precision == "int8":
        from edgekd.export.quantize import calibration_progress, quantize_onnx_static, uses_transformer_scheme

        fp32 = ctx.cache.get("onnx_fp32")
        if fp32 is None:  # int8 alone: trace an fp32 graph in scratch space, not in the bundle
            fp32 = ctx.scratch / "onnx_fp32" / "model.onnx"
            export_onnx(ctx, fp32)
            ctx.cache["onnx_fp32"] = fp32
        cfg = ctx.profile.quantization
        transformer = uses_transformer_scheme(ctx)
        with calibration_progress(ctx, "onnx int8") as advance:
            model = quantize_onnx_static(fp32, path, ctx.calibration(), ctx.scratch, cfg.onnx, cfg.keep_first_last,
                                         advance, transformer)
        save_onnx(model, path, ctx.metadata, precision)
        return {"opset": _opset(model), "quantization": onnx_quantization_note(cfg, transformer,
                                                                              {n.op_type for n in model.graph.node})}
    raise EdgeKDError(f"onnx: unsupported precision '{precision}'")


def onnx_quantization_note(cfg, transformer: bool = False, present: set[str] | None = None) -> str:
    """How the ONNX INT8 artifact was quantized, for the bundle (profile quantization section). `present`: the
    graph's op types; the FP32 op types named are those it has."""
    from edgekd.export.quantize import ort_op_types

    opts = cfg.onnx
    op_types = ort_op_types(opts, transformer)
    kept = [t for t in opts.exclude_op_types if present is None or t in present]
    return (f"onnxruntime static QDQ (int8 weights {'per channel' if opts.per_channel else 'per tensor'}"
            f"{', 7-bit range' if opts.reduce_range else ''}, uint8 activations, {opts.calibrate_method} "
            "calibration)" + (", first and last layers FP32" if cfg.keep_first_last else "")
            + (f", op types quantized {', '.join(op_types)}" if op_types else "")
            + (" (transformer scheme)" if transformer and opts.op_types is None else "")
            + (f", FP32 op types {', '.join(kept)}" if kept else ""))


def open_onnx(path: Path, precision: str, threads: int | None) -> ArtifactSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inputs, outputs = sess.get_inputs(), sess.get_outputs()

    def dims(shape) -> list[int | None]:
        return [d if isinstance(d, int) else None for d in shape]

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run([outputs[0].name], {inputs[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return ArtifactSession([i.name for i in inputs], [o.name for o in outputs], dims(inputs[0].shape),
                           dims(outputs[0].shape), run)
