"""Peak memory of a training stage's loop, for the stage's metrics (`train_metrics.json`)."""

from __future__ import annotations

import resource
import sys
import threading

import psutil
import torch

MIB = 1024 * 1024


def lifetime_peak_rss() -> int:
    """Bytes: the highest resident set size this process has had since it started (getrusage's
    ru_maxrss, kept by the kernel; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Context manager: the peak memory while its block runs, as `metrics()`.

    `peak_rss_mb` is the process's highest resident set size during the block. When the block
    raises the process-lifetime peak (`lifetime_peak_rss`) that exact peak is it; when it stays
    under an earlier one (a process that ran other work first) it is the highest of the RSS samples
    a daemon thread takes every `interval_s`, which can miss a spike shorter than the interval.
    Where CUDA is available, `gpu_peak_allocated_mb` / `gpu_peak_reserved_mb` are torch's peak
    allocated / reserved memory on the current device since the block began (the peak statistics
    are reset at its start). With several processes all numbers are this process's own.
    """

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._sampled_peak = 0
        self._peak_before = 0
        self._peak_after = 0

    def __enter__(self) -> PeakMemory:
        self._peak_before = lifetime_peak_rss()
        self._sampled_peak = self._process.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()
        self._sampled_peak = max(self._sampled_peak, self._process.memory_info().rss)
        self._peak_after = lifetime_peak_rss()

    def _sample(self) -> None:
        while not self._done.wait(self.interval_s):
            self._sampled_peak = max(self._sampled_peak, self._process.memory_info().rss)

    def metrics(self) -> dict[str, float]:
        """peak_rss_mb, and the gpu_peak_* numbers where CUDA is available (MiB)."""
        rss = self._peak_after if self._peak_after > self._peak_before else self._sampled_peak
        out = {"peak_rss_mb": round(rss / MIB, 1)}
        if torch.cuda.is_available():
            out["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
            out["gpu_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved() / MIB, 1)
        return out
