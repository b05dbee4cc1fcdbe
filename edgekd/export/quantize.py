"""INT8 post-training quantization: NNCF on the OpenVINO model, ONNX Runtime static QDQ on the ONNX graph."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgekd.errors import EdgeKDError, exception_line, shorten
from edgekd.export.artifact import INPUT_NAME, ExportContext
from edgekd.export.profile import OnnxQuantization
from edgekd.progress import progress_task


ATTENTION_NAME = re.compile("attn|attention", re.IGNORECASE)


def is_transformer(model: nn.Module) -> bool:
    """Multi-head attention layers call for NNCF's transformer scheme: nn.MultiheadAttention, or any module whose
    class name has Attn or Attention in it and that has heads (`num_heads`), as timm names them: ViT's Attention,
    Swin's WindowAttention, CaiT's TalkingHeadAttn, Twins' GlobalSubSampleAttn, MaxViT's AttentionCl,
    EfficientFormerV2's Attention2d, MobileNetV4's MultiQueryAttention2d (only *Attention had counted).
    Squeeze-excitation, CBAM and ResNeSt's SplitAttn gates have no heads and do not count."""
    return any(isinstance(m, nn.MultiheadAttention)
               or (ATTENTION_NAME.search(type(m).__name__) and isinstance(getattr(m, "num_heads", None), int))
               for m in model.modules())


def uses_transformer_scheme(ctx: ExportContext) -> bool:
    """The profile's quantization.model_type, with auto resolved by is_transformer on the export's model."""
    model_type = ctx.profile.quantization.model_type
    return model_type == "transformer" or (model_type == "auto" and is_transformer(ctx.model))


def calibration_progress(ctx: ExportContext, label: str):
    """A progress task over the calibration images of `label`'s INT8 pass; yields its advance()."""
    return progress_task(ctx.progress, f"{label}: calibration", len(ctx.calibration()))


