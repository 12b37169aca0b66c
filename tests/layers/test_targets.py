"""Which layers LoRA-GA initializes and at which rank (:mod:`loraga_fast.layers.targets`), against peft's own rules: the
layers ``get_peft_model`` wraps and the ranks it gives them."""

from __future__ import annotations

import copy
import logging

import peft
import pytest
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraga_fast import UsageError
from loraga_fast.layers.targets import (
    check_ranks,
    fill_default_target_modules,
    find_targets,
    layer_ranks,
    short_list,
    warn_left_out,
)
from tests._helpers import tiny_gpt2, tiny_llama


def _peft_wrapped(model: nn.Module, config: LoraConfig) -> dict[str, int]:
    """``{name: r}`` of the Linear / Conv1D layers peft itself gives a LoRA adapter under ``config``."""
    pm = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    return {n.removeprefix("base_model.model."): m.r["default"] for n, m in pm.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A and isinstance(m.get_base_layer(), (nn.Linear, Conv1D))}


CONFIGS = {
    "names": dict(target_modules=["q_proj", "down_proj", "embed_tokens"]),  # an Embedding peft wraps, LoRA-GA skips
    "regex": dict(target_modules=r".*layers\.1\.(self_attn\.(k|v)_proj|mlp\.gate_proj)"),
    "exclude": dict(target_modules=["q_proj", "k_proj"], exclude_modules=["model.layers.0.self_attn.k_proj"]),
    "layers": dict(target_modules=["o_proj", "up_proj"], layers_to_transform=[1]),
    "lm-head": dict(target_modules=["lm_head", "v_proj"]),
}


@pytest.mark.parametrize("kwargs", list(CONFIGS.values()), ids=list(CONFIGS))
def test_find_targets_and_layer_ranks_follow_peft(kwargs: dict) -> None:  # type: ignore[type-arg]
    model = tiny_llama()
    config = LoraConfig(r=4, rank_pattern={"down_proj": 2, "model.layers.1.self_attn.k_proj": 6}, **kwargs)
    expected = _peft_wrapped(model, config)
    targets = find_targets(model, config)
    assert [n for n, _ in targets] == [n for n, _ in model.named_modules() if n in expected]  # model order
    assert all(isinstance(m, nn.Linear) for _, m in targets) and len(targets) > 0
    assert layer_ranks(config, [n for n, _ in targets]) == expected


def test_find_targets_conv1d_like_peft() -> None:
    model = tiny_gpt2()
    config = LoraConfig(r=2, target_modules=["c_attn", "c_proj"])
    expected = _peft_wrapped(model, config)
    targets = find_targets(model, config)
    assert {n for n, _ in targets} == set(expected) and len(expected) == 6  # c_proj: attn.c_proj and mlp.c_proj
    assert all(isinstance(m, Conv1D) for _, m in targets)


def test_find_targets_refuses_quantized_layers() -> None:
    model = tiny_llama()
    model.model.layers[0].mlp.down_proj.weight.quant_state = object()
    # a quant_state that is not bitsandbytes' (bitsandbytes layers are targets: tests/layers/test_quantized.py)
    with pytest.raises(UsageError, match=r"Layer 'model.layers.0.mlp.down_proj' is a non-bitsandbytes .* quantized layer"):
        find_targets(model, LoraConfig(target_modules=["down_proj"]))
    assert find_targets(model, LoraConfig(target_modules=["up_proj"]))  # only matched layers are looked at


def test_fill_default_target_modules() -> None:
    model = tiny_llama()
    config = LoraConfig(target_modules=None)
    fill_default_target_modules(model, config)
    assert config.target_modules == set(peft.tuners.lora.model.LoraModel.target_module_mapping["llama"])
    given = LoraConfig(target_modules=["o_proj"])
    fill_default_target_modules(model, given)
    assert given.target_modules == {"o_proj"}

    class Unknown(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2)

    with pytest.raises(UsageError, match="Please specify `target_modules`"):
        fill_default_target_modules(Unknown(), LoraConfig(target_modules=None))


def test_check_ranks() -> None:
    shapes = {"a": (16, 32), "b": (8, 4), "c": (3, 3)}
    check_ranks(shapes, {"a": 8, "b": 2, "c": 9}, ["a", "b"])  # 2 r == min is allowed; 'c' is not asked about
    with pytest.raises(UsageError, match=r"2 \* r <= min.*layer 'b' has a weight of shape \(8, 4\) and r=3"):
        check_ranks(shapes, {"a": 8, "b": 3}, ["a", "b"])
    assert issubclass(UsageError, ValueError)


def test_warn_left_out(caplog: pytest.LogCaptureFixture) -> None:
    names = [f"l{i}" for i in range(8)]
    with caplog.at_level(logging.WARNING, logger="loraga_fast"):
        warn_left_out(names, seen=["l0", "l1"], zero=["l1"], what="keep peft's default init")
    missing, zero = caplog.records
    assert missing.getMessage() == ("LoRA-GA: 6 of 8 target layers saw no backward pass in train_step and keep peft's "
                                    "default init: l2, l3, l4, l5, l6, ...")
    assert zero.getMessage().startswith("LoRA-GA: the mean gradient of 1 layer(s) is all zero")
    assert zero.getMessage().endswith(": l1")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loraga_fast"):
        warn_left_out(names, seen=names, zero=[], what="x")
    assert not caplog.records
    assert short_list(["a", "b"]) == "a, b" and short_list(list("abcdef"), limit=5) == "a, b, c, d, e, ..."
