"""Extra peak memory of a block of code: :class:`MemoryProbe` and its :class:`MemoryReading`.

How far memory rose above its level just before the block, at its highest during the block:

* CPU: process RSS, sampled by a background thread (psutil, every ~1 ms) and at both ends of the block, minus
  the RSS just before it (call ``gc.collect()`` before entering). Cross-checked with
  ``getrusage(RUSAGE_SELF).ru_maxrss``, the process's RSS high-water mark, which is only meaningful when it rose
  during the block (``maxrss_valid``). Freed memory that the allocator keeps makes RSS growth on a later call an
  underestimate, so measure a call that is the first of its kind in a fresh process.
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the block. Exact and cheap.
"""

from __future__ import annotations

import resource
import sys
import threading
from dataclasses import dataclass

import psutil
import torch

__all__ = ["MemoryProbe", "MemoryReading"]


@dataclass
class MemoryReading:
    """Extra peak memory of one call.

    Attributes:
        method: ``"rss"`` (CPU, sampled process RSS) or ``"cuda_allocated"`` (CUDA caching allocator).
        baseline_bytes: memory just before the call.
        peak_bytes: highest memory seen during the call.
        peak_extra_bytes: ``peak_bytes - baseline_bytes``.
        num_samples: RSS samples taken (CPU only).
        maxrss_extra_bytes: ``ru_maxrss`` after the call minus ``baseline_bytes`` (CPU only).
        maxrss_valid: whether ``ru_maxrss`` rose during the call, i.e. the high-water mark belongs to the call
            (CPU only). When False, ``maxrss_extra_bytes`` is only an upper bound.
    """

    method: str
    baseline_bytes: int
    peak_bytes: int
    peak_extra_bytes: int
    num_samples: int = 0
    maxrss_extra_bytes: int | None = None
    maxrss_valid: bool | None = None


def _maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class _RssSampler(threading.Thread):
    """Background thread recording the highest RSS of this process, read every ``interval_s``."""

    def __init__(self, interval_s: float):
        super().__init__(name="rss-sampler", daemon=True)
        self.interval_s = interval_s
        self.peak = 0
        self.num_samples = 0
        self._process = psutil.Process()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = self._process.memory_info().rss
            self.peak = max(self.peak, rss)
            self.num_samples += 1
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class MemoryProbe:
    """Context manager measuring the extra peak memory of its body on ``device`` (see the module docstring).

    The reading is in :attr:`reading` after the ``with`` block. On CPU, call ``gc.collect()`` before entering so
    the baseline holds no garbage.
    """

    def __init__(self, device: torch.device, interval_s: float = 1e-3):
        self.device = device
        self.interval_s = interval_s
        self.reading: MemoryReading | None = None
        self._baseline = 0
        self._maxrss_before = 0
        self._sampler: _RssSampler | None = None

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def __enter__(self) -> MemoryProbe:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._maxrss_before = _maxrss_bytes()
            self._baseline = psutil.Process().memory_info().rss
            self._sampler = _RssSampler(self.interval_s)
            self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.reading = MemoryReading(method="cuda_allocated", baseline_bytes=self._baseline, peak_bytes=peak,
                                         peak_extra_bytes=peak - self._baseline)
            return
        assert self._sampler is not None
        self._sampler.stop()
        final = psutil.Process().memory_info().rss
        peak = max(self._sampler.peak, final, self._baseline)
        maxrss_after = _maxrss_bytes()
        self.reading = MemoryReading(
            method="rss", baseline_bytes=self._baseline, peak_bytes=peak, peak_extra_bytes=peak - self._baseline,
            num_samples=self._sampler.num_samples + 2, maxrss_extra_bytes=maxrss_after - self._baseline,
            maxrss_valid=maxrss_after > self._maxrss_before,
        )
