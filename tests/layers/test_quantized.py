"""QLoRA bases: bitsandbytes 4-bit (nf4 / fp4, double quantization, compute dtypes) and 8-bit targets are captured
through their own forward; the gradients are checked against a float64 sum over the very ``G`` and ``X`` the
quantized model produced (plain autograd hooks, nothing of loraga_fast runs). Other quantized kinds are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from loraga_fast import UsageError, preprocess_loraga
from tests._helpers import (
    LLAMA_TARGETS,
    attached,
    lm_loss,
    lora_ga_config,
    tiny_llama,
    token_batches,
)

bnb = pytest.importorskip("bitsandbytes")

KINDS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


def quantized_llama(tmp_path: Path, kind: str) -> nn.Module:
    """A two-block LLaMA (hidden 64, intermediate 128: bitsandbytes' CPU kernels want multiples of 32) saved and
    loaded back quantized by transformers (BitsAndBytesConfig, on the CPU)."""
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    folder = tmp_path / "base"
    if not folder.exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**KINDS[kind]),
                                                device_map="cpu")


def consumed_reference(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 mean over backward passes of ``G^T X`` with ``X`` as the quantized matmul consumed it (Linear4bit:
    cast to its compute dtype) and ``G`` the gradient at the layer's output, from hooks on a copy of the model."""
    model = copy.deepcopy(model).train()
    modules = dict(model.named_modules())
    sums = {n: torch.zeros(modules[n].out_features, modules[n].in_features, dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)

    def hook(n: str):  # type: ignore[no-untyped-def]
        def forward_hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = args[0].detach()
            if isinstance(mod, bnb.nn.Linear4bit) and mod.compute_dtype is not None:
                x = x.to(mod.compute_dtype)

            def grad_hook(g: torch.Tensor) -> None:
                sums[n].add_(g.reshape(-1, g.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double())
                counts[n] += 1

            out.register_hook(grad_hook)

        return forward_hook

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        for b in batches:
            lm_loss(model, b).backward()  # the float embedding requires grad: the outputs do too
    finally:
        for h in handles:
            h.remove()
    return {n: s / counts[n] for n, s in sums.items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_targets_are_captured_exactly(kind: str, tmp_path: Path) -> None:
    model = quantized_llama(tmp_path, kind)
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    assert len(names) == 14 and all(type(dict(model.named_modules())[n]).__module__.startswith("bitsandbytes")
                                    for n in names)
    batches = token_batches()
    reference = consumed_reference(model, names, batches)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():  # train mode: bitsandbytes repacks 4-bit weights on the CPU for no-grad eval calls
        before = model.train()(batches[0]).logits
    model.eval()
    preprocess_loraga(model, lora_ga_config(LLAMA_TARGETS), lambda: [lm_loss(model, b).backward() for b in batches]
                      and None)
    grads = attached(model)
    assert sorted(grads) == sorted(names)
    for n in names:
        g, ref = grads[n], reference[n]
        assert g.dtype == torch.float32 and g.shape == ref.shape
        err = ((g.double() - ref).norm() / ref.norm()).item()
        assert err <= 1e-6, (kind, n, err)
    # nothing of the quantized model changed, and no weight-sized float copy or .grad is left on it
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]) and p.requires_grad == flags[n] and p.grad is None, n
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.train()(batches[0]).logits, before, rtol=0, atol=0)


def test_lowmem_mode_captures_quantized_targets_too(tmp_path: Path) -> None:
    """The same capture feeds the sketches: low-memory factors of a 4-bit model match exact mode's."""
    from tests._helpers import prepared_factors, subspace_cos

    model = quantized_llama(tmp_path, "nf4")
    batches = token_batches()
    factors = {}
    for mode in ("exact", "lowmem"):
        m = copy.deepcopy(model)
        preprocess_loraga(m, lora_ga_config(LLAMA_TARGETS), lambda m=m: [lm_loss(m, b).backward() for b in batches]
                          and None, mode=mode)
        factors[mode] = prepared_factors(m)
    for n, f in factors["exact"].items():
        low = factors["lowmem"][n]
        torch.testing.assert_close(low.s, f.s, rtol=1e-3, atol=1e-7)  # exact mode: rSVD, q = 4r
        assert subspace_cos(low.u[:, :4], f.u[:, :4]) > 0.999, n


def test_other_quantized_kinds_are_refused_by_name() -> None:
    model = tiny_llama()
    fake = type("QuantLinear", (nn.Module,), {"__module__": "auto_gptq.nn_modules.qlinear.qlinear_cuda"})()
    model.model.layers[0].self_attn.q_proj = fake
    with pytest.raises(UsageError, match=r"Layer 'model.layers.0.self_attn.q_proj' is a GPTQ \(auto-gptq\) quantized "
                                         r"layer .* bitsandbytes Linear4bit"):
        preprocess_loraga(model, lora_ga_config(LLAMA_TARGETS), lambda: None)


@pytest.mark.parametrize("kind", ["nf4", "nf4-double", "int8"])
def test_get_peft_model_on_a_quantized_base_requantizes_the_offset(kind: str, tmp_path: Path) -> None:
    """Default ``quantized_offset="requantize"``: the base becomes exactly what bitsandbytes makes of the fp32
    matrix ``dequantized - s B A`` (quantized again with the layer's own settings); ``"none"`` leaves it untouched.
    The adapters are the same LoRA-GA factors either way, in the dtype peft gave them."""
    from peft import get_peft_model

    from loraga_fast.layers.quantized import dequantized_weight

    batches = token_batches()
    peft_models = {}
    for strategy in ("requantize", "none"):
        model = quantized_llama(tmp_path, kind)
        names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
        before = {n: dequantized_weight(dict(model.named_modules())[n]) for n in names}
        raw = {n: dict(model.named_modules())[n].weight.detach().clone() for n in names}
        cfg = lora_ga_config(LLAMA_TARGETS)
        preprocess_loraga(model, cfg, lambda m=model: [lm_loss(m, b).backward() for b in batches] and None,
                          quantized_offset=strategy)
        pm = get_peft_model(model, cfg)
        layers = {n: dict(pm.base_model.model.named_modules())[n] for n in names}
        for n, layer in layers.items():
            base = layer.get_base_layer()
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            assert a.dtype == b.dtype == torch.float32 and torch.isfinite(a).all() and b.abs().max() > 0, n
            if strategy == "none":
                assert torch.equal(base.weight.detach(), raw[n]), n
                continue
            target = before[n] - layer.scaling["default"] * (b.detach().float() @ a.detach().float())
            if isinstance(base, bnb.nn.Linear4bit):
                qs = base.weight.quant_state
                fresh = bnb.nn.Params4bit(target.clone(), requires_grad=False, quant_type=qs.quant_type,
                                          blocksize=qs.blocksize, compress_statistics=qs.nested).to("cpu")
                assert torch.equal(base.weight.data, fresh.data), n
            assert not torch.equal(dequantized_weight(base), before[n]), n  # the offset moved something
            # within one quantization step of the target
            err = (dequantized_weight(base) - target).abs().max() / target.abs().max()
            assert err < (0.2 if isinstance(base, bnb.nn.Linear4bit) else 0.02), (n, float(err))
        with torch.no_grad():
            out = pm.train()(batches[0]).logits
        assert torch.isfinite(out).all()
        peft_models[strategy] = layers
    for n, layer in peft_models["none"].items():
        other = peft_models["requantize"][n]
        assert torch.equal(layer.lora_A["default"].weight, other.lora_A["default"].weight), n


def test_unknown_offset_strategy_is_refused() -> None:
    model = tiny_llama()
    with pytest.raises(UsageError, match="quantized_offset must be one of 'requantize', 'none', got 'lofq'"):
        preprocess_loraga(model, lora_ga_config(LLAMA_TARGETS), lambda: None, quantized_offset="lofq")


def test_estimate_gradient_with_quant_flag_on_a_quantized_model(tmp_path: Path) -> None:
    """The original's entry point: a 4-bit model is estimated directly (``quant_flag=True``, its other arguments
    accepted), then ``LoraGAContext`` + ``get_peft_model`` initialize it."""
    from peft import get_peft_model

    from loraga_fast import LoraGAContext, estimate_gradient
    from tests._helpers import dict_batches

    model = quantized_llama(tmp_path, "nf4")
    batches = dict_batches(3)
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    grads = estimate_gradient(model, batches, None, True, "bf16", "nf4", progress=False)
    reference = consumed_reference(model, names, [b["input_ids"] for b in batches])
    assert set(names) <= set(grads)
    for n in names:
        assert ((grads[n].double() - reference[n]).norm() / reference[n].norm()).item() <= 1e-6, n
    cfg = lora_ga_config(LLAMA_TARGETS)
    with LoraGAContext(model, grads):
        pm = get_peft_model(model, cfg)
    layer = dict(pm.base_model.model.named_modules())[names[0]]
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) and layer.lora_B["default"].weight.abs().max() > 0


