"""until="converged" (exact mode and one-pass low-memory mode): a gradient that stops changing after a known number
of batches stops where the rule says, one that never converges runs every batch, a stop leaves the model exactly as
it was; LoRA-GA's A and B directions are measured apart (a swap across index r moves, on Linear and Conv1D), every
rank a budget may give is watched, a target not reached yet blocks the stop for two checks and a late one is
measured; the check's factorization against exact SVDs; bad arguments fail before any data is read. (Data
parallel and FSDP: tests/distributed/test_convergence_ranks.py.)"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model
from torch import nn

from loraga_fast import estimate_gradient, preprocess_loraga, train_step_from_dataloader, train_step_from_trainer
from loraga_fast.api.preprocess import run_plan
from loraga_fast.core.convergence import CHECK_EVERY, ConvergenceMonitor, StopRule
from loraga_fast.core.plan import make_plan
from loraga_fast.stores.exact import AccumulatorStore
from loraga_fast.stores.sketch import SketchSpec
from loraga_fast.stores.stream import StreamStore
from tests._helpers import (
    attached,
    lora_ga_config,
    tiny_llama,
    token_batches,
    train_step_for,
)

SIZE = 16


class Probe(nn.Module):
    """``loss = <lin(x), t>``: each batch's weight gradient is exactly ``t x^T`` (rank 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(SIZE, SIZE, bias=False)
        self.head = nn.Linear(SIZE, SIZE, bias=False)  # not a target: eval mode and a frozen flag must survive

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.lin(x) * t).sum() + 0.0 * self.head(x).sum()


def probe_batches(changing: int | None, total: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batch ``i < changing`` adds ``4^i e_{5i} e_i^T`` (each new batch dominates, so the top subspaces move at every
    check; the wide gaps between singular values make every factorization accurate); later batches add exactly zero
    (x = 0), so the running mean's subspaces stop changing after ``changing`` batches. ``changing=None``: every
    batch changes them (SIZE directions, cycling with weights growing by 1.5)."""
    out = []
    for i in range(total):
        x, t = torch.zeros(1, SIZE), torch.zeros(1, SIZE)
        if changing is None or i < changing:
            x[0, i % SIZE] = 4.0 ** i if changing is not None else 1.5 ** i
            t[0, (5 * i + i // SIZE) % SIZE] = 1.0
        else:
            t += 1.0
        out.append((x, t))
    return out


def probe_config(r: int = 1, direction: str = "ArB2r", targets: list[str] | None = None) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or ["lin"], init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig(direction=direction))


MODES = [pytest.param({}, id="exact"), pytest.param({"mode": "lowmem", "passes": 1}, id="lowmem-1pass")]


def mean_batches(means: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for :class:`Probe` whose running mean gradient after ``D`` batches is ``means[D - 1]`` (out x in):
    ``x`` = the SIZE unit tokens, ``t = G_D^T`` with ``G_D = D M_D - (D - 1) M_{D-1}``, so the gradient is ``G_D``."""
    out, previous = [], torch.zeros(SIZE, SIZE, dtype=torch.float64)
    for d, m in enumerate(means, 1):
        g = d * m.double() - (d - 1) * previous
        out.append((torch.eye(SIZE), g.T.float().contiguous()))
        previous = m.double()
    return out


def orthonormal(seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64)).Q


