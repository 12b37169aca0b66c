"""Run under ``torchrun --nproc_per_node=N`` (what ``accelerate launch`` does for multi-process CPU/DDP): the
original ``estimate_gradient(model, dataloader, accelerator)`` on an ``accelerator.prepare``-d (DDP) model, and
``preprocess_loraga`` driven by ``train_step_from_trainer`` of a Trainer. Rank 0 writes the results to argv[1]."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from accelerate import Accelerator

from loraga_fast import estimate_gradient, preprocess_loraga, train_step_from_trainer
from tests._helpers import VOCAB, attached, lora_ga_config, tiny_llama


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes > 1, "launch with torchrun --nproc_per_node=N (N > 1)"
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, VOCAB, (12,), generator=g) for _ in range(8)]
    examples = [{"input_ids": r, "labels": r} for r in rows]

    model = accelerator.prepare(tiny_llama())  # DistributedDataParallel
    loader = torch.utils.data.DataLoader(examples, batch_size=2)
    named = estimate_gradient(model, loader, accelerator, lora_config=lora_ga_config(), progress=False)

    from transformers import Trainer, TrainingArguments

    trainer_model = tiny_llama()
    args = TrainingArguments(output_dir=str(Path(out).parent / "trainer"), per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, logging_strategy="no", save_strategy="no")
    trainer = Trainer(model=trainer_model, args=args, train_dataset=examples)
    preprocess_loraga(trainer_model, lora_ga_config(), train_step_from_trainer(trainer))
    result = {"estimate": named,
              "trainer": {n: t.clone() for n, t in attached(trainer_model).items()},
              "rows": rows, "world": accelerator.num_processes, "ddp": type(model).__name__}
    torch.save(result, Path(out) / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
