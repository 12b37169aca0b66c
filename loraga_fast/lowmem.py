"""Low-memory mode: the top-``2r`` singular triplets of each mean gradient from skinny sketches, in a few passes.

Exact mode keeps one fp32 ``(m, n)`` accumulator per target (4 bytes per weight). LoRA-GA only needs the top
``2r`` singular subspaces of the mean gradient ``A``, and those can be found from products of ``A`` with tall
``(n, k)`` / ``(m, k)`` bases, each computed from the captured ``X`` and ``G`` of every backward pass
(:mod:`loraga_fast.ops.sketch`). With ``passes = 3`` (the default) over the same batches:

1. ``Y = A Omega`` (``Omega`` a seeded Gaussian ``(n, k)``);
2. ``Z = A^T orth(Y)``;
3. ``Y2 = A P`` with ``P = orth(Z)``; then ``A ~= Y2 P^T`` (the generalized Nystrom approximation
   ``Y2 (Z^T P)^+ Z^T``, see :func:`loraga_fast.ops.sketch.factors_from_sketch`), whose SVD gives the triplets.

More passes continue the alternation (each one is a power iteration); the last product and the basis it was
taken against give the factors. Per layer only two skinny fp32 matrices live: the basis of the current pass and
the product it accumulates, ``(m + n) k`` floats, ping-ponging between the two sides; same-shape layers share one
``(B, m, k)`` and one ``(B, n, k)`` tensor (:class:`SketchStore`).

Every pass re-runs the user's ``train_step``, which must be re-runnable and see the same batches in the same
quantity. Before each later pass the global random states (torch CPU and CUDA, ``random``, numpy) are put back as
they were before the first one, so dropout masks and a shuffling ``DataLoader`` (seeded from torch's generator)
repeat. Each pass is checked against the first: the number of backward passes through each layer, and a
``4 x 4`` fingerprint ``Phi_m^T (sum_t G_t^T X_t) Phi_n`` of the summed gradient (equal batches give equal
values, different ones almost surely not).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import nn

from .capture import CaptureSession, weight_layout_transposed, weight_shape
from .init import (
    DEFAULT_SEED,
    LayerFactors,
    _weight_top_sigma,
    check_finite,
    layer_ranks,
)
from .ops.rsvd import orthonormalize
from .ops.sketch import factors_from_sketch, probe_accumulate, sketch_accumulate
from .store import Slot, all_reduce_counts

__all__ = ["DEFAULT_PASSES", "DEFAULT_SKETCH_PER_RANK", "FINGERPRINT_PROBES", "FINGERPRINT_RTOL", "LowMemGradient",
           "LowMemGradientUnavailable", "LowMemGroup", "MemoryEstimate", "SketchStore", "accumulator_bytes",
           "estimate_bytes", "preprocess_lowmem", "run_passes"]

logger = logging.getLogger("loraga_fast")

DEFAULT_SKETCH_PER_RANK = 16  # k = 16 r (8x the 2r triplets LoRA-GA needs), measured on SmolLM2 gradients
DEFAULT_PASSES = 3
FINGERPRINT_PROBES = 4  # the fingerprint is a (4, 4) sketch per layer
FINGERPRINT_RTOL = 1e-3  # allowed relative change of a fingerprint between passes (floating-point noise)
MODE_KEY = "loraga_fast.mode"  # cache metadata: "lowmem" here; exact-mode caches have no such key


# ---- the placeholder attached as _peft_loraga_grad ---------------------------------------------------------


class LowMemGradientUnavailable(RuntimeError):
    """Raised when code reads the gradient of a layer prepared in low-memory mode (it was never formed)."""


class LowMemGradient:
    """What low-memory mode attaches as ``module._peft_loraga_grad``: no gradient, only a marker that
    loraga_fast's ``get_peft_model`` hand-off recognises by identity. Any other use (peft's own
    ``lora_ga_init`` when the hand-off is bypassed, a user reading the tensor, a torch function) raises
    :class:`LowMemGradientUnavailable` explaining why, instead of returning a wrong value."""

    __slots__ = ("name", "weight_shape")

    def __init__(self, name: str, weight_shape: tuple[int, ...]):
        self.name = name
        self.weight_shape = weight_shape

    def _fail(self, what: str) -> NoReturn:
        raise LowMemGradientUnavailable(
            f"Layer '{self.name}' was prepared by loraga_fast.preprocess_loraga(mode='lowmem'), which never forms the "
            f"mean gradient (only its top singular factors), so `_peft_loraga_grad` holds no tensor ({what}). "
            "Initialize it with peft.get_peft_model(model, lora_config) in this process, with the LoraConfig (rank) it "
            "was prepared for; to get the gradient itself, run preprocess_loraga(mode='exact')."
        )

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # keep Python's protocols (copy, pickle, hasattr on dunders) working
            raise AttributeError(attr)
        self._fail(f"accessed .{attr}")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        for arg in (*args, *(kwargs or {}).values()):
            if isinstance(arg, LowMemGradient):
                arg._fail(f"passed to {getattr(func, '__name__', func)}")
        return NotImplemented

    def __getitem__(self, index: Any) -> NoReturn:
        self._fail("indexed")

    def __array__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._fail("converted to an array")

    def __float__(self) -> NoReturn:
        self._fail("converted to a number")

    def __repr__(self) -> str:
        return f"<loraga_fast low-memory placeholder for '{self.name}' {tuple(self.weight_shape)}: no gradient is held>"


# ---- memory estimate ----------------------------------------------------------------------------------------


def sketch_columns(m: int, n: int, r: int, sketch_size: int | None) -> int:
    """Sketch columns ``k`` of an ``(m, n)`` layer with LoRA rank ``r``: ``sketch_size`` or ``16 r``, at most
    ``min(m, n)`` (where the sketch is the whole space and the result exact)."""
    k = DEFAULT_SKETCH_PER_RANK * r if sketch_size is None else sketch_size
    return max(1, min(k, m, n))


def accumulator_bytes(shapes: Iterable[tuple[int, int]], r: int, sketch_size: int | None = None) -> tuple[int, int]:
    """``(exact, lowmem)`` accumulator bytes for layers of weight shapes ``shapes`` at rank ``r``: ``4 m n`` per
    layer in exact mode, ``4 (m + n) k`` in low-memory mode (plus :func:`extra_bytes_per_layer`)."""
    exact = lowmem = 0
    for m, n in shapes:
        exact += 4 * m * n
        lowmem += 4 * (m + n) * sketch_columns(m, n, r, sketch_size) + extra_bytes_per_layer(m, n)
    return exact, lowmem


def extra_bytes_per_layer(m: int, n: int) -> int:
    """Bytes low-memory mode holds per layer beside its sketch: the ``(P, P)`` fingerprint and (an upper bound
    for) its share of the per-group probes ``Phi_m (m, P)``, ``Phi_n (n, P)`` (P = FINGERPRINT_PROBES)."""
    p = FINGERPRINT_PROBES
    return 4 * (p * p + (m + n) * p)


@dataclass
class MemoryEstimate:
    """Accumulator memory of the two modes for one model and LoRA config.

    Attributes:
        exact_bytes: fp32 ``(m, n)`` accumulators (exact mode).
        lowmem_bytes: the ``(m + n) k`` fp32 sketches plus fingerprints and probes (low-memory mode).
        num_layers: target layers.
        sketch_columns: ``k`` of each layer (by name).
    """

    exact_bytes: int
    lowmem_bytes: int
    num_layers: int
    sketch_columns: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"LoRA-GA accumulator memory for {self.num_layers} target layers: exact mode {_fmt(self.exact_bytes)}, "
                f"low-memory mode {_fmt(self.lowmem_bytes)} ({self.exact_bytes / max(self.lowmem_bytes, 1):.1f}x less, "
                f"{DEFAULT_PASSES} passes over the batches by default)")


def _fmt(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def _math_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a target: the shape of ``A = G^T X`` whatever the storage layout."""
    rows, cols = weight_shape(module)  # not weight.shape: FSDP1 holds it flattened outside forward
    return (cols, rows) if weight_layout_transposed(module) else (rows, cols)


