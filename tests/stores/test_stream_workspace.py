"""One-pass low-memory mode's transient workspace stays within :func:`~loraga_fast.core.memory.stream_workspace_bytes`,
measured as the peak of the live bytes ops allocate: a backward pass's fold here; the distributed tree merge on 3
and 4 processes in tests/distributed/test_stream_merge.py (which imports :class:`LiveBytes`)."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from loraga_fast.core.memory import stream_workspace_bytes
from loraga_fast.stores.sketch import SketchSpec
from loraga_fast.stores.stream import StreamStore

SHAPES = [(96, 64, 16), (64, 200, 24), (16, 1000, 16), (1000, 16, 16), (300, 300, 32)]
"""``(m, n, l)``: square-ish, one side long, either side; l / (m + n) from 0.016 to 0.09 (the core terms weigh
most where it is large)."""


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by storages that ops allocate while the mode is active (an output that shares no
    input's storage), each counted until the last tensor viewing it is gone. Allocations inside a kernel (LAPACK's
    work arrays) are not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, live tensors viewing it]

    def _release(self, ptr: int) -> None:
        entry = self._storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            ptr = t.untyped_storage().data_ptr()
            entry = self._storages.get(ptr)
            if entry is None:
                if ptr in inputs:  # a view of (or written into) a tensor made before the mode: not ours
                    continue
                entry = self._storages[ptr] = [t.untyped_storage().nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def test_live_bytes_counts_views_until_the_last_one_goes() -> None:
    with LiveBytes() as probe:
        a = torch.zeros(100)  # 400 bytes
        view = a[:10]
        del a
        b = torch.zeros(50)  # a's storage is still held by the view
        assert probe.live == 600
        del view, b
        assert probe.live == 0
    assert probe.peak == 600


@pytest.mark.parametrize(("m", "n", "k"), SHAPES, ids=[f"{m}x{n}-l{k}" for m, n, k in SHAPES])
def test_a_backward_pass_fold_stays_within_the_formula(m: int, n: int, k: int) -> None:
    """The first batch (power iteration), a compressed later one (T > l) and a whole one (T <= l)."""
    store = StreamStore([SketchSpec("w", m, n, k, torch.device("cpu"))])
    slot = store["w"]
    gen = torch.Generator().manual_seed(0)
    bound = stream_workspace_bytes([(m, n, k)])
    block = 4 * (m + n) * k
    for tokens in (2 * k + 3, 2 * k + 3, k):
        g, x = torch.randn(tokens, m, generator=gen), torch.randn(tokens, n, generator=gen)
        with LiveBytes() as probe:
            slot.add(g, x, False)
        slot.count += 1
        assert probe.live == 0  # nothing left behind: the state is updated in place
        assert 2 * block < probe.peak <= bound, (tokens, probe.peak / block, bound / block)
        assert bound <= 2 * probe.peak or tokens <= k, (tokens, probe.peak / block, bound / block)  # and not loose
