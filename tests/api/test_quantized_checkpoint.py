"""The QLoRA path users take, end to end on the CPU: a small LLaMA saved as a safetensors checkpoint, loaded 4-bit by
transformers (``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4))``), estimated
and initialized in exact and low-memory mode, then saved and reloaded on a freshly loaded quantized base; and the
``loraga-fast init --model FOLDER --quantize nf4`` command on the same checkpoint.

The reference gradients never run loraga_fast: float64 autograd on a float copy of the checkpoint whose target
weights are bitsandbytes' own dequantization of the loaded 4-bit weights. The per-layer capture against the very
``G`` and ``X`` of the quantized forward (1e-6) is tests/layers/test_quantized.py's job."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from loraga_fast import (
    load_initialized,
    preprocess_loraga,
    quantize_model,
    save_loraga_model_final,
    save_loraga_model_init,
)
from tests._helpers import (
    LLAMA_TARGETS,
    adapters,
    attached,
    factor_energy,
    lm_loss,
    lora_ga_config,
    reference_mean_grads,
    rel_err,
)

bnb = pytest.importorskip("bitsandbytes")

LOWMEM_PASSES = [1, 3]
"""The low-memory pass counts covered here (``passes=``); the one-pass mode appends 1."""

MODES = [pytest.param("exact", None, id="exact")] + [
    pytest.param("lowmem", p, id=f"lowmem-p{p}") for p in LOWMEM_PASSES
]

A_ENERGY = {"exact": 0.99, "lowmem": 0.98}
"""Least share of the optimal energy ``||G A_q||^2 / sum_{i<=r} s_i^2`` (``A_q`` an orthonormal basis of A's rows,
``G`` the float64 reference) the adapters' A must capture in every layer. Measured: >= 0.99996 in both modes."""

B_ENERGY = 0.98
"""The same for B (the next r left singular vectors, LoRA-GA's default ArB2r). Measured: >= 0.9989 in exact mode
(peft's randomized SVD, q = 4r), >= 0.9997 in low-memory mode."""

COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16}

GRAD_TOL = {"fp32": 1e-5, "bf16": 0.05}
"""Exact mode's mean gradient against the float64 reference (relative Frobenius error): fp32 compute only adds fp32
rounding; bf16 compute runs the 4-bit matmuls (and so G and X) in bf16."""

NF4_TWO_ROUNDINGS = 2.0
"""``quantized_offset="requantize"`` rounds every target to nf4 once more: the function at initialization may move by
at most this many times what the checkpoint's own nf4 rounding moved it (measured: 1.0-1.3x; ``"none"``: 7x)."""

R = 4
HIDDEN, INTERMEDIATE, VOCAB = 128, 256, 256  # bitsandbytes' CPU kernels want multiples of 32; k = 24 r < 128


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(4)]


def _byte_tokenizer() -> object:
    """A byte-level tokenizer with the 256 byte symbols and no merges (the command reads a tokenizer from the
    folder), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-block LLaMA with seeded random weights saved as a safetensors checkpoint (with a byte tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64))
    model.save_pretrained(folder, safe_serialization=True)
    _byte_tokenizer().save_pretrained(folder)  # type: ignore[attr-defined]
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    return folder


def load_quantized(folder: Path, compute: torch.dtype) -> nn.Module:
    """The checkpoint loaded 4-bit nf4 by transformers on the CPU, as a QLoRA user loads it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute))
    targets = _targets(model)
    assert len(targets) == 14
    for module in targets.values():
        assert isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state.quant_type == "nf4"
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    return model


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS}


def _dequantized(module: nn.Module) -> torch.Tensor:
    """bitsandbytes' own dequantization of a Linear4bit weight, float64."""
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).double()


def _float_copy(folder: Path, quantized: nn.Module) -> nn.Module:
    """The checkpoint in float64 with every target weight replaced by the 4-bit model's dequantized weight: the
    function the quantized model computes, in float64."""
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for n, module in _targets(quantized).items():
            modules[n].weight.copy_(_dequantized(module))
    return ref


