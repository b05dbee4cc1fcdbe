"""The hardware limit: this machine's FP32 GEMM rate (numpy and torch) and a model's achieved fraction of it."""

from __future__ import annotations

import contextlib
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import numpy as np

from edgekd.runtime.timing import time_call

GEMM_SIZES = (512, 1024, 2048)
"""Square FP32 matmul sizes tried; the best one (usually the largest that fits the caches well) is the peak."""


def gemm_peak_fraction(macs_per_image: int | float | None, images_per_s: float | None, peak_gflops: float | None,
                       views: int = 1) -> float | None:
    """Achieved share of the GEMM peak: 2 FLOPs per MAC x MACs x rows per image (TTA views) x images/s / peak."""
    if not macs_per_image or not images_per_s or not peak_gflops:
        return None
    return 2.0 * float(macs_per_image) * views * float(images_per_s) / (float(peak_gflops) * 1e9)


def _gemm_rate(matmul: Callable[[], object], n: int, min_seconds: float) -> dict[str, float]:
    """GFLOP/s of one n x n x n matmul from the median and the fastest of timed calls."""
    stats = time_call(matmul, warmup=2, min_runs=5, max_runs=500, min_seconds=min_seconds)
    flop = 2.0 * n ** 3
    return {"n": n, "gflops_p50": flop / (stats["p50_ms"] * 1e6), "gflops_best": flop / (stats["min_ms"] * 1e6),
            "runs": stats["runs"]}


def measure_gemm_peak(threads: int, sizes: tuple[int, ...] = GEMM_SIZES, min_seconds: float = 0.5,
                      libraries: tuple[str, ...] = ("torch", "numpy")) -> dict:
    """FP32 GEMM GFLOP/s at `threads` threads for each library and size.

    The peak is the median-call rate of the best (library, size): the same statistic (p50) as the model
    throughputs it is compared with, so a busy machine lowers both alike. `gflops_best` (fastest call) is kept too.
    """
    rng = np.random.default_rng(0)
    results = []
    for lib in [lib for lib in libraries if find_spec(lib) is not None]:  # torch only where it is installed
        for n in sizes:
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            if lib == "torch":
                import torch

                torch.set_num_threads(threads)
                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                out = torch.empty(n, n)
                rate = _gemm_rate(lambda: torch.mm(ta, tb, out=out), n, min_seconds)
            elif lib == "numpy":
                out_np = np.empty((n, n), dtype=np.float32)
                with blas_threads(threads):
                    rate = _gemm_rate(lambda: np.matmul(a, b, out=out_np), n, min_seconds)
            else:
                raise ValueError(f"unknown GEMM library '{lib}'")
            results.append({"library": lib, **rate})
    best = max(results, key=lambda r: r["gflops_p50"])
    return {"peak_gflops": best["gflops_p50"], "peak_gflops_best_call": max(r["gflops_best"] for r in results),
            "library": best["library"], "n": best["n"], "threads": threads, "dtype": "float32", "all": results}


def blas_threads(threads: int):
    """numpy's BLAS limited to `threads` (threadpoolctl, a scikit-learn dependency); without threadpoolctl (the
    core install) a no-op: the caller's environment (OMP_NUM_THREADS, set by `edgekd bench`) limits it."""
    if find_spec("threadpoolctl") is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


class OtherCPU:
    """How busy the machine was with OTHER work while a benchmark ran, in cores (0 = quiet).

    Load averages count the benchmark's own threads (a 2-thread run on 2 cores shows a load of ~2 on an idle box),
    so they cannot tell a quiet machine from a busy one. This reads the machine's busy CPU time from /proc/stat
    (user, nice, system, irq, softirq, steal) and subtracts this process's and its waited-for children's CPU time
    (getrusage): the remainder, divided by the wall time, is the other processes' average use. Where /proc/stat or
    getrusage is missing (not Linux), `cores()` returns None.
    """

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def busy_seconds() -> float | None:
        """The machine's busy CPU seconds since boot, all cores, from /proc/stat (None where it is missing)."""
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def own_seconds() -> float:
        """CPU seconds of this process and its waited-for children."""
        import resource

        return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for field in ("ru_utime", "ru_stime"))

    def _snapshot(self) -> tuple[float, float, float] | None:
        import time

        busy = self.busy_seconds()
        return None if busy is None else (time.monotonic(), busy, self.own_seconds())

    def cores(self) -> float | None:
        """Average cores used by other processes since construction."""
        end = self._snapshot()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, others / (end[0] - self.start[0]))
