"""INT8 post-training quantization: NNCF on the OpenVINO model, ONNX Runtime static QDQ on the ONNX graph."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgekd.errors import EdgeKDError
from edgekd.export.artifact import INPUT_NAME, ExportContext
from edgekd.progress import progress_task


def is_transformer(model: nn.Module) -> bool:
    """Attention layers (timm's Attention, nn.MultiheadAttention) call for NNCF's transformer scheme."""
    from timm.layers import Attention

    return any(isinstance(m, (Attention, nn.MultiheadAttention)) for m in model.modules())


def calibration_progress(ctx: ExportContext, label: str):
    """A progress task over the calibration images of `label`'s INT8 pass; yields its advance()."""
    return progress_task(ctx.progress, f"{label}: calibration", len(ctx.calibration()))


def quantize_openvino(model, ctx: ExportContext, advance=lambda: None) -> tuple[Any, dict[str, Any]]:
    """NNCF PTQ of an FP32 ov.Model on the calibration images (`advance()` per image NNCF reads); optionally
    accuracy-controlled on the val split."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    cfg = ctx.profile.quantization
    calib = ctx.calibration()
    transformer = cfg.model_type == "transformer" or (cfg.model_type == "auto" and is_transformer(ctx.model))
    kwargs: dict[str, Any] = {"subset_size": len(calib), "fast_bias_correction": cfg.fast_bias_correction,
                              "preset": (nncf.QuantizationPreset.MIXED if cfg.preset == "mixed"
                                         else nncf.QuantizationPreset.PERFORMANCE)}
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if cfg.keep_first_last:
        compute = [op.get_friendly_name() for op in model.get_ordered_ops()
                   if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]
        if compute:
            kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(dict.fromkeys(compute[:1] + compute[-1:])))
    def calibration_item(i: int) -> np.ndarray:
        advance()
        return calib[i:i + 1]

    dataset = nncf.Dataset(range(len(calib)), calibration_item)
    info: dict[str, Any] = {"quantization": f"nncf {nncf.__version__} PTQ ({cfg.preset} preset) on {len(calib)} "
                                            "training images"
                                            + (" (transformer scheme)" if transformer else "")
                                            + ("" if cfg.fast_bias_correction else ", full bias correction")
                                            + (", first and last layers FP32" if cfg.keep_first_last else "")}
    try:
        if not cfg.accuracy_control:
            return nncf.quantize(model, dataset, **kwargs), info
        x_val, y_val = ctx.validation()
        batches = [(x_val[i:i + 32], y_val[i:i + 32]) for i in range(0, len(x_val), 32)]

        def accuracy(compiled, items) -> float:
            output = compiled.outputs[0]
            hits = total = 0
            for x, y in items:
                pred = np.asarray(compiled(x)[output]).argmax(1)
                hits += int((pred == y).sum())
                total += len(y)
            return hits / max(total, 1)

        quantized = nncf.quantize_with_accuracy_control(
            model, calibration_dataset=dataset, validation_dataset=nncf.Dataset(batches, lambda item: item[0]),
            validation_fn=accuracy, max_drop=cfg.max_drop, drop_type=nncf.DropType.ABSOLUTE, **kwargs)
        info["quantization"] += f", accuracy-controlled (max val accuracy drop {cfg.max_drop})"
        return quantized, info
    except EdgeKDError:
        raise
    except Exception as err:
        raise EdgeKDError(f"openvino int8: NNCF quantization failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160] if str(err) else ''}") from None


COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


def first_last_compute_nodes(model_path: Path) -> list[str]:
    """Names of the first and last Conv/Gemm/MatMul in (topological) graph order."""
    import onnx

    names = [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type in COMPUTE_OPS and n.name]
    return list(dict.fromkeys(names[:1] + names[-1:]))


def quantize_onnx_static(fp32_path: Path, out_path: Path, calib: np.ndarray, scratch: Path,
                         keep_first_last: bool = True, advance=lambda: None) -> None:
    """ONNX Runtime static quantization in QDQ format (int8 per-channel weights, uint8 activations, MinMax);
    optionally the first and last compute layers stay FP32.

    uint8 activations (U8S8) because ONNX Runtime's x86 kernels are built for them: on this 2-core EPYC (its
    flags list avx512_vnni), int8 activations (S8S8) ran MobileNetV3-Large at 224 px 2.1x slower than FP32
    (14.8 vs 7.0 ms, one thread), U8S8 1.2x faster (5.9 ms); ResNet-18: S8S8 1.3x, U8S8 3.3x faster."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
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
    try:
        # Shape inference + graph cleanup as ORT recommends before quantizing (skipped if it cannot run).
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
    except Exception:
        prepared = fp32_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        quantize_static(str(prepared), str(out_path), ImageReader(calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=first_last_compute_nodes(prepared) if keep_first_last else [])
    except Exception as err:
        raise EdgeKDError(f"onnx int8: ONNX Runtime quantization failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160] if str(err) else ''}") from None