@pytest.fixture(scope="module")
def references(checkpoint: Path) -> Callable[[str], dict[str, torch.Tensor]]:
    """``references(compute)``: the float64 mean gradient of every target weight over :func:`_batches` (cached)."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(compute: str) -> dict[str, torch.Tensor]:
        if compute not in cache:
            quantized = load_quantized(checkpoint, COMPUTE[compute])
            cache[compute] = reference_mean_grads(_float_copy(checkpoint, quantized), list(_targets(quantized)),
                                                  _batches())
        return cache[compute]

    return get


def _train_step(model: nn.Module, batches: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for b in batches:
            lm_loss(model, b).backward()

    return step


def _prepare(model: nn.Module, mode: str, passes: int | None, **kwargs: object) -> nn.Module:
    """preprocess_loraga + get_peft_model, rank 4 on all seven projections."""
    from peft import get_peft_model

    cfg = lora_ga_config(LLAMA_TARGETS)
    assert cfg.r == R
    preprocess_loraga(model, cfg, _train_step(model, _batches()), mode=mode, passes=passes, **kwargs)
    return get_peft_model(model, cfg)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # train mode: bitsandbytes repacks 4-bit weights for no-grad eval-mode calls on the CPU
        return model.train()(x).logits.double()


def _lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_the_checkpoint_is_safetensors_and_the_4bit_model_is_its_dequantized_function(checkpoint: Path) -> None:
    """The reference below is only as good as the float copy: with fp32 compute the 4-bit model and its float64
    dequantized copy compute the same logits (to fp32 rounding)."""
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in names
    quantized = load_quantized(checkpoint, torch.float32)
    x = _batches()[0]
    assert rel_err(_logits(quantized, x), _logits(_float_copy(checkpoint, quantized), x)) <= 1e-5


@pytest.mark.parametrize("compute", list(COMPUTE))
@pytest.mark.parametrize(("mode", "passes"), MODES)
def test_adapters_span_the_top_subspaces_of_the_float64_reference_gradient(
        checkpoint: Path, references: Callable[[str], dict[str, torch.Tensor]], mode: str, passes: int | None,
        compute: str) -> None:
    from peft import get_peft_model

    model = load_quantized(checkpoint, COMPUTE[compute])
    reference = references(compute)
    cfg = lora_ga_config(LLAMA_TARGETS)
    preprocess_loraga(model, cfg, _train_step(model, _batches()), mode=mode, passes=passes)
    if mode == "exact":  # the mean gradient itself is readable in exact mode
        grads = attached(model)
        assert grads.keys() == reference.keys()
        for n, g in grads.items():
            assert rel_err(g, reference[n]) <= GRAD_TOL[compute], (n, rel_err(g, reference[n]))
    pm = get_peft_model(model, cfg)
    layers = adapters(pm)
    assert layers.keys() == reference.keys()
    worst_a = worst_b = 1.0
    for n, (a, b) in layers.items():
        g = reference[n]
        assert a.shape == (R, g.shape[1]) and b.shape == (g.shape[0], R), n
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), n
        assert a.abs().max() > 0 and b.abs().max() > 0, n
        # factor_energy takes A's span from v[:, :r] and B's from u[:, r:2r]: v = A^T, u = [B, B]
        energy_a, energy_b = factor_energy(g, torch.cat([b, b], dim=1), a.T, R)
        worst_a, worst_b = min(worst_a, energy_a), min(worst_b, energy_b)
    assert worst_a >= A_ENERGY[mode], (mode, compute, worst_a)
    assert worst_b >= B_ENERGY, (mode, compute, worst_b)


@pytest.mark.parametrize(("mode", "passes"), MODES)
def test_the_requantized_offset_keeps_the_function_within_nf4_rounding(checkpoint: Path, mode: str,
                                                                        passes: int | None) -> None:
    """docs/qlora.md: ``requantize`` (the default) dequantizes, subtracts ``s B A`` in fp32 and quantizes again with
    the layer's own settings, so (1) every element of the new base is within half the widest nf4 code gap (times
    its block's absmax) of ``dequantized - s B A``, and (2) the function moves at initialization by at most two nf4
    roundings' worth, far less than with ``"none"``, which leaves the 4-bit weights as loaded and moves it by
    ``s B A``."""
    from transformers import LlamaForCausalLM

    x = _batches()[0]
    float_logits = _logits(LlamaForCausalLM.from_pretrained(checkpoint), x)
    code = bnb.functional.get_4bit_type("nf4", device="cpu").double()
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    drift, moved_codes = {}, {}
    for offset in ("requantize", "none"):
        model = load_quantized(checkpoint, torch.float32)
        before = _logits(model, x)
        rounding = rel_err(before, float_logits)  # what the checkpoint's own nf4 rounding did to the function
        dequantized = {n: _dequantized(m) for n, m in _targets(model).items()}
        raw = {n: m.weight.data.clone() for n, m in _targets(model).items()}
        pm = _prepare(model, mode, passes, quantized_offset=offset)
        drift[offset] = rel_err(_logits(pm, x), before)
        for n, layer in _lora_layers(pm).items():
            base = layer.get_base_layer()
            assert isinstance(base, bnb.nn.Linear4bit), n
            offset_matrix = layer.scaling["default"] * (layer.lora_B["default"].weight.detach().double()
                                                        @ layer.lora_A["default"].weight.detach().double())
            if offset == "none":
                assert torch.equal(base.weight.data, raw[n]), n
                continue
            target = dequantized[n] - offset_matrix
            blocksize = base.weight.quant_state.blocksize
            absmax = target.reshape(-1, blocksize).abs().amax(dim=1, keepdim=True)
            err = (_dequantized(base) - target).reshape(-1, blocksize).abs()
            assert (err <= half_gap * absmax * (1 + 1e-5) + 1e-7).all(), (n, (err / absmax).max().item())
            moved_codes[n] = (base.weight.data != raw[n]).sum().item()
    # s B A is mostly below an nf4 step, so requantizing moves only some codes (measured: none in q_proj and k_proj,
    # whose gradients are tiny at random init; 3-37% of the others'), and those moves keep the function close
    assert sum(1 for c in moved_codes.values() if c > 0) >= len(moved_codes) // 2, moved_codes
    assert 0 < drift["requantize"] <= NF4_TWO_ROUNDINGS * rounding, (drift, rounding)
    assert drift["requantize"] <= 0.3 * drift["none"], drift


def _train_a_little(peft_model: nn.Module) -> None:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for b in _batches()[:2]:
        lm_loss(peft_model.train(), b).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("offset", ["requantize", "none"])
@pytest.mark.parametrize(("mode", "passes"), MODES)
def test_the_trained_adapter_reloads_on_a_freshly_loaded_quantized_base(checkpoint: Path, tmp_path: Path, mode: str,
                                                                        passes: int | None, offset: str) -> None:
    """The documented save path for quantized bases (docs/qlora.md): ``save_loraga_model_init`` right after
    ``get_peft_model``, train, ``save_loraga_model_final``; then ``PeftModel.from_pretrained`` on the checkpoint
    loaded 4-bit again. ``"none"``: the trained adapter as it is, the trained model reproduced exactly;
    ``"requantize"``: peft's rank-2r conversion ``B_f A_f - B_0 A_0`` for the untouched base, which reproduces the
    trained model up to the offset's nf4 rounding."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from loraga_fast.api.names import INIT_CHECKPOINT, OFFSETS_FILE

    x = _batches()[0]
    compute = torch.float32  # bf16 compute is covered above; on a CPU its matmuls are several times slower
    model = load_quantized(checkpoint, compute)
    before = _logits(model, x)
    pm = _prepare(model, mode, passes, quantized_offset=offset)
    run = tmp_path / "run"
    save_loraga_model_init(pm, run)
    initial = {n: (a.clone(), b.clone()) for n, (a, b) in adapters(pm).items()}
    initialized = _logits(pm, x)
    _train_a_little(pm)
    trained = adapters(pm)
    assert all(not torch.equal(trained[n][1], b0) for n, (_, b0) in initial.items())  # it did train
    trained_logits = _logits(pm, x)
    scaling = {n: layer.scaling["default"] for n, layer in _lora_layers(pm).items()}
    save_loraga_model_final(pm, run)
    assert (run / "adapter_model.safetensors").is_file()
    assert not (run / INIT_CHECKPOINT).exists() and not (run / OFFSETS_FILE).exists()

    loaded = PeftModel.from_pretrained(load_quantized(checkpoint, compute), run)
    saved = load_file(str(run / "adapter_model.safetensors"))
    state = get_peft_model_state_dict(loaded)
    assert state.keys() == saved.keys() and len(saved) == 28
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    layers = _lora_layers(loaded)
    assert layers.keys() == trained.keys()
    for n, layer in layers.items():
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit), n
    with loaded.disable_adapter():  # the base really is the untouched checkpoint
        torch.testing.assert_close(_logits(loaded, x), before, rtol=0, atol=0)
    again = _logits(loaded, x)
    if offset == "none":
        for n, layer in layers.items():
            assert torch.equal(layer.lora_A["default"].weight, trained[n][0]), n
            assert torch.equal(layer.lora_B["default"].weight, trained[n][1]), n
        torch.testing.assert_close(again, trained_logits, rtol=1e-5, atol=1e-5)
        return
    for n, layer in layers.items():
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        assert a.shape[0] == 2 * R and b.shape[1] == 2 * R, n
        (af, bf), (a0, b0) = trained[n], initial[n]
        expected = scaling[n] * (bf.double() @ af.double() - b0.double() @ a0.double())
        assert rel_err(layer.scaling["default"] * (b @ a), expected) <= 1e-5, n
    # on the untouched base the converted adapter differs from the trained model by the offset's nf4 rounding only:
    # the same drift as the initialized model showed against the base
    init_drift = rel_err(initialized, before)
    assert rel_err(again, trained_logits) <= max(2 * init_drift, 1e-3), (rel_err(again, trained_logits), init_drift)