def alternating(first: torch.Tensor, second: torch.Tensor, total: int, every: int = CHECK_EVERY) -> list[torch.Tensor]:
    """Running means that are ``first`` at the checks after every, 3 every, ... backward passes and ``second`` at
    those after 2 every, 4 every, ... (so every check compares the one with the other)."""
    return [first if ((d + every - 1) // every) % 2 else second for d in range(1, total + 1)]


def counting_step(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> tuple[Callable[[], None], list[int]]:
    done: list[int] = []

    def step() -> None:
        for batch in batches:
            model(*batch).backward()
            done.append(1)

    return step, done


def expected_stop(changing: int, every: int) -> int:
    """Checks run after every ``every`` backward passes; the one after ``D`` passes compares with the subspaces of
    ``D - every``; it sees no move once ``D - every >= changing``, and two such checks in a row stop the run."""
    return every * (math.ceil(changing / every) + 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("changing", "every"), [(6, 4), (8, 4), (5, 2), (3, 1)])
def test_stops_where_the_gradient_stopped_changing(changing: int, every: int, mode: dict) -> None:  # type: ignore[type-arg]
    model = Probe()
    batches = probe_batches(changing, 60)
    step, done = counting_step(model, batches)
    plan = make_plan(model, probe_config(), until="converged", check_every=every, **mode)
    result = run_plan(model, plan, step)
    stop = expected_stop(changing, every)
    assert len(done) == stop == result.backward_passes
    assert result.convergence is not None and result.convergence["converged"]
    assert result.convergence["last_check"]["backward_passes"] == stop
    if mode:  # one pass holds factors, not the mean: the mean over the passes actually run is exact mode's
        return
    expected = sum(t.T @ x for x, t in batches[:stop]) / stop
    torch.testing.assert_close(model.lin._peft_loraga_grad, expected, rtol=1e-6, atol=0)


def run_means(means: list[torch.Tensor], config: LoraConfig, conv1d: bool = False, **kwargs: object
              ) -> tuple[int, dict]:  # type: ignore[type-arg]
    """Run ``until='converged'`` over :func:`mean_batches` of ``means``: (backward passes run, the summary)."""
    model = Probe()
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        model.lin = Conv1D(SIZE, SIZE)
    step, done = counting_step(model, mean_batches(means))
    result = run_plan(model, make_plan(model, config, until="converged", **kwargs), step)
    assert result.convergence is not None and len(done) == result.backward_passes
    return len(done), result.convergence


def spectrum(*values: float) -> torch.Tensor:
    return torch.tensor([*values] + [0.05 * 0.8 ** i for i in range(SIZE - len(values))], dtype=torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("direction", "swap"), [("ArB2r", (1, 2)), ("A2rBr", (1, 2)), ("ArBr", (0, 1))],
                         ids=["ArB2r", "A2rBr", "ArBr"])
def test_a_swap_across_lora_gas_split_is_a_move(direction: str, swap: tuple[int, int], mode: dict) -> None:  # type: ignore[type-arg]
    """r = 2: two singular values swap between every two checks, across the split of the direction between A's and
    B's indices; the top-2r subspaces stay the same on both sides (the whole-subspace measure saw no move), while A
    and B change: every batch runs. direction='random' draws from the whole top 2r, so there the same run stops."""
    u, v = orthonormal(1), orthonormal(2)
    sigma = spectrum(4.0, 3.5, 3.0, 2.5)
    swapped = sigma.clone()
    swapped[list(swap)] = sigma[list(reversed(swap))]
    means = alternating(u * sigma @ v.T, u * swapped @ v.T, 40)
    done, summary = run_means(means, probe_config(r=2, direction=direction), **mode)
    assert done == 40 and not summary["converged"] and summary["last_check"]["moved"] > 0.1
    done, summary = run_means(means, probe_config(r=2, direction="random"), **mode)
    assert summary["converged"] and done == 3 * CHECK_EVERY  # the third check (the first compares nothing)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("side", ["A", "B"])
def test_a_or_b_moving_alone_is_a_move(side: str, conv1d: bool, mode: dict) -> None:  # type: ignore[type-arg]
    """r = 2, ArB2r: only A's right vectors (v_1: replaced by an unused direction) or only B's left ones (u_3) change
    between checks, the other side's vectors all stay: every batch runs, on a Linear and on a Conv1D (stored
    (in, out): its A comes from the stored sum's left vectors)."""
    u, v = orthonormal(3), orthonormal(4)
    sigma = spectrum(4.0, 3.0, 2.0, 1.5)
    moved_u, moved_v = u.clone(), v.clone()
    if side == "A":
        moved_v[:, 0] = v[:, SIZE - 1]
    else:
        moved_u[:, 2] = u[:, SIZE - 1]
    means = alternating(u * sigma @ v.T, moved_u * sigma @ moved_v.T, 40)
    done, summary = run_means(means, probe_config(r=2), conv1d=conv1d, **mode)
    assert done == 40 and not summary["converged"] and summary["last_check"]["moved"] > 0.1


@pytest.mark.parametrize("mode", MODES)
def test_a_rank_budget_watches_every_rank_up_to_max_rank(mode: dict) -> None:  # type: ignore[type-arg]
    """r = 1 in the config, rank_budget with max_rank=4: the top 2 directions stay, directions 3 to 8 (which ranks 2
    to 4 would use) turn between two orthogonal sets at every check. Without the budget the run stops (the
    config's 2r directions converged); with it every batch runs."""
    u, v = orthonormal(5), orthonormal(6)
    sigma = torch.tensor([5.0, 4.5] + [2.0] * 6 + [0.0] * 8, dtype=torch.float64)
    turned = [0, 1, *range(8, 14), *range(2, 8), 14, 15]  # directions 3..8 replaced by 9..14 (zero before)
    means = alternating(u * sigma @ v.T, u[:, turned] * sigma @ v[:, turned].T, 40)
    done, summary = run_means(means, probe_config(r=1), **mode)
    assert summary["converged"] and done == 3 * CHECK_EVERY  # the third check (the first compares nothing)
    done, summary = run_means(means, probe_config(r=1), rank_budget="uniform", max_rank=4, **mode)
    assert done == 40 and not summary["converged"] and summary["last_check"]["moved"] > 0.1


class Branches(nn.Module):
    """:class:`Probe`'s ``lin`` and a target ``late`` that a batch reaches only when it carries ``(x, t)`` for it (a
    conditional branch, an MoE expert); each of its batches adds the same full-rank gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(SIZE, SIZE, bias=False)
        self.late = nn.Linear(SIZE, SIZE, bias=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, branch: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        loss = (self.lin(x) * t).sum()
        return loss + (self.late(branch[0]) * branch[1]).sum() if branch is not None else loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("first", "stop"), [(13, 24), (None, 16)], ids=["reached-late", "never-reached"])
def test_a_target_not_reached_yet_blocks_the_stop_for_two_checks(first: int | None, stop: int, mode: dict) -> None:  # type: ignore[type-arg]
    """``lin`` stops changing after 4 batches (alone it stops after 12). ``late`` first reached by batch 13: no
    backward pass at the checks after 4 and 8 (it blocks), after 12 (its third: taken as not reached, no longer
    blocking), reached at 16 (its first gradient: blocks), measured from 20 (its mean is constant): the run stops
    after 24 with late's gradient. Never reached: it blocks at the checks after 4 and 8 only, so the run stops after
    16 (one check later than without it) and late gets no gradient (peft's default init)."""
    gen = torch.Generator().manual_seed(7)
    branch = (torch.randn(SIZE, SIZE, generator=gen), torch.randn(SIZE, SIZE, generator=gen))
    batches = [(x, t, branch if first is not None and i + 1 >= first else None)
               for i, (x, t) in enumerate(probe_batches(4, 60))]
    model = Branches()
    step, done = counting_step(model, batches)  # type: ignore[arg-type]
    result = run_plan(model, make_plan(model, probe_config(targets=["lin", "late"]), until="converged", **mode), step)
    assert result.convergence is not None and result.convergence["converged"]
    assert len(done) == stop == result.backward_passes
    assert result.convergence["last_check"]["layers_not_reached"] == (0 if first else 1)
    if not mode:
        assert hasattr(model.late, "_peft_loraga_grad") == (first is not None)


def test_a_gradient_that_never_converges_runs_every_batch() -> None:
    model = Probe()
    batches = probe_batches(None, 40)
    step, done = counting_step(model, batches)
    result = run_plan(model, make_plan(model, probe_config(), until="converged"), step)
    assert len(done) == 40 == result.backward_passes
    summary = result.convergence
    assert summary is not None and not summary["converged"] and summary["checks"] == (40 - 1) // CHECK_EVERY  # at the forwards after 4, 8, ..., 36
    assert summary["last_check"]["moved"] > summary["tol"] and summary["last_check"]["worst_layer"] == "lin"


def test_a_stop_leaves_the_model_exactly_as_it_was() -> None:
    model = Probe()
    model.head.eval()
    model.head.weight.requires_grad_(False)
    calls: list[int] = []
    user_hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    attrs = {n: set(vars(m)) - {"_peft_loraga_grad"} for n, m in model.named_modules()}
    hooks = {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks), dict(m._backward_hooks))
             for n, m in model.named_modules()}
    batches = probe_batches(4, 100)

    def step() -> None:  # a user loop that swallows ordinary exceptions is still stopped
        for x, t in batches:
            try:
                model(x, t).backward()
            except Exception:  # pragma: no cover - the stop is not an Exception
                continue

    result = run_plan(model, make_plan(model, probe_config(), until="converged"), step)
    stop = expected_stop(4, CHECK_EVERY)
    assert result.convergence is not None and result.convergence["converged"] and result.backward_passes == stop
    assert len(calls) == stop  # the stop runs ahead of every hook: the interrupted forward ran none of the user's
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: set(vars(m)) - {"_peft_loraga_grad"} for n, m in model.named_modules()} == attrs
    assert {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks), dict(m._backward_hooks))
            for n, m in model.named_modules()} == hooks
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    user_hook.remove()
    pm = get_peft_model(model, probe_config())  # and the model goes on normally
    assert pm.base_model.model.lin.lora_A["default"].weight.shape == (1, SIZE)


