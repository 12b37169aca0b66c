"""rank_budget=: the allocation against hand-computed and brute-force optima, the budget met, peft's rank_pattern /
alpha_pattern through get_peft_model, save_pretrained and PeftModel.from_pretrained, the adapters against exact
SVDs at the allocated ranks (both modes), and bad budgets failing before any data is read."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model
from torch import nn

from loraga_fast import check_preprocess, preprocess_loraga
from loraga_fast.core.allocation import allocate, apply_ranks, decrease_curve, lora_params, rank_budget
from tests._helpers import (
    LLAMA_TARGETS,
    adapters,
    attached,
    lora_ga_config,
    subspace_cos,
    tiny_llama,
    token_batches,
    train_step_for,
)


def test_hand_computed_optimum() -> None:
    """Three layers with concave curves D(r). a (cost 10): gains 2, 1, 0 per rank from r = 1; b (cost 10): 8, 8;
    c (cost 20): 50, 0. Gains per parameter: a 0.2, 0.1; b 0.8, 0.8; c 2.5, 0. A budget of 70 = min_rank 1 everywhere
    (40) + 30: c -> 2 (20), then b -> 2 (10)."""
    curves = {"a": [0, 5, 7, 8, 8], "b": [0, 4, 12, 20], "c": [0, 100, 150, 150]}
    costs = {"a": 10, "b": 10, "c": 20}
    ranks = allocate(curves, costs, 70, 1, {"a": 3, "b": 3, "c": 3})
    assert ranks == {"a": 1, "b": 2, "c": 2} and lora_params(ranks, costs) == 70
    # with 10 more: b's third rank (0.8) beats a's second (0.2); c's third gains nothing
    assert allocate(curves, costs, 80, 1, {"a": 3, "b": 3, "c": 3}) == {"a": 1, "b": 3, "c": 2}
    # max_rank caps it: then a's second rank
    assert allocate(curves, costs, 80, 1, {"a": 3, "b": 2, "c": 3}) == {"a": 2, "b": 2, "c": 2}


def test_a_step_over_a_flat_increment_is_taken_when_it_pays() -> None:
    """Non-concave gains (weight_svd's can be): a's second rank gains nothing, its third a lot. One increment at a
    time would never reach it; the step of best average gain (two increments, 5 per rank) beats b's 1 per rank."""
    curves = {"a": [0, 1, 1, 11], "b": [0, 1, 2, 3]}
    costs = {"a": 10, "b": 10}
    assert allocate(curves, costs, 40, 1, {"a": 3, "b": 3}) == {"a": 3, "b": 1}
    # a budget that cannot pay for the whole step: the best step that fits (b's)
    assert allocate(curves, costs, 30, 1, {"a": 3, "b": 3}) == {"a": 1, "b": 2}


def _curves(spectra: dict[str, torch.Tensor], max_rank: int, scale: str = "stable") -> dict[str, list[float]]:
    return {n: decrease_curve(s.tolist(), max_rank, "ArB2r", scale, scaling=2.0, stable_factor=0.8, weight_sigma=3.0)
            for n, s in spectra.items()}


@pytest.mark.parametrize("seed", range(5))
def test_equal_costs_match_the_brute_force_optimum_and_fill_the_budget(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    spectra = {name: torch.rand(8, generator=g).sort(descending=True).values * 10 ** torch.rand(1, generator=g)
               for name in "abcd"}
    curves = _curves(spectra, 4)
    costs = dict.fromkeys(spectra, 7)
    budget = 7 * 9  # min_rank 1 on each of 4 layers, 5 ranks to place
    ranks = allocate(curves, costs, budget, 1, dict.fromkeys(spectra, 4))
    assert lora_params(ranks, costs) == budget

    def total(rs: dict[str, int]) -> float:
        return sum(curves[n][r] for n, r in rs.items())

    best = max((dict(zip("abcd", combo)) for combo in itertools.product(range(1, 5), repeat=4) if sum(combo) == 9),
               key=total)
    assert total(ranks) == pytest.approx(total(best), rel=1e-6)


def test_unequal_costs_never_exceed_the_budget_and_leave_less_than_any_increment() -> None:
    g = torch.Generator().manual_seed(3)
    costs = {"q": 64, "k": 48, "up": 112, "down": 112}
    for scale in ("stable", "weight_svd"):
        curves = _curves({n: torch.rand(32, generator=g).sort(descending=True).values for n in costs}, 16, scale)
        max_ranks = dict.fromkeys(costs, 16)
        for budget in (400, 1000, 1234, 2 * sum(costs.values()) * 4 + 5):
            ranks = allocate(curves, costs, budget, 1, max_ranks)
            left = budget - lora_params(ranks, costs)
            assert 0 <= left
            growable = [costs[n] for n in costs if ranks[n] < max_ranks[n]]
            assert not growable or left < min(growable)


def _model_and_budget(**kwargs: object) -> tuple[nn.Module, LoraConfig, dict[str, torch.Tensor]]:
    model = tiny_llama()
    cfg = lora_ga_config(scale="unit", direction="ArB2r")
    preprocess_loraga(model, cfg, train_step_for(model, token_batches(n=4)), **kwargs)  # type: ignore[arg-type]
    return model, cfg, {n: g.clone() for n, g in attached(model).items()}


def test_allocated_ranks_are_peft_rank_and_alpha_patterns_and_the_adapters_are_lora_ga_at_them() -> None:
    model, cfg, grads = _model_and_budget(rank_budget="uniform")
    shapes = {n: tuple(g.shape) for n, g in grads.items()}
    costs = {n: m + k for n, (m, k) in shapes.items()}
    ranks = {n: cfg.rank_pattern[n] for n in grads}
    left = 4 * sum(costs.values()) - lora_params(ranks, costs)  # uniform r = 4's budget
    assert 0 <= left < min(costs[n] for n in ranks if ranks[n] < min(shapes[n]) // 2)
    assert len(set(ranks.values())) > 2  # the spectra differ: so do the ranks
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in grads}
    pm = get_peft_model(model, cfg)
    got = adapters(pm)
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    for name, r in ranks.items():
        a, b = got[name]
        layer = layers[name]
        assert a.shape == (r, shapes[name][1]) and b.shape == (shapes[name][0], r)
        assert cfg.alpha_pattern[name] == 2 * r and layer.scaling["default"] == pytest.approx(2.0)  # alpha / r kept
        u, s, vh = torch.linalg.svd(grads[name].double())
        # ArB2r, unit: A = Vh[:r], B = U[:, r:2r] S[r:2r] (peft's math at the allocated rank)
        assert subspace_cos(a.T, vh[:r].T) > 0.999 and subspace_cos(b, u[:, r : 2 * r]) > 0.999
        torch.testing.assert_close(torch.linalg.svdvals(b.double()), s[r : 2 * r], rtol=1e-4, atol=1e-9)
        offset = layer.get_base_layer().weight - weights[name]
        torch.testing.assert_close(offset, -2.0 * (b @ a), rtol=1e-4, atol=1e-7)


def test_the_largest_allocations_go_where_the_decrease_per_parameter_is() -> None:
    _, cfg, grads = _model_and_budget(rank_budget="uniform", min_rank=2, max_rank=8)
    ranks = {n: cfg.rank_pattern[n] for n in grads}
    assert min(ranks.values()) >= 2 and max(ranks.values()) <= 8
    costs = {n: sum(g.shape) for n, g in grads.items()}
    # the greedy's condition, from exact singular values: no layer's next rank gains more per parameter than some
    # layer's last one (ArB2r / unit: concave curves)
    curves = {n: decrease_curve(torch.linalg.svdvals(g.double()).tolist(), 8, "ArB2r", "unit", scaling=2.0)
              for n, g in grads.items()}

    def gain(n: str, r: int) -> float:
        return (curves[n][r] - curves[n][r - 1]) / costs[n]

    last = min(gain(n, r) for n, r in ranks.items() if r > 2)
    following = max(gain(n, r + 1) for n, r in ranks.items() if r < 8)
    assert following <= last * (1 + 1e-3)


def test_rank_pattern_round_trips_through_save_and_load(tmp_path: Path) -> None:
    model, cfg, _ = _model_and_budget(rank_budget=3000)
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(tmp_path)
    saved = adapters(pm)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    back = adapters(loaded)
    assert loaded.peft_config["default"].rank_pattern == cfg.rank_pattern
    assert back.keys() == saved.keys() and len(back) == 14
    for name, (a, b) in saved.items():
        assert torch.equal(back[name][0], a) and torch.equal(back[name][1], b), name
    assert sum(a.numel() + b.numel() for a, b in back.values()) <= 3000


def test_low_memory_mode_allocates_the_same_ranks() -> None:
    """tiny_llama's sketches span whole layers (k = 24 r > min(m, n)), so the spectra, and the ranks, are exact mode's."""
    _, exact, _ = _model_and_budget(rank_budget="uniform")
    model = tiny_llama()
    cfg = lora_ga_config(scale="unit", direction="ArB2r")
    preprocess_loraga(model, cfg, train_step_for(model, token_batches(n=4)), mode="lowmem", rank_budget="uniform")
    assert cfg.rank_pattern == exact.rank_pattern
    pm = get_peft_model(model, cfg)
    assert {n: a.shape[0] for n, (a, _) in adapters(pm).items()} == exact.rank_pattern


def test_names_that_match_each_other_get_their_own_ranks() -> None:
    """A top-level target ``proj`` and a nested ``block.proj``: peft's pattern match would give ``block.proj`` the
    key ``proj`` first; the keys are anchored so each layer reads its own rank (an assert guarded this before,
    gone under ``python -O``)."""

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.block = nn.Module()
            self.block.proj = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block.proj(self.proj(x))

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(scale="unit"))
    budget = rank_budget(cfg, {"proj": (16, 16), "block.proj": (16, 16)}, {"proj": 2, "block.proj": 2}, "uniform")
    assert budget is not None
    apply_ranks(cfg, budget, {"proj": 1, "block.proj": 3})
    model = Nested()
    pm = get_peft_model(model, cfg)
    assert pm.base_model.model.proj.r["default"] == 1 and pm.base_model.model.block.proj.r["default"] == 3
    assert pm.base_model.model.proj.scaling["default"] == pm.base_model.model.block.proj.scaling["default"] == 2.0


def _never_called() -> None:
    raise AssertionError("train_step ran")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rank_budget": 100}, r"rank_budget=100 \(100 LoRA parameters\) is smaller than min_rank=1 on every target"),
    ({"rank_budget": "uniform", "min_rank": 5}, "is smaller than min_rank=5 on every target"),
    ({"rank_budget": "uniform", "max_rank": 9}, r"max_rank=9 is over min\(m, n\) / 2 = 8 for layer 'model.layers.0.self_attn.k_proj'"),
    ({"rank_budget": "all"}, "rank_budget must be 'uniform'"),
    ({"rank_budget": 0}, "rank_budget must be 'uniform'"),
    ({"rank_budget": 2.5}, "rank_budget must be 'uniform'"),
    ({"rank_budget": "uniform", "min_rank": 0}, "min_rank must be a whole number >= 1"),
    ({"rank_budget": "uniform", "min_rank": 3, "max_rank": 2}, "max_rank=2 is below min_rank=3"),
    ({"max_rank": 4}, "min_rank and max_rank apply to rank_budget only"),
    ({"rank_budget": "uniform", "mode": "lowmem", "sketch_size": 8, "max_rank": 6}, "raise sketch_size"),
    ({"rank_budget": "uniform", "use_rslora": True}, "rank_budget cannot be combined with use_rslora=True"),
])
def test_bad_budgets_fail_before_any_data_is_read(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    rslora = kwargs.pop("use_rslora", False)
    for run in (lambda cfg: preprocess_loraga(tiny_llama(), cfg, _never_called, **kwargs),
                lambda cfg: check_preprocess(tiny_llama(), cfg, **kwargs)):
        cfg = lora_ga_config()
        cfg.use_rslora = rslora
        with pytest.raises(ValueError, match=match):
            run(cfg)


def test_uniform_counts_the_configs_own_ranks() -> None:
    cfg = lora_ga_config(LLAMA_TARGETS)
    cfg.rank_pattern = {"q_proj": 2}
    plan = check_preprocess(tiny_llama(), cfg, rank_budget="uniform")
    assert plan.budget is not None
    expected = sum((2 if n.endswith("q_proj") else 4) * sum(m.weight.shape) for n, m in plan.targets)
    assert plan.budget.params == expected
