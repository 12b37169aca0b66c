"""The nf4 presets' block-wise builder (loraga_fast.bench.workloads.build_quantized_model) on a tiny config: the
model it builds is the one transformers' bitsandbytes loader makes of the plain bf16 model with the same weights, it
never holds more than one float projection at a time, the library estimates on it and peft wraps it; the lowmem
suite runs such a preset and records exact mode's refusal from its memory check."""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from loraga_fast.bench import lowmem
from loraga_fast.bench.workloads import (
    PRESETS,
    TARGET_MODULES,
    build_model,
    build_quantized_model,
    make_batches,
    make_lora_config,
    make_train_step,
    model_bytes,
    quantize_model,
    seeded_init_,
)

bnb = pytest.importorskip("bitsandbytes")

# llama-13b-nf4-cpu's settings at a tiny size (bitsandbytes' CPU kernels want widths that are multiples of 32)
TINY_NF4 = dataclasses.replace(PRESETS["llama-13b-nf4-cpu"], name="tiny-nf4-cpu", hidden_size=64, num_layers=2,
                               intermediate_size=128, num_heads=4, vocab_size=96, seq_len=16, num_batches=2)


def _projection_shapes(p: object) -> list[tuple[int, int]]:
    h, i = p.hidden_size, p.intermediate_size  # type: ignore[attr-defined]
    return [(h, h)] * 4 + [(i, h), (i, h), (h, i)]


