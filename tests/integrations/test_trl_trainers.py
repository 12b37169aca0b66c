"""The same one line for TRL's other trainers that take ``peft_config``: DPOTrainer, KTOTrainer and RewardTrainer
(tiny LLaMA, tiny preference / binary-feedback datasets, one process). Each gives the adapters and offset bases that
the two-trainer recipe it replaces gives: a trainer built on the bare base model for ``train_step_from_trainer``
(``preprocess_loraga`` then ``get_peft_model``) -- the same dataset, collator, sampler seed and loss, so the same
batches; DPO's and KTO's reference passes run under ``disable_adapter`` in the one-line trainer and on a reference
model with the base weights in the other. Then 2 training steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration tests need trl (the test extra)")

from loraga_fast import UsageError, preprocess_loraga, train_step_from_trainer  # noqa: E402
from loraga_fast.integrations.trl import init_lora_ga  # noqa: E402
from tests._helpers import adapters, lora_ga_config, tiny_llama  # noqa: E402
from tests.integrations._sft import assert_like_reference, char_tokenizer  # noqa: E402

PROMPTS = ["the fox", "hello", "lora ga", "a tiny", "one line", "every batch", "short", "gradients"]
GOOD = [" jumps", " world", " in trl", " llama", " of code", " counts", " and sweet", " first"]
BAD = [" sleeps", " there", " is slow", " cat", " of noise", " is lost", " and long", " last"]


def _common(tmp_path: Path, kind: str) -> dict[str, Any]:
    return {"output_dir": str(tmp_path / kind), "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 1e-2,
            "report_to": [], "save_strategy": "no", "logging_strategy": "no", "seed": 0, "disable_tqdm": True,
            "bf16": False, "use_cpu": True, "max_length": 32}


def _reward_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=0))


def _config(kind: str) -> Any:
    config = lora_ga_config()
    if kind == "reward":
        from peft import TaskType

        config.task_type = TaskType.SEQ_CLS  # peft then trains the score head too (modules_to_save)
    return config


def _trainer(kind: str, tmp_path: Path, peft_config: Any) -> Any:
    from datasets import Dataset

    # without peft, DPO and KTO need their reference model (TRL would load it from the model's hub name, which a
    # model built here has not): the same weights; with peft, the reference is the model under disable_adapter
    reference = {"ref_model": tiny_llama()} if peft_config is None else {}

    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_dict({"prompt": PROMPTS, "chosen": GOOD, "rejected": BAD})
        return DPOTrainer(model=tiny_llama(), args=DPOConfig(**_common(tmp_path, kind)), train_dataset=data,
                          processing_class=char_tokenizer(), peft_config=peft_config, **reference)
    if kind == "kto":
        from trl import KTOConfig, KTOTrainer

        data = Dataset.from_dict({"prompt": PROMPTS * 2, "completion": GOOD + BAD, "label": [True] * 8 + [False] * 8})
        return KTOTrainer(model=tiny_llama(), args=KTOConfig(**_common(tmp_path, kind)), train_dataset=data,
                          processing_class=char_tokenizer(), peft_config=peft_config, **reference)
    from trl import RewardConfig, RewardTrainer

    data = Dataset.from_dict({"chosen": [p + g for p, g in zip(PROMPTS, GOOD, strict=True)],
                              "rejected": [p + b for p, b in zip(PROMPTS, BAD, strict=True)]})
    return RewardTrainer(model=_reward_model(), args=RewardConfig(**_common(tmp_path, kind)), train_dataset=data,
                         processing_class=char_tokenizer(), peft_config=peft_config)


# the reward model's last block sees only each sequence's last token (its score): a mean gradient of rank at most the
# sequence count there, so 4 batches (16 sequences) for every layer to reach rank 2r = 8
BATCHES = {"dpo": 2, "kto": 2, "reward": 4}


@pytest.mark.parametrize("kind", ["dpo", "kto", "reward"])
def test_one_line_equals_the_two_trainer_recipe_and_trains(kind: str, tmp_path: Path) -> None:
    import peft

    trainer = _trainer(kind, tmp_path / "one", _config(kind))
    init_lora_ga(trainer, num_batches=BATCHES[kind])

    bare = _trainer(kind, tmp_path / "two", None)  # the recipe init_lora_ga replaces: a trainer on the base model
    config = _config(kind)
    preprocess_loraga(bare.model, config, train_step_from_trainer(bare, num_batches=BATCHES[kind]))
    assert_like_reference(trainer.model, peft.get_peft_model(bare.model, config))

    initial = {n: b.clone() for n, (_, b) in adapters(trainer.model).items()}
    assert trainer.train().global_step == 2
    assert all(not torch.equal(b, initial[n]) for n, (_, b) in adapters(trainer.model).items())


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_online_rl_trainers_are_refused_in_one_line(kind: str, tmp_path: Path) -> None:
    # they generate their batches from the model in _prepare_inputs, buffering generations and counting steps:
    # GRPO's loss even reads a field only the training loop sets (current_gradient_accumulation_steps)
    import trl
    from datasets import Dataset

    classes = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}
    config_cls, trainer_cls = classes[kind]
    common = {k: v for k, v in _common(tmp_path, kind).items() if k != "max_length"}
    args = config_cls(**{**common, "per_device_train_batch_size": 4}, num_generations=2, max_completion_length=4)
    trainer = trainer_cls(model=tiny_llama(), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                          processing_class=char_tokenizer(), peft_config=lora_ga_config())
    with pytest.raises(UsageError, match=f"{trainer_cls.__name__} generates its batches") as err:
        init_lora_ga(trainer, num_batches=1)
    assert "\n" not in str(err.value)


def test_a_transformers_trainer_on_a_peft_model(tmp_path: Path) -> None:
    # no TRL in the trainer: transformers' own Trainer given a PeftModel with a LoRA-GA config at peft's default init
    import peft
    from transformers import Trainer, TrainingArguments

    from tests._helpers import token_batches
    from tests.integrations._sft import record_batches, reference

    data = [{"input_ids": row, "labels": row} for batch in token_batches(n=4, bsz=2, seq=12) for row in batch]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no", seed=0,
                             disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=peft.get_peft_model(tiny_llama(), lora_ga_config()), args=args, train_dataset=data)
    seen, remove = record_batches(trainer.model.get_base_model())
    init_lora_ga(trainer, num_batches=2)
    remove()
    assert len(seen) == 2
    assert_like_reference(trainer.model, reference(seen))
    assert trainer.train().global_step == 2
