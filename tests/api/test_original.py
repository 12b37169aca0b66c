"""The original LoRA-GA utilities (:mod:`loraga_fast.api.original`): ``estimate_gradient``, ``LoraGAContext`` and the
save helpers. The train_step helpers are tested in tests/api/test_steps.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model
from peft.tuners.lora.model import LoraModel
from torch import nn
from torch.utils.data import DataLoader

from loraga_fast import (
    LoraGAContext,
    estimate_gradient,
    save_loraga_model_final,
    save_loraga_model_init,
)
from tests._helpers import (
    LLAMA_TARGETS,
    attached,
    dict_batches,
    dict_loss,
    reference_mean_grads,
    rel_err,
    tiny_llama,
    token_batches,
)


def test_estimate_gradient_dict_batches_match_float64() -> None:
    model = tiny_llama()
    loader = dict_batches()
    grads = estimate_gradient(model, loader)  # every Linear by default, lm_head included
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(grads) == sorted(names) and "lm_head" in grads
    ref = reference_mean_grads(model, names, loader, dict_loss)
    for n in names:
        assert grads[n].dtype == torch.float32 and rel_err(grads[n], ref[n]) < 1e-5, n
    assert all(p.grad is None for p in model.parameters())


def test_estimate_gradient_tuple_batches_num_batches_and_lora_config() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    data = [(torch.randn(5, 8), torch.randn(5, 1)) for _ in range(4)]

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    wrapped = Wrapped()
    loss_fn = lambda out, batch: (out - batch[1]).square().mean()  # noqa: E731
    cfg = LoraConfig(r=2, target_modules=["net.0"])
    grads = estimate_gradient(wrapped, data, num_batches=2, lora_config=cfg, loss_fn=loss_fn, progress=False)
    assert list(grads) == ["net.0"]
    ref = reference_mean_grads(wrapped, ["net.0"], data[:2], lambda m, b: loss_fn(m(*b), b))
    assert rel_err(grads["net.0"], ref["net.0"]) < 1e-5


def test_estimate_gradient_with_an_accelerator() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_llama()
    loader = DataLoader(dict_batches(4), batch_size=None)
    grads = estimate_gradient(model, loader, accelerator)
    ref = reference_mean_grads(model, list(grads), dict_batches(4), dict_loss)
    assert max(rel_err(grads[n], ref[n]) for n in ref) < 1e-5


def test_estimate_gradient_accepts_the_originals_quantization_arguments() -> None:
    """quant_flag / origin_type / quant_type / no_split_module_classes only served the original's float-copy
    workaround: accepted, and the estimate is the same (quantized models: tests/layers/test_quantized.py)."""
    model = tiny_llama()
    plain = estimate_gradient(model, dict_batches(), None)
    flagged = estimate_gradient(model, dict_batches(), None, True, "fp16", "fp4", ["LlamaDecoderLayer"])
    assert plain.keys() == flagged.keys() and all(torch.equal(plain[n], flagged[n]) for n in plain)


def test_bad_batches_raise_and_leave_the_model_untouched() -> None:
    model = tiny_llama().eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no batches"):
        estimate_gradient(model, [])
    with pytest.raises(ValueError, match="carry no loss"):
        estimate_gradient(model, [{"input_ids": token_batches(n=1)[0]}])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all("forward" not in m.__dict__ for m in model.modules()) and not model.training


def _lora_ga_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig())


def test_round_trip_reproduces_the_trained_model_on_the_untouched_base(tmp_path: Path) -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    named_grad = estimate_gradient(model, dict_batches(), progress=False)
    with LoraGAContext(model=model, named_grad=named_grad):
        model = get_peft_model(model, _lora_ga_config())
    assert "inject_adapter" not in LoraModel.__dict__ and not hasattr(model, "named_grad")
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert b.abs().sum() > 0  # LoRA-GA init, not peft's zero-B default
    save_loraga_model_init(model, tmp_path)
    assert (tmp_path / "init_lora_checkpoint").is_dir()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for batch in dict_batches(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    x = token_batches(n=1, seed=9)[0]
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
    with torch.no_grad():
        assert (trained - base.eval()(x).logits).abs().max() > 1e-3  # training moved the model
    save_loraga_model_final(model, tmp_path)
    assert not (tmp_path / "init_lora_checkpoint").exists()

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, trained, rtol=0, atol=1e-5)


def test_context_with_a_missing_target_raises_before_touching_the_model() -> None:
    model = tiny_llama()
    named_grad = estimate_gradient(model, dict_batches(1), progress=False)
    del named_grad["model.layers.1.mlp.up_proj"]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no gradient for target module 'model.layers.1.mlp.up_proj'"):
        with LoraGAContext(model, named_grad):
            get_peft_model(model, _lora_ga_config())
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert not attached(model) and "inject_adapter" not in LoraModel.__dict__


def test_context_with_a_wrong_shape_or_unknown_name_raises() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' has shape \(3, 3\)"):
        with LoraGAContext(model, {"model.layers.0.self_attn.q_proj": torch.zeros(3, 3)}):
            pass
    with pytest.raises(ValueError, match="'nope', which is not a module"):
        with LoraGAContext(model, {"nope": torch.zeros(3, 3)}):
            pass
    assert "inject_adapter" not in LoraModel.__dict__


def test_context_left_unused_leaves_nothing_behind() -> None:
    model = tiny_llama()
    named_grad = estimate_gradient(model, dict_batches(1), progress=False)
    before = {n: set(vars(m)) for n, m in model.named_modules()}
    with LoraGAContext(model, named_grad):
        pass
    assert {n: set(vars(m)) for n, m in model.named_modules()} == before


def test_context_with_a_non_finite_gradient_raises_before_touching_the_model() -> None:
    model = tiny_llama()
    named_grad = estimate_gradient(model, dict_batches(1), progress=False)
    named_grad["model.layers.0.mlp.down_proj"] = named_grad["model.layers.0.mlp.down_proj"].clone().fill_(float("nan"))
    with pytest.raises(ValueError, match=r"not finite \(NaN/Inf\).*model.layers.0.mlp.down_proj"):
        with LoraGAContext(model, named_grad):
            get_peft_model(model, _lora_ga_config())
    assert not any(hasattr(m, "lora_A") for m in model.modules()) and not attached(model)
