"""LoRA-GA initialization from our batched factors: peft's config knobs by value, and the hand-off's hygiene."""

from __future__ import annotations

import copy
import gc
import logging

import peft
import pytest
import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from loraga_fast import preprocess_loraga
from tests._helpers import (
    TwoBranch,
    attached,
    lm_loss,
    lora_ga_config,
    subspace_cos,
    tiny_llama,
    token_batches,
    train_step_for,
)

PEFT_LORA_GA_INIT = LoraLayer.lora_ga_init


def _prepare(model: nn.Module, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Run our preprocess; returns copies of the mean gradients and of the weights before init."""
    preprocess_loraga(model, cfg, train_step_for(model, token_batches()))
    return {n: g.clone() for n, g in attached(model).items()}


def _layer(pm: nn.Module, name: str) -> LoraLayer:
    return dict(pm.named_modules())[f"base_model.model.{name}"]


def _forbid_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("per-layer torch.svd_lowrank ran")

    monkeypatch.setattr(torch, "svd_lowrank", forbidden)


def test_rank_pattern_alpha_pattern_and_gd_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                     alpha_pattern={"v_proj": 32}, init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(direction="ArB2r", scale="gd_scale"))
    grads = _prepare(model, cfg)
    _forbid_svd(monkeypatch)
    pm = get_peft_model(model, cfg)
    for name, r, alpha in [("model.layers.0.self_attn.q_proj", 2, 8), ("model.layers.1.self_attn.v_proj", 4, 32)]:
        layer = _layer(pm, name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        scaling = alpha / r
        assert a.shape == (r, 32) and layer.scaling["default"] == scaling
        u, s, vh = torch.linalg.svd(grads[name].double())
        # ArB2r: A = Vh[:r] / scaling, B = U[:, r:2r] S[r:2r] / scaling  (gd_scale)
        assert subspace_cos(a.T, vh[:r].T) > 0.999 and subspace_cos(b, u[:, r : 2 * r]) > 0.999
        torch.testing.assert_close(a.double().norm(dim=1), torch.full((r,), 1 / scaling, dtype=torch.float64), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.linalg.svdvals(b.double()), s[r : 2 * r] / scaling, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(layer.get_base_layer().weight - w0[name], -scaling * (b @ a), rtol=1e-4, atol=1e-7)


def test_rslora_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    cfg = lora_ga_config(["o_proj"], direction="A2rBr", scale="unit")
    cfg.use_rslora = True
    grads = _prepare(model, cfg)
    w0 = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    _forbid_svd(monkeypatch)
    pm = get_peft_model(model, cfg)
    layer = _layer(pm, "model.layers.0.self_attn.o_proj")
    scaling = 8 / 4**0.5
    assert layer.scaling["default"] == pytest.approx(scaling)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    u, s, vh = torch.linalg.svd(grads["model.layers.0.self_attn.o_proj"].double())
    # A2rBr, unit: A = Vh[r:2r], B = U[:, :r] S[:r]
    torch.testing.assert_close(torch.linalg.svdvals(b.double()), s[:4], rtol=1e-4, atol=1e-9)
    assert subspace_cos(a.T, vh[4:8].T) > 0.999
    torch.testing.assert_close(layer.get_base_layer().weight - w0, -scaling * (b @ a), rtol=1e-4, atol=1e-7)


def test_dora_magnitude_comes_from_the_offset_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_llama()
    x = token_batches(n=1, seed=7)[0]
    with torch.no_grad():
        before = base(x).logits
    results = []
    for ours in (True, False):
        model = copy.deepcopy(base)
        cfg = lora_ga_config(["q_proj", "down_proj"])
        cfg.use_dora = True
        (preprocess_loraga if ours else peft.preprocess_loraga)(model, cfg, train_step_for(model, token_batches()))
        pm = get_peft_model(model, cfg)
        with torch.no_grad():
            torch.testing.assert_close(pm(x).logits, before, rtol=1e-4, atol=1e-4)
        results.append(pm)
    ours_pm, peft_pm = results
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        mag = _layer(ours_pm, name).lora_magnitude_vector["default"].weight
        original = dict(base.named_modules())[name].weight
        # W_offset + scaling * B @ A == W_original, so DoRA's magnitude is the original weight's row norms
        torch.testing.assert_close(mag, original.norm(dim=1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mag, _layer(peft_pm, name).lora_magnitude_vector["default"].weight, rtol=1e-5, atol=1e-6)


def test_non_finite_gradient_raises_before_anything_is_modified() -> None:
    gc.collect()  # models prepared by earlier tests and dropped: their wrapper goes with them
    assert LoraLayer.lora_ga_init is PEFT_LORA_GA_INIT
    model = tiny_llama()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    def overflowing_step() -> None:
        (lm_loss(model, token_batches(n=1)[0]) * float("inf")).backward()

    with pytest.raises(ValueError, match=r"not finite \(NaN/Inf\).*model\.layers\.0\.self_attn\.q_proj"):
        preprocess_loraga(model, lora_ga_config(), overflowing_step)
    assert not attached(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert LoraLayer.lora_ga_init is PEFT_LORA_GA_INIT


@pytest.mark.parametrize("mode", ["exact", "lowmem"])
def test_zero_gradient_warns_and_gets_default_init(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    model = TwoBranch()
    dead_w = model.dead.weight.detach().clone()
    xs = [torch.randn(12, 16) for _ in range(2)]
    cfg = lora_ga_config(["used", "dead"])
    with caplog.at_level(logging.WARNING, logger="loraga_fast"):
        preprocess_loraga(model, cfg, lambda: [model(x).backward() for x in xs] and None, mode=mode)
    assert "all zero" in caplog.text and "dead" in caplog.text
    if mode == "exact":  # still readable, as peft attaches it (low-memory mode attaches a placeholder)
        assert torch.equal(model.dead._peft_loraga_grad, torch.zeros(16, 16))
    pm = get_peft_model(model, cfg)
    dead = pm.base_model.model.dead
    assert torch.isfinite(dead.lora_A["default"].weight).all() and dead.lora_A["default"].weight.abs().sum() > 0
    assert torch.equal(dead.lora_B["default"].weight, torch.zeros(16, 4))
    assert torch.equal(dead.get_base_layer().weight, dead_w)
    assert pm.base_model.model.used.lora_B["default"].weight.abs().sum() > 0


def test_rank_too_large_for_a_layer_raises() -> None:
    model = tiny_llama()
    cfg = lora_ga_config(["k_proj"])  # k_proj is 16 x 32 (2 KV heads of 8)
    cfg.r = 9
    with pytest.raises(ValueError, match=r"2 \* r <= min.*'model.layers.0.self_attn.k_proj'.*r=9"):
        preprocess_loraga(model, cfg, train_step_for(model, token_batches(n=1)))
    assert not attached(model)


def test_hand_off_is_scoped_to_prepared_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    gc.collect()
    assert LoraLayer.lora_ga_init is PEFT_LORA_GA_INIT
    ours = tiny_llama()
    cfg_ours = lora_ga_config(["q_proj"])
    preprocess_loraga(ours, cfg_ours, train_step_for(ours, token_batches()))
    assert LoraLayer.lora_ga_init is not PEFT_LORA_GA_INIT  # wrapped while prepared layers exist

    # a model prepared by peft alone goes through peft's own path, untouched by our wrapper
    theirs = tiny_llama()
    cfg_theirs = lora_ga_config(["q_proj"])
    peft.preprocess_loraga(theirs, cfg_theirs, train_step_for(theirs, token_batches()))
    calls = []
    real_svd = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    get_peft_model(theirs, cfg_theirs)
    assert len(calls) == 2

    # a gradient the user replaced is respected: peft's path runs for that layer
    ours.model.layers[1].self_attn.q_proj._peft_loraga_grad = torch.randn(32, 32)
    calls.clear()
    get_peft_model(ours, cfg_ours)
    assert len(calls) == 1
    assert LoraLayer.lora_ga_init is PEFT_LORA_GA_INIT  # nothing prepared is left: the wrapper is gone


def test_cached_gradients_are_factored_too(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "g.safetensors"
    first = tiny_llama()
    preprocess_loraga(first, lora_ga_config(), train_step_for(first, token_batches()), cache_file=path)
    get_peft_model(first, lora_ga_config())
    second = tiny_llama()
    preprocess_loraga(second, lora_ga_config(), lambda: None, cache_file=path)
    _forbid_svd(monkeypatch)
    pm = get_peft_model(second, lora_ga_config())
    assert _layer(pm, "model.layers.0.mlp.up_proj").lora_B["default"].weight.abs().sum() > 0
