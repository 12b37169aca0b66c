"""preprocess_loraga end to end: gradients against float64 autograd and installed peft, and peft's contract."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import peft
import pytest
import torch
from torch import nn

from loraga_fast import preprocess_loraga
from tests._helpers import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    attached,
    hook_reference,
    lm_loss,
    lora_ga_config,
    reference_mean_grads,
    rel_err,
    tiny_gpt2,
    tiny_llama,
    token_batches,
    train_step_for,
)

FP16_ACCUMULATION_RTOL = 1e-6  # about 10x what the fp32 accumulation of fp16 X and G measures here (1e-7)


@pytest.mark.parametrize(
    "make,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, GPT2_TARGETS)], ids=["llama", "gpt2-conv1d"]
)
def test_fp32_matches_float64_autograd(backend: str, make: Callable[..., nn.Module], targets: list[str]) -> None:
    model = make()
    batches = token_batches()
    preprocess_loraga(model, lora_ga_config(targets), train_step_for(model, batches))
    ours = attached(model)
    assert len(ours) == 2 * (7 if targets is LLAMA_TARGETS else 4)  # gpt2: c_proj matches attn.c_proj and mlp.c_proj
    ref = reference_mean_grads(make(), list(ours), batches)
    modules = dict(model.named_modules())
    for name, grad in ours.items():
        assert grad.dtype == torch.float32 and grad.shape == modules[name].weight.shape
        assert rel_err(grad, ref[name]) < 1e-5, name
        assert modules[name].weight.grad is None


def test_fp32_matches_installed_peft() -> None:
    batches = token_batches()
    ours_model, peft_model = tiny_llama(), tiny_llama()
    preprocess_loraga(ours_model, lora_ga_config(), train_step_for(ours_model, batches))
    peft.preprocess_loraga(peft_model, lora_ga_config(), train_step_for(peft_model, batches))
    ours, theirs = attached(ours_model), attached(peft_model)
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name in ours:
        assert rel_err(ours[name], theirs[name]) < 1e-5, name


def test_bf16_more_accurate_than_peft(backend: str) -> None:
    batches = token_batches(n=6)
    base = tiny_llama(torch.bfloat16, hidden=64)
    ours_model, peft_model = copy.deepcopy(base), copy.deepcopy(base)
    preprocess_loraga(ours_model, lora_ga_config(), train_step_for(ours_model, batches))
    peft.preprocess_loraga(peft_model, lora_ga_config(), train_step_for(peft_model, batches))
    ours, theirs = attached(ours_model), attached(peft_model)
    ref = hook_reference(base, list(ours), batches)
    ours_err = sum(rel_err(ours[n], ref[n]) for n in ref) / len(ref)
    peft_err = sum(rel_err(theirs[n], ref[n]) for n in ref) / len(ref)
    assert ours_err < 1e-5 < peft_err, (ours_err, peft_err)
    assert all(ours[n].dtype == torch.float32 for n in ours)


def test_fp16_model_matches_float64_autograd() -> None:
    batches = token_batches()
    base = tiny_llama(torch.float16)
    model = copy.deepcopy(base)
    preprocess_loraga(model, lora_ga_config(), train_step_for(model, batches))
    ours = attached(model)
    ref = reference_mean_grads(base, list(ours), batches)
    assert all(g.dtype == torch.float32 for g in ours.values())
    assert max(rel_err(ours[n], ref[n]) for n in ref) < 2e-2  # fp16 forward/backward, not the accumulation
    # the accumulation itself: float64 sums over the very fp16 X and G the model produced (plain autograd hooks)
    exact = hook_reference(base, list(ours), batches)
    assert len(exact) == 14 and max(rel_err(ours[n], exact[n]) for n in exact) < FP16_ACCUMULATION_RTOL


class SharedLayerModel(nn.Module):
    """One Linear used twice per forward: each backward pass through it counts, as in peft."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 12)
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(torch.tanh(self.proj(x)))))


def test_module_called_several_times_matches_peft(backend: str) -> None:
    xs = [torch.randn(2, 5, 12) for _ in range(3)]
    loss = lambda m, x: m(x).square().mean()  # noqa: E731
    base = SharedLayerModel()
    ours_model, peft_model = copy.deepcopy(base), copy.deepcopy(base)
    cfg = lambda: lora_ga_config(["proj"])  # noqa: E731
    preprocess_loraga(ours_model, cfg(), train_step_for(ours_model, xs, loss))
    peft.preprocess_loraga(peft_model, cfg(), train_step_for(peft_model, xs, loss))
    ref = reference_mean_grads(base, ["proj"], xs, loss)["proj"] / 2  # two backward passes per batch
    assert rel_err(ours_model.proj._peft_loraga_grad, ref) < 1e-5
    assert rel_err(ours_model.proj._peft_loraga_grad, peft_model.proj._peft_loraga_grad) < 1e-5


# ---- peft's contract -------------------------------------------------------------------------------------


def test_missing_lora_ga_config_raises() -> None:
    model = tiny_llama()
    cfg = lora_ga_config()
    cfg.lora_ga_config = None
    with pytest.raises(ValueError, match="lora_ga_config=LoraGAConfig"):
        preprocess_loraga(model, cfg, lambda: None)


