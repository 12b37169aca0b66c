"""A run whose accumulators cannot fit is refused before the first forward pass, naming the figures and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraga_fast import UsageError, memory_estimate, preprocess_loraga
from loraga_fast.command.main import main
from tests._helpers import (
    attached,
    lm_loss,
    lora_ga_config,
    tiny_llama,
    token_batches,
    wide_llama,
)


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Fake the memory available on every device (bytes; a list so a test can set it)."""
    import importlib

    value = [0]
    monkeypatch.setattr(importlib.import_module("loraga_fast.core.memory"), "available_bytes", lambda device: value[0])
    return value


def test_exact_mode_is_refused_when_its_accumulators_do_not_fit(limit: list[int]) -> None:
    model = wide_llama()
    cfg = lora_ga_config()
    cfg.r = 1  # k = 24 columns: the sketches are far smaller than the 128- to 512-wide gradients
    estimate = memory_estimate(model, cfg)
    limit[0] = (estimate.exact_bytes + estimate.lowmem_bytes) // 2  # exact does not fit, low-memory mode does
    assert estimate.lowmem_bytes < limit[0] < estimate.exact_bytes
    calls: list[int] = []

    def step() -> None:
        calls.append(1)
        for b in token_batches():
            lm_loss(model, b).backward()

    with pytest.raises(UsageError, match=rf"exact mode needs {estimate.exact_bytes / 2**20:.1f} MiB .* on cpu, but only "
                                         r".* available: use preprocess_loraga\(\.\.\., mode='lowmem'\)"):
        preprocess_loraga(model, cfg, step)
    assert not calls and not attached(model)  # refused before anything ran
    preprocess_loraga(model, cfg, step, mode="lowmem")  # the suggested mode fits and runs
    assert calls and len(attached(model)) == 7


def test_low_memory_mode_is_refused_too_when_even_its_sketches_do_not_fit(limit: list[int]) -> None:
    model = tiny_llama()
    limit[0] = 1000
    with pytest.raises(UsageError, match="lowmem mode needs .* fewer target_modules or a smaller sketch_size"):
        preprocess_loraga(model, lora_ga_config(), lambda: None, mode="lowmem")


def test_unknown_availability_does_not_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setattr(importlib.import_module("loraga_fast.core.memory"), "available_bytes", lambda device: None)
    model = tiny_llama()
    preprocess_loraga(model, lora_ga_config(), lambda: [lm_loss(model, b).backward() for b in token_batches()])
    assert len(attached(model)) == 14


def test_real_availability_is_read() -> None:
    from loraga_fast.core.memory import available_bytes

    free = available_bytes(torch.device("cpu"))
    assert free is not None and 0 < free < 2**50


def test_the_command_refuses_with_one_line(limit: list[int], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    limit[0] = 2**20  # 1 MiB: the embedded default's exact accumulators (~12 MiB) do not fit
    args = ["init", "--out", str(tmp_path / "o"), "--batches", "2", "--batch-size", "2", "--seq-len", "48"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("loraga-fast: error: LoRA-GA exact mode needs") and "mode='lowmem'" in err
    assert not (tmp_path / "o").exists()


def test_memory_estimate_of_a_model_without_targets_says_why() -> None:
    import peft

    model = tiny_llama()
    config = lora_ga_config(["q_proj", "v_proj"])
    assert memory_estimate(model, config).num_layers > 0
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(UsageError, match="wrapped by peft already: estimate on the base model"):
        memory_estimate(wrapped, config)
    with pytest.raises(UsageError, match=r"matches target_modules=\['nothing'\]"):
        memory_estimate(tiny_llama(), lora_ga_config(["nothing"]))