def import_nncf():
    """nncf, imported without the "No CUDA runtime is found" line torch's cpp_extension logs on a CPU machine when
    NNCF imports it (a raw log line in a CLI whose warnings are one `warning:` line each)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf

    return nncf


def nncf_options(model, ctx: ExportContext) -> tuple[dict[str, Any], str]:
    """nncf.quantize keyword arguments from the profile (preset, bias correction, transformer scheme, FP32
    layers), and their description for the bundle."""
    nncf = import_nncf()

    cfg = ctx.profile.quantization
    transformer = uses_transformer_scheme(ctx)
    fast = transformer if cfg.fast_bias_correction is None else cfg.fast_bias_correction
    kwargs: dict[str, Any] = {"subset_size": len(ctx.calibration()), "fast_bias_correction": fast,
                              "preset": (nncf.QuantizationPreset.MIXED if cfg.preset == "mixed"
                                         else nncf.QuantizationPreset.PERFORMANCE)}
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    names: list[str] = []
    if cfg.keep_first_last:
        compute = [op.get_friendly_name() for op in model.get_ordered_ops()
                   if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]
        names = list(dict.fromkeys(compute[:1] + compute[-1:]))
    present = {op.get_type_name() for op in model.get_ordered_ops()}
    types = [t for t in cfg.openvino.ignored_types if t in present]
    warn_absent_types("quantization.openvino.ignored_types", cfg.openvino.ignored_types, present, "op of this model")
    if names or types:
        # validate=False: a profile naming an op type this model lacks (HSwish on a ResNet) still applies.
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=names, types=types, validate=False)
    about = (f"nncf {nncf.__version__} PTQ ({cfg.preset} preset) on {len(ctx.calibration())} training images"
             + (" (transformer scheme)" if transformer else "")
             + (", fast bias correction" if fast else ", full bias correction")
             + (", first and last layers FP32" if cfg.keep_first_last else "")
             + (f", FP32 op types {', '.join(types)}" if types else ""))
    return kwargs, about


def quantize_openvino(model, ctx: ExportContext, advance=lambda: None) -> tuple[Any, dict[str, Any]]:
    """NNCF PTQ of an FP32 ov.Model on the calibration images (`advance()` per image NNCF reads); optionally
    accuracy-controlled on the val split."""
    nncf = import_nncf()

    nncf.set_log_level(logging.ERROR)
    cfg = ctx.profile.quantization
    calib = ctx.calibration()
    kwargs, about = nncf_options(model, ctx)

    def calibration_item(i: int) -> np.ndarray:
        advance()
        return calib[i:i + 1]

    dataset = nncf.Dataset(range(len(calib)), calibration_item)
    info: dict[str, Any] = {"quantization": about}
    try:
        if not cfg.accuracy_control:
            with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout holds the CLI's tables
                return nncf.quantize(model, dataset, **kwargs), info
        if ctx.metadata.get("tasks"):  # one argmax over every head's outputs is no accuracy of a multi-head model
            raise EdgeKDError("openvino int8: quantization.accuracy_control scores one argmax over all outputs; a "
                              "multi-head (continual) model's heads are scored apart: turn it off for this model")
        x_val, y_val = ctx.validation()
        starts = list(range(0, len(x_val), 32))  # each batch normalized when read: the split is held uint8

        def accuracy(compiled, items) -> float:
            output = compiled.outputs[0]
            hits = total = 0
            for i in items:
                x, y = x_val[i:i + 32], y_val[i:i + 32]
                pred = np.asarray(compiled(x)[output]).argmax(1)
                hits += int((pred == y).sum())
                total += len(y)
            return hits / max(total, 1)

        with contextlib.redirect_stdout(sys.stderr):
            quantized = nncf.quantize_with_accuracy_control(
                model, calibration_dataset=dataset, validation_dataset=nncf.Dataset(starts, lambda i: x_val[i:i + 32]),
                validation_fn=accuracy, max_drop=cfg.max_drop, drop_type=nncf.DropType.ABSOLUTE, **kwargs)
        # NNCF picks the layers it returns to FP32 on val, the split the ACC gate scores: said where it shows
        info["quantization"] += (f", accuracy-controlled (max val accuracy drop {cfg.max_drop}; tuned on the val "
                                 "split, so the gate's val ACC drop is not an independent estimate: the test "
                                 "figures are)")
        return quantized, info
    except EdgeKDError:
        raise
    except Exception as err:
        raise EdgeKDError(f"openvino int8: NNCF quantization failed: {exception_line(err, 160)}") from None


COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


HEAD_PASS_THROUGH = ("GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "ReduceMean", "Flatten",
                     "Reshape", "Squeeze", "Unsqueeze", "Transpose")
"""Pooling and shape ops that may sit between the last compute op and the one before it (a CNN's pool and flatten)."""


def first_last_compute_nodes(nodes) -> list[str]:
    """Names of the first and last Conv/Gemm/MatMul among an ONNX graph's nodes (topological order), and of the
    pooling/shape ops that feed the last one: ONNX Runtime quantizes a GlobalAveragePool or Flatten on its own, so
    the "FP32" head had still read an 8-bit activation (Flatten -> Q -> DQ -> Gemm); NNCF keeps it FP32."""
    compute = [n for n in nodes if n.op_type in COMPUTE_OPS and n.name]
    names = [n.name for n in compute[:1] + compute[-1:]]
    producers = {out: n for n in nodes for out in n.output}
    feed = compute[-1].input[0] if compute and compute[-1].input else None
    while (n := producers.get(feed)) is not None and n.op_type in HEAD_PASS_THROUGH and n.name:
        names.append(n.name)
        feed = n.input[0] if n.input else None
    return list(dict.fromkeys(names))


def warn_absent_types(key: str, types: list[str], present: set[str], what: str) -> None:
    """One warning for the op types a profile keeps FP32 that this model does not have (a shipped profile may name
    MobileNetV3's HSwish for every model; a typo such as Hswish is found here too)."""
    if absent := [t for t in types if t not in present]:
        shown = sorted(present)[:16]
        warnings.warn(f"{key}: no {', '.join(absent)} {what} (its op types: {', '.join(shown)}"
                      f"{', ...' if len(present) > len(shown) else ''}); nothing kept FP32 for "
                      f"{'it' if len(absent) == 1 else 'them'}", stacklevel=3)


def ort_op_types(options: OnnxQuantization, transformer: bool) -> list[str] | None:
    """The op types ONNX Runtime quantizes: the profile's, else the compute ops for a transformer (its LayerNorm,
    Softmax, residual Add and GELU stay FP32), else None (ONNX Runtime's default set)."""
    if options.op_types is not None:
        return list(options.op_types)
    return list(COMPUTE_OPS) if transformer else None


def ort_quantize_options(model_path: Path, options: OnnxQuantization, keep_first_last: bool,
                         transformer: bool = False) -> dict[str, Any]:
    """onnxruntime.quantization.quantize_static keyword arguments (besides paths and data) from the profile:
    QDQ, int8 weights (per channel or per tensor), uint8 activations, the calibration method, the op types
    quantized (ort_op_types) and the nodes left in FP32 (the first and last compute layers, every node of an
    excluded op type)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.calibrate_method]
    nodes = onnx.load(str(model_path)).graph.node
    from onnxruntime.quantization import registry

    known = {schema.name for schema in onnx.defs.get_all_schemas()}  # + ONNX Runtime's own quantizable ops
    known |= set(registry.IntegerOpsRegistry) | set(registry.QLinearOpsRegistry) | set(registry.QDQRegistry)
    for key, names in (("exclude_op_types", options.exclude_op_types), ("op_types", options.op_types or [])):
        if unknown := [t for t in names if t not in known]:  # a typo had been a card claiming it was kept FP32
            raise EdgeKDError(f"quantization.onnx.{key}: {', '.join(unknown)}: not an ONNX operator type (they are "
                              "spelt as in the ONNX spec, e.g. Conv, Mul, HardSigmoid)")
    warn_absent_types("quantization.onnx.exclude_op_types", options.exclude_op_types, {n.op_type for n in nodes},
                      "node of this graph")
    excluded = first_last_compute_nodes(nodes) if keep_first_last else []
    types = set(options.exclude_op_types)
    excluded += [n.name for n in nodes if n.op_type in types and n.name]
    return {"quant_format": QuantFormat.QDQ, "per_channel": options.per_channel, "reduce_range": options.reduce_range,
            "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "calibrate_method": method,
            "nodes_to_exclude": list(dict.fromkeys(excluded)),
            **({"op_types_to_quantize": op_types} if (op_types := ort_op_types(options, transformer)) else {}),
            **({"extra_options": {"CalibPercentile": 99.999}} if options.calibrate_method == "percentile" else {})}


@contextlib.contextmanager
def quiet_root_logger():
    """Collect what the root logger would print (ONNX Runtime's quantizer writes there, one line per weight) into a
    list instead of stderr; yields that list."""
    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    notes: list[str] = []
    root = logging.getLogger()
    saved, keep = root.handlers[:], Keep(logging.WARNING)
    root.handlers = [keep]
    try:
        yield notes
    finally:
        root.handlers = saved


def quantize_onnx_static(fp32_path: Path, out_path: Path, calib: np.ndarray, scratch: Path,
                         options: OnnxQuantization | None = None, keep_first_last: bool = True,
                         advance=lambda: None, transformer: bool = False):
    """ONNX Runtime static quantization in QDQ format (by default int8 per-channel weights, uint8 activations,
    MinMax; `options`: the profile's quantization.onnx); optionally the first and last compute layers stay FP32;
    `transformer`: only the compute ops are quantized unless the profile lists op types. Returns the quantized
    onnx.ModelProto (as written to `out_path`).

    uint8 activations (U8S8) because ONNX Runtime's x86 kernels are built for them: on this 2-core EPYC (its
    flags list avx512_vnni), int8 activations (S8S8) ran MobileNetV3-Large at 224 px 2.1x slower than FP32
    (14.8 vs 7.0 ms, one thread), U8S8 1.2x faster (5.9 ms); ResNet-18: S8S8 1.3x, U8S8 3.3x faster."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class ImageReader(CalibrationDataReader):
        def __init__(self, images: np.ndarray):
            self.items = iter(images[i:i + 1] for i in range(len(images)))

        def get_next(self):
            x = next(self.items, None)
            if x is None:
                return None
            advance()
            return {INPUT_NAME: x}

    prepared = scratch / "onnx_int8_prepared.onnx"
    with quiet_root_logger() as notes:  # ORT logs a line per weight ("Axis 1 is out-of-range for weight ...")
        try:
            # Shape inference + graph cleanup as ORT recommends before quantizing (skipped if it cannot run).
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        except Exception:
            prepared = fp32_path
        out_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = ort_quantize_options(prepared, options or OnnxQuantization(), keep_first_last, transformer)
        try:
            quantize_static(str(prepared), str(out_path), ImageReader(calib), **kwargs)
        except Exception as err:
            raise EdgeKDError(f"onnx int8: ONNX Runtime quantization failed: {exception_line(err, 160)}") from None
    if notes:  # one warning line, not dozens
        warnings.warn(f"onnxruntime quantization: {len(notes)} note(s) like '{shorten(notes[0], 120)}'", stacklevel=2)
    import onnx

    quantized = onnx.load(str(out_path))
    dequantized = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    if not any(n.op_type in COMPUTE_OPS and len(n.input) > 1 and n.input[1] in dequantized
               for n in quantized.graph.node):  # Q/DQ around a pool alone had passed as an INT8 artifact
        out_path.unlink(missing_ok=True)  # an FP32 graph is no INT8 artifact
        raise EdgeKDError("onnx int8: ONNX Runtime quantized no Conv/Gemm/MatMul weights of this graph (op types "
                          "quantized: "
                          f"{', '.join(kwargs.get('op_types_to_quantize') or ['its default set'])}; "
                          f"{len(kwargs['nodes_to_exclude'])} nodes excluded); check quantization.onnx.op_types")
    return quantized
