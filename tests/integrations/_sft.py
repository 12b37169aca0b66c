"""What the TRL tests share: a character tokenizer for the tiny LLaMA (ids below its vocabulary of 96), a tiny text
dataset, the SFT arguments, the batches a trainer's model saw, and the reference LoRA-GA init
(``preprocess_loraga`` + ``get_peft_model`` on those batches, with transformers' own causal-LM loss: no trainer,
no TRL code)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests._helpers import LLAMA_TARGETS, adapters, lora_ga_config, rel_err, tiny_llama, token_batches

CHARS = "abcdefghijklmnopqrstuvwxyz .,"
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny test",
         "lora ga in trl in one line", "a tiny llama learns its letters", "every batch comes from the trainer",
         "gradients first, then the adapters", "one trainer per process", "short lines, few tokens"] * 2


def char_tokenizer() -> Any:
    """One token per character of :data:`CHARS`, plus pad (0), eos (1) and unk (2): 32 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def text_dataset(texts: Sequence[str] = TEXTS) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"text": list(texts)})


def sft_args(out_dir: str | Path, **overrides: Any) -> Any:
    """``SFTConfig`` for 2 steps of 2 sequences in fp32 (SFTConfig's default is bf16), nothing logged or saved
    (``overrides`` win; one process passes ``use_cpu=True``, which DeepSpeed runs must not)."""
    from trl import SFTConfig

    kwargs: dict[str, Any] = {"output_dir": str(out_dir), "per_device_train_batch_size": 2, "max_steps": 2,
                              "learning_rate": 1e-2, "report_to": [], "save_strategy": "no", "logging_strategy": "no",
                              "max_length": 32, "seed": 0, "disable_tqdm": True, "bf16": False}
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def record_batches(model: nn.Module) -> tuple[list[dict[str, torch.Tensor]], Callable[[], None]]:
    """Record the tensors of every call of ``model`` (the trainer's base model); returns the list and a remover."""
    seen: list[dict[str, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append({k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels") if k in kwargs})

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True).remove


def reference(batches: Sequence[dict[str, torch.Tensor]], targets: Sequence[str] = LLAMA_TARGETS,
              model: nn.Module | None = None, **preprocess: Any) -> nn.Module:
    """``preprocess_loraga`` + ``get_peft_model`` on a fresh tiny LLaMA (seed 0, or ``model``) over ``batches``,
    one backward pass each, with the model's own causal-LM loss (the mean over the label tokens, as SFT's)."""
    import peft

    from loraga_fast import preprocess_loraga

    model = model if model is not None else tiny_llama()
    config = lora_ga_config(targets)

    def train_step() -> None:
        for batch in batches:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step, **preprocess)
    return peft.get_peft_model(model, config)


def base_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The (offset) base weights of the LoRA layers, by state-dict key."""
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items() if k.endswith("base_layer.weight")}


def assert_like_reference(peft_model: nn.Module, ref: nn.Module, tol: float = 1e-4) -> None:
    """The same LoRA-GA adapters (``B A`` of every layer, B nonzero: not peft's default init) and offset bases."""
    got, want = adapters(peft_model), adapters(ref)
    assert sorted(got) == sorted(want) and len(got) > 0
    for name, (a, b) in got.items():
        assert bool(b.ne(0).any()), name
        err = rel_err(b @ a, want[name][1] @ want[name][0])
        assert err < tol, (name, err)
    got_w, want_w = base_weights(peft_model), base_weights(ref)
    assert sorted(got_w) == sorted(want_w)
    for key, w in got_w.items():
        assert rel_err(w, want_w[key]) < tol, key


def assert_like_reference_up_to_signs(got: dict[str, tuple[torch.Tensor, torch.Tensor]],
                                      got_bases: dict[str, torch.Tensor], ref: nn.Module, scaling: float,
                                      tol: float = 1e-4) -> None:
    """:func:`assert_like_reference` for factors from another process count: each singular pair is fixed only up to
    a joint sign, which loraga_fast makes canonical (the largest-magnitude entry of each ``v`` positive); where two
    entries nearly tie, the rounding of a different reduction order can flip it, and LoRA-GA's ``B A`` (``B`` from
    pairs ``r..2r``, ``A`` from ``0..r``) then changes. So every row of ``A`` and column of ``B`` is compared up to its
    sign, ``B A`` after aligning them, and each base must be offset by its own factors: ``W' + s B A`` = the
    reference's, the untouched weight."""
    want, want_bases = adapters(ref), base_weights(ref)
    assert sorted(got) == sorted(want) and sorted(got_bases) == sorted(want_bases) and len(got) > 0
    for name, (a, b) in got.items():
        a_ref, b_ref = want[name]
        assert bool(b.ne(0).any()), name
        sa = torch.sign((a * a_ref).sum(dim=1, keepdim=True))
        sb = torch.sign((b * b_ref).sum(dim=0, keepdim=True))
        assert rel_err(a * sa, a_ref) < tol and rel_err(b * sb, b_ref) < tol, name
        assert rel_err((b * sb) @ (a * sa), b_ref @ a_ref) < tol, name
        key = f"base_model.model.{name}.base_layer.weight"
        whole = got_bases[key].double() + scaling * (b.double() @ a.double())
        assert rel_err(whole, want_bases[key].double() + scaling * (b_ref.double() @ a_ref.double())) < 1e-5, key


def probe(model: nn.Module) -> torch.Tensor:
    x = token_batches(n=1, seed=7)[0]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids=x).logits.detach().clone()
    finally:
        model.train(was)


def reloaded(adapter_dir: str | Path) -> torch.Tensor:
    """``probe`` of ``adapter_dir`` loaded on an untouched tiny LLaMA (seed 0)."""
    import peft

    return probe(peft.PeftModel.from_pretrained(tiny_llama(), str(adapter_dir)))


__all__ = ["CHARS", "TEXTS", "assert_like_reference", "assert_like_reference_up_to_signs", "base_weights",
           "char_tokenizer", "probe", "record_batches", "reference", "reloaded", "rel_err", "sft_args", "text_dataset"]
