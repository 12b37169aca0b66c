"""Gradients of numerical rank below 2r (few tokens): no blow-ups, in every mode, direction and scale."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import get_peft_model

from loraga_fast import preprocess_loraga
from tests._helpers import lm_loss, lora_ga_config, tiny_llama

DIRECTIONS = ["ArBr", "A2rBr", "ArB2r", "random"]
SCALES = ["stable", "weight_svd", "gd_scale", "unit"]


@pytest.mark.parametrize("mode", ["exact", "lowmem"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_one_token_gradient_gives_bounded_factors_and_unchanged_outputs(
        direction: str, scale: str, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama(hidden=64)
    batch = torch.tensor([[5, 17]])  # one predicted token: every target's gradient has rank <= 2 < 2r = 8
    probe = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = copy.deepcopy(model)(probe).logits
    cfg = lora_ga_config(["q_proj", "down_proj"], direction=direction, scale=scale)
    with caplog.at_level(logging.WARNING, logger="loraga_fast"):
        preprocess_loraga(model, cfg, lambda: lm_loss(model, batch).backward(), mode=mode)
        pm = get_peft_model(model, cfg)
    assert "numerical rank" in caplog.text and "q_proj" in caplog.text
    weights = [w for n, w in pm.named_parameters() if "lora_" in n]
    assert len(weights) == 8
    for w in weights:
        assert torch.isfinite(w).all()
        assert w.abs().max() < 1e3  # peft's weight_svd reaches ~1e7 here (it divides by a ~1e-14 singular value)
    for n, m in pm.named_modules():
        if hasattr(m, "lora_B") and "default" in m.lora_B:
            b = m.lora_B["default"].weight
            assert (b.norm(dim=0) > 0).sum() <= 2, n  # only the live directions enter B
    with torch.no_grad():
        after = pm(probe).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
