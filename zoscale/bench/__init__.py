"""Benchmarks that write reports; each report names the hardware it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_description() -> str:
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model or platform.machine()}, {os.cpu_count()} cores"


def device_description(device: torch.device | None = None) -> str:
    """The GPU's name when the run uses one, else the CPU's."""
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.cuda.get_device_name(device)
    return cpu_description()
