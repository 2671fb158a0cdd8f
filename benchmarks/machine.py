"""What the benchmarks say about the machine their figures were taken on."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any, Dict, Optional


def cpu_name() -> str:
    """Return the CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[list]:
    """Return the 1, 5 and 15 minute load averages, where the system reports them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def describe(device: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
    """Describe where the numbers were taken: date, Python, torch, CPU, cores, threads, load, device."""
    import torch

    out: Dict[str, Any] = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        python=platform.python_version(),
        torch=torch.__version__,
        cpu=cpu_name(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_average=load_average(),
    )
    if device is not None:
        out["device"] = str(device)
        if str(device).startswith("cuda"):
            out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    out.update(extra)
    return out
