"""Do OpenVINO CPU settings change its lead over PyTorch eager, and how close to the machine's FP32 peak do both run?
One timm model (initial weights, batch 1, 2 threads, f32 math), compiled under each setting below and timed
against PyTorch eager, side by side, --repeats times; then the same two engines on one large matrix product and
one large 3x3 convolution (the best case for each), so the model's MACs per second read as a share of what the
two cores reach at all.

    .venv/bin/python benchmarks/ov_cpu_config.py [--arch resnet18] [--size 224] [--repeats 2] [--note '...']

p50 ms of 60 calls after 10 warm-up calls. Writes benchmarks/results/ov_cpu_config.json (one record per repeat
and setting, one per peak probe) and prints each line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings

import numpy as np
import openvino as ov
import timm
import torch
from common import RESULTS, results_doc, run_main

from edgekd.fileio import write_json
from edgekd.models.factory import count_macs

BASE = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}
SETTINGS = {
    "latency hint (the runner's)": {**BASE, "PERFORMANCE_HINT": "LATENCY"},
    "latency hint + CPU pinning": {**BASE, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": True},
    "one stream, no hint": {**BASE, "NUM_STREAMS": 1},
    "latency hint + hyper-threading": {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                       "ENABLE_HYPER_THREADING": True},
}
RUNNER = "latency hint (the runner's)"


class MatMul(torch.nn.Module):
    """x @ W: 1024 x 1024 x 1024, 1.07 GMACs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(1024, 1024))

    def forward(self, x):
        return x @ self.w


PROBES = {  # name -> (module, input, MACs)
    "matmul 1024^3": (MatMul, (1024, 1024), 1024 ** 3),
    "conv3x3 256->256 @ 56x56": (lambda: torch.nn.Conv2d(256, 256, 3, padding=1, bias=False), (1, 256, 56, 56),
                                 256 * 256 * 9 * 56 * 56),
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


def eager_and_openvino(model: torch.nn.Module, x: torch.Tensor, config: dict) -> tuple[float, float]:
    """p50 ms of PyTorch eager and of OpenVINO under `config`, timed one after the other."""
    request = ov.Core().compile_model(ov.convert_model(model, example_input=x), "CPU", config).create_infer_request()
    return p50_ms(lambda: model(x)), p50_ms(lambda: request.infer({0: x.numpy()}))


def gmacs(macs: int, ms: float) -> float:
    return macs / ms / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--note", default="", help="how quiet the machine was, kept in the results")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    model = timm.create_model(args.arch, num_classes=2, pretrained=False).eval()
    macs = count_macs(model, (3, args.size, args.size))
    x = torch.randn(1, 3, args.size, args.size)
    ov_model, core = ov.convert_model(model, example_input=x), ov.Core()
    records = []
    with torch.no_grad():
        for rep in range(args.repeats):
            eager = p50_ms(lambda: model(x))
            records.append({"kind": "model", "arch": args.arch, "repeat": rep, "engine": "pytorch eager",
                            "p50_ms": eager, "gmac_per_s": gmacs(macs, eager)})
            print(f"repeat {rep}: PyTorch eager {eager:.2f} ms ({gmacs(macs, eager):.0f} GMAC/s)", flush=True)
            for name, config in SETTINGS.items():
                request = core.compile_model(ov_model, "CPU", config).create_infer_request()
                ms = p50_ms(lambda: request.infer({0: x.numpy()}))
                records.append({"kind": "model", "arch": args.arch, "repeat": rep, "engine": f"openvino: {name}",
                                "p50_ms": ms, "gmac_per_s": gmacs(macs, ms), "vs_eager": eager / ms})
                print(f"repeat {rep}: {name}: {ms:.2f} ms, {eager / ms:.2f}x eager ({gmacs(macs, ms):.0f} GMAC/s)",
                      flush=True)
        for name, (make, shape, probe_macs) in PROBES.items():
            eager, ms = eager_and_openvino(make().eval(), torch.randn(*shape), SETTINGS[RUNNER])
            for engine, t in (("pytorch eager", eager), (f"openvino: {RUNNER}", ms)):
                records.append({"kind": "peak probe", "probe": name, "engine": engine, "p50_ms": t,
                                "gmac_per_s": gmacs(probe_macs, t)})
                print(f"peak probe {name}: {engine} {t:.2f} ms ({gmacs(probe_macs, t):.0f} GMAC/s)", flush=True)
    peak = max(r["gmac_per_s"] for r in records if r["kind"] == "peak probe")
    for r in records:
        r["share_of_peak"] = r["gmac_per_s"] / peak
    command = "python benchmarks/ov_cpu_config.py " + shlex.join(sys.argv[1:])
    write_json(RESULTS / "ov_cpu_config.json", results_doc("ov_cpu_config", command, records, arch=args.arch,
                                                           size=args.size, macs=macs, peak_gmac_per_s=peak,
                                                           notes=[args.note] if args.note else []))
    model_records = [r for r in records if r["kind"] == "model"]
    best = max(model_records, key=lambda r: r["gmac_per_s"])
    eager_best = max(r["gmac_per_s"] for r in model_records if r["engine"] == "pytorch eager")
    print(f"peak {peak:.0f} GMAC/s; {args.arch} best {best['engine']} at {best['share_of_peak']:.0%} of it; 2x its "
          f"fastest eager call would need {2 * eager_best:.0f} GMAC/s ({2 * eager_best / peak:.0%} of the peak)")


if __name__ == "__main__":
    run_main(main)
