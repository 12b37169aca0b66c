"""After loraga_fast.preprocess_loraga, peft.get_peft_model initializes LoRA-GA exactly as with peft's own."""

from __future__ import annotations

import copy
import itertools

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

from loraga_fast import preprocess_loraga
from tests._helpers import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    attached,
    lora_ga_config,
    subspace_cos,
    tiny_gpt2,
    tiny_llama,
    token_batches,
    train_step_for,
)

DIRECTIONS = ["ArBr", "A2rBr", "ArB2r", "random"]
SCALES = ["stable", "weight_svd", "gd_scale", "unit"]


def _lora_state(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for n, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            base = m.get_base_layer()
            fifo = m.fan_in_fan_out
            out[n.removeprefix("base_model.model.")] = {
                "A": m.lora_A["default"].weight.detach().float(),
                "B": m.lora_B["default"].weight.detach().float(),
                "W": (base.weight.detach().T if fifo else base.weight.detach()).float(),
                "scaling": torch.tensor(m.scaling["default"]),
            }
    return out


MODELS = [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, GPT2_TARGETS)]


@pytest.mark.parametrize("make,targets", MODELS, ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("direction,scale", list(itertools.product(DIRECTIONS, SCALES)))
def test_all_directions_and_scales_match_peft(make, targets, direction: str, scale: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    batches = token_batches()
    base = make()
    x = token_batches(n=1, seed=7)[0]
    with torch.no_grad():
        before = base(x).logits
    w_before = {n: (m.weight.detach().T if isinstance(m, Conv1D) else m.weight.detach()).float().clone()
                for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}

    states, grads = [], {}
    for ours in (True, False):
        model = copy.deepcopy(base)
        cfg = lora_ga_config(targets, direction=direction, scale=scale, stable_gamma=4)
        (preprocess_loraga if ours else peft.preprocess_loraga)(model, cfg, train_step_for(model, batches))
        if ours:
            grads = {n: (g.T if isinstance(dict(model.named_modules())[n], Conv1D) else g).clone()
                     for n, g in attached(model).items()}
            with monkeypatch.context() as mp:  # our factors are batched: no per-layer SVD inside get_peft_model
                mp.setattr(torch, "svd_lowrank", _no_per_layer_svd)
                pm = get_peft_model(model, cfg)
        else:
            pm = get_peft_model(model, cfg)
        with torch.no_grad():
            after = pm(x).logits
        # the base-weight offset cancels the adapter: the model's function is unchanged by the initialization
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        assert not any(hasattr(m, "_peft_loraga_grad") for m in pm.modules())
        states.append(_lora_state(pm))
    ours_s, peft_s = states
    assert ours_s.keys() == peft_s.keys() and len(ours_s) == len(grads) > 0
    r = 4
    for n, o in ours_s.items():
        p = peft_s[n]
        assert o["B"].abs().sum() > 0 and o["A"].abs().sum() > 0, n
        # W_new - W_old == -scaling * B @ A
        torch.testing.assert_close(o["W"] - w_before[n], -o["scaling"] * (o["B"] @ o["A"]), rtol=1e-4, atol=1e-6)
        if direction == "random":  # a random half of the top-2r triplets: check the spaces they come from
            u, _, vh = torch.linalg.svd(grads[n].double())
            assert subspace_cos(u[:, : 2 * r], o["B"]) > 0.999, n  # B's columns lie in the top-2r left space
            assert subspace_cos(vh[: 2 * r].T, o["A"].T) > 0.999, n
            continue
        assert subspace_cos(o["B"], p["B"]) > 0.999, n
        assert subspace_cos(o["A"].T, p["A"].T) > 0.999, n
        sv_o, sv_p = torch.linalg.svdvals(o["B"]), torch.linalg.svdvals(p["B"])
        if scale == "weight_svd":
            # B's top singular value is the weight's top singular value: ours is accurate, peft's q=r estimate
            # is a randomized lower bound; the rest of B's spectrum matches after that normalization
            sigma_w = torch.linalg.svdvals(w_before[n])[0]
            torch.testing.assert_close(sv_o[0], sigma_w, rtol=2e-3, atol=0)
            assert sv_p[0] <= sigma_w * (1 + 1e-5)
            sv_o, sv_p = sv_o / sv_o[0], sv_p / sv_p[0]
        torch.testing.assert_close(sv_o, sv_p, rtol=2e-3, atol=1e-7)


def _no_per_layer_svd(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("peft's per-layer torch.svd_lowrank ran: the precomputed factors were not used")


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
