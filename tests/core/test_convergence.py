"""until="converged": a gradient that stops changing after a known number of batches stops where the rule says, one
that never converges runs every batch, a stop leaves the model exactly as it was, the check's measure against
float64 SVDs, and bad arguments fail before any data is read. (Data parallel and FSDP: tests/distributed/
test_convergence_ranks.py.)"""

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


def probe_config() -> LoraConfig:
    return LoraConfig(r=1, lora_alpha=2, target_modules=["lin"], init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig())


def counting_step(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Callable[[], None], list[int]]:
    done: list[int] = []

    def step() -> None:
        for x, t in batches:
            model(x, t).backward()
            done.append(1)

    return step, done


def expected_stop(changing: int, every: int) -> int:
    """Checks run after every ``every`` backward passes; the one after ``D`` passes compares with the subspaces of
    ``D - every``; it sees no move once ``D - every >= changing``, and two such checks in a row stop the run."""
    return every * (math.ceil(changing / every) + 2)


@pytest.mark.parametrize(("changing", "every"), [(6, 4), (8, 4), (5, 2), (3, 1)])
def test_stops_where_the_gradient_stopped_changing(changing: int, every: int) -> None:
    model = Probe()
    batches = probe_batches(changing, 60)
    step, done = counting_step(model, batches)
    plan = make_plan(model, probe_config(), until="converged", check_every=every)
    result = run_plan(model, plan, step)
    stop = expected_stop(changing, every)
    assert len(done) == stop == result.backward_passes
    assert result.convergence is not None and result.convergence["converged"]
    assert result.convergence["last_check"]["backward_passes"] == stop
    # the mean over the passes actually run
    expected = sum(t.T @ x for x, t in batches[:stop]) / stop
    torch.testing.assert_close(model.lin._peft_loraga_grad, expected, rtol=1e-6, atol=0)


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
    """On random tokens the subspaces keep moving: until='converged' then runs every batch, and gives the plain mean."""
    batches = token_batches(n=9)
    plain, conv = tiny_llama(), tiny_llama()
    preprocess_loraga(plain, lora_ga_config(), train_step_for(plain, batches))
    preprocess_loraga(conv, lora_ga_config(), train_step_for(conv, batches), until="converged")
    a, b = attached(plain), attached(conv)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_the_measure_against_float64_svds() -> None:
    """moved = 1 - min(||M V_prev||^2, ||U_prev^T M||^2) / sum_{i<=2r} s_i(M)^2 with exact SVDs of both checks."""
    g = torch.Generator().manual_seed(0)
    decay = 0.7 ** torch.arange(24.0)  # a decaying spectrum, as gradients have (a flat one has no stable subspace)
    u = torch.linalg.qr(torch.randn(2, 24, 24, generator=g)).Q
    v = torch.linalg.qr(torch.randn(2, 40, 24, generator=g)).Q
    m1 = u * decay @ v.mT
    u2 = torch.linalg.qr(u + 0.2 * torch.randn(2, 24, 24, generator=g)).Q  # the same spectrum, rotated subspaces
    v2 = torch.linalg.qr(v + 0.2 * torch.randn(2, 40, 24, generator=g)).Q
    m2 = u2 * decay @ v2.mT
    store = AccumulatorStore([("a", (24, 40), torch.device("cpu")), ("b", (24, 40), torch.device("cpu"))])
    monitor = ConvergenceMonitor(store, {"a": 3, "b": 2}, StopRule(tol=0.1, every=1))
    store.shape_groups[0].tensor.copy_(m1)
    assert monitor.check(1).moved is None
    store.shape_groups[0].tensor.copy_(m2)
    check = monitor.check(2)
    expected = []
    for j, r in enumerate((3, 2)):
        u1, _, vh1 = torch.linalg.svd(m1[j].double())
        s2 = torch.linalg.svdvals(m2[j].double())
        k = 2 * r
        opt = s2[:k].square().sum()
        got = min((m2[j].double() @ vh1[:k].T).square().sum(), (u1[:, :k].T @ m2[j].double()).square().sum())
        expected.append((1 - got / opt).item())
    assert check.moved == pytest.approx(max(expected), rel=1e-3)
    assert check.worst_layer == "ab"[expected.index(max(expected))] and check.above_tol == sum(e > 0.1 for e in expected)
    assert 0.01 < min(expected)  # the case does move


def _never_called() -> None:
    raise AssertionError("train_step ran")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"until": "converged", "convergence_tol": 0.0}, r"convergence_tol must be a number in \(0, 1\)"),
    ({"until": "converged", "convergence_tol": 1.0}, r"convergence_tol must be a number in \(0, 1\)"),
    ({"until": "converged", "convergence_tol": -0.1}, r"convergence_tol must be a number in \(0, 1\)"),
    ({"until": "converged", "convergence_tol": "tight"}, r"convergence_tol must be a number in \(0, 1\)"),
    ({"until": "never"}, "until must be None"),
    ({"convergence_tol": 0.1}, "convergence_tol applies to until='converged' only"),
    ({"until": "converged", "mode": "lowmem"}, "not available in low-memory mode"),
])
def test_bad_arguments_fail_before_any_data_is_read(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        preprocess_loraga(tiny_llama(), lora_ga_config(), _never_called, **kwargs)
    if "mode" not in kwargs:  # estimate_gradient has no low-memory mode
        with pytest.raises(ValueError, match=match):
            estimate_gradient(tiny_llama(), [_never_called], progress=False, **kwargs)
