"""The train_step helpers (:mod:`loraga_fast.api.steps`): ``train_step_from_dataloader`` and ``train_step_from_trainer``
give the mean gradient over the batches they say they run."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model

from loraga_fast import (
    preprocess_loraga,
    train_step_from_dataloader,
    train_step_from_trainer,
)
from tests._helpers import (
    VOCAB,
    attached,
    dict_batches,
    dict_loss,
    lora_ga_config,
    reference_mean_grads,
    rel_err,
    tiny_llama,
)


def test_train_step_from_dataloader() -> None:
    model = tiny_llama()
    loader = dict_batches(3)
    preprocess_loraga(model, lora_ga_config(), train_step_from_dataloader(model, loader, num_batches=2))
    ref = reference_mean_grads(model, list(attached(model)), loader[:2], dict_loss)
    assert max(rel_err(g, ref[n]) for n, g in attached(model).items()) < 1e-5


def test_train_step_from_trainer_drives_a_real_trainer(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    dataset = [{"input_ids": (ids := torch.randint(0, VOCAB, (12,), generator=g)), "labels": ids} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to=[],
                             use_cpu=True, logging_strategy="no", save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    batches = [{k: v.clone() for k, v in b.items()} for b in list(trainer.get_train_dataloader())[:3]]
    cfg = lora_ga_config()
    preprocess_loraga(model, cfg, train_step_from_trainer(trainer, num_batches=3))
    grads = attached(model)
    ref = reference_mean_grads(model, list(grads), batches, dict_loss)
    assert len(grads) == 14 and max(rel_err(grads[n], ref[n]) for n in ref) < 1e-5

    peft_model = get_peft_model(model, cfg)
    result = Trainer(model=peft_model, args=args, train_dataset=dataset).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
