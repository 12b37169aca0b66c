"""``init_lora_ga(SFTTrainer(..., peft_config=...))`` on 2 gloo processes, one Trainer per process: data parallel
(the Trainer wraps the model in DDP when it trains) and DeepSpeed ZeRO-3 through the Trainer (``SFTConfig(deepspeed=
...)`` before ``from_pretrained``: the base loaded partitioned; the engine built by ``trainer.train()``, after the
re-initialization). Each process estimates from its own share of the trainer's batches; the adapters and offset bases
equal ``preprocess_loraga`` + ``get_peft_model`` over every process's batches in one process; 2 steps; the final adapter
(``save_loraga_model_final`` on every process, process 0 writes) reloaded on the untouched base in this process gives
the trained outputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl", reason="the TRL integration tests need trl (the test extra)")

from transformers import LlamaForCausalLM  # noqa: E402  (before any zero.Init, see tests/distributed/test_zero3.py)

from tests._helpers import adapters, lora_ga_config, rel_err, spawn  # noqa: E402
from tests.integrations._sft import (  # noqa: E402
    assert_like_reference_up_to_signs,
    base_weights,
    char_tokenizer,
    probe,
    record_batches,
    reference,
    sft_args,
    text_dataset,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]
# what a Trainer user writes (as tests/distributed/test_zero3_hf.py): "auto" filled in from the arguments and the model
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}}


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


def _full_bases(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    partitioned = [p for p in peft_model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return base_weights(peft_model)
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        return base_weights(peft_model)


def _configure_deepspeed_state_on_cpu() -> None:
    """On a machine without an accelerator, accelerate finds no distributed backend for DeepSpeed and runs the
    Trainer as one process (``num_processes == 1``: each process would get the whole dataset, and TRL's
    ``compute_loss`` fails in ``gather_for_metrics`` with ``ProcessGroupGloo::allgather: invalid output tensor
    list``, in plain SFT training too). A state configured beforehand with the gloo backend, which the arguments
    then use (``accelerator_config={"use_configured_state": True}``), makes it the 2-process DeepSpeed run a GPU
    machine gets by itself."""
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    got = (state.num_processes, state.distributed_type)
    assert got == (2, "DEEPSPEED"), got


def _worker(rank: int, world: int, init_file: str, out_dir: str, kind: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    if kind == "zero3":
        from tests.distributed.test_zero3 import _init

        _init(rank, world, init_file)
    else:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from trl import SFTTrainer

        from loraga_fast import save_loraga_model_final
        from loraga_fast.integrations.trl import init_lora_ga

        save = os.path.join(out_dir, f"{kind}_adapter")
        # the arguments first: under DeepSpeed their HfTrainerDeepSpeedConfig makes from_pretrained load partitioned
        extra: dict[str, Any] = {"use_cpu": True}
        if kind == "zero3":
            _configure_deepspeed_state_on_cpu()
            extra = {"deepspeed": ZERO3, "accelerator_config": {"use_configured_state": True}}
        args = sft_args(os.path.join(out_dir, kind), ddp_backend="gloo", **extra)
        model = LlamaForCausalLM.from_pretrained(os.path.join(out_dir, "base"))
        w = model.model.layers[0].self_attn.q_proj.weight
        out: dict[str, Any] = {"partitioned": hasattr(w, "ds_id") and w.numel() == 0}
        trainer = SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=char_tokenizer(),
                             peft_config=lora_ga_config(TARGETS))
        out["deepspeed"] = trainer.is_deepspeed_enabled
        seen, remove = record_batches(trainer.model.get_base_model())
        init_lora_ga(trainer, num_batches=2, save_dir=save)  # the one line
        remove()
        out["seen"] = seen
        out["adapters"] = {n: (a.clone(), b.clone()) for n, (a, b) in adapters(trainer.model).items()}
        out["bases"] = _full_bases(trainer.model)
        out["steps"] = trainer.train().global_step
        out["wrapped"] = type(trainer.model_wrapped).__name__
        out["trained"] = probe(trainer.model)
        save_loraga_model_final(trainer.model, save)
        torch.save(out, os.path.join(out_dir, f"{kind}{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check(tmp_path: Path, kind: str, wrapped: str) -> None:
    _llama().save_pretrained(tmp_path / "base")
    spawn(_worker, 2, tmp_path, kind, timeout=420.0)
    results = [torch.load(tmp_path / f"{kind}{r}.pt", weights_only=False) for r in range(2)]
    seen = [b for res in results for b in res["seen"]]
    assert len(seen) == 4  # 2 batches per process, each process its own share of the dataset
    assert not any(torch.equal(a["input_ids"], b["input_ids"]) for a in results[0]["seen"] for b in results[1]["seen"])
    ref = reference(seen, TARGETS, model=LlamaForCausalLM.from_pretrained(tmp_path / "base"))
    for r, res in enumerate(results):
        assert res["partitioned"] == (kind == "zero3") and res["deepspeed"] == (kind == "zero3"), r
        assert res["steps"] == 2 and res["wrapped"] == wrapped, (r, res["wrapped"])
        # LoRA-GA's from the mean over both processes' batches, every process the same
        assert_like_reference_up_to_signs(res["adapters"], res["bases"], ref, scaling=2.0)
        for name, (a, b) in res["adapters"].items():
            assert torch.equal(a, results[0]["adapters"][name][0]) and torch.equal(b, results[0]["adapters"][name][1])
        assert rel_err(res["trained"], results[0]["trained"]) < 1e-6, r  # every process trained the same model
    final = tmp_path / f"{kind}_adapter"
    assert not (final / "init_lora_checkpoint").exists()
    import peft

    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")  # untouched: no DeepSpeed in this process
    got = probe(peft.PeftModel.from_pretrained(base, str(final)))
    assert rel_err(got, results[0]["trained"]) < 1e-5, rel_err(got, results[0]["trained"])


@pytest.mark.slow
def test_sft_data_parallel_two_processes(tmp_path: Path) -> None:
    _check(tmp_path, "ddp", "DistributedDataParallel")


@pytest.mark.slow
def test_sft_deepspeed_zero3_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed", reason="the ZeRO-3 test needs deepspeed (the test extra)")
    _check(tmp_path, "zero3", "DeepSpeedEngine")
