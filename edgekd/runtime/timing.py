"""Latency timing shared by the runtime benchmark and `edgekd bench`: warm-up, timed runs, percentiles, peak RSS."""

from __future__ import annotations

import resource
import sys
import time
from typing import Callable

import numpy as np


def latency_stats(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99/mean/min of latency samples in milliseconds (numpy's linear-interpolation percentiles)."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(arr.mean()),
            "min_ms": float(arr.min()), "runs": int(arr.size)}


def time_call(fn: Callable[[], object], warmup: int = 10, min_runs: int = 50, max_runs: int = 2000,
              min_seconds: float = 1.0) -> dict[str, float]:
    """Call `fn` `warmup` times, then time it until both `min_runs` and `min_seconds` are reached. The stats carry
    `first_ms`, the first call alone (an engine that compiles or allocates on first use pays there), which is never
    a sample: with `warmup` 0 it had been one (an OpenVINO compile as p99 191 ms beside 0.27) and first_ms none."""
    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup - 1):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {**latency_stats(samples), "first_ms": first}


def _interleaved_samples(fns: dict[str, Callable[[], object]], rounds: int, samples: dict[str, list[float]]) -> None:
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)


def time_alternating(groups: list[dict[str, Callable[[], object]]], phases: int = 5, warmup: int = 10,
                     rounds: int = 200) -> dict[str, dict]:
    """Groups that must not run interleaved call by call (e.g. two runtimes whose worker threads spin after a call
    and would steal the other's cores) timed in alternating phases: group 1 interleaved, group 2 interleaved, ...
    `phases` times, `rounds` calls of each callable in all (at least one per phase; the remainder goes to the first
    phases: 200 in 3 phases had been 198). A slow drift of the machine's speed then hits every group alike. Each
    name's stats also carry `phase_p50_ms`, the p50 of each phase."""
    names = [n for g in groups for n in g]
    if len(set(names)) != len(names):
        raise ValueError(f"callable names repeat across groups: {names}")
    samples: dict[str, list[float]] = {n: [] for n in names}
    phase_p50: dict[str, list[float]] = {n: [] for n in names}
    phases = max(1, phases)
    base, extra = divmod(max(rounds, phases), phases)
    for phase in range(phases):
        for group in groups:
            for fn in group.values():
                for _ in range(warmup):
                    fn()
            part: dict[str, list[float]] = {n: [] for n in group}
            _interleaved_samples(group, base + (phase < extra), part)
            for n, s in part.items():
                samples[n] += s
                phase_p50[n].append(float(np.median(s)))
    return {n: {**latency_stats(s), "phase_p50_ms": phase_p50[n]} for n, s in samples.items()}


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    On Linux, VmHWM from /proc/self/status: ru_maxrss survives fork + exec, so a subprocess started by a large
    parent would report the parent's size. Elsewhere ru_maxrss (KiB on Linux/BSD, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # closed (a ResourceWarning had been left)
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
