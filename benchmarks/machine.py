"""The machine a benchmark ran on, recorded beside its figures: CPU, cores, memory, GPU, versions and load.

The load average is part of the record because other jobs on a shared machine skew every timing.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from corpus import fail  # benchmarks/ is on sys.path when a script there runs
from shards.loader import dali_available


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return None


def machine_info(load_before: list[float]) -> dict:
    """The machine and its load average when the benchmark started (`load_before`) and now."""
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    dali = None
    if dali_available():
        import nvidia.dali

        dali = nvidia.dali.__version__
    return {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "total_cores": os.cpu_count(),
            "memory_gib": memory_kib // 1024 ** 2, "gpu": _gpu_name(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "dali": dali,
            "ray": metadata.version("ray"), "load_average_before": load_before, "load_average_after": load_average()}


def machine_label(m: dict) -> str:
    """One line for a figure's title: CPU, usable cores, GPU."""
    return f"{m['cpu'][:40]}, {m['cores']} cores" + (f", {m['gpu']}" if m.get("gpu") else "")


def gpu_count() -> int:
    """The CUDA GPUs torch sees; exits with what to fix when there is none (a GPU run was asked for)."""
    if not torch.cuda.is_available():
        fail(f"error: --device gpu, but torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is "
             "False); run on a GPU machine (benchmarks/gpu.sh) or with --device cpu")
    return torch.cuda.device_count()
