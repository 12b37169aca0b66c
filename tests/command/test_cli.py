"""The loraga-fast command: the embedded default end to end, reloading what it saved, how errors are reported (the
table of user mistakes is in test_cli_errors.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraga_fast import load_initialized, save_loraga_model_final
from loraga_fast.command.main import main
from loraga_fast.command.inputs import load_model

SMALL = ["--batches", "2", "--batch-size", "2", "--seq-len", "48", "--rank", "4"]


@pytest.mark.parametrize("mode", ["exact", "lowmem", "lowmem-1"])
def test_default_init_saves_an_initialized_model_that_reloads(mode: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    passes = ["--passes", "1"] if mode == "lowmem-1" else []
    mode = mode.removesuffix("-1")
    assert main(["init", "--out", str(out), "--mode", mode, *passes, *SMALL]) == 0
    printed = capsys.readouterr().out
    # peft's default targets for LLaMA: q_proj and v_proj in each of the 4 layers
    assert "LoRA-GA initialization" in printed and "targets         8 layers (q_proj, v_proj)" in printed
    # the memory estimate of both modes is printed before the estimation starts
    assert "accumulator memory for 8 target layers: exact mode" in printed and f"-> mode {mode}" in printed
    summary = json.loads((out / "loraga_fast_init.json").read_text())
    assert summary["target_modules"] == ["q_proj", "v_proj"] and len(summary["run_id"]) == 12
    if passes:
        assert summary["passes"] == 1 and "one pass over the batches" in printed
        assert "mode            lowmem, 1 pass over the data" in printed
    assert summary["mode"] == mode and summary["targets"] == 8 and summary["tokens"] == 2 * 2 * 48 and set(summary["phases_s"]) == {"load", "estimate", "init", "save"}

    # the saved offset base + adapter is the initialized model, whose function equals the original's
    original, _, _ = load_model(None, torch.float32, torch.device("cpu"), seed=0)
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        before = original(x).logits
    base, _, _ = load_model(None, torch.float32, torch.device("cpu"), seed=0)
    model = load_initialized(base, out)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0 and layer.lora_B["default"].weight.requires_grad
    assert not torch.equal(layer.get_base_layer().weight, original.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-4)
    # and it finishes into a plain adapter for the untouched base
    save_loraga_model_final(model, out)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "init_lora_checkpoint").exists()
    assert not (out / "base_offset.safetensors").exists()  # a folder holding the adapter for the untouched base


def test_jsonl_data_and_targets(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": "def f(x):\n    return x * 2\n" * 8}) for _ in range(20)))
    out = tmp_path / "out"
    assert main(["init", "--data", str(data), "--text-field", "body", "--targets", "o_proj, down_proj,up_proj",
                 "--out", str(out), *SMALL]) == 0
    summary = json.loads((out / "loraga_fast_init.json").read_text())
    assert summary["targets"] == 12 and summary["target_modules"] == ["o_proj", "down_proj", "up_proj"]


def _error_lines(err: str) -> list[str]:
    """stderr without the progress bars (tqdm's lines and carriage-return updates), which must be all that is left
    besides the error itself."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in err.splitlines()]
    return [line for line in lines if line and not line.startswith("loading:")]


def _fail_with(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Make the estimation step raise ``error`` (as the library would)."""
    import loraga_fast.api.preprocess

    def boom(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(loraga_fast.api.preprocess, "run_plan", boom)


def test_user_errors_print_one_line_internal_errors_keep_their_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from loraga_fast import UsageError

    args = ["init", "--out", str(tmp_path / "o"), *SMALL]
    _fail_with(monkeypatch, UsageError("layer 'x' needs a smaller r"))
    assert main(args) == 2
    assert _error_lines(capsys.readouterr().err) == ["loraga-fast: error: layer 'x' needs a smaller r"]
    # a ValueError that is not a UsageError is a bug somewhere: it is not swallowed into one line
    _fail_with(monkeypatch, ValueError("internal shape mismatch"))
    with pytest.raises(ValueError, match="internal shape mismatch"):
        main(args)
    _fail_with(monkeypatch, RuntimeError("kernel failed"))
    with pytest.raises(RuntimeError, match="kernel failed"):
        main(args)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_user_errors_too(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraga_fast import UsageError

    _fail_with(monkeypatch, UsageError("bad rank"))
    args = ["init", "--out", str(tmp_path / "o"), *SMALL]
    if how == "flag":
        args = ["--debug", *args]
    else:
        monkeypatch.setenv("LORAGA_FAST_DEBUG", "1")
    with pytest.raises(UsageError, match="bad rank"):
        main(args)


def test_ctrl_c_prints_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert main(["init", "--out", str(tmp_path / "o"), *SMALL]) == 130
    assert _error_lines(capsys.readouterr().err) == [f"loraga-fast: interrupted; --out {tmp_path / 'o'} was left as it was"]
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "loraga_fast", "--help"], capture_output=True, text=True, check=True).stdout
    assert "init" in out and "bench" in out


def test_cuda_device_without_a_gpu_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid")
    with pytest.raises(SystemExit) as exc:
        main(["init", "--device", "cuda"])
    assert exc.value.code == 2
    assert "torch sees no CUDA GPU on this machine: use --device cpu" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from loraga_fast import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"loraga-fast {__version__}"


def test_hub_ids_with_a_slash_are_looked_up_not_refused_as_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """`org/name` is a hub id (transformers resolves it: local cache, HF_HUB_OFFLINE); a path that is not there
    (leading "." or "/", or several levels deep) is a missing folder. The loaders are stubbed: no network."""
    import transformers

    from loraga_fast.command.inputs import CliError

    asked: list[str] = []

    def offline(source: str, **kwargs: object) -> None:
        asked.append(source)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no look at the hub first (test_cli_errors covers it)
    with pytest.raises(CliError, match=r"could not load --model 'HuggingFaceTB/SmolLM2-135M' \(not a local folder; "
                                       r"looked up as a hub id"):
        load_model("HuggingFaceTB/SmolLM2-135M", torch.float32, torch.device("cpu"), 0)
    assert asked == ["HuggingFaceTB/SmolLM2-135M"]
    for path in ("./no/such", "/abs/none", "a/b/c"):
        with pytest.raises(CliError, match=f"--model folder not found: {path}"):
            load_model(path, torch.float32, torch.device("cpu"), 0)
    assert asked == ["HuggingFaceTB/SmolLM2-135M"]


def test_cache_reuse_is_reported_and_the_json_records_the_parameters(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "grads.safetensors"
    args = ["init", "--cache", str(cache), *SMALL]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    first = json.loads((tmp_path / "first" / "loraga_fast_init.json").read_text())
    assert first["cache_reused"] is False and first["tokens"] == 2 * 2 * 48 and cache.is_file()
    assert first["params"]["batches"] == 2 and first["params"]["seq_len"] == 48 and first["params"]["rank"] == 4
    assert first["params"]["scale"] == "stable" and first["params"]["cache"] == str(cache)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "second")]) == 0
    second = json.loads((tmp_path / "second" / "loraga_fast_init.json").read_text())
    assert second["cache_reused"] is True and second["tokens"] is None
    assert f"none: loaded from the cache {cache}" in capsys.readouterr().out


def test_upstream_warnings_stay_off_the_progress_bars(tmp_path: Path) -> None:
    """peft's call of transformers' deprecated is_gradient_checkpointing (a FutureWarning on every run) and
    bitsandbytes' optional-kernel notice used to be printed into the progress bars: stderr holds only the bars."""
    run = subprocess.run([sys.executable, "-m", "loraga_fast", "init", "--out", str(tmp_path / "o"), *SMALL],
                         capture_output=True, text=True, check=True)
    lines = [line.rsplit("\r", 1)[-1].strip() for line in run.stderr.splitlines()]
    others = [line for line in lines if line and not line.startswith(("loading:", "LoRA-GA gradient estimation:",
                                                                       "LoRA-GA initialization:"))]
    assert others == [], others


def test_csv_and_tsv_data_take_the_text_field_column(tmp_path: Path) -> None:
    """A .csv used to be read as plain text, header and commas included. Now its --text-field column is the text:
    quoted cells with commas, quotes and line breaks, a byte-order mark, cells longer than csv's 128 KiB default."""
    import csv

    from loraga_fast.command.inputs import read_text

    long = "x" * 200_000
    rows = [{"id": "1", "body": 'a "quoted", multi-line\ncell'}, {"id": "2", "body": long}]
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"d{suffix}"
        with path.open("w", newline="", encoding="utf-8-sig") as f:  # Excel writes a BOM
            writer = csv.DictWriter(f, ["id", "body"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
        assert read_text(str(path), "body") == 'a "quoted", multi-line\ncell\n\n' + long
        assert read_text(str(path), "id") == "1\n\n2"
    assert csv.field_size_limit() == 131072  # the process-wide limit is restored


def test_csv_data_through_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loraga_fast.command.init as init

    data = tmp_path / "d.csv"
    data.write_text("label,body\n" + "".join(f'{i},"def f(x):\n    return x * {i}, x"\n' for i in range(40)))
    texts: list[str] = []
    real = init.make_batches
    monkeypatch.setattr(init, "make_batches", lambda text, *a: texts.append(text) or real(text, *a))
    out = tmp_path / "out"
    assert main(["init", "--data", str(data), "--text-field", "body", "--out", str(out), *SMALL]) == 0
    assert texts == ["\n\n".join(f"def f(x):\n    return x * {i}, x" for i in range(40))]  # the column, no header
    assert json.loads((out / "loraga_fast_init.json").read_text())["params"]["text_field"] == "body"
