"""The passes every mode shares: capture passes into a store, reductions, and the checks between.

:func:`run_passes` calls ``train_step`` once per pass the store needs (exact mode: one; low-memory mode: one per
power iteration) with the targets routed through the capture op, reduces the store over ranks after each pass,
and checks every pass (finite values; in later passes, the same backward passes and data as the first).
:func:`summarize` then tells which layers saw a backward pass and which have an all-zero gradient.

Before each later pass the global random states (torch CPU and CUDA, ``random``, numpy) are put back as they were
before the first one, so dropout masks and a shuffling ``DataLoader`` (seeded from torch's generator) repeat.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..distributed.dtensor import local_tensor
from ..distributed.guard import StepGuard
from ..errors import UsageError
from ..layers.capture import CaptureSession, Slot
from ..layers.kinds import weight_layout_transposed, weight_shape
from ..layers.targets import check_ranks, short_list
from ..stores.base import GradientSource, Store
from ..stores.factors import check_finite
from .convergence import Converged, ConvergenceMonitor, StopRule

__all__ = ["FINGERPRINT_RTOL", "Progress", "RandomState", "run_passes", "summarize"]

FINGERPRINT_RTOL = 1e-3  # allowed relative change of a pass fingerprint between passes (floating-point noise)

_HOW_TO_FIX = (
    "In low-memory mode preprocess_loraga calls train_step once per pass, and every call must run the same batches "
    "(for example by iterating over a list or a DataLoader created again inside train_step, not over a shared iterator "
    "or generator); the random state is reset before each pass, so dropout and shuffling repeat. Or use mode='exact', "
    "which runs train_step once."
)


class Progress:
    """tqdm bar over backward passes (the most any target has seen, over all passes), shown when a total is known
    or asked for."""

    def __init__(self, total: int | None, enabled: bool | None, passes: int = 1):
        self.bar = None
        self.offset = 0
        if enabled or (enabled is None and total is not None):
            from tqdm.auto import tqdm

            desc = "LoRA-GA gradient estimation" + (f" ({passes} passes)" if passes > 1 else "")
            self.bar = tqdm(total=total * passes if total is not None else None, desc=desc, unit="backward")

    @property
    def callback(self) -> Callable[[Slot], None] | None:
        """What the capture session calls after each backward pass (None when no bar is shown)."""
        return self._on_backward if self.bar is not None else None

    def begin_pass(self) -> None:
        if self.bar is not None:
            self.offset = self.bar.n

    def _on_backward(self, slot: Slot) -> None:
        assert self.bar is not None
        if self.offset + slot.count > self.bar.n:
            self.bar.update(self.offset + slot.count - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RandomState:
    """The global random states a ``train_step`` may draw from, captured once and put back before each pass."""

    def __init__(self) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.python = random.getstate()
        numpy = sys.modules.get("numpy")
        self.numpy = numpy.random.get_state() if numpy is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)


def run_passes(model: nn.Module, targets: Sequence[tuple[str, nn.Module]], store: Store,
               train_step: Callable[[], None], *, ranks: Mapping[str, int], process_group: Any = None,
               guard_group: Any = None, num_batches: int | None = None, progress: bool | None = None,
               stop: StopRule | None = None, watch_ranks: Mapping[str, int] | None = None,
               min_rank: int | None = None) -> ConvergenceMonitor | None:
    """Run ``train_step`` ``store.passes`` times with ``targets`` routed into ``store``, reducing and checking each pass.

    Args:
        ranks: each target's LoRA rank (checked against its shape after the first pass when more passes follow).
        process_group: the process group the store is reduced over after each pass (data parallel).
        guard_group: when set (FSDP-sharded models), every pass runs under a
            :class:`~loraga_fast.distributed.guard.StepGuard` over this process group, so processes running different
            numbers of forwards raise instead of hanging.
        stop: ``until="converged"`` (a store of one pass: exact mode, or one-pass low-memory mode): a
            :class:`~loraga_fast.core.convergence.ConvergenceMonitor` checks LoRA-GA's directions every few backward
            passes and ends ``train_step`` at the start of a forward once they have converged (every rank at the
            same pass; distributed, ranks must then run the same number of forwards). The store then holds the
            passes actually run.
        watch_ranks, min_rank: with ``stop`` and a rank budget: the largest rank each layer may get (default
            ``ranks``) and the smallest; the monitor measures every rank between.

    Returns:
        The monitor (its checks and whether it stopped ``train_step``) when ``stop`` is given, else None.

    Raises:
        ValueError: no backward pass reached any target; a non-finite mean gradient; a later pass saw another number
            of backward passes, or other batches, than the first (naming the layer); ``2 r > min(m, n)`` for a layer
            (before more passes are spent).
    """
    state = RandomState() if store.passes > 1 else None
    bar = Progress(num_batches, progress, store.passes)
    first_counts: dict[str, int] = {}
    first_prints: dict[str, torch.Tensor] | None = None
    monitor = None
    if stop is not None:
        assert store.passes == 1, "until='converged' is refused for sketch passes by the plan"
        monitor = ConvergenceMonitor(store, watch_ranks if watch_ranks is not None else ranks, stop,  # type: ignore[arg-type]
                                     process_group=process_group, min_rank=min_rank,
                                     transposed=[name for name, module in targets if weight_layout_transposed(module)])
    device = local_tensor(next(iter(model.parameters()))).device if monitor or guard_group is not None else None
    try:
        for index in range(store.passes):
            if state is not None and index:
                state.restore()
            store.begin_pass(index)
            bar.begin_pass()
            guard: Any = None
            watch: Any = None
            if monitor is not None:
                watch = monitor.attach(model, device)  # distributed: a StepGuard carrying the pass counts
                guard = watch if isinstance(watch, StepGuard) else None
            if guard is None and guard_group is not None:
                guard = StepGuard(model, guard_group, device)
            try:
                with CaptureSession(model, targets, store, on_backward=bar.callback), torch.enable_grad():
                    try:
                        train_step()
                    except Converged:  # raised before a forward: every recorded backward pass is whole
                        pass
                if guard is not None:
                    guard.finish()
            finally:
                for hook in {id(h): h for h in (guard, watch) if h is not None}.values():
                    hook.remove()
            store.reduce(process_group)
            counts = store.counts()
            if index:  # a later pass: finite, then the same backward passes and data as the first (a train_step
                if index + 1 < store.passes:  # that cannot be replayed runs none: that is the news, not "no backward")
                    check_finite(store.magnitudes(), [name for name, count in counts.items() if count > 0])
                _check_same_pass(store, index, first_counts, first_prints)
                continue
            active = [name for name, count in counts.items() if count > 0]
            if not active:
                raise UsageError(
                    f"train_step ran no backward pass through any of the {len(targets)} target layers (e.g. "
                    f"{short_list([name for name, _ in targets], 2)}): it must compute a loss with the model and call "
                    "loss.backward() (under torch.no_grad(), or with a loss that does not depend on these layers, no "
                    "gradient reaches them)."
                )
            if index + 1 < store.passes:  # before more passes are spent; the last is checked by summarize, which
                check_finite(store.magnitudes(), active)  # every caller runs next (one read of the sums, not two)
            first_counts, first_prints = counts, store.fingerprints()
            if store.passes > 1:
                check_ranks({n: weight_shape(m) for n, m in targets}, ranks, active)
    finally:
        bar.close()
        store.release()
    return monitor


def _check_same_pass(store: Store, index: int, first_counts: Mapping[str, int],
                     first_prints: Mapping[str, torch.Tensor] | None) -> None:
    for name, count in store.counts().items():
        if count != first_counts[name]:
            raise UsageError(
                f"LoRA-GA low-memory mode: layer '{name}' saw {first_counts[name]} backward pass(es) in the first "
                f"call of train_step but {count} in call {index + 1}. {_HOW_TO_FIX}"
            )
    prints = store.fingerprints()
    if prints is None or first_prints is None:
        return
    for name, fp in prints.items():
        ref = first_prints[name]
        if (fp - ref).norm() > FINGERPRINT_RTOL * ref.norm() or not torch.isfinite(fp).all():
            change = ((fp - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            raise UsageError(
                f"LoRA-GA low-memory mode: layer '{name}' saw different data in call {index + 1} of train_step than in "
                f"the first (its gradient fingerprint changed by {change:.3g}, relative). {_HOW_TO_FIX}"
            )


def summarize(source: GradientSource, names: Sequence[str]) -> tuple[list[str], set[str]]:
    """``(seen, zero)``: the layers of ``names`` that saw a backward pass, and those among them whose mean gradient
    is all zero.

    Raises:
        ValueError: a mean gradient is not finite (naming the layers).
    """
    counts = source.counts()
    seen = [name for name in names if counts.get(name, 0) > 0]
    magnitudes = source.magnitudes()  # 0 iff all zero, non-finite iff not finite
    check_finite(magnitudes, seen)
    return seen, {name for name in seen if magnitudes[name] == 0}
