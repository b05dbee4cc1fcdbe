"""Batch-1 speed of NNCF INT8 variants of one OpenVINO FP32 IR against that IR (issue 17: INT8 >= 1.5x FP32).

    .venv/bin/python benchmarks/int8_speed.py BUNDLE/openvino/model_fp32.xml [--transformer] [--threads 2]

Each variant is `nncf.quantize` of the IR with its preset and ignored scope (fast bias correction, seeded random
calibration inputs: speed does not depend on the calibration values), compiled for the CPU at the profile's FP32
precision hint; FP32 and INT8 are timed in alternating blocks (the export's speed check does the same). Prints a
markdown table with the command, date and machine; accuracy is not measured here (the export's gate does that).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np

from common import existing_path, machine, machine_line, now, run_main  # noqa: E402

from edgekd.host import cpu_info  # noqa: E402


def transformer_variants(model, ends: list[str]) -> dict[str, dict]:
    """The export's transformer scheme (NNCF ModelType.TRANSFORMER) and what might speed it up without VNNI.
    OpenVINO fuses a timm ViT's attention into ScaledDotProductAttention ops, so its MatMuls are the linear layers:
    there are no attention MatMuls to leave in FP32."""
    import nncf

    mixed, perf, kind = nncf.QuantizationPreset.MIXED, nncf.QuantizationPreset.PERFORMANCE, nncf.ModelType.TRANSFORMER
    return {
        "transformer scheme, first/last FP32 (the export's default for attention models)": dict(
            preset=mixed, model_type=kind, ignored_scope=nncf.IgnoredScope(names=ends)),
        "transformer scheme, performance preset": dict(preset=perf, model_type=kind, ignored_scope=nncf.IgnoredScope(names=ends)),
        "transformer scheme, every MatMul quantized (patch embedding and head too)": dict(preset=mixed, model_type=kind),
        "CNN scheme (no model_type), first/last FP32": dict(preset=mixed, ignored_scope=nncf.IgnoredScope(names=ends)),
    }


def variants(model, transformer: bool = False) -> dict[str, dict]:
    """Variant -> nncf.quantize keywords. The export's default keeps the first and last conv in FP32."""
    import nncf

    convs = [op.get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]
    ends = [convs[0], convs[-1]]
    if transformer:
        return transformer_variants(model, ends)
    mixed, perf = nncf.QuantizationPreset.MIXED, nncf.QuantizationPreset.PERFORMANCE
    return {
        "mixed preset, first/last conv FP32 (the export's default)": dict(preset=mixed, ignored_scope=nncf.IgnoredScope(names=ends)),
        "performance preset (symmetric activations), first/last FP32": dict(preset=perf, ignored_scope=nncf.IgnoredScope(names=ends)),
        "mixed, every conv quantized": dict(preset=mixed),
        "mixed, squeeze-excite ops FP32 (Sigmoid, Multiply, ReduceMean)": dict(
            preset=mixed, ignored_scope=nncf.IgnoredScope(names=ends, types=["Multiply", "Sigmoid", "ReduceMean"], validate=False)),
        "mixed, Swish FP32": dict(preset=mixed, ignored_scope=nncf.IgnoredScope(names=ends, types=["Swish"], validate=False)),
    }


def p50_ms(compiled, x: np.ndarray, calls: int) -> float:
    for _ in range(3):
        compiled(x)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        compiled(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xml", type=existing_path, help="an OpenVINO FP32 IR (a bundle's openvino/model_fp32.xml)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=int, default=32, help="random calibration inputs")
    parser.add_argument("--phases", type=int, default=5, help="alternating FP32/INT8 blocks per variant")
    parser.add_argument("--calls", type=int, default=40, help="timed calls per block")
    parser.add_argument("--transformer", action="store_true", help="variants of the transformer scheme (ViT)")
    args = parser.parse_args()
    import nncf
    import openvino as ov

    core = ov.Core()
    fp32 = core.read_model(args.xml)
    shape = [1] + [d.get_length() for d in list(fp32.inputs[0].get_partial_shape())[1:]]
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(args.calib)]
    config = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    base = core.compile_model(fp32, "CPU", config)
    rows = []
    for name, kwargs in variants(fp32, args.transformer).items():
        quantized = nncf.quantize(fp32, nncf.Dataset(calib), subset_size=args.calib, fast_bias_correction=True, **kwargs)
        compiled = core.compile_model(quantized, "CPU", config)
        f, i = zip(*[(p50_ms(base, calib[0], args.calls), p50_ms(compiled, calib[0], args.calls))
                     for _ in range(args.phases)])
        rows.append(f"| {name} | {np.median(f):.1f} | {np.median(i):.1f} | {np.median(f) / np.median(i):.2f}x |")
        print(rows[-1], flush=True)
    command = shlex.join([".venv/bin/python", "benchmarks/int8_speed.py", *sys.argv[1:]])
    print(f"\n`{command}` ({now()}; {machine_line(machine())}, SIMD {', '.join(cpu_info()['simd'] or ['not read'])}; "
          f"batch 1, {args.threads} threads, median of {args.phases} alternating blocks of {args.calls} calls)\n")
    print("| variant | FP32 p50 ms | INT8 p50 ms | INT8 vs FP32 |\n|---|---:|---:|---:|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    run_main(main)
