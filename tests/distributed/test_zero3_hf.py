"""DeepSpeed ZeRO-3 through transformers' Trainer and through accelerate, on 2 gloo processes (DeepSpeed's CPU
accelerator): the base model loaded partitioned (``TrainingArguments(deepspeed=...)`` / ``DeepSpeedPlugin(...,
zero3_init_flag=True)`` before ``from_pretrained``), the gradients estimated (``train_step_from_trainer`` /
``estimate_gradient(model, dataloader, accelerator)``, also on a model ``accelerator.prepare`` turned into an engine),
``get_peft_model``, ``save_loraga_model_init``, 2 training steps by the Trainer / by ``accelerator.backward``,
``save_loraga_model_final``; then, in this process, the final adapter reloaded on the untouched base gives the trained
model's outputs.

The Trainer is used once per process: accelerate refuses a second ``Accelerator`` with a DeepSpeed plugin in one
process (``NotImplementedError: You cannot pass in a deepspeed_plugin when creating a second Accelerator``), so the
Trainer built for the estimation trains the peft model (``trainer.model = trainer.model_wrapped = peft_model``).
``TrainingArguments(use_cpu=True)`` must not be passed: accelerate then sets DeepSpeed aside (the distributed type
stays MULTI_CPU) while the model still loads partitioned."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM  # before any zero.Init (see test_zero3._partitioned_llama)

from loraga_fast import (
    LoraGAContext,
    estimate_gradient,
    preprocess_loraga,
    save_loraga_model_final,
    save_loraga_model_init,
    train_step_from_trainer,
)
from tests._helpers import lora_ga_config, rel_err, spawn, token_batches
from tests.distributed.test_zero3 import TARGETS, _init, _llama

pytest.importorskip("deepspeed", reason="DeepSpeed ZeRO-3 tests need deepspeed (the test extra)")
pytest.importorskip("accelerate", reason="the accelerate path needs accelerate (the test extra)")

# what a Trainer user writes: "auto" filled in from TrainingArguments and the model (persistence 10 x hidden: the
# small LoRA weights stay whole on every process, the base weights are partitioned)
TRAINER_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                  "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}}
ACCELERATE_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "zero_allow_untested_optimizer": True,
                     "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
BATCHES = token_batches(n=8)  # 16 sequences, 2 per batch


class _Dataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 2 * len(BATCHES)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = BATCHES[i // 2][i % 2]
        return {"input_ids": x, "labels": x}


def _probe(model: torch.nn.Module) -> torch.Tensor:
    x = token_batches(n=1, seed=7)[0]
    with torch.no_grad():
        return model(input_ids=x).logits.detach().clone()


def _partitioned(model: torch.nn.Module) -> bool:
    w = model.model.layers[0].self_attn.q_proj.weight
    return hasattr(w, "ds_id") and w.numel() == 0


def _trainer_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    try:
        import peft
        from transformers import Trainer, TrainingArguments

        out: dict[str, Any] = {}
        save = os.path.join(out_dir, "trainer_adapter")
        # the arguments first: their HfTrainerDeepSpeedConfig makes from_pretrained load the model partitioned
        args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), deepspeed=TRAINER_CONFIG,
                                 per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, report_to=[],
                                 save_strategy="no", ddp_backend="gloo", seed=0)
        model = LlamaForCausalLM.from_pretrained(os.path.join(out_dir, "base"))
        out["partitioned"] = _partitioned(model)
        trainer = Trainer(model=model, args=args, train_dataset=_Dataset())
        out["deepspeed"] = trainer.is_deepspeed_enabled
        cfg = lora_ga_config(TARGETS)
        preprocess_loraga(model, cfg, train_step_from_trainer(trainer, num_batches=2))
        peft_model = peft.get_peft_model(model, cfg)
        save_loraga_model_init(peft_model, save)
        out["initial"] = _probe(peft_model)
        trainer.model = trainer.model_wrapped = peft_model  # one Trainer per process under DeepSpeed (see above)
        out["steps"] = trainer.train().global_step
        out["trained"] = _probe(peft_model)
        save_loraga_model_final(peft_model, save)
        torch.save(out, os.path.join(out_dir, f"trainer{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _accelerate_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    try:
        import peft
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        out: dict[str, Any] = {}
        save = os.path.join(out_dir, "accelerate_adapter")
        base = os.path.join(out_dir, "base")
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ACCELERATE_CONFIG, zero3_init_flag=True))
        model = LlamaForCausalLM.from_pretrained(base)  # zero3_init_flag: loaded partitioned
        out["partitioned"] = _partitioned(model)
        loader = torch.utils.data.DataLoader(_Dataset(), batch_size=2)
        cfg = lora_ga_config(TARGETS)
        seen: list[torch.Tensor] = []  # the batches accelerate's prepared loader gave this process
        hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
        grads = estimate_gradient(model, loader, accelerator, lora_config=cfg, num_batches=2, progress=False)
        hook.remove()
        out["grads"], out["seen"] = {n: g.full_tensor() for n, g in grads.items()}, seen

        # a model accelerator.prepare already turned into an engine (no optimizer): estimated through its module
        other = LlamaForCausalLM.from_pretrained(base)
        engine = accelerator.prepare(other)
        out["engine"] = type(engine).__name__
        from_engine = estimate_gradient(engine, loader, accelerator, lora_config=lora_ga_config(TARGETS), num_batches=2,
                                        progress=False)
        out["engine_grads"] = {n: g.full_tensor() for n, g in from_engine.items()}
        # accelerate ties accelerator.backward to the first engine it built: free it before preparing the peft model
        # (this also destroys the engine, whose hooks would otherwise stay on the module)
        engine = accelerator.free_memory(engine)

        with LoraGAContext(model, grads):
            peft_model = peft.get_peft_model(model, cfg)
        save_loraga_model_init(peft_model, save)
        out["initial"] = _probe(peft_model)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        wrapped, optimizer, train_loader = accelerator.prepare(peft_model, optimizer, loader)
        losses = []
        for _, batch in zip(range(2), train_loader):
            loss = wrapped(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        out["losses"] = losses
        out["trained"] = _probe(peft_model)
        save_loraga_model_final(wrapped, save)  # the engine accelerate returned: process 0 writes, adapters gathered
        torch.save(out, os.path.join(out_dir, f"accelerate{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reloaded_outputs(tmp_path: Path, adapter: str) -> torch.Tensor:
    import peft

    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")  # untouched: no DeepSpeed in this process
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / adapter)
    assert not (tmp_path / adapter / "init_lora_checkpoint").exists()
    return _probe(reloaded)


def _check_trained(results: list[dict[str, Any]], reloaded: torch.Tensor) -> None:
    for r, res in enumerate(results):
        assert res["partitioned"], r
        assert rel_err(res["trained"], results[0]["trained"]) < 1e-6, r  # every process trained the same model
        assert rel_err(res["trained"], res["initial"]) > 1e-4, r  # the steps moved the adapters
        # the final adapter on the untouched base: W + s (B A - B0 A0) against the trained (W - s B0 A0) + s B A
        assert rel_err(reloaded, res["trained"]) < 1e-4, (r, rel_err(reloaded, res["trained"]))


@pytest.mark.slow
def test_zero3_trainer_estimates_trains_and_saves(tmp_path: Path) -> None:
    _llama().save_pretrained(tmp_path / "base")
    spawn(_trainer_worker, 2, tmp_path, timeout=300.0)
    results = [torch.load(tmp_path / f"trainer{r}.pt", weights_only=False) for r in range(2)]
    assert all(res["deepspeed"] and res["steps"] == 2 for res in results), results
    _check_trained(results, _reloaded_outputs(tmp_path, "trainer_adapter"))


@pytest.mark.slow
def test_zero3_accelerate_estimates_trains_and_saves(tmp_path: Path) -> None:
    from tests._helpers import hook_reference

    _llama().save_pretrained(tmp_path / "base")
    spawn(_accelerate_worker, 2, tmp_path, timeout=300.0)
    results = [torch.load(tmp_path / f"accelerate{r}.pt", weights_only=False) for r in range(2)]
    single = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    names = list(results[0]["grads"])
    seen = [b for res in results for b in res["seen"]]
    assert len(seen) == 4, [b.shape for b in seen]  # 2 batches per process (num_batches=2)
    reference = hook_reference(single, names, seen)  # the mean over every process's batches, float64
    assert len(names) == 2 * len(TARGETS)
    for r, res in enumerate(results):
        assert res["engine"] == "DeepSpeedEngine"
        for n in names:
            assert rel_err(res["grads"][n], reference[n]) < 1e-5, (r, n)
            assert rel_err(res["engine_grads"][n], reference[n]) < 1e-5, (r, n)
        assert len(res["losses"]) == 2 and all(torch.isfinite(torch.tensor(res["losses"]))), r
    _check_trained(results, _reloaded_outputs(tmp_path, "accelerate_adapter"))