def _train_a_little(peft_model: nn.Module, batches: list[torch.Tensor]) -> None:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for b in batches:
        lm_loss(peft_model.train(), b).backward()
        opt.step()
        opt.zero_grad()


def test_untouched_quantized_base_saves_the_trained_adapter_exactly(tmp_path: Path) -> None:
    """quantized_offset="none": the base is never offset, so save_loraga_model_final writes the trained adapter as
    it is and PeftModel.from_pretrained on a freshly loaded (untouched) quantized base reproduces the trained model."""
    from peft import PeftModel, get_peft_model

    from loraga_fast import save_loraga_model_final, save_loraga_model_init

    batches = token_batches()
    model = quantized_llama(tmp_path, "nf4")
    cfg = lora_ga_config(LLAMA_TARGETS)
    preprocess_loraga(model, cfg, lambda: [lm_loss(model, b).backward() for b in batches] and None,
                      quantized_offset="none")
    pm = get_peft_model(model, cfg)
    save_loraga_model_init(pm, tmp_path / "run")
    _train_a_little(pm, batches)
    with torch.no_grad():
        trained = pm.train()(batches[0]).logits
    save_loraga_model_final(pm, tmp_path / "run")
    assert not (tmp_path / "run" / "init_lora_checkpoint").exists()
    loaded = PeftModel.from_pretrained(quantized_llama(tmp_path, "nf4"), tmp_path / "run")
    with torch.no_grad():
        again = loaded.train()(batches[0]).logits
    torch.testing.assert_close(again, trained, rtol=1e-5, atol=1e-5)


