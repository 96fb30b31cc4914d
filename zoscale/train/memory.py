"""Memory as nvidia-smi sees it (NVML) and as the allocator sees it, per rank.

A `MemorySampler` thread records, every `interval_s`: the device's used memory and this process's
used memory (NVML), and the host RSS (psutil, for CPU offload). `phase(name)` marks what the step is
doing (perturbation, forward, update, evaluation) and records the torch allocator's peak within
it. Without NVML (no driver, no GPU) it says so once and keeps the host and allocator data.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import psutil
import torch

GIB = 2**30


def _nvml_handle(device_index: int):
    """An NVML device handle, or (None, reason)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index), None
    except Exception as e:  # pynvml.NVMLError_LibraryNotFound and friends: no driver here
        return None, None, f"{type(e).__name__}: {e}"


class MemorySampler:
    def __init__(self, interval_s: float = 0.05, device_index: int | None = None):
        self.interval_s = interval_s
        index = device_index if device_index is not None else (torch.cuda.current_device()
                                                                 if torch.cuda.is_available() else 0)
        self.nvml, self.handle, self.nvml_missing = _nvml_handle(index)
        self.process = psutil.Process(os.getpid())
        self.samples: list[dict] = []
        self.allocator_peaks: dict[str, float] = {}
        self.current_phase = "idle"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.time()

    # -- sampling -------------------------------------------------------------------------------
    def sample(self) -> dict:
        record = {"t": time.time() - self._start, "phase": self.current_phase,
                  "host_rss": self.process.memory_info().rss}
        if self.handle is not None:
            record["device_used"] = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used
            record["process_used"] = next((p.usedGpuMemory or 0 for p in
                                           self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                                           if p.pid == os.getpid()), 0)
        if torch.cuda.is_available():
            record["allocated"] = torch.cuda.memory_allocated()
            record["reserved"] = torch.cuda.memory_reserved()
        self.samples.append(record)
        return record

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> MemorySampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="zoscale-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Tag samples with ``name`` and record the allocator's peak inside it."""
        previous, self.current_phase = self.current_phase, name
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            self.sample()  # every phase holds at least one sample, however short it was
            if torch.cuda.is_available():
                peak = torch.cuda.max_memory_allocated()
                self.allocator_peaks[name] = max(self.allocator_peaks.get(name, 0), peak)
            self.current_phase = previous

    def summary(self) -> dict[str, float]:
        """memory/* metrics: peaks over the samples so far (GiB)."""
        out = aggregate(self.samples)
        out.update({f"memory/allocated_peak_{k}_gib": v / GIB for k, v in self.allocator_peaks.items()})
        return out


def aggregate(samples: list[dict]) -> dict[str, float]:
    """Peaks of recorded samples, overall and per phase, in GiB (keys present only when measured)."""
    out: dict[str, float] = {}
    for key, name in (("device_used", "nvml_device_used"), ("process_used", "nvml_process_used"),
                      ("host_rss", "host_rss"), ("allocated", "allocated"), ("reserved", "reserved")):
        values = [s[key] for s in samples if key in s]
        if values:
            out[f"memory/{name}_peak_gib"] = max(values) / GIB
            for phase in sorted({s["phase"] for s in samples if key in s}):
                peak = max(s[key] for s in samples if key in s and s["phase"] == phase)
                out[f"memory/{name}_peak_{phase}_gib"] = peak / GIB
    return out
