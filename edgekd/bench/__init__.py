"""Benchmarks of checkpoints and bundles: latency percentiles, throughput, size, RSS, accuracy, the GEMM peak.

Imports are lazy: `python -m edgekd.bench.worker` measures ONNX Runtime/OpenVINO rows in a process without torch.
"""

from __future__ import annotations

__all__ = ["VARIANTS", "BenchConfig", "BenchResult", "Timing", "check_source", "command_line", "default_bench_out",
           "gemm_over_peak_note", "gemm_peak_fraction", "gemm_spread_note", "measure_gemm_peak", "records_table", "run_bench"]


def __getattr__(name: str):
    if name in ("VARIANTS", "BenchConfig", "BenchResult", "Timing", "check_source", "command_line", "default_bench_out",
                "run_bench"):
        from edgekd.bench import run

        return getattr(run, name)
    if name in ("gemm_peak_fraction", "measure_gemm_peak"):
        from edgekd.bench import hardware

        return getattr(hardware, name)
    if name in ("gemm_over_peak_note", "gemm_spread_note", "records_table"):
        from edgekd.bench import report

        return getattr(report, name)
    raise AttributeError(f"module 'edgekd.bench' has no attribute {name!r}")