def test_mixed_offsets_cannot_be_saved_as_one_adapter(tmp_path: Path) -> None:
    """down_proj left in float (offset) and the 4-bit layers untouched: no single converted adapter fits both."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraga_fast import save_loraga_model_final, save_loraga_model_init

    quantized_llama(tmp_path, "nf4")  # writes the float base
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["down_proj", "lm_head"]))
    assert not isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    batches = token_batches()
    cfg = lora_ga_config(LLAMA_TARGETS)
    preprocess_loraga(model, cfg, lambda: [lm_loss(model, b).backward() for b in batches] and None,
                      quantized_offset="none")
    pm = get_peft_model(model, cfg)
    save_loraga_model_init(pm, tmp_path / "run")
    with pytest.raises(UsageError, match="12 of the 14 LoRA layers have a base left untouched"):
        save_loraga_model_final(pm, tmp_path / "run")


def test_the_command_with_quantize(tmp_path: Path) -> None:
    """loraga-fast init --quantize nf4 on the embedded default: the quantized base is left untouched, the run folder
    holds the adapter only, load_initialized + save_loraga_model_final give an adapter for the untouched base."""
    import json

    from peft import PeftModel

    from loraga_fast import load_initialized, save_loraga_model_final
    from loraga_fast.command.main import main
    from loraga_fast.command.inputs import load_model
    from loraga_fast.api.quantize import quantize_model

    out = tmp_path / "run"
    assert main(["init", "--quantize", "nf4", "--batches", "2", "--batch-size", "2", "--seq-len", "48",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "loraga_fast_init.json").read_text())
    assert summary["quantize"] == "nf4" and summary["base_untouched"] is True and summary["targets"] == 8
    assert not (out / "base_offset.safetensors").exists()

    def base() -> nn.Module:
        model, _, _ = load_model(None, torch.float32, torch.device("cpu"), seed=0)
        return quantize_model(model, "nf4", torch.float32, "cpu")

    model = load_initialized(base(), out)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) and layer.lora_B["default"].weight.abs().sum() > 0
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        initialized = model.train()(x).logits
    save_loraga_model_final(model, out)
    again = PeftModel.from_pretrained(base(), out)
    with torch.no_grad():
        torch.testing.assert_close(again.train()(x).logits, initialized, rtol=1e-5, atol=1e-5)
