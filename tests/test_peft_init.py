"""After loraga_fast.preprocess_loraga, peft.get_peft_model initializes LoRA-GA exactly as with peft's own."""

from __future__ import annotations

import copy
import itertools

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model

from loraga_fast import preprocess_loraga
from tests._helpers import lora_ga_config, tiny_llama, token_batches, train_step_for

DIRECTIONS = ["ArBr", "A2rBr", "ArB2r", "random"]
SCALES = ["stable", "weight_svd", "gd_scale", "unit"]


def _lora_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


@pytest.mark.parametrize("direction,scale", list(itertools.product(DIRECTIONS, SCALES)))
def test_all_directions_and_scales_match_peft(direction: str, scale: str) -> None:
    batches = token_batches()
    base = tiny_llama()
    x = token_batches(n=1, seed=7)[0]
    with torch.no_grad():
        before = base(x).logits

    results = []
    for pre in (preprocess_loraga, peft.preprocess_loraga):
        model = copy.deepcopy(base)
        cfg = lora_ga_config(direction=direction, scale=scale, stable_gamma=4)
        pre(model, cfg, train_step_for(model, batches))
        torch.manual_seed(0)  # svd_lowrank and the "random" direction draw from torch's generator
        pm = get_peft_model(model, cfg)
        with torch.no_grad():
            after = pm(x).logits
        # the base-weight offset cancels the adapter: the model's function is unchanged by the initialization
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        assert not any(hasattr(m, "_peft_loraga_grad") for m in pm.modules())
        results.append(_lora_factors(pm))
    ours, theirs = results
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for n in ours:
        (a1, b1), (a2, b2) = ours[n], theirs[n]
        assert b1.abs().sum() > 0 and a1.abs().sum() > 0, n
        delta_ours, delta_peft = b1 @ a1, b2 @ a2
        assert ((delta_ours - delta_peft).norm() / delta_peft.norm()).item() < 1e-3, n


def test_bf16_model_output_unchanged_by_init() -> None:
    base = tiny_llama(torch.bfloat16)
    x = token_batches(n=1, seed=7)[0]
    with torch.no_grad():
        before = base(x).logits.float()
    model = copy.deepcopy(base)
    cfg = lora_ga_config()
    preprocess_loraga(model, cfg, train_step_for(model, token_batches()))
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        after = pm(x).logits.float()
    assert ((after - before).norm() / before.norm()).item() < 2e-2


def test_save_and_reload_on_the_original_base_reproduces_outputs(tmp_path: "pytest.TempPathFactory") -> None:
    """peft's documented LoRA-GA flow: save the initial adapter, train, save converted to plain LoRA."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    cfg = lora_ga_config()
    preprocess_loraga(model, cfg, train_step_for(model, token_batches()))
    pm = get_peft_model(model, cfg)
    init_dir, final_dir = tmp_path / "init", tmp_path / "final"
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(init_dir)
    with torch.no_grad():  # stand-in for training: move every adapter weight
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
    x = token_batches(n=1, seed=7)[0]
    with torch.no_grad():
        trained = pm(x).logits
    pm.save_pretrained(final_dir, path_initial_model_for_weight_conversion=str(init_dir))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), final_dir)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, trained, rtol=1e-4, atol=1e-4)
