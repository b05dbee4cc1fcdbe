"""Do OpenVINO CPU settings change its lead over PyTorch eager? One timm model (initial weights, batch 1, 2 threads,
f32 math), compiled under each setting below and timed against PyTorch eager, side by side, --repeats times.

    .venv/bin/python benchmarks/ov_cpu_config.py [--arch resnet18] [--size 224] [--repeats 2]

Prints p50 ms (60 calls after 10 warm-up calls) per setting and its ratio to eager, per repeat.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import openvino as ov
import timm
import torch

BASE = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}
SETTINGS = {
    "latency hint (the runner's)": {**BASE, "PERFORMANCE_HINT": "LATENCY"},
    "latency hint + CPU pinning": {**BASE, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": True},
    "one stream, no hint": {**BASE, "NUM_STREAMS": 1},
    "latency hint + hyper-threading": {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                       "ENABLE_HYPER_THREADING": True},
}


def p50_ms(fn, calls: int = 60, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    model = timm.create_model(args.arch, num_classes=2, pretrained=False).eval()
    x = torch.randn(1, 3, args.size, args.size)
    ov_model, core = ov.convert_model(model, example_input=x), ov.Core()
    with torch.no_grad():
        for rep in range(args.repeats):
            eager = p50_ms(lambda: model(x))
            print(f"repeat {rep}: PyTorch eager {eager:.2f} ms", flush=True)
            for name, config in SETTINGS.items():
                request = core.compile_model(ov_model, "CPU", config).create_infer_request()
                ms = p50_ms(lambda: request.infer({0: x.numpy()}))
                print(f"repeat {rep}: {name}: {ms:.2f} ms, {eager / ms:.2f}x eager", flush=True)


if __name__ == "__main__":
    main()
