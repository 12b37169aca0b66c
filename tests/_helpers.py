"""Tiny models, batches, references that do not use loraga_fast, and what the tests read back from a prepared model
(shared by the tests)."""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

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


def wide_llama() -> nn.Module:
    """One LLaMA block large enough that k = 24 r is well below min(m, n): q/o 256x256, k/v 128x256,
    gate/up 512x256, down 256x512."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).to(dtype)


class TwoBranch(nn.Module):
    """Two Linear(16, 16) layers; the loss never reaches ``dead`` (its gradient is all zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(16, 16)
        self.dead = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x).square().mean() + 0.0 * self.dead(x).sum()


def token_batches(n: int = 3, bsz: int = 2, seq: int = 11, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (bsz, seq), generator=g) for _ in range(n)]


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def dict_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    """``token_batches`` as ``{"input_ids", "labels"}`` dicts (what a DataLoader over a tokenized dataset yields)."""
    return [{"input_ids": b, "labels": b} for b in token_batches(n=n)]


def dict_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


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


def prepared_factors(model: nn.Module) -> dict[str, Any]:
    """The factors (:class:`loraga_fast.stores.factors.LayerFactors`) the get_peft_model hand-off holds for ``model``'s
    prepared layers, by module name."""
    from loraga_fast.core import handoff

    out = {}
    for full_name, module in model.named_modules():
        entry = handoff.prepared(module)
        if entry is not None and entry[1] in entry[0].factors():
            out[full_name] = entry[0].factors()[entry[1]]
    return out


def adapters(peft_model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{base module name: (lora_A weight, lora_B weight)}`` of a peft model's default adapter."""
    return {n.removeprefix("base_model.model."): (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
            for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


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


def hook_reference(model: nn.Module, names: Sequence[str], batches: Sequence[object],
                   step: Callable[[nn.Module, object], None] = lambda m, b: lm_loss(m, b).backward(),  # type: ignore[arg-type]
                   context: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
                   ) -> dict[str, torch.Tensor]:
    """float64 mean over backward passes of each layer's ``G^T X``, with ``G`` and ``X`` exactly as ``model`` (a copy,
    in its own dtype) produced them, taken with plain autograd hooks: no loraga_fast code runs.

    ``step(model, batch)`` runs one forward and backward (default: the causal-LM loss of a token batch); all the
    batches run inside ``context()`` (e.g. ``lambda: torch.autocast("cpu", dtype=torch.bfloat16)``). The forward hook
    keeps the input as the layer's matmul consumed it: cast to the autocast dtype when autocast is on for its
    device, else as is. A layer called several times per step counts each backward pass (the mean is over passes,
    as ``preprocess_loraga`` defines it). Results are in the weight's layout (``(in, out)`` for ``Conv1D``).
    """
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    sums = {n: torch.zeros(_math_shape(modules[n]), dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}  # a stack: backward runs in reverse order

    def save_input(n: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = args[0].detach()
            device = x.device.type
            if torch.is_autocast_enabled(device):
                x = x.to(torch.get_autocast_dtype(device))
            inputs[n].append(x)

        return hook

    def add_product(n: str) -> Callable[..., None]:
        def hook(mod: nn.Module, grad_in: object, grad_out: tuple[torch.Tensor, ...]) -> None:
            g, x = grad_out[0], inputs[n].pop()
            sums[n] += g.reshape(-1, g.shape[-1]).double().t() @ x.reshape(-1, x.shape[-1]).double()
            counts[n] += 1

        return hook

    hooks = []
    for n in names:
        modules[n].weight.requires_grad_(True)
        hooks.append(modules[n].register_forward_hook(save_input(n)))
        hooks.append(modules[n].register_full_backward_hook(add_product(n)))
    try:
        with context():
            for b in batches:
                step(model, b)
    finally:
        for h in hooks:
            h.remove()
    out = {n: s / max(counts[n], 1) for n, s in sums.items()}
    return {n: (t.t() if isinstance(modules[n], Conv1D) else t) for n, t in out.items()}


def _math_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear or transformers Conv1D (whose weight is stored ``(in, out)``)."""
    from transformers.pytorch_utils import Conv1D

    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, Conv1D) else (w.shape[0], w.shape[1])


def assert_untouched(model: nn.Module) -> None:
    """Nothing attached, every forward restored, every parameter trainable again (after a refused call)."""
    assert not attached(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


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


def spawn(fn: object, world: int, tmp_path: Path, *args: object, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world, init_file, out_dir, *args)`` in ``world`` processes (``init_file`` for a ``file://``
    rendezvous, ``out_dir`` for their results); fail (not hang) after ``timeout``."""
    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=(world, str(tmp_path / "init"), str(tmp_path), *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} processes did not finish within {timeout:.0f} s (deadlock?)")


def subspace_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the largest principal angle between the column spaces of ``a`` and ``b`` (1 = same space)."""
    qa = torch.linalg.qr(a.double()).Q
    qb = torch.linalg.qr(b.double()).Q
    return torch.linalg.svdvals(qa.T @ qb).min().item()


def factor_energy(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: int) -> tuple[float, float]:
    """How much of the optimal energy LoRA-GA's default split (A from the top r right vectors, B from the next r left
    vectors) captures with factors ``u (m, >=2r)``, ``v (n, >=2r)`` of ``grad``, against its exact float64 SVD:

    A: ``||G Q_A||^2 / sum_{i<=r} s_i^2`` (Q_A spans ``v[:, :r]``); B: ``||Q_B^T (G - G_r)||^2 / sum_{r<i<=2r} s_i^2``
    (Q_B spans ``u[:, r:2r]``, G_r is G's best rank-r part). 1 = the exact SVD. Well defined where neighbouring
    singular values are nearly equal, unlike principal angles.
    """
    g = grad.double()
    uu, s, vh = torch.linalg.svd(g, full_matrices=False)
    q_a = torch.linalg.qr(v[:, :r].double()).Q
    q_b = torch.linalg.qr(u[:, r : 2 * r].double()).Q
    g_r = uu[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    a = ((g @ q_a).square().sum() / s[:r].square().sum()).item()
    b = ((q_b.T @ (g - g_r)).square().sum() / s[r : 2 * r].square().sum()).item()
    return a, b
