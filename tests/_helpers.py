"""Tiny models, batches, and references that do not use loraga_fast (shared by the tests)."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from peft import LoraConfig, LoraGAConfig
from torch import nn

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
VOCAB = 96


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, hidden: int = 32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).to(dtype)


def token_batches(n: int = 3, bsz: int = 2, seq: int = 11, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (bsz, seq), generator=g) for _ in range(n)]


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def train_step_for(model: nn.Module, batches: Sequence[torch.Tensor],
                   loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lm_loss) -> Callable[[], None]:
    def train_step() -> None:
        for b in batches:
            loss_fn(model, b).backward()

    return train_step


def lora_ga_config(targets: Sequence[str] | None = LLAMA_TARGETS, **ga: object) -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets) if targets is not None else None,
        init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(**ga),
    )


def attached(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m._peft_loraga_grad for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")}


def reference_mean_grads(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor],
                         loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lm_loss,
                         dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Plain autograd in ``dtype`` (float64 by default): mean over batches of each target weight's gradient."""
    ref = copy.deepcopy(model).to(dtype).train()
    for p in ref.parameters():
        p.requires_grad_(False)
    modules = dict(ref.named_modules())
    for n in names:
        modules[n].weight.requires_grad_(True)
    for b in batches:
        loss_fn(ref, _cast_floats(b, dtype)).backward()
    return {n: modules[n].weight.grad / len(batches) for n in names}


def _cast_floats(batch: object, dtype: torch.dtype) -> object:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cast_floats(v, dtype) for v in batch)
    return batch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return ((a64 - b64).norm() / b64.norm()).item()


BACKENDS = ["torch", "triton"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force an accumulate backend; ``triton`` runs the kernel on CPU tensors through the Triton interpreter."""
    saved = {k: os.environ.get(k) for k in ("LORAGA_FAST_BACKEND", "TRITON_INTERPRET")}
    os.environ["LORAGA_FAST_BACKEND"] = name
    if name == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def subspace_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the largest principal angle between the column spaces of ``a`` and ``b`` (1 = same space)."""
    qa = torch.linalg.qr(a.double()).Q
    qb = torch.linalg.qr(b.double()).Q
    return torch.linalg.svdvals(qa.T @ qb).min().item()