def test_the_helpers_and_estimate_gradient_stop_too() -> None:
    batches = probe_batches(4, 50)
    model = Probe()
    step = train_step_from_dataloader(model, batches, loss_fn=lambda out, batch: out)
    preprocess_loraga(model, probe_config(), step, until="converged", convergence_tol=0.05)
    stop = expected_stop(4, CHECK_EVERY)
    expected = sum(t.T @ x for x, t in batches[:stop]) / stop
    torch.testing.assert_close(model.lin._peft_loraga_grad, expected, rtol=1e-6, atol=0)
    named = estimate_gradient(Probe(), batches, loss_fn=lambda out, batch: out, progress=False,
                              lora_config=probe_config(), until="converged")
    torch.testing.assert_close(named["lin"], expected, rtol=1e-6, atol=0)

    class Trainer:  # the four things train_step_from_trainer uses of a transformers Trainer
        model = Probe()

        def get_train_dataloader(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return batches

        def _prepare_inputs(self, batch: object) -> object:
            return batch

        def compute_loss(self, model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return model(*inputs)

    trainer = Trainer()
    preprocess_loraga(trainer.model, probe_config(), train_step_from_trainer(trainer), until="converged")
    torch.testing.assert_close(trainer.model.lin._peft_loraga_grad, expected, rtol=1e-6, atol=0)


def test_a_real_model_without_convergence_equals_the_plain_run() -> None:
    """On random tokens the subspaces keep moving: until='converged' then runs every batch, and gives the plain mean.
    16 batches: checks after 4, 8 and 12, so a measure that saw no move would stop after 12."""
    batches = token_batches(n=16)
    plain, conv = tiny_llama(), tiny_llama()
    preprocess_loraga(plain, lora_ga_config(), train_step_for(plain, batches))
    plan = make_plan(conv, lora_ga_config(), until="converged")
    result = run_plan(conv, plan, train_step_for(conv, batches))
    assert result.backward_passes == 16 and result.convergence is not None
    assert not result.convergence["converged"] and result.convergence["checks"] == 3
    assert result.convergence["last_check"]["moved"] > result.convergence["tol"]
    a, b = attached(plain), attached(conv)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_the_checks_factorization_against_exact_svds() -> None:
    """Exact mode's check (a warm-started randomized subspace iteration, two iterations) measures the moves that the
    same check computes from exact SVDs (one-pass mode's check reads its store's factorization: here float64 SVDs
    of the very sums), on a decaying spectrum whose subspaces rotate a little; per layer, at ranks 3 and 2."""
    g = torch.Generator().manual_seed(0)
    decay = 0.7 ** torch.arange(24.0, dtype=torch.float64)  # a decaying spectrum, as gradients have
    u = torch.linalg.qr(torch.randn(2, 24, 24, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(2, 40, 24, generator=g, dtype=torch.float64)).Q
    u2 = torch.linalg.qr(u + 0.2 * torch.randn(2, 24, 24, generator=g, dtype=torch.float64)).Q  # rotated subspaces
    v2 = torch.linalg.qr(v + 0.2 * torch.randn(2, 40, 24, generator=g, dtype=torch.float64)).Q
    sums = [u * decay @ v.mT, u2 * decay @ v2.mT]
    ranks = {"a": 3, "b": 2}
    exact = AccumulatorStore([(name, (24, 40), torch.device("cpu")) for name in ranks])
    stream = StreamStore([SketchSpec(name, 24, 40, 24, torch.device("cpu")) for name in ranks])
    for slot in [*exact.slots.values(), *stream.slots.values()]:
        slot.count = 1  # a backward pass reached every layer
    monitors = [ConvergenceMonitor(store, ranks, StopRule(tol=0.1, every=1)) for store in (exact, stream)]
    for step, m in enumerate(sums, 1):
        exact.shape_groups[0].tensor.copy_(m)
        su, ss, svh = torch.linalg.svd(m, full_matrices=False)
        group = stream.shape_groups[0]
        group.u.copy_(su)
        group.s.copy_(ss)
        group.v.copy_(svh.mT)
        checks = [monitor.check(step) for monitor in monitors]
    approx, reference = (monitor.moves for monitor in monitors)
    assert approx.keys() == reference.keys() == ranks.keys()
    for name in ranks:
        assert approx[name] == pytest.approx(reference[name], rel=1e-4), name
    assert 0.1 < min(reference.values())  # the case does move
    assert checks[0].worst_layer == checks[1].worst_layer and checks[0].above_tol == checks[1].above_tol == 2


def _never_called() -> None:
    raise AssertionError("train_step ran")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"until": "converged", "convergence_tol": 0.0}, r"convergence_tol must be a number in \(0, 1\)"),
    ({"until": "converged", "convergence_tol": 1.0}, r"convergence_tol must be a number in \(0, 1\)"),
    ({"until": "converged", "convergence_tol": -0.1}, r"convergence_tol must be a number in \(0, 1\)"),
    ({"until": "converged", "convergence_tol": "tight"}, r"convergence_tol must be a number in \(0, 1\)"),
    ({"until": "never"}, "until must be None"),
    ({"convergence_tol": 0.1}, "convergence_tol applies to until='converged' only"),
    ({"until": "converged", "mode": "lowmem"}, "until='converged' in low-memory mode needs passes=1: with passes=3"),
    ({"until": "converged", "mode": "lowmem", "passes": 2}, "needs passes=1: with passes=2 the first pass holds only"),
])
def test_bad_arguments_fail_before_any_data_is_read(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        preprocess_loraga(tiny_llama(), lora_ga_config(), _never_called, **kwargs)
    if "mode" not in kwargs:  # estimate_gradient has no low-memory mode
        with pytest.raises(ValueError, match=match):
            estimate_gradient(tiny_llama(), [_never_called], progress=False, **kwargs)
