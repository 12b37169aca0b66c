"""One-pass low-memory mode's store: a rank-``l`` truncated SVD of each gradient sum, updated on every backward pass.

Low-memory mode with ``passes >= 2`` (:mod:`loraga_fast.stores.sketch`) needs ``train_step`` to replay the same
batches once per pass. With ``passes = 1`` each layer keeps instead ``U diag(s) V^T`` (``U`` ``(m, l)``, ``V``
``(n, l)``, fp32, ``l = k``: the sketch columns, ``24 r`` by default, so the same ``4 (m + n) l`` bytes), and every
backward pass through the layer folds its ``A_t = G^T X`` in (:mod:`loraga_fast.ops.stream`):

1. a batch of ``T > l`` tokens is compressed to ``l`` columns by a randomized range finder whose test matrix is
   ``[V_1 .. V_{l/2}, Gaussian]`` (the top half of the right vectors the sum already has, then fresh Gaussian
   columns from the store's seeded generator; a layer's first batch: all Gaussian, one power iteration); a batch
   of ``T <= l`` tokens is taken whole;
2. ``U diag(s) V^T + L R^T`` is re-factored (QR of both sides and an SVD of the ``(l + w)`` square core) and
   truncated to rank ``l``.

At the end the top ``2 r`` triplets are the leading columns of the state (divided by the pass count for the
mean). Distributed (data parallel, FSDP, ZeRO-3), each process keeps the factorization of its own batches;
:meth:`StreamStore.reduce` all-gathers every process's ``U diag(s)`` and ``V`` (``4 (m + n) l`` bytes per layer and
process) and every process re-factors the concatenation in process order, so all hold the same factors.

Deterministic: the Gaussian columns come from one generator per layer seeded from the store's seed, the layer's
shape and its index in its shape group, drawn once per backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed.collectives import all_reduce_counts, is_distributed
from ..layers.capture import Slot
from ..ops.rsvd import canonical_signs
from ..ops.stream import compress_update, merge_update
from .base import FactorSource, Store
from .factors import DEFAULT_SEED, LayerFactors
from .sketch import SketchSpec

__all__ = ["StreamGroup", "StreamSlot", "StreamStore"]


@dataclass(eq=False)
class StreamGroup:
    """Layers sharing ``(m, n, l)`` and device: ``u (B, m, l)``, ``s (B, l)``, ``v (B, n, l)`` (fp32)."""

    device: torch.device
    m: int
    n: int
    k: int
    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    slots: list[StreamSlot] = field(default_factory=list)


class StreamSlot(Slot):
    """One layer's view of its group's state. :meth:`add` (the capture op, once per backward pass) folds ``G^T X``
    into ``U diag(s) V^T``."""

    def __init__(self, name: str, group: StreamGroup, index: int, transposed: bool, generator: torch.Generator):
        super().__init__(name)
        self.group = group
        self.index = index
        self.transposed = transposed  # Conv1D: the weight (and the factors handed to peft) are (in, out)
        self.generator = generator

    def add(self, grad_out: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
        g = self.group
        u, s, v = g.u[self.index], g.s[self.index], g.v[self.index]
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if tokens == 0:
            return
        if tokens <= g.k:  # the whole batch: rank <= l, nothing to compress
            left = grad_out.reshape(-1, g.m).t()
            right = x.reshape(-1, g.n).t()
        else:
            known = g.k // 2 if self.count else 0  # before the first batch V is all zeros
            omega = torch.empty((g.n, g.k), dtype=torch.float32, device=g.device)
            omega[:, :known] = v[:, :known]
            omega[:, known:].normal_(generator=self.generator)
            left, right = compress_update(grad_out, x, omega, 0 if known else 1)
        nu, ns, nv = merge_update(u, s, v, left, right)
        u.copy_(nu)
        s.copy_(ns)
        v.copy_(nv)


class StreamStore(Store, FactorSource):
    """The truncated SVDs of all targets' gradient sums, grouped by ``(m, n, l, device)``; one pass over the data.

    Memory: :attr:`nbytes` = ``4 ((m + n) l + l)`` per layer; each backward pass adds a transient workspace of a few
    ``(m + n) (2 l)`` fp32 blocks for the layer being merged (``loraga_fast.core.memory``).
    """

    passes = 1

    def __init__(self, specs: Sequence[SketchSpec], seed: int = DEFAULT_SEED):
        members: dict[tuple[int, int, int, torch.device], list[SketchSpec]] = {}
        for spec in specs:
            members.setdefault((spec.m, spec.n, spec.k, torch.device(spec.device)), []).append(spec)
        self.seed = seed
        self.shape_groups: list[StreamGroup] = []
        slots: dict[str, StreamSlot] = {}
        for (m, n, k, device), group_specs in members.items():
            b = len(group_specs)
            group = StreamGroup(device=device, m=m, n=n, k=k,
                                u=torch.zeros((b, m, k), dtype=torch.float32, device=device),
                                s=torch.zeros((b, k), dtype=torch.float32, device=device),
                                v=torch.zeros((b, n, k), dtype=torch.float32, device=device))
            for i, spec in enumerate(group_specs):
                gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + hash((m, n, k, i))) % 2**63)
                slot = StreamSlot(spec.name, group, i, spec.transposed, gen)
                group.slots.append(slot)
                slots[spec.name] = slot
            self.shape_groups.append(group)
        self.slots: dict[str, StreamSlot] = {spec.name: slots[spec.name] for spec in specs}  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        """All bytes the store holds: ``U``, ``s`` and ``V`` of every layer."""
        return sum(g.u.nbytes + g.s.nbytes + g.v.nbytes for g in self.shape_groups)

    def reduce(self, process_group: Any = None) -> None:
        """Distributed: merge every process's factorization into one, the same in every process: per layer, an
        all-gather of ``U diag(s)`` and ``V`` (``4 (m + n) l`` bytes from each process), then a re-factorization of
        the concatenation in process order (:func:`~loraga_fast.ops.stream.merge_update`, width ``P l``)."""
        if not is_distributed(process_group):
            return
        import torch.distributed as dist

        world = dist.get_world_size(process_group)
        for g in self.shape_groups:
            for i in range(len(g.slots)):  # layer by layer: the workspace is one layer's, times the processes
                sides = []
                for part in (g.u[i] * g.s[i], g.v[i]):  # (m, l) and (n, l) of this process
                    parts = [torch.empty_like(part) for _ in range(world)]
                    dist.all_gather(parts, part, group=process_group)
                    sides.append(torch.cat(parts, 1))
                g.u[i].zero_()
                g.s[i].zero_()
                g.v[i].zero_()
                nu, ns, nv = merge_update(g.u[i], g.s[i], g.v[i], *sides)
                g.u[i].copy_(nu)
                g.s[i].copy_(ns)
                g.v[i].copy_(nv)
        device = self.shape_groups[0].device if self.shape_groups else None
        all_reduce_counts(list(self.slots.values()), device, process_group)

    def magnitudes(self) -> dict[str, float]:
        """:meth:`GradientSource.magnitudes`: each layer's largest singular value of its sum (0 for an all-zero
        gradient, NaN for a non-finite one)."""
        out: dict[str, float] = {}
        for g in self.shape_groups:
            out.update({slot.name: v for slot, v in zip(g.slots, g.s[:, 0].tolist())})
        return out

    def factors(self, ranks: Mapping[str, int]) -> dict[str, LayerFactors]:
        """The top ``2 r`` triplets of each mean gradient in ``ranks`` (the leading columns of the state, singular
        values divided by the pass count), in the weight's stored layout (Conv1D: ``(in, out)``, ``U`` and ``V``
        swapped), with exact mode's signs fixed in that layout: the largest-magnitude entry of each stored right
        vector is positive (:func:`~loraga_fast.ops.rsvd.canonical_signs`)."""
        out: dict[str, LayerFactors] = {}
        for g in self.shape_groups:
            wanted = [slot for slot in g.slots if slot.name in ranks]
            if not wanted:
                continue
            k = min(2 * max(ranks[slot.name] for slot in wanted), g.k)  # 2 r_max of the group, as the sketches give
            for slot in wanted:
                # the stored layout first: Conv1D's (in, out) weight is the transpose of the (out, in) state
                left, right = g.u[slot.index, None, :, :k], g.v[slot.index, None, :, :k]
                if slot.transposed:
                    left, right = right, left
                # then exact mode's sign convention in that layout (the largest entry of each right vector
                # positive): LoRA-GA pairs u_{r+j} with v_j, so B A is exact mode's, whatever the order the batches
                # or the processes were merged in
                u, s, v = canonical_signs(left, g.s[slot.index, None, :k], right)
                out[slot.name] = LayerFactors(u=u[0].contiguous(), s=(s[0] / max(slot.count, 1)).contiguous(),
                                              v=v[0].contiguous())
        return out