def test_the_command_on_the_checkpoint_folder(checkpoint: Path, tmp_path: Path) -> None:
    """``loraga-fast init --model FOLDER --quantize nf4``: the run folder holds the adapter only (the quantized base is
    left untouched), ``load_initialized`` takes the checkpoint loaded 4-bit directly (the same weights as
    ``quantize_model`` gives), and ``save_loraga_model_final`` gives an adapter that reproduces it exactly."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from loraga_fast.api.names import (
        ADAPTER_WEIGHTS,
        INIT_CHECKPOINT,
        OFFSETS_FILE,
        SUMMARY_FILE,
    )
    from loraga_fast.command.main import main

    out = tmp_path / "run"
    assert main(["init", "--model", str(checkpoint), "--quantize", "nf4", "--dtype", "fp32", "--device", "cpu",
                 "--targets", ",".join(LLAMA_TARGETS), "--rank", str(R), "--batches", "2", "--batch-size", "2",
                 "--seq-len", "32", "--out", str(out)]) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["quantize"] == "nf4" and summary["base_untouched"] is True and summary["targets"] == 14
    assert not (out / OFFSETS_FILE).exists()

    base = load_quantized(checkpoint, torch.float32)
    via_quantize_model = quantize_model(LlamaForCausalLM.from_pretrained(checkpoint), "nf4", torch.float32, "cpu")
    quantized = _targets(via_quantize_model)
    for n, module in _targets(base).items():
        assert torch.equal(module.weight.data, quantized[n].weight.data), n
    del via_quantize_model, quantized

    model = load_initialized(base, out)
    saved = load_file(str(out / INIT_CHECKPOINT / ADAPTER_WEIGHTS))
    layers = _lora_layers(model)
    assert len(layers) == 14
    for n, layer in layers.items():
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit), n
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.equal(a, saved[f"base_model.model.{n}.lora_A.weight"]), n
        assert torch.equal(b, saved[f"base_model.model.{n}.lora_B.weight"]), n
        assert torch.isfinite(a).all() and b.abs().max() > 0 and a.requires_grad, n
    x = _batches()[0]
    initialized = _logits(model, x)
    save_loraga_model_final(model, out)
    again = PeftModel.from_pretrained(load_quantized(checkpoint, torch.float32), out)
    torch.testing.assert_close(_logits(again, x), initialized, rtol=1e-5, atol=1e-5)
