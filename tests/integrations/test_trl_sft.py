"""LoRA-GA in TRL's SFTTrainer in one line (:func:`loraga_fast.integrations.trl.init_lora_ga`), with the real TRL, on
one process: the adapters and offset bases equal ``preprocess_loraga`` + ``get_peft_model`` on the very batches the
trainer's dataloader, collator and loss gave; 2 training steps; the final adapter (``save_loraga_model_final``, or a
plain ``save_pretrained`` with ``keep_base``) on an untouched base gives the trained model's outputs; the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration tests need trl (the test extra)")

from loraga_fast import UsageError, save_loraga_model_final  # noqa: E402
from loraga_fast.integrations.trl import init_lora_ga  # noqa: E402
from tests._helpers import LLAMA_TARGETS, adapters, lora_ga_config, rel_err, tiny_llama  # noqa: E402
from tests.integrations._sft import (  # noqa: E402
    assert_like_reference,
    char_tokenizer,
    probe,
    record_batches,
    reference,
    reloaded,
    sft_args,
    text_dataset,
)


def _trainer(tmp_path: Path, peft_config: Any = None, model: Any = None, **args: Any) -> Any:
    from trl import SFTTrainer

    return SFTTrainer(model=model if model is not None else tiny_llama(),
                      args=sft_args(tmp_path / "sft", use_cpu=True, **args), train_dataset=text_dataset(),
                      processing_class=char_tokenizer(),
                      peft_config=peft_config if peft_config is not None or model is not None else lora_ga_config())


def test_sft_one_line_equals_preprocess_then_get_peft_model_trains_and_reloads(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    assert all(bool(b.eq(0).all()) for _, b in adapters(trainer.model).values())  # peft's default init, B = 0
    seen, remove = record_batches(trainer.model.get_base_model())
    metrics_before = {k: dict(v) for k, v in trainer._metrics.items()}
    # accelerate's GradientState is one object per process, shared by every Accelerator: compare with what the
    # earlier trainers of this process left there
    refs_before = list(trainer.accelerator.gradient_state.dataloader_references)
    assert init_lora_ga(trainer, num_batches=3, save_dir=tmp_path / "adapter") is trainer
    remove()
    assert len(seen) == 3 and all(b["labels"].shape == b["input_ids"].shape for b in seen)
    # the trainer's own collator: padded batches with the pad positions out of the loss
    assert any(bool(b["attention_mask"].eq(0).any()) for b in seen)
    assert all(bool(b["labels"][b["attention_mask"].eq(0)].eq(-100).all()) for b in seen)
    assert_like_reference(trainer.model, reference(seen))
    # nothing of the estimation is left: no gradient attached, accelerate's state free, the metrics as they were
    assert not [n for n, m in trainer.model.named_modules() if hasattr(m, "_peft_loraga_grad")]
    assert trainer.accelerator.gradient_state.dataloader_references == refs_before
    assert {k: dict(v) for k, v in trainer._metrics.items()} == metrics_before
    assert all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())

    initial = probe(trainer.model)
    assert rel_err(initial, probe(tiny_llama())) < 1e-5  # W - s B0 A0 + s B0 A0: the base model's function
    assert trainer.train().global_step == 2
    trained = probe(trainer.model)
    assert rel_err(trained, initial) > 1e-4
    save_loraga_model_final(trainer.model, tmp_path / "adapter")
    assert rel_err(reloaded(tmp_path / "adapter"), trained) < 1e-5


def test_keep_base_trains_to_a_plain_adapter(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    seen, remove = record_batches(trainer.model.get_base_model())
    init_lora_ga(trainer, num_batches=2, keep_base="lora-one")
    remove()
    ref = reference(seen, keep_base="lora-one")
    got, want = adapters(trainer.model), adapters(ref)
    for name, (a, b) in got.items():
        assert bool(b.ne(0).any()) and rel_err(b @ a, want[name][1] @ want[name][0]) < 1e-4, name
    untouched = tiny_llama().state_dict()
    for key, w in trainer.model.get_base_model().state_dict().items():
        if "lora_" not in key:
            assert torch.equal(w, untouched[key.replace(".base_layer", "")]), key  # the base is left as it was
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "plain")  # no conversion needed
    assert rel_err(reloaded(tmp_path / "plain"), probe(trainer.model)) < 1e-5


def test_an_optimizer_built_before_holds_the_initialized_parameters(tmp_path: Path) -> None:
    # optimizers=(optimizer, None): built on the peft model before init_lora_ga; the same Parameter objects get
    # LoRA-GA's factors, so its first step moves them (and nothing else)
    from trl import SFTTrainer

    model = tiny_llama()
    import peft

    peft_model = peft.get_peft_model(model, lora_ga_config())
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    trainer = SFTTrainer(model=peft_model, args=sft_args(tmp_path / "sft", use_cpu=True), train_dataset=text_dataset(),
                         processing_class=char_tokenizer(), optimizers=(optimizer, None))
    init_lora_ga(trainer, num_batches=2)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert held == {id(p) for p in lora}
    initialized = [p.detach().clone() for p in lora]
    assert any(bool(p.ne(0).any()) for p in initialized[1::2])  # the B factors
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer  # accelerate wraps it, nothing rebuilt
    assert all(not torch.equal(p, q) for p, q in zip(lora, initialized, strict=True))


def test_lowmem_mode_and_a_trl_checkpoint_finalized(tmp_path: Path) -> None:
    # mode="lowmem": 3 passes over the trainer's dataloader (the same batches each time: checked by preprocess_loraga);
    # what the trainer itself saves (trainer.save_model, checkpoint-N) is an adapter for the offset base, which
    # finalize_adapter turns into one for the untouched base from save_dir's initial adapter
    from loraga_fast import finalize_adapter

    trainer = _trainer(tmp_path)
    seen, remove = record_batches(trainer.model.get_base_model())
    init_lora_ga(trainer, num_batches=2, mode="lowmem", save_dir=tmp_path / "run")
    remove()
    assert len(seen) == 6 and all(torch.equal(seen[i]["input_ids"], seen[i % 2]["input_ids"]) for i in range(6))
    assert_like_reference(trainer.model, reference(seen[:2], mode="lowmem"))
    trainer.train()
    trainer.save_model(str(tmp_path / "trl_out"))
    finalize_adapter(tmp_path / "run", tmp_path / "trl_out", tmp_path / "final")
    assert rel_err(reloaded(tmp_path / "final"), probe(trainer.model)) < 1e-5


def _message(fn: Any) -> str:
    with pytest.raises(UsageError) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_refusals_in_one_line(tmp_path: Path) -> None:
    import peft

    plain = _trainer(tmp_path, model=tiny_llama())  # no peft_config: the trainer trains the whole model
    assert "not a peft model" in _message(lambda: init_lora_ga(plain, num_batches=1))

    default = _trainer(tmp_path, peft_config=peft.LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    assert "init_lora_weights=True" in _message(lambda: init_lora_ga(default, num_batches=1))
    no_ga = lora_ga_config()
    no_ga.lora_ga_config = None  # peft itself would refuse this config at get_peft_model for a prepared model
    missing = _trainer(tmp_path, peft_config=no_ga)
    assert "lora_ga_config" in _message(lambda: init_lora_ga(missing, num_batches=1))

    dora = lora_ga_config()
    dora.use_dora = True
    assert "DoRA" in _message(lambda: init_lora_ga(_trainer(tmp_path, peft_config=dora), num_batches=1))

    trainer = _trainer(tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert "rank_budget=" in _message(lambda: init_lora_ga(trainer, num_batches=1, rank_budget="uniform"))
    # preprocess_loraga's own refusals come through, before any weight is touched
    assert "num_batches must be at least 1" in _message(lambda: init_lora_ga(trainer, num_batches=0))
    assert "keep_base" in _message(lambda: init_lora_ga(trainer, num_batches=1, keep_base="both"))
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert all(type(m).__module__.startswith("peft") for n, m in trainer.model.named_modules() if n.endswith("q_proj"))

    init_lora_ga(trainer, num_batches=1)
    assert "not at peft's default init" in _message(lambda: init_lora_ga(trainer, num_batches=1))
    trainer.train()
    assert "already trained (2 steps)" in _message(lambda: init_lora_ga(trainer, num_batches=1))


def test_qlora_base_left_untouched_trains_and_reloads(tmp_path: Path) -> None:
    # an nf4 base (bitsandbytes runs on the CPU); TRL casts QLoRA adapters to bf16 after get_peft_model, and
    # LoRA-GA's factors take the adapters' dtype; quantized_offset="none": the quantized base is not rewritten
    pytest.importorskip("bitsandbytes", reason="the QLoRA case needs bitsandbytes (the test extra)")
    import peft

    from loraga_fast import preprocess_loraga, quantize_model

    def nf4() -> Any:
        return quantize_model(tiny_llama(), "nf4", torch.float32, "cpu")

    trainer = _trainer(tmp_path, model=nf4(), peft_config=lora_ga_config())
    seen, remove = record_batches(trainer.model.get_base_model())
    packed = {k: v.clone() for k, v in trainer.model.state_dict().items() if "base_layer.weight" in k}
    init_lora_ga(trainer, num_batches=2, quantized_offset="none", save_dir=tmp_path / "qlora")
    remove()
    assert all(torch.equal(v, packed[k]) for k, v in trainer.model.state_dict().items() if k in packed)

    ref_model, config = nf4(), lora_ga_config()
    preprocess_loraga(ref_model, config, lambda: [ref_model(**b).loss.backward() for b in seen] and None,
                      quantized_offset="none")
    want = adapters(peft.get_peft_model(ref_model, config))
    for name, (a, b) in adapters(trainer.model).items():  # the reference's factors in the adapters' bf16
        assert a.dtype == b.dtype == torch.bfloat16 and bool(b.ne(0).any()), name
        expected = want[name][1].bfloat16().float() @ want[name][0].bfloat16().float()
        assert rel_err(b.float() @ a.float(), expected) < 1e-3, name

    trainer.train()
    trained = probe(trainer.model)
    save_loraga_model_final(trainer.model, tmp_path / "qlora")  # saved as it is: the base was never offset
    reloaded_model = peft.PeftModel.from_pretrained(nf4(), str(tmp_path / "qlora"))
    for name, p in reloaded_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.bfloat16()  # as TRL trained them
    assert rel_err(probe(reloaded_model), trained) < 1e-5