def estimate_bytes(targets: Sequence[tuple[str, nn.Module]], ranks: Mapping[str, int],
                   sketch_size: int | None = None) -> MemoryEstimate:
    """:class:`MemoryEstimate` for ``targets`` (``(name, module)``) with per-layer ``ranks``."""
    exact = lowmem = 0
    columns = {}
    for name, module in targets:
        m, n = _math_shape(module)
        e, lm = accumulator_bytes([(m, n)], ranks[name], sketch_size)
        exact += e
        lowmem += lm
        columns[name] = sketch_columns(m, n, ranks[name], sketch_size)
    return MemoryEstimate(exact_bytes=exact, lowmem_bytes=lowmem, num_layers=len(targets), sketch_columns=columns)


# ---- the sketch store -----------------------------------------------------------------------------------------


class SketchSlot(Slot):
    """One layer's view of its group's sketches. ``add`` (called by the capture op per backward pass) adds
    ``A basis`` into the ``m`` side (forward passes) or ``A^T basis`` into the ``n`` side (adjoint passes), and the
    fingerprint. ``acc`` is the side being accumulated in the current pass."""

    def __init__(self, name: str, group: SketchGroup, index: int, transposed: bool):
        super().__init__(name=name, acc=group.out[index])
        self.group = group
        self.index = index
        self.transposed = transposed  # Conv1D: the weight (and the factors handed to peft) are (in, out)
        self.out_side = group.out[index]  # (m, k)
        self.in_side = group.inp[index]  # (n, k)
        self.fingerprint = group.fingerprints[index]
        self.adjoint = False

    def add(self, grad_out: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
        g = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        if self.adjoint:  # Z += X^T (G Q)
            sketch_accumulate(self.in_side, xs, g, self.out_side)
        else:  # Y += G^T (X P)
            sketch_accumulate(self.out_side, g, xs, self.in_side)
        probe_accumulate(self.fingerprint, g, xs, self.group.probe_out, self.group.probe_in)


@dataclass(eq=False)
class SketchGroup:
    """Layers sharing ``(m, n, k)`` and device: ``out (B, m, k)`` and ``inp (B, n, k)`` fp32, one of them the
    current basis and the other the product being accumulated; ``fingerprints (B, P, P)``; shared probes."""

    m: int
    n: int
    k: int
    device: torch.device
    out: torch.Tensor
    inp: torch.Tensor
    fingerprints: torch.Tensor
    probe_out: torch.Tensor
    probe_in: torch.Tensor
    slots: list[SketchSlot] = field(default_factory=list)


@dataclass(frozen=True)
class SketchSpec:
    """One target: its name, ``(m, n)`` = ``(out_features, in_features)``, sketch columns ``k``, device, layout."""

    name: str
    m: int
    n: int
    k: int
    device: torch.device
    transposed: bool = False


class SketchStore:
    """The skinny sketches of all targets, grouped by ``(m, n, k, device)`` (same role as
    :class:`loraga_fast.store.AccumulatorStore` in exact mode; ``store[name]`` is the layer's slot).

    Memory: :attr:`sketch_nbytes` = ``4 (m + n) k`` per layer exactly; :attr:`nbytes` adds the fingerprints
    (``4 P^2`` per layer) and one pair of probes per group (``4 (m + n) P``), ``P = FINGERPRINT_PROBES``.
    """

    def __init__(self, specs: Sequence[SketchSpec], seed: int = DEFAULT_SEED):
        members: dict[tuple[int, int, int, torch.device], list[SketchSpec]] = {}
        for spec in specs:
            members.setdefault((spec.m, spec.n, spec.k, torch.device(spec.device)), []).append(spec)
        self.seed = seed
        self.groups: list[SketchGroup] = []
        slots: dict[str, SketchSlot] = {}
        p = FINGERPRINT_PROBES
        for (m, n, k, device), group_specs in members.items():
            b = len(group_specs)
            gen = self._generator(device, m, n, k)
            group = SketchGroup(
                m=m, n=n, k=k, device=device,
                out=torch.zeros((b, m, k), dtype=torch.float32, device=device),
                inp=torch.zeros((b, n, k), dtype=torch.float32, device=device),
                fingerprints=torch.zeros((b, p, p), dtype=torch.float32, device=device),
                probe_out=torch.randn((m, p), dtype=torch.float32, device=device, generator=gen),
                probe_in=torch.randn((n, p), dtype=torch.float32, device=device, generator=gen),
            )
            for i, spec in enumerate(group_specs):
                slot = SketchSlot(spec.name, group, i, spec.transposed)
                group.slots.append(slot)
                slots[spec.name] = slot
            self.groups.append(group)
        self.slots: dict[str, SketchSlot] = {spec.name: slots[spec.name] for spec in specs}
        self.pass_index = -1

    def _generator(self, device: torch.device, *key: int) -> torch.Generator:
        # the same seed on every rank and for every run: all ranks draw the same Omega and probes
        seed = (self.seed * 1_000_003 + hash(key)) % 2**63 if key else self.seed
        return torch.Generator(device=device).manual_seed(seed)

    def __getitem__(self, name: str) -> SketchSlot:
        return self.slots[name]

    @property
    def sketch_nbytes(self) -> int:
        """Bytes of the sketches alone: ``4 (m + n) k`` per layer."""
        return sum(g.out.nbytes + g.inp.nbytes for g in self.groups)

    @property
    def nbytes(self) -> int:
        """All bytes the store holds: sketches, fingerprints and probes."""
        return self.sketch_nbytes + sum(g.fingerprints.nbytes + g.probe_out.nbytes + g.probe_in.nbytes
                                        for g in self.groups)

    @staticmethod
    def adjoint_pass(index: int) -> bool:
        """Even passes (0, 2, ...) accumulate ``A basis`` on the ``m`` side, odd ones ``A^T basis`` on the ``n`` side."""
        return index % 2 == 1

    def begin_pass(self, index: int) -> None:
        """Set the bases of pass ``index`` (a Gaussian for the first; then the orthonormalized product of the
        previous pass, in place) and zero the products, counts and fingerprints."""
        adjoint = self.adjoint_pass(index)
        for g in self.groups:
            basis, product = (g.out, g.inp) if adjoint else (g.inp, g.out)
            if index == 0:
                gen = self._generator(g.device, g.m, g.n, g.k, 1)
                basis.copy_(torch.randn(basis.shape, dtype=torch.float32, device=g.device, generator=gen))
            else:
                basis.copy_(orthonormalize(basis))  # the previous pass's product
            product.zero_()
            g.fingerprints.zero_()
            for slot in g.slots:
                slot.adjoint = adjoint
                slot.acc = product[slot.index]
                slot.count = 0
        self.pass_index = index

    def products(self, g: SketchGroup) -> torch.Tensor:
        """The tensor the current pass accumulates into for group ``g``."""
        return g.inp if self.adjoint_pass(self.pass_index) else g.out

    def all_reduce(self, group: object = None) -> None:
        """Sum the current products, fingerprints and counts over the ranks of ``group``: skinny tensors only."""
        import torch.distributed as dist

        for g in self.groups:
            dist.all_reduce(self.products(g), group=group)
            dist.all_reduce(g.fingerprints, group=group)
        all_reduce_counts(list(self.slots.values()), self.groups[0].device if self.groups else None, group)

    def counts(self) -> dict[str, int]:
        return {name: slot.count for name, slot in self.slots.items()}

    def fingerprints(self) -> dict[str, torch.Tensor]:
        return {name: slot.fingerprint.clone() for name, slot in self.slots.items()}

    def max_abs(self) -> dict[str, float]:
        """Each layer's largest absolute entry of the current product (NaN/Inf propagate; 0 means ``A = 0``
        almost surely, ``A`` times a Gaussian or an orthonormal basis of its own range)."""
        out: dict[str, float] = {}
        for g in self.groups:
            values = torch.linalg.vector_norm(self.products(g).flatten(1), ord=float("inf"), dim=1).tolist()
            out.update({slot.name: v for slot, v in zip(g.slots, values)})
        return out

    def factors(self, ranks: Mapping[str, int]) -> dict[str, LayerFactors]:
        """After the last pass: the top ``2 r`` triplets (``2 r_max`` of the group) of each mean gradient in
        ``ranks``, in the weight's stored layout (one batched skinny SVD per group)."""
        out: dict[str, LayerFactors] = {}
        adjoint = self.adjoint_pass(self.pass_index)
        for g in self.groups:
            index = [slot.index for slot in g.slots if slot.name in ranks]
            if not index:
                continue
            counts = torch.tensor([float(g.slots[i].count) for i in index], dtype=torch.float32, device=g.device)
            basis, product = (g.out, g.inp) if adjoint else (g.inp, g.out)
            product = product[index] / counts[:, None, None]
            k = 2 * max(ranks[g.slots[i].name] for i in index)
            # forward: A ~= product basis^T; adjoint: A^T ~= product basis^T, so U and V swap
            left, s, right = factors_from_sketch(basis[index], product, k)
            u, v = (right, left) if adjoint else (left, right)
            for j, i in enumerate(index):
                slot = g.slots[i]
                uu, vv = (v[j], u[j]) if slot.transposed else (u[j], v[j])
                out[slot.name] = LayerFactors(u=uu.contiguous(), s=s[j].contiguous(), v=vv.contiguous())
        return out


# ---- the passes -------------------------------------------------------------------------------------------------


class _RandomState:
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


class _Progress:
    def __init__(self, total: int | None, enabled: bool | None, passes: int):
        self.bar = None
        self.offset = 0
        if enabled or (enabled is None and total is not None):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total * passes if total is not None else None,
                            desc=f"LoRA-GA low-memory estimation ({passes} passes)", unit="backward")

    def begin(self) -> None:
        if self.bar is not None:
            self.offset = self.bar.n

    def on_backward(self, slot: Slot) -> None:
        assert self.bar is not None
        if self.offset + slot.count > self.bar.n:
            self.bar.update(self.offset + slot.count - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_HOW_TO_FIX = (
    "In low-memory mode preprocess_loraga calls train_step once per pass, and every call must run the same batches "
    "(for example by iterating over a list or a DataLoader created again inside train_step, not over a shared iterator "
    "or generator); the random state is reset before each pass, so dropout and shuffling repeat. Or use mode='exact', "
    "which runs train_step once."
)


def run_passes(model: nn.Module, targets: Sequence[tuple[str, nn.Module]], train_step: Callable[[], None],
               store: SketchStore, ranks: Mapping[str, int], *, passes: int, process_group: Any = None,
               distributed: bool = False, num_batches: int | None = None, progress: bool | None = None) -> set[str]:
    """Run ``train_step`` ``passes`` times with ``targets`` routed into ``store``'s sketches, checking each pass.

    Returns the names of the layers whose mean gradient is all zero. Afterwards ``store`` holds the last pass's
    products and counts (sums over the ranks when ``distributed``).

    Raises:
        ValueError: a pass saw another number of backward passes, or other batches, than the first (naming the
            layer); a mean gradient is not finite; ``2 r > min(m, n)`` for a layer that saw a backward pass.
    """
    state = _RandomState()
    bar = _Progress(num_batches, progress, passes)
    first_counts: dict[str, int] = {}
    first_prints: dict[str, torch.Tensor] = {}
    zero: set[str] = set()
    try:
        for index in range(passes):
            if index:
                state.restore()
            store.begin_pass(index)
            bar.begin()
            on_backward = bar.on_backward if bar.bar is not None else None
            with CaptureSession(model, targets, store, on_backward=on_backward), torch.enable_grad():
                train_step()
            if distributed:
                store.all_reduce(process_group)
            counts = store.counts()
            active = [name for name, count in counts.items() if count > 0]
            check_finite(store.max_abs(), active)
            if index == 0:
                first_counts, first_prints = counts, store.fingerprints()
                _check_ranks(targets, ranks, active)
                zero = {name for name, value in store.max_abs().items() if value == 0 and counts[name] > 0}
                continue
            for name, count in counts.items():
                if count != first_counts[name]:
                    raise ValueError(
                        f"LoRA-GA low-memory mode: layer '{name}' saw {first_counts[name]} backward pass(es) in the first "
                        f"call of train_step but {count} in call {index + 1}. {_HOW_TO_FIX}"
                    )
            prints = store.fingerprints()
            for name, fp in prints.items():
                ref = first_prints[name]
                if (fp - ref).norm() > FINGERPRINT_RTOL * ref.norm() or not torch.isfinite(fp).all():
                    raise ValueError(
                        f"LoRA-GA low-memory mode: layer '{name}' saw different data in call {index + 1} of train_step "
                        f"than in the first (its gradient fingerprint changed by {((fp - ref).norm() / ref.norm().clamp_min(1e-30)).item():.3g}, "
                        f"relative). {_HOW_TO_FIX}"
                    )
    finally:
        bar.close()
    return zero


def _check_ranks(targets: Sequence[tuple[str, nn.Module]], ranks: Mapping[str, int], active: Iterable[str]) -> None:
    modules = dict(targets)
    for name in active:
        shape = weight_shape(modules[name])
        if 2 * ranks[name] > min(shape):
            raise ValueError(
                f"LoRA-GA needs 2 * r <= min(out_features, in_features), but layer '{name}' has a weight of shape "
                f"{shape} and r={ranks[name]}: lower r (or set rank_pattern for it) or exclude the layer."
            )


# ---- hand-off --------------------------------------------------------------------------------------------------


class LowMemGroup:
    """The :class:`loraga_fast.init.PreparedGroup` interface for low-memory mode: factors computed already.

    ``grads`` maps each name to the :class:`LowMemGradient` placeholder attached to its module (the hand-off
    recognises prepared layers by identity with it).
    """

    def __init__(self, modules: Mapping[str, nn.Module], factors: Mapping[str, LayerFactors], ranks: Mapping[str, int],
                 zero: Iterable[str], placeholders: Mapping[str, LowMemGradient]):
        names = [name for name in modules]
        self.modules = {name: weakref.ref(modules[name]) for name in names}
        self.grads = {name: placeholders[name] for name in names}
        self.ranks = {name: ranks[name] for name in names}
        self.zero = set(zero) & set(names)
        self._factors = {name: factors[name] for name in names if name in factors}

    def factors(self) -> dict[str, LayerFactors]:
        return self._factors


def _groups(targets: Sequence[tuple[str, nn.Module]], names: Iterable[str], factors: Mapping[str, LayerFactors],
            ranks: Mapping[str, int], zero: set[str], weight_svd: bool) -> tuple[list[LowMemGroup], dict[str, LowMemGradient]]:
    """One :class:`LowMemGroup` per weight shape and device over ``names``, and their placeholders."""
    modules = dict(targets)
    by_shape: dict[tuple[tuple[int, ...], torch.device], list[str]] = {}
    for name in names:
        weight = modules[name].weight
        by_shape.setdefault((weight_shape(modules[name]), weight.device), []).append(name)
    placeholders = {name: LowMemGradient(name, weight_shape(modules[name])) for name in names}
    groups = []
    for (_, device), members in by_shape.items():
        if weight_svd:
            active = [n for n in members if n not in zero]
            if active:
                gen = torch.Generator(device=device).manual_seed(DEFAULT_SEED)
                sigmas = _weight_top_sigma([modules[n] for n in active], [ranks[n] for n in active], gen)
                for n, sigma in zip(active, sigmas):
                    factors[n].weight_sigma = sigma  # type: ignore[index]
        groups.append(LowMemGroup({n: modules[n] for n in members}, factors, ranks, zero, placeholders))
    return groups, placeholders


def preprocess_lowmem(model: nn.Module, lora_config: Any, targets: Sequence[tuple[str, nn.Module]],
                      train_step: Callable[[], None], cache_file: str | os.PathLike[str] | None = None, *,
                      sketch_size: int | None = None, passes: int | None = None, num_batches: int | None = None,
                      progress: bool | None = None, process_group: Any = None, distributed: bool = False,
                      writer: bool = True) -> tuple[list[LowMemGroup], dict[str, LowMemGradient]]:
    """Low-memory ``preprocess_loraga`` after target discovery: sketches (or the cache), checks, factors, cache.

    Returns the groups to register with the ``get_peft_model`` hand-off and ``{name: placeholder}`` to attach as
    ``_peft_loraga_grad``. Nothing is returned (and so nothing attached) unless every check passed.
    """
    passes = DEFAULT_PASSES if passes is None else passes
    if passes < 2:
        raise ValueError(f"low-memory mode needs passes >= 2 (the default is {DEFAULT_PASSES}), got {passes}.")
    names = [name for name, _ in targets]
    ranks = layer_ranks(lora_config, names)
    if sketch_size is not None and sketch_size < 2 * max(ranks.values()):
        raise ValueError(f"sketch_size={sketch_size} must be at least 2 * r = {2 * max(ranks.values())} (the default, "
                         f"{DEFAULT_SKETCH_PER_RANK} r, meets LoRA-GA's accuracy needs).")
    weight_svd = getattr(lora_config.lora_ga_config, "scale", None) == "weight_svd"
    start = time.perf_counter()
    cached = cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0
    if cached:
        factors, zero, seen = load_factors(cache_file, targets, ranks)  # type: ignore[arg-type]
        _check_ranks(targets, ranks, seen)
        store_bytes = 0
        source = f"loaded from {os.fspath(cache_file)}"  # type: ignore[arg-type]
    else:
        specs = []
        for name, module in targets:
            m, n = _math_shape(module)
            specs.append(SketchSpec(name, m, n, sketch_columns(m, n, ranks[name], sketch_size), module.weight.device,
                                    weight_layout_transposed(module)))
        store = SketchStore(specs)
        zero = run_passes(model, targets, train_step, store, ranks, passes=passes, process_group=process_group,
                          distributed=distributed, num_batches=num_batches, progress=progress)
        counts = store.counts()
        seen = [name for name in names if counts[name] > 0]
        factors = store.factors({name: ranks[name] for name in seen if name not in zero})
        store_bytes = store.nbytes
        del store
        if cache_file is not None and writer:
            save_factors(cache_file, factors, names, zero)
        source = f"estimated in {passes} passes over {max(counts.values(), default=0)} backward passes each"
    groups, placeholders = _groups(targets, seen, factors, ranks, zero, weight_svd)
    missing = [name for name in names if name not in seen]
    if missing:
        logger.warning("LoRA-GA: %d of %d target layers saw no backward pass in train_step and keep peft's default "
                       "init: %s", len(missing), len(names), _short(missing))
    if zero:
        logger.warning("LoRA-GA: the mean gradient of %d layer(s) is all zero (the loss never reached them); they get "
                       "peft's default LoRA init: %s", len(zero), _short(sorted(zero)))
    logger.info("LoRA-GA (low-memory mode): %d target layers %s in %.2fs (sketches: %.1f MiB)", len(targets), source,
                time.perf_counter() - start, store_bytes / 2**20)
    return groups, placeholders


def _short(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


# ---- cache: factors, not gradients ------------------------------------------------------------------------------

_TARGETS_KEY = "loraga_fast.targets"
_ZERO_KEY = "loraga_fast.zero"
_PARTS = ("u", "s", "v")


def save_factors(path: str | os.PathLike[str], factors: Mapping[str, LayerFactors], target_names: Sequence[str],
                 zero: Iterable[str]) -> None:
    """Write the factors (``{name}.loraga_fast.{u,s,v}``, fp32) atomically; metadata names the mode, every target
    (with or without factors) and the all-zero layers."""
    from .cache import write_atomic

    tensors = {f"{name}.loraga_fast.{part}": getattr(f, part).contiguous()
               for name, f in factors.items() for part in _PARTS}
    write_atomic(path, tensors, {MODE_KEY: "lowmem", _TARGETS_KEY: json.dumps(list(target_names)),
                                 _ZERO_KEY: json.dumps(sorted(zero))})


def load_factors(path: str | os.PathLike[str], targets: Sequence[tuple[str, nn.Module]],
                 ranks: Mapping[str, int]) -> tuple[dict[str, LayerFactors], set[str], list[str]]:
    """Read a low-memory cache written by :func:`save_factors`, checked against ``targets`` and ``ranks``.

    Returns ``(factors, zero, seen)``: factors trimmed to ``2 r`` columns, all-zero layers, layers that saw a
    backward pass (those with factors, and the all-zero ones).

    Raises:
        ValueError: not a safetensors file, an exact-mode cache, names/shapes that do not match, or factors with
            fewer than ``2 r`` columns (a cache made for a smaller rank).
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except SafetensorError as err:
        raise ValueError(f"Cache file '{path}' is not a safetensors file ({err}): delete it or pass another "
                         "cache_file.") from err
    with handle:
        metadata = handle.metadata() or {}
        if metadata.get(MODE_KEY) != "lowmem":
            raise ValueError(
                f"Cache file '{path}' holds exact-mode mean gradients (written by preprocess_loraga(mode='exact') or "
                "peft), not low-memory factors: pass mode='exact' to use it, or another cache_file for mode='lowmem'."
            )
        cached_names = json.loads(metadata.get(_TARGETS_KEY, "[]"))
        zero = set(json.loads(metadata.get(_ZERO_KEY, "[]")))
        keys = set(handle.keys())
        modules = dict(targets)
        for name in modules:
            if name not in cached_names:
                raise ValueError(f"Cache file '{path}' does not match the model: it has no entry for target module '{name}'.")
        extra = [name for name in cached_names if name not in modules]
        if extra:
            raise ValueError(f"Cache file '{path}' does not match the model: it holds module '{extra[0]}', which is not "
                             "a target of this model and lora_config.")
        factors: dict[str, LayerFactors] = {}
        for name, module in modules.items():
            if f"{name}.loraga_fast.u" not in keys:
                continue
            u, s, v = (handle.get_tensor(f"{name}.loraga_fast.{part}") for part in _PARTS)
            shape = weight_shape(module)
            if (u.shape[0], v.shape[0]) != shape:
                raise ValueError(f"Cache file '{path}' does not match the model: module '{name}' has cached factors for a "
                                 f"weight of shape {(u.shape[0], v.shape[0])} but a weight of shape {shape}.")
            need = min(2 * ranks[name], min(shape))
            if u.shape[1] < need:
                raise ValueError(f"Cache file '{path}' was written for a smaller rank: module '{name}' has {u.shape[1]} "
                                 f"cached singular vectors but r={ranks[name]} needs {2 * ranks[name]}. Delete the file "
                                 "or pass another cache_file.")
            device = module.weight.device
            factors[name] = LayerFactors(u=u.to(device), s=s.to(device), v=v.to(device))
        seen = [name for name in modules if name in factors or name in zero]
    return factors, zero, seen
