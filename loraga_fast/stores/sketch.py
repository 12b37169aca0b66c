"""Low-memory mode's store: the top-``2r`` singular triplets of each mean gradient from skinny sketches.

Exact mode keeps one fp32 ``(m, n)`` accumulator per target (4 bytes per weight). LoRA-GA only needs the top
``2r`` singular subspaces of the mean gradient ``A``, and those can be found from products of ``A`` with tall
``(n, k)`` / ``(m, k)`` bases, each computed from the captured ``X`` and ``G`` of every backward pass
(:mod:`loraga_fast.ops.sketch`). With ``passes = 3`` (the default) over the same batches:

1. ``Y = A Omega`` (``Omega`` a seeded Gaussian ``(n, k)``);
2. ``Z = A^T orth(Y)``;
3. ``Y2 = A P`` with ``P = orth(Z)``; then ``A ~= Y2 P^T`` (the generalized Nystrom approximation
   ``Y2 (Z^T P)^+ Z^T``, see :func:`loraga_fast.ops.sketch.factors_from_sketch`), whose SVD gives the triplets.

More passes continue the alternation (each one is a power iteration); the last product and the basis it was
taken against give the factors. Per layer only two skinny fp32 matrices live, the ``m``-side ``(m, k)`` and the
``n``-side ``(n, k)`` sketch: one is the basis of the current pass and the other the product it accumulates,
ping-ponging; same-shape layers share one ``(B, m, k)`` and one ``(B, n, k)`` tensor.

Each pass also adds a ``4 x 4`` fingerprint ``Phi_m^T (sum_t G_t^T X_t) Phi_n`` per layer, which the estimation
flow compares between passes (equal batches give equal values, different ones almost surely not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed.collectives import all_reduce_counts, is_distributed
from ..layers.capture import Slot
from ..ops.rsvd import orthonormalize
from ..ops.sketch import factors_from_sketch, probe_accumulate, sketch_accumulate
from .base import FactorSource, Store, row_max_abs
from .factors import DEFAULT_SEED, LayerFactors

__all__ = ["DEFAULT_PASSES", "DEFAULT_SKETCH_PER_LORA_RANK", "FINGERPRINT_PROBES", "SketchGroup", "SketchSlot", "SketchSpec",
           "SketchStore", "sketch_columns"]

DEFAULT_SKETCH_PER_LORA_RANK = 24  # k = 24 r (12x the 2r triplets LoRA-GA needs): bench/accuracy.py, README "Low-memory mode"
CHUNK_LAYERS = 1  # the sketch algebra works on one layer of a group at a time (bounded workspace, bench/sketch_memory.py)
DEFAULT_PASSES = 3
FINGERPRINT_PROBES = 4  # the fingerprint is a (4, 4) sketch per layer


def sketch_columns(m: int, n: int, r: int, sketch_size: int | None) -> int:
    """Sketch columns ``k`` of an ``(m, n)`` layer with LoRA rank ``r``: ``sketch_size`` or ``24 r``, at most
    ``min(m, n)`` (where the sketch is the whole space and the result exact)."""
    k = DEFAULT_SKETCH_PER_LORA_RANK * r if sketch_size is None else sketch_size
    return max(1, min(k, m, n))


@dataclass(frozen=True)
class SketchSpec:
    """One target: its name, ``(m, n)`` = ``(out_features, in_features)``, sketch columns ``k``, device, layout."""

    name: str
    m: int
    n: int
    k: int
    device: torch.device
    transposed: bool = False


@dataclass(eq=False)
class SketchGroup:
    """Layers sharing ``(m, n, k)`` and device: the ``m``-side sketches ``m_side (B, m, k)`` and the ``n``-side ones
    ``n_side (B, n, k)`` (fp32; one is the current basis, the other the product being accumulated),
    ``fingerprints (B, P, P)`` and the probes ``probe_m (m, P)``, ``probe_n (n, P)`` shared by the group."""

    device: torch.device
    m: int
    n: int
    k: int
    m_side: torch.Tensor
    n_side: torch.Tensor
    fingerprints: torch.Tensor
    probe_m: torch.Tensor
    probe_n: torch.Tensor
    slots: list[SketchSlot] = field(default_factory=list)


class SketchSlot(Slot):
    """One layer's view of its group's sketches. :meth:`add` (called by the capture op per backward pass) adds
    ``A basis`` into the ``m`` side (forward passes) or ``A^T basis`` into the ``n`` side (adjoint passes), and the
    fingerprint."""

    def __init__(self, name: str, group: SketchGroup, index: int, transposed: bool):
        super().__init__(name)
        self.group = group
        self.index = index
        self.transposed = transposed  # Conv1D: the weight (and the factors handed to peft) are (in, out)
        self.m_side = group.m_side[index]  # (m, k)
        self.n_side = group.n_side[index]  # (n, k)
        self.fingerprint = group.fingerprints[index]
        self.adjoint = False

    def add(self, grad_out: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
        if self.adjoint:  # Z += X^T (G Q)
            sketch_accumulate(self.n_side, x, grad_out, self.m_side)
        else:  # Y += G^T (X P)
            sketch_accumulate(self.m_side, grad_out, x, self.n_side)
        probe_accumulate(self.fingerprint, grad_out, x, self.group.probe_m, self.group.probe_n)


class SketchStore(Store, FactorSource):
    """The skinny sketches of all targets, grouped by ``(m, n, k, device)``; ``store[name]`` is the layer's slot.

    Memory: :attr:`sketch_nbytes` = ``4 (m + n) k`` per layer exactly; :attr:`nbytes` adds the fingerprints
    (``4 P^2`` per layer) and one pair of probes per group (``4 (m + n) P``), ``P = FINGERPRINT_PROBES``.
    """

    def __init__(self, specs: Sequence[SketchSpec], passes: int = DEFAULT_PASSES, seed: int = DEFAULT_SEED):
        members: dict[tuple[int, int, int, torch.device], list[SketchSpec]] = {}
        for spec in specs:
            members.setdefault((spec.m, spec.n, spec.k, torch.device(spec.device)), []).append(spec)
        self.passes = passes
        self.seed = seed
        self.shape_groups: list[SketchGroup] = []
        slots: dict[str, SketchSlot] = {}
        p = FINGERPRINT_PROBES
        for (m, n, k, device), group_specs in members.items():
            b = len(group_specs)
            gen = self._generator(device, m, n, k)
            group = SketchGroup(
                m=m, n=n, k=k, device=device,
                m_side=torch.zeros((b, m, k), dtype=torch.float32, device=device),
                n_side=torch.zeros((b, n, k), dtype=torch.float32, device=device),
                fingerprints=torch.zeros((b, p, p), dtype=torch.float32, device=device),
                probe_m=torch.randn((m, p), dtype=torch.float32, device=device, generator=gen),
                probe_n=torch.randn((n, p), dtype=torch.float32, device=device, generator=gen),
            )
            for i, spec in enumerate(group_specs):
                slot = SketchSlot(spec.name, group, i, spec.transposed)
                group.slots.append(slot)
                slots[spec.name] = slot
            self.shape_groups.append(group)
        self.slots: dict[str, SketchSlot] = {spec.name: slots[spec.name] for spec in specs}  # type: ignore[assignment]
        self.pass_index = -1

    def _generator(self, device: torch.device, *key: int) -> torch.Generator:
        # the same seed in every process and for every run: all processes draw the same Omega and probes
        seed = (self.seed * 1_000_003 + hash(key)) % 2**63 if key else self.seed
        return torch.Generator(device=device).manual_seed(seed)

    @property
    def sketch_nbytes(self) -> int:
        """Bytes of the sketches alone: ``4 (m + n) k`` per layer."""
        return sum(g.m_side.nbytes + g.n_side.nbytes for g in self.shape_groups)

    @property
    def nbytes(self) -> int:
        """All bytes the store holds: sketches, fingerprints and probes."""
        return self.sketch_nbytes + sum(g.fingerprints.nbytes + g.probe_m.nbytes + g.probe_n.nbytes
                                        for g in self.shape_groups)

    @staticmethod
    def adjoint_pass(index: int) -> bool:
        """Even passes (0, 2, ...) accumulate ``A basis`` on the ``m`` side, odd ones ``A^T basis`` on the ``n`` side."""
        return index % 2 == 1

    def _sides(self, g: SketchGroup, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(basis, product)`` of group ``g`` in pass ``index`` (default: the current one)."""
        adjoint = self.adjoint_pass(self.pass_index if index is None else index)
        return (g.m_side, g.n_side) if adjoint else (g.n_side, g.m_side)

    def begin_pass(self, index: int) -> None:
        """Set the bases of pass ``index`` (a Gaussian for the first; then the orthonormalized product of the
        previous pass, in place) and zero the products, counts and fingerprints."""
        for g in self.shape_groups:
            basis, product = self._sides(g, index)
            gen = self._generator(g.device, g.m, g.n, g.k, 1)
            for start in range(0, basis.shape[0], CHUNK_LAYERS):  # in place, CHUNK_LAYERS layer(s) at a time
                chunk = basis[start : start + CHUNK_LAYERS]
                if index == 0:
                    chunk.normal_(generator=gen)
                else:
                    chunk.copy_(orthonormalize(chunk))  # the previous pass's product
            product.zero_()
            g.fingerprints.zero_()
            for slot in g.slots:
                slot.adjoint = self.adjoint_pass(index)
                slot.count = 0
        self.pass_index = index

    def reduce(self, process_group: Any = None) -> None:
        """Sum the current products, fingerprints and counts over the processes of ``process_group``: skinny tensors
        only."""
        if not is_distributed(process_group):
            return
        import torch.distributed as dist

        for g in self.shape_groups:
            dist.all_reduce(self._sides(g)[1], group=process_group)
            dist.all_reduce(g.fingerprints, group=process_group)
        device = self.shape_groups[0].device if self.shape_groups else None
        all_reduce_counts(list(self.slots.values()), device, process_group)

    def fingerprints(self) -> dict[str, torch.Tensor]:
        return {name: slot.fingerprint.clone() for name, slot in self.slots.items()}

    def magnitudes(self) -> dict[str, float]:
        """:meth:`GradientSource.magnitudes`: each layer's largest absolute entry of the current product (NaN/Inf
        propagate; 0 means ``A = 0`` almost surely, ``A`` times a Gaussian or an orthonormal basis of its own
        range)."""
        out: dict[str, float] = {}
        for g in self.shape_groups:
            values = row_max_abs(self._sides(g)[1]).tolist()
            out.update({slot.name: v for slot, v in zip(g.slots, values)})
        return out

    def factors(self, ranks: Mapping[str, int]) -> dict[str, LayerFactors]:
        """After the last pass: the top ``2 r`` triplets (``2 r_max`` of the group) of each mean gradient in
        ``ranks``, in the weight's stored layout (one batched skinny SVD per group)."""
        out: dict[str, LayerFactors] = {}
        adjoint = self.adjoint_pass(self.pass_index)
        for g in self.shape_groups:
            index = [slot.index for slot in g.slots if slot.name in ranks]
            if not index:
                continue
            basis, product = self._sides(g)
            k = 2 * max(ranks[g.slots[i].name] for i in index)
            for start in range(0, len(index), CHUNK_LAYERS):  # CHUNK_LAYERS layer(s) at a time: bounded workspace
                part = index[start : start + CHUNK_LAYERS]
                # contiguous indices are a view (no copy of the chunk)
                rows = slice(part[0], part[-1] + 1) if part == list(range(part[0], part[-1] + 1)) else part
                counts = torch.tensor([float(g.slots[i].count) for i in part], dtype=torch.float32, device=g.device)
                # forward: A ~= product basis^T; adjoint: A^T ~= product basis^T, so U and V swap. The mean is the
                # sum / count: the same singular vectors, singular values / count (no scaled copy of the product)
                left, s, right = factors_from_sketch(basis[rows], product[rows], k)
                s = s / counts[:, None]
                u, v = (right, left) if adjoint else (left, right)
                for j, i in enumerate(part):
                    slot = g.slots[i]
                    uu, vv = (v[j], u[j]) if slot.transposed else (u[j], v[j])
                    out[slot.name] = LayerFactors(u=uu.contiguous(), s=s[j].contiguous(), v=vv.contiguous())
        return out
