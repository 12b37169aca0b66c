"""Low-memory mode never allocates group-sized temporaries: the sketch algebra works a few layers at a time."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraga_fast.stores.sketch import CHUNK_LAYERS, SketchSpec, SketchStore


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op allocates (outputs that share no storage with the op's inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.largest = max(self.largest, t.numel())
        return out


def test_pass_setup_and_factors_use_a_bounded_workspace() -> None:
    layers, m, n, k = 8, 96, 64, 16
    store = SketchStore([SketchSpec(f"l{i}", m, n, k, torch.device("cpu")) for i in range(layers)], passes=3)
    bound = CHUNK_LAYERS * max(m, n) * k  # a chunk's worth of one side
    group_side = layers * min(m, n) * k  # the smallest group-sized tensor (what the old code allocated)
    assert bound < group_side
    gen = torch.Generator().manual_seed(0)
    # rank-8 gradients (below k): the sketch captures them exactly, so the factors can be checked tightly
    a = torch.randn(layers, m, 8, generator=gen) @ torch.randn(layers, 8, n, generator=gen)
    for index in range(3):
        with _LargestOutput() as probe:
            store.begin_pass(index)
        assert probe.largest <= bound, (index, probe.largest, bound)
        for i, slot in enumerate(store.slots.values()):  # one backward pass per layer: G = a[i], X = identity
            slot.add(a[i].t(), torch.eye(n), False)
            slot.count += 1
    with _LargestOutput() as probe:
        factors = store.factors({f"l{i}": 2 for i in range(layers)})
    assert probe.largest <= bound, (probe.largest, bound)
    for i in range(layers):  # and the factors are still the top triplets
        s_exact = torch.linalg.svdvals(a[i].double())[:4]
        torch.testing.assert_close(factors[f"l{i}"].s.double(), s_exact, rtol=1e-4, atol=1e-6)
