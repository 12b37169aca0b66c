"""When a timing is unreliable: what the suites record while they time (:class:`Stopwatch`), the two rules every
suite applies, and how a ratio inherits them.

* **contended** -- other processes used more than ``CONTENDED`` (10%) of a core, on average, during the timed
  calls: ``sum(other_cpu_s) > CONTENDED * sum(times_s)``. ``other_cpu_s`` is the system-wide busy CPU time
  during a call minus this process's (:class:`Stopwatch`). On a small machine an OpenMP team
  whose core is taken by another job slows down many-fold, so such times are not comparable.
* **noisy** -- the per-call times of one measurement spread by more than ``SPREAD`` (1.5x):
  ``max(times_s) / min(times_s) > SPREAD``. This catches what the contention counter misses (stolen time that
  the hypervisor does not report, memory-bandwidth or thermal throttling, a GPU shared with another job): the
  12.9x ratio that motivated it had per-call times of 8.0 / 91.1 / 128.6 s. One call has no spread (``None``,
  never noisy).

A ratio ``ours / peft`` is contended (noisy) when either of its two sides is. Tables print ``MARK_CONTENDED``
(`` *``) and ``MARK_NOISY`` (`` ~``) after such figures and end with :func:`footnotes`; the JSON carries
``<name>_contended``, ``<name>_spread`` and ``<name>_noisy`` beside each time ratio ``<name>_ratio`` (see
:func:`ratio_flags`), which :mod:`loraga_fast.bench.plots` hatches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import psutil

__all__ = [
    "CONTENDED",
    "MARK_CONTENDED",
    "MARK_NOISY",
    "SPREAD",
    "Stopwatch",
    "busy_cpu_s",
    "footnotes",
    "is_contended",
    "is_noisy",
    "marks",
    "ratio_flags",
    "spread",
]

CONTENDED = 0.1
"""A timing is contended when other processes used more than this fraction of a core during the timed calls."""
SPREAD = 1.5
"""A timing is noisy when its slowest call took more than this many times its fastest."""
MARK_CONTENDED = " *"
MARK_NOISY = " ~"


def busy_cpu_s() -> float:
    """System-wide non-idle CPU seconds so far, all cores (stolen time counts as busy)."""
    t = psutil.cpu_times()
    return sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


class Stopwatch:
    """Times its ``with`` block: wall time (``time_s``), this process's CPU time over all threads (``cpu_s``) and
    the CPU time the rest of the machine used meanwhile (``other_cpu_s``: system-wide busy time, hypervisor steal
    included, minus ``cpu_s``; far from 0 means other work competed for the cores). :meth:`elapsed` reads the
    wall time inside the block."""

    time_s: float
    cpu_s: float
    other_cpu_s: float

    def __enter__(self) -> Stopwatch:
        self._busy, self._cpu, self._start = busy_cpu_s(), time.process_time(), time.perf_counter()
        return self

    def elapsed(self) -> float:
        """Wall seconds since the block began."""
        return time.perf_counter() - self._start

    def __exit__(self, *exc: object) -> None:
        self.time_s = self.elapsed()
        self.cpu_s = time.process_time() - self._cpu
        self.other_cpu_s = max(busy_cpu_s() - self._busy - self.cpu_s, 0.0)


def is_contended(times_s: Sequence[float] | None, other_cpu_s: Sequence[float] | None) -> bool:
    """True when other processes used more than ``CONTENDED`` of a core, on average, over the calls timed in
    ``times_s`` (``other_cpu_s``: their CPU seconds during each call). No times: False."""
    times, others = list(times_s or []), list(other_cpu_s or [])
    return bool(times) and sum(others) > CONTENDED * sum(times)


def spread(times_s: Sequence[float] | None) -> float | None:
    """``max / min`` of the per-call times; None for fewer than two calls (or a non-positive time)."""
    times = list(times_s or [])
    if len(times) < 2 or min(times) <= 0:
        return None
    return max(times) / min(times)


def is_noisy(times_s: Sequence[float] | None) -> bool:
    """True when the per-call times spread by more than ``SPREAD`` (see :func:`spread`)."""
    s = spread(times_s)
    return s is not None and s > SPREAD


def ratio_flags(name: str, *sides: dict[str, Any]) -> dict[str, Any]:
    """The flags of the time ratio ``<name>_ratio`` between ``sides`` (dicts with ``times_s`` and ``other_cpu_s``,
    e.g. :func:`loraga_fast.bench.measure.measure` results): ``<name>_contended`` and ``<name>_noisy`` (True when any
    side is), ``<name>_spread`` (the largest side's spread, None when no side has two calls)."""
    spreads = [s for s in (spread(side.get("times_s")) for side in sides) if s is not None]
    return {
        f"{name}_contended": any(is_contended(side.get("times_s"), side.get("other_cpu_s")) for side in sides),
        f"{name}_spread": max(spreads) if spreads else None,
        f"{name}_noisy": any(is_noisy(side.get("times_s")) for side in sides),
    }


def marks(contended: bool, noisy: bool = False) -> str:
    """The suffix a table prints after a flagged figure: ``" *"``, ``" ~"``, ``" * ~"`` or ``""``."""
    return (MARK_CONTENDED if contended else "") + (MARK_NOISY if noisy else "")


def footnotes(contended: bool, noisy: bool = False) -> list[str]:
    """The lines explaining the marks that a table used."""
    lines = []
    if contended:
        lines.append(f"{MARK_CONTENDED.strip()} contended: other processes used more than {CONTENDED:.0%} of a core "
                     "during these timed calls (other_cpu_s in the JSON); a ratio is marked when either side is")
    if noisy:
        lines.append(f"{MARK_NOISY.strip()} noisy: the slowest timed call took more than {SPREAD:g}x the fastest "
                     "(times_s in the JSON); a ratio is marked when either side is")
    if lines:
        lines.append("marked figures are unreliable: rerun on an idle machine")
    return lines