def test_the_presets() -> None:
    for name, (hidden, inter, layers) in {"llama-13b-nf4-cpu": (5120, 13824, 40),
                                          "llama-7b-nf4-cpu": (4096, 11008, 32)}.items():
        p = PRESETS[name]
        assert (p.hidden_size, p.intermediate_size, p.num_layers, p.num_heads, p.vocab_size) == \
            (hidden, inter, layers, hidden // 128, 32000)
        assert (p.quant, p.num_kv_heads, p.batch_size, p.seq_len, p.num_batches, p.lora_r) == \
            ("nf4", None, 1, 64, 4, 8)


def test_the_block_wise_build_is_transformers_quantizing_the_plain_model() -> None:
    model = build_model(TINY_NF4, "bf16", "cpu", seed=3)
    for block in model.model.layers:
        for name in TARGET_MODULES:
            layer = block.get_submodule({"q": "self_attn.", "k": "self_attn.", "v": "self_attn.",
                                         "o": "self_attn."}.get(name[0], "mlp.") + name)
            assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4"
            assert layer.compute_dtype == torch.bfloat16 and not layer.weight.compress_statistics
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    # what peft reads to build its 4-bit LoRA layers, as from_pretrained(quantization_config=...) sets it
    assert model.is_loaded_in_4bit and model.is_quantized and model.hf_quantizer is not None
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4" and not model.training

    from transformers import LlamaForCausalLM

    plain = seeded_init_(LlamaForCausalLM._from_config(TINY_NF4.llama_config(), dtype=torch.bfloat16), seed=3)
    reference = quantize_model(plain, "nf4")  # saved and loaded back by transformers with a BitsAndBytesConfig
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # quantized bytes, absmax, quant maps, float weights
    batch = make_batches(TINY_NF4, "cpu")[0]
    with torch.no_grad():  # (train mode: bitsandbytes repacks 4-bit weights for no-grad eval calls)
        a, b = model.train()(input_ids=batch).logits, reference.train()(input_ids=batch).logits
    assert torch.equal(a, b) and torch.isfinite(a).all()

    held = model_bytes(model)
    h, i, v = TINY_NF4.hidden_size, TINY_NF4.intermediate_size, TINY_NF4.vocab_size
    weights = TINY_NF4.num_layers * sum(m * n for m, n in _projection_shapes(TINY_NF4))
    assert held["quantized"] == weights // 2 + weights // 64 * 4 + TINY_NF4.num_layers * 7 * 16 * 4  # + absmax, code
    assert held["float"] == 2 * (2 * v * h + (2 * TINY_NF4.num_layers + 1) * h) + 2 * 4 * (h // TINY_NF4.num_heads // 2)  # inv_freq twice
    assert held["total"] == held["quantized"] + held["float"] and i > h


def _float_matrix_bytes() -> int:
    """Bytes of the live floating-point matrices (by storage), wherever they are referenced from."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.is_floating_point() and obj.dim() == 2 and not obj.is_meta:
            seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(seen.values())


def test_the_builder_holds_one_float_projection_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    p = dataclasses.replace(TINY_NF4, num_layers=4)
    live: list[int] = []
    quantize = bnb.nn.Params4bit._quantize

    def watched(self, device):  # type: ignore[no-untyped-def]
        live.append(_float_matrix_bytes())  # just before bitsandbytes quantizes a weight
        return quantize(self, device)

    monkeypatch.setattr(bnb.nn.Params4bit, "_quantize", watched)
    gc.collect()
    before = _float_matrix_bytes()
    model = build_quantized_model(p, "bf16", "cpu")
    assert len(live) == 7 * p.num_layers  # every projection went through bitsandbytes' quantization
    embeddings = 2 * 2 * p.vocab_size * p.hidden_size
    largest = 2 * max(m * n for m, n in _projection_shapes(p))
    block = 2 * sum(m * n for m, n in _projection_shapes(p))
    assert max(live) - before <= embeddings + largest < embeddings + block
    del model

    # the measure catches a build that makes the float model first: the same count, quantizing afterwards
    from transformers import LlamaForCausalLM

    live.clear()
    plain = seeded_init_(LlamaForCausalLM._from_config(p.llama_config(), dtype=torch.bfloat16))
    first = plain.model.layers[0].self_attn.q_proj.weight
    bnb.nn.Params4bit(first.data, requires_grad=False, quant_type="nf4").to("cpu")
    assert max(live) - before > embeddings + p.num_layers * block - largest


def test_lowmem_mode_and_get_peft_model_on_the_nf4_model() -> None:
    from peft import get_peft_model

    from loraga_fast import preprocess_loraga

    model = build_model(TINY_NF4, "bf16", "cpu")
    batches = make_batches(TINY_NF4, "cpu")
    cfg = make_lora_config(TINY_NF4)
    preprocess_loraga(model, cfg, make_train_step(model, batches), mode="lowmem")  # offset requantized: the default
    peft_model = get_peft_model(model, cfg)
    layers = [m for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * TINY_NF4.num_layers
    wrapped = [m for m in peft_model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    assert len(wrapped) == 7 * TINY_NF4.num_layers
    assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) and m.lora_B["default"].weight.abs().sum() > 0
               for m in wrapped)
    loss = peft_model.train()(input_ids=batches[0], labels=batches[0]).loss
    assert torch.isfinite(loss)


@pytest.fixture
def tiny_preset(monkeypatch: pytest.MonkeyPatch) -> str:
    """TINY_NF4 as a suite preset, the suite's workers run in this process."""
    monkeypatch.setitem(PRESETS, TINY_NF4.name, TINY_NF4)
    monkeypatch.setattr(lowmem, "in_fresh_process", lambda fn, **kwargs: fn(**kwargs))
    return TINY_NF4.name


def test_the_lowmem_suite_runs_an_nf4_preset(tiny_preset: str, tmp_path: Path) -> None:
    out = tmp_path / "lowmem.json"
    assert lowmem.main(["--preset", tiny_preset, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "bf16" and list(result["runs"]) == ["floor", "lowmem1", "lowmem"]  # exact and peft not run
    assert result["refused"] == {} and result["failed"] == {}
    for run in result["runs"].values():
        assert run["quantize"] == "nf4" and run["exact_check"] is None
        assert run["model_bytes"] == run["model_quantized_bytes"] + run["model_float_bytes"] > 0
        assert run["sketch_bytes"] == run["estimate"]["lowmem_bytes"] > 0 and run["peak_bytes"] > 0
    assert result["runs"]["lowmem"]["per_pass_x_floor"] > 0


def test_the_suite_records_exact_modes_refusal_from_its_check(tiny_preset: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from loraga_fast.core import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)  # the floor runs no check of its own
    out = tmp_path / "lowmem.json"
    assert lowmem.main(["--preset", tiny_preset, "--impls", "floor", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    message = result["refused"]["exact"]
    assert message == result["runs"]["floor"]["exact_check"]
    assert "LoRA-GA exact mode needs" in message and "only 1.0 KiB is available" in message
    assert "mode='lowmem'" in message