def test_quantized_module_raises() -> None:
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.quant_state = object()
    with pytest.raises(ValueError, match=r"Layer 'model.layers.1.mlp.up_proj' is a non-bitsandbytes .* quantized layer"):
        preprocess_loraga(model, lora_ga_config(), lambda: None)
    assert not attached(model)


def test_no_supported_layer_raises() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="No supported layers found"):
        preprocess_loraga(model, lora_ga_config(["embed_tokens", "input_layernorm"]), lambda: None)


def test_unsupported_layers_are_skipped() -> None:
    model = tiny_llama()
    batches = token_batches(n=1)
    preprocess_loraga(model, lora_ga_config(["embed_tokens", "q_proj"]), train_step_for(model, batches))
    assert sorted(attached(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_default_target_modules_filled_from_peft() -> None:
    model = tiny_llama()
    cfg = lora_ga_config(None)
    preprocess_loraga(model, cfg, train_step_for(model, token_batches(n=1)))
    expected = set(peft.tuners.lora.model.LoraModel.target_module_mapping["llama"])
    assert cfg.target_modules == expected
    assert {name.rsplit(".", 1)[1] for name in attached(model)} == expected


def test_exclude_modules_honoured() -> None:
    model = tiny_llama()
    cfg = lora_ga_config(["q_proj"])
    cfg.exclude_modules = ["model.layers.0.self_attn.q_proj"]
    preprocess_loraga(model, cfg, train_step_for(model, token_batches(n=1)))
    assert list(attached(model)) == ["model.layers.1.self_attn.q_proj"]


def test_zero_grad_inside_train_step_keeps_the_true_mean() -> None:
    batches = token_batches(n=3)
    base = tiny_llama()

    def step_with_zero_grad(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            for b in batches:
                model.zero_grad()
                lm_loss(model, b).backward()

        return step

    ours_model, peft_model = copy.deepcopy(base), copy.deepcopy(base)
    preprocess_loraga(ours_model, lora_ga_config(), step_with_zero_grad(ours_model))
    peft.preprocess_loraga(peft_model, lora_ga_config(), step_with_zero_grad(peft_model))
    ours, theirs = attached(ours_model), attached(peft_model)
    ref = reference_mean_grads(base, list(ours), batches)
    assert max(rel_err(ours[n], ref[n]) for n in ref) < 1e-5
    assert min(rel_err(theirs[n], ref[n]) for n in ref) > 1e-2  # peft kept only the last batch (/ 3)


def _enable_checkpointing(model: nn.Module, reentrant: bool) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing(reentrant: bool) -> None:
    batches = token_batches()
    plain, ckpt = tiny_llama(), tiny_llama()
    _enable_checkpointing(ckpt, reentrant)
    preprocess_loraga(plain, lora_ga_config(), train_step_for(plain, batches))
    forwards = []
    ckpt.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *_: forwards.append(1))
    preprocess_loraga(ckpt, lora_ga_config(), train_step_for(ckpt, batches))
    assert len(forwards) == 2 * len(batches)  # checkpointing really recomputed the layer in backward
    a, b = attached(plain), attached(ckpt)
    assert a.keys() == b.keys() and len(a) == 14
    for n in a:
        assert rel_err(b[n], a[n]) < 1e-6, n


def test_weights_never_require_grad_and_state_is_restored() -> None:
    model = tiny_llama()
    model.eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    seen = []
    q = model.model.layers[0].self_attn.q_proj

    def step() -> None:
        seen.append((q.weight.requires_grad, model.training))
        lm_loss(model, token_batches(n=1)[0]).backward()

    preprocess_loraga(model, lora_ga_config(), step)
    assert seen == [(False, True)]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_model_untouched(error: type[BaseException]) -> None:
    model = tiny_llama()
    old = torch.ones(1)
    model.model.layers[0].mlp.up_proj._peft_loraga_grad = old  # from an earlier call: must survive a failure
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    batches = token_batches(n=2)

    def failing_step() -> None:
        lm_loss(model, batches[0]).backward()
        raise error("boom")

    with pytest.raises(error, match="boom"):
        preprocess_loraga(model, lora_ga_config(), failing_step)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs
    assert attached(model) == {"model.layers.0.mlp.up_proj": old}
    assert all(p.grad is None for p in model.parameters())
    # and the model still works normally afterwards
    preprocess_loraga(model, lora_ga_config(), train_step_for(model, batches))
    assert len(attached(model)) == 14


def test_targets_without_backward_get_no_gradient(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama()
    stale = torch.ones(1)
    model.model.layers[1].self_attn.q_proj._peft_loraga_grad = stale

    def step() -> None:  # only the first decoder layer runs
        h = model.model.embed_tokens(token_batches(n=1)[0])
        model.model.layers[0].mlp(h).sum().backward()

    with caplog.at_level(logging.WARNING, logger="loraga_fast"):
        preprocess_loraga(model, lora_ga_config(), step)
    assert sorted(attached(model)) == [f"model.layers.0.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    assert "11 of 14 target layers saw no backward pass" in caplog.text


def test_summary_log_and_progress(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="loraga_fast"):
        preprocess_loraga(model, lora_ga_config(), train_step_for(model, token_batches(n=3)), num_batches=3)
    assert "14 target layers estimated over 3 backward passes" in caplog.text
    assert "3/3" in capsys.readouterr().err  # tqdm bar reached its total
