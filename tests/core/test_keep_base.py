"""``keep_base=``: an init from the estimated gradient that leaves every base weight bit-identical, so the adapter
(initial or trained) is a plain LoRA adapter for the original base: ``"a-only"`` (``A`` = top-r right singular
vectors of the float64 reference gradient, ``B = 0``: the function unchanged) and ``"lora-one"`` (``B A = -G_r /
stable_gamma``: the model one step down the gradient); saved and reloaded on a fresh base, through
``save_pretrained`` and through ``save_loraga_model_init`` / ``save_loraga_model_final``; Conv1D; QLoRA without
requantization; the refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

from loraga_fast import check_preprocess, preprocess_loraga, save_loraga_model_final, save_loraga_model_init
from tests._helpers import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    adapters,
    lora_ga_config,
    reference_mean_grads,
    subspace_cos,
    tiny_gpt2,
    tiny_llama,
    token_batches,
    train_step_for,
)

R = 4
GAMMA = 4


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model.").replace(".base_layer", ""): p.detach().clone()
            for n, p in model.named_parameters() if "lora_" not in n}


def _init(make, targets, keep_base):  # type: ignore[no-untyped-def]
    model = make()
    batches = token_batches()
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
             and n.split(".")[-1] in targets]
    ref = reference_mean_grads(model, names, batches)
    before = _weights(model)
    cfg = lora_ga_config(targets, stable_gamma=GAMMA)
    preprocess_loraga(model, cfg, train_step_for(model, batches), keep_base=keep_base)
    pm = get_peft_model(model, cfg)
    return pm, cfg, before, ref


@pytest.mark.parametrize("make,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, GPT2_TARGETS)],
                         ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("keep_base", [True, "a-only", "lora-one"])
def test_the_base_is_bit_identical_and_the_adapters_come_from_the_gradient(make, targets, keep_base) -> None:  # type: ignore[no-untyped-def]
    base = make()
    x = token_batches(n=1, seed=9)[0]
    with torch.no_grad():
        y0 = base(x).logits
    pm, cfg, before, ref = _init(make, targets, keep_base)
    after = _weights(pm)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before), "a base weight changed"
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    for name, (a, b) in adapters(pm).items():
        g = ref[name].double()
        if layers[name].fan_in_fan_out:
            g = g.T  # the math layout (out, in)
        u, s, vh = torch.linalg.svd(g)
        assert subspace_cos(a.T.double(), vh[:R].T) > 0.999, name  # A spans the top-r right singular vectors
        if keep_base == "lora-one":
            g_r = (u[:, :R] * s[:R]) @ vh[:R]
            torch.testing.assert_close((b @ a).double(), -g_r / GAMMA, rtol=0, atol=2e-3 * float(g_r.abs().max()) / GAMMA)
        else:
            assert torch.count_nonzero(b) == 0, name
            torch.testing.assert_close(a.double() @ a.double().T, torch.eye(R, dtype=torch.float64), atol=1e-5, rtol=0)
    with torch.no_grad():
        y1 = pm(x).logits
    if keep_base == "lora-one":
        assert (y1 - y0).abs().max() > 1e-6  # one step down the gradient: the function moved
    else:
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)  # B = 0: exactly the original function


@pytest.mark.parametrize("keep_base", ["a-only", "lora-one"])
def test_the_trained_adapter_reloads_on_a_fresh_base(keep_base: str, tmp_path: Path) -> None:
    pm, _, _, _ = _init(tiny_llama, LLAMA_TARGETS, keep_base)
    save_loraga_model_init(pm, tmp_path / "run")
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for batch in token_batches(n=2, seed=4):
        pm(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    x = token_batches(n=1, seed=9)[0]
    with torch.no_grad():
        trained = pm(x).logits
    pm.save_pretrained(tmp_path / "plain")
    save_loraga_model_final(pm, tmp_path / "run")
    for folder in ("plain", "run"):  # either way: the adapter for the untouched base
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, trained, rtol=1e-5, atol=1e-5)
        assert loaded.peft_config["default"].r == R  # no rank-2r conversion: there is no offset to undo


def test_qlora_base_is_not_requantized() -> None:
    pytest.importorskip("bitsandbytes")
    from loraga_fast.api.quantize import quantize_model

    model = quantize_model(tiny_llama(hidden=64), "nf4", torch.float32, "cpu")
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert packed
    cfg = lora_ga_config(LLAMA_TARGETS)
    preprocess_loraga(model, cfg, train_step_for(model, token_batches()), keep_base=True)
    pm = get_peft_model(model, cfg)
    after = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
             for n, p in pm.named_parameters() if p.dtype == torch.uint8}
    assert after.keys() == packed.keys() and all(torch.equal(after[n], packed[n]) for n in packed)
    assert all(torch.count_nonzero(b) == 0 for _, b in adapters(pm).values())


def _never_called() -> None:
    raise AssertionError("train_step ran")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"keep_base": "pissa"}, "keep_base must be False, True or one of 'a-only', 'lora-one', got 'pissa'"),
    ({"keep_base": 1}, "keep_base must be False, True or one of"),
    ({"keep_base": True, "rank_budget": "uniform"}, "keep_base cannot be combined with rank_budget"),
])
def test_bad_keep_base_fails_before_any_data_is_read(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    model = tiny_llama()
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        preprocess_loraga(model, lora_ga_config(), _never_called, **kwargs)
    with pytest.raises(ValueError, match=match):
        check_preprocess(model, lora_ga_config(), **kwargs)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
