"""The machine a run or benchmark ran on: CPU model, cores, the SIMD features that decide kernel speed, GPU, versions.

Torch-free (torch's version and GPU are read only when torch is installed): training records it in metrics.json,
`edgekd bench` and the benchmarks in their results.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path

INT8_DOT_PRODUCT = ("avx512_vnni", "avx_vnni", "amx_int8")
"""CPU flags of INT8 dot-product instructions (VNNI, AMX): what makes INT8 kernels pay on x86."""


def cpu_info() -> dict:
    """CPU model, the cores this process may use, and the SIMD features that decide FP32/INT8 kernel speed (AVX2/FMA,
    AVX-512, VNNI, AMX). `simd` and `int8_dot_product` are None where the flags cannot be read (no /proc/cpuinfo
    flags line: macOS, Windows, ARM): unknown, not "none" (a VNNI machine's export had recorded no VNNI)."""
    model, flags = "", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and flags is None:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if not model and sys.platform == "darwin":  # platform.processor() says only "arm" or "i386" there
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=5).stdout.strip()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"model": model or platform.processor() or "", "cores": usable_cores(), "machine": platform.machine(),
            "simd": None if flags is None else [f for f in wanted if f in flags],
            "int8_dot_product": None if flags is None else any(f in flags for f in INT8_DOT_PRODUCT)}


def usable_cores() -> int:
    """The cores this process may run on (CPU affinity: taskset, a container's cpuset), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def host_record(**extra) -> dict:
    """{"cpu", "cores", "arch", "simd" (None: not read, another arch or OS), "gpu" (None: none), "python", "torch"
    (None: not installed)} + `extra`: the machine dict of metrics.json and of every benchmark results file
    (benchmarks/schema.py). Seconds per epoch and seeded float sums depend on it: two VMs both named "AMD EPYC",
    one with AVX-512 VNNI and one AVX2-only, ran one seeded command to different figures."""
    gpu, torch_version = None, None
    try:
        import torch

        torch_version = torch.__version__.split("+")[0]
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    x86 = platform.machine().lower() in ("x86_64", "amd64") and os.path.exists("/proc/cpuinfo")
    info = cpu_info()
    return {"cpu": info["model"], "cores": info["cores"], "arch": platform.machine(),
            "simd": info["simd"] if x86 else None, "gpu": gpu, "python": platform.python_version(),
            "torch": torch_version, **extra}
