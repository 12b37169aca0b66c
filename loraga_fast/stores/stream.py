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
mean). Distributed (data parallel, FSDP, ZeRO-3), each process keeps the factorization of its own batches, and
:meth:`StreamStore.merged` combines them layer by layer in a binomial tree over the processes of the group: in
round ``d = 1, 2, 4, ...`` the process of group rank ``i`` with ``i % 2d == d`` sends its ``[U diag(s); V]``
(``4 (m + n) l`` bytes) to ``i - d``, which folds it into its own with :func:`~loraga_fast.ops.stream.merge_update`
(width ``2 l``: the same merge as a batch's); after ``ceil(log2 P)`` rounds group rank 0 holds the merged
factorization and broadcasts it. Per layer that is ``ceil(log2 P)`` merges of width ``2 l`` on the critical path
(``O((m + n) l^2 + l^3)`` each) and a transient workspace independent of ``P``
(:data:`loraga_fast.core.memory.STREAM_WORKSPACE`); the merge order is fixed by rank and every process gets the
broadcast bits, so the factors are bit-identical everywhere. :meth:`StreamStore.reduce` writes them into the state.

Deterministic: the Gaussian columns come from one generator per layer seeded (plain integer arithmetic) from the
store's seed, the layer's shape and its index in its shape group, drawn once per backward pass. The factors handed
out carry exact mode's sign convention in the weight's stored layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed.collectives import all_reduce_counts, is_distributed
from ..errors import UsageError
from ..layers.capture import Slot
from ..ops.rsvd import canonical_signs
from ..ops.stream import compress_update, merge_update
from .base import FactorSource, Store
from .factors import DEFAULT_SEED, LayerFactors
from .sketch import SketchSpec

__all__ = ["StreamGroup", "StreamSlot", "StreamStore", "tree_merge"]


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
        """Fold this backward pass's ``G^T X`` (``G (..., m)``, ``X (..., n)``) into the layer's truncated SVD.
        ``transposed`` is the capture op's layout flag; it must be the slot's (the state is ``(out, in)`` either
        way, only :meth:`StreamStore.factors` turns it into the weight's layout)."""
        if transposed != self.transposed:
            raise UsageError(f"LoRA-GA one-pass store: layer '{self.name}' was set up with transposed="
                             f"{self.transposed} but the capture op passed transposed={transposed}; build the "
                             "SketchSpec with the layer's weight layout (layers.kinds.weight_layout_transposed).")
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
                gen = torch.Generator(device=device).manual_seed(_layer_seed(seed, m, n, k, i))
                slot = StreamSlot(spec.name, group, i, spec.transposed, gen)
                group.slots.append(slot)
                slots[spec.name] = slot
            self.shape_groups.append(group)
        self.slots: dict[str, StreamSlot] = {spec.name: slots[spec.name] for spec in specs}  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        """All bytes the store holds: ``U``, ``s`` and ``V`` of every layer."""
        return sum(g.u.nbytes + g.s.nbytes + g.v.nbytes for g in self.shape_groups)

    def merged(self, process_group: Any = None
               ) -> Iterator[tuple[StreamSlot, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The factorization of every layer's gradient sum over all processes of ``process_group``, one layer at a
        time, without modifying the store.

        Yields ``(slot, u, s, v)`` for every layer, shape groups in order and layers in group order: fp32 ``u (m,
        l)``, ``s (l,)`` descending, ``v (n, l)`` with ``u diag(s) v^T`` the rank-``l`` truncated SVD of the sum of
        every process's ``U diag(s) V^T`` (the ``(out, in)`` math layout; a sum, not divided by the pass counts,
        which this does not reduce; signs as the merge leaves them: :meth:`factors` fixes them). Distributed, the
        processes are merged in a binomial tree (module docstring): ``ceil(log2 P)`` merges of width ``2 l`` and a
        broadcast per layer, the result bit-identical on every process; the tensors yielded are fresh. Not
        distributed: the store's own state (views: do not modify them).

        Collective when distributed, and lazy: a layer's sends, receives and broadcast run when the iteration
        reaches it, so every process of ``process_group`` must take the same layers from it, in step (all of them,
        or the same first ones everywhere). A layer's result may be written into the store once it is yielded
        (:meth:`reduce` does): later layers do not read it.
        """
        distributed = is_distributed(process_group)
        for g in self.shape_groups:
            for slot in g.slots:
                u, s, v = g.u[slot.index], g.s[slot.index], g.v[slot.index]
                yield (slot, *tree_merge(u, s, v, process_group)) if distributed else (slot, u, s, v)

    def reduce(self, process_group: Any = None) -> None:
        """Distributed: replace every process's factorization by the merged one (:meth:`merged`, the same bits in
        every process), layer by layer, and sum the pass counts."""
        if not is_distributed(process_group):
            return
        for slot, u, s, v in self.merged(process_group):
            i, g = slot.index, slot.group
            g.u[i].copy_(u)
            g.s[i].copy_(s)
            g.v[i].copy_(v)
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


def _layer_seed(seed: int, m: int, n: int, k: int, index: int) -> int:
    """The seed of a layer's generator: the store's seed, the layer's ``(m, n, l)`` and its index in its shape group
    mixed by plain integer arithmetic (a polynomial in a large prime), reduced below ``2**63``."""
    out = seed
    for part in (m, n, k, index):
        out = (out * 1_000_003 + part) % 2**63
    return out


def tree_merge(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
               process_group: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's truncated SVD ``u diag(s) v^T`` (``(m, l)``, ``(l,)``, ``(n, l)`` fp32, this process's) merged
    with every other process's of ``process_group`` (collective): a binomial tree of
    :func:`~loraga_fast.ops.stream.merge_update` calls, each folding the partial of group rank ``i + d`` into that
    of ``i`` (``i % 2d == 0``, ``d = 1, 2, 4, ...``), so at most ``2 l`` columns are merged at once and the order is
    fixed by rank; group rank 0's result is broadcast, so every process returns the same bits. The inputs are not
    modified; the outputs are new tensors (views of one broadcast buffer)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    m, n, width = u.shape[0], v.shape[0], u.shape[1]
    step = 1
    while step < world:
        if rank % (2 * step):  # hand this partial to the process that folds it in; this one is done
            dist.send(torch.cat([u * s, v]), _global_rank(process_group, rank - step), group=process_group)
            break
        if rank + step < world:
            part = torch.empty((m + n, width), dtype=torch.float32, device=u.device)
            dist.recv(part, _global_rank(process_group, rank + step), group=process_group)
            u, s, v = merge_update(u, s, v, part[:m], part[m:])
            del part
        step *= 2
    if rank == 0:
        packed = torch.cat([u, v, s[None]])
    else:
        packed = torch.empty((m + n + 1, width), dtype=torch.float32, device=u.device)
    del u, s, v
    dist.broadcast(packed, _global_rank(process_group, 0), group=process_group)
    return packed[:m], packed[m + n], packed[m : m + n]


def _global_rank(process_group: Any, rank: int) -> int:
    """The global rank of group rank ``rank`` (the point-to-point and broadcast calls take global ranks)."""
    import torch.distributed as dist

    return rank if process_group is None else dist.get_global_rank(process_group, rank)
