"""What the ``loraga-fast init`` command reads: a model (folder, GGUF file, hub name or the embedded default) and
text (a file or the embedded default), turned into batches."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
import struct
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["ByteTokenizer", "CliError", "check_causal_lm", "load_model", "make_batches", "model_skeleton", "read_text",
           "stdlib_text"]

# a hub id: "name" or "org/name" (letters, digits, "-", "_", "."), not starting with "." or "/"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")

STDLIB_FILES = ["functools.py", "inspect.py", "argparse.py", "dataclasses.py", "typing.py", "pathlib.py"]


class CliError(UsageError):
    """An error in the command's arguments or inputs; printed as one line, like the library's :class:`UsageError`."""


class ByteTokenizer:
    """The embedded default's tokenizer: UTF-8 bytes, ids 0..255."""

    vocab_size = 256

    def __call__(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def stdlib_text() -> str:
    """A real text corpus that ships with Python: some standard-library modules' source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((root / name).read_text(encoding="utf-8") for name in STDLIB_FILES if (root / name).exists())


# data files refused by name, with what to do instead: (what the file is, the fix)
_TO_JSONL = "convert it to .jsonl first, e.g. {reader}({{path!r}}).to_json('data.jsonl'{options})"
_PANDAS_OPTIONS = ", orient='records', lines=True"
_COMPRESSED = {".gz": ("gzip", "gunzip -k"), ".bz2": ("bzip2", "bunzip2 -k"), ".xz": ("xz", "unxz -k"),
               ".zst": ("zstd", "unzstd")}
_ARCHIVES = {".zip": ("a zip archive", "unzip {path}"), ".tar": ("a tar archive", "tar -xf {path}"),
             ".tgz": ("a compressed tar archive", "tar -xzf {path}"), ".7z": ("a 7-Zip archive", "")}
_NOT_TEXT_DATA = {
    ".parquet": ("a Parquet file", _TO_JSONL.format(reader="pandas.read_parquet", options=_PANDAS_OPTIONS)),
    ".feather": ("a Feather file", _TO_JSONL.format(reader="pandas.read_feather", options=_PANDAS_OPTIONS)),
    ".arrow": ("an Arrow file", _TO_JSONL.format(reader="datasets.Dataset.from_file", options="")),
    **{suffix: ("an Excel workbook", "save the sheet as .csv") for suffix in (".xlsx", ".xls")},
    **{suffix: (f"{kind}-compressed", f"decompress it first ({tool} {{path}})")
       for suffix, (kind, tool) in _COMPRESSED.items()},
    **{suffix: (kind, f"extract it{f' ({tool})' if tool else ''} and pass one of its files")
       for suffix, (kind, tool) in _ARCHIVES.items()},
    **{suffix: ("not a text format", "") for suffix in (".pkl", ".pickle", ".npy", ".npz", ".pt", ".pth",
                                                        ".safetensors", ".bin", ".h5", ".hdf5", ".sqlite", ".db")},
}
DATA_FORMATS = ".txt (or any UTF-8 text), .jsonl, .json, .csv or .tsv"


def read_text(path: str, text_field: str) -> str:
    """The text to estimate on, by the file's suffix: the ``text_field`` of every record of a ``.jsonl`` file (one
    JSON object per line) or of a ``.json`` file holding a list of records (or of strings); the ``text_field``
    column of a ``.csv`` or ``.tsv`` file with a header row; any other file as plain UTF-8 text, except the binary,
    columnar and compressed formats of ``_NOT_TEXT_DATA``, refused by name with what to do.

    Raises:
        CliError: the file is missing, not UTF-8, malformed, lacks ``text_field``, or is of a refused format.
    """
    p = Path(path)
    if p.is_dir():
        raise CliError(f"--data {path} is a folder: give a {DATA_FORMATS} file")
    if not p.is_file():
        raise CliError(f"--data file not found: {path}")
    suffix = p.suffix.lower()
    if suffix in _NOT_TEXT_DATA:
        what, fix = _NOT_TEXT_DATA[suffix]
        raise CliError(f"--data {path} is {what}, which loraga-fast init does not read (it reads {DATA_FORMATS}): "
                       f"{fix.format(path=path) if fix else 'give a text file'}")
    try:
        raw = p.read_text(encoding="utf-8").removeprefix("\ufeff")  # a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise CliError(f"--data {path} is not UTF-8 text ({err.reason} at byte {err.start}): give a {DATA_FORMATS} "
                       "file") from None
    if suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CliError(f"{path}, line {i}: not valid JSON ({_json_error(err)} column {err.colno}): each line of a "
                               ".jsonl file must be one JSON object") from None
            texts.append(_record_text(record, text_field, f"{path}, line {i}"))
        return "\n\n".join(texts)
    if suffix == ".json":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CliError(f"{path}: not valid JSON ({_json_error(err)} line {err.lineno}, column {err.colno})") from None
        if not isinstance(records, list):
            raise CliError(f"{path}: a .json file must hold a list of records (got a {type(records).__name__}); "
                           "for one record per line use .jsonl")
        return "\n\n".join(_record_text(r, text_field, f"{path}, record {i}") for i, r in enumerate(records, 1))
    if suffix in (".csv", ".tsv"):
        return _table_text(raw, path, "\t" if suffix == ".tsv" else ",", text_field)
    return raw


def _table_text(raw: str, path: str, delimiter: str, text_field: str) -> str:
    """The ``text_field`` column of every row of a CSV/TSV text whose first row names the columns."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # one document per cell can be far longer than csv's 128 KiB default
    try:
        # strict: a quote left open (which would swallow the rest of the file into one cell) is an error
        reader = csv.DictReader(io.StringIO(raw, newline=""), delimiter=delimiter, strict=True)
        start = 1
        columns = reader.fieldnames
        if not columns:
            raise CliError(f"{path}: empty; a {'.tsv' if delimiter == chr(9) else '.csv'} file needs a header row "
                           f"naming its columns (one of them {text_field!r}, or set --text-field)")
        if text_field not in columns:
            other = "\t" if delimiter == "," else ","
            hint = (f" (is it {'tab' if other == chr(9) else 'comma'}-separated? name it "
                    f"{'.tsv' if other == chr(9) else '.csv'})" if len(columns) == 1 and other in columns[0] else "")
            raise CliError(f"{path}: no column {text_field!r} (columns: {', '.join(map(repr, columns))}){hint}; "
                           "set --text-field")
        texts = []
        while True:
            start = reader.line_num + 1  # where the row begins (a quoted cell may span lines)
            try:
                row = next(reader)
            except StopIteration:
                break
            value = row[text_field]
            if value is None:
                raise CliError(f"{path}, line {start}: no value in column {text_field!r} (the row has fewer fields "
                               f"than the header's {len(columns)})")
            texts.append(value)
    except csv.Error as err:
        hint = "; is a quote opened there left unclosed?" if "end of data" in str(err) else ""
        raise CliError(f"{path}, line {start}: not valid CSV ({err}{hint})") from None
    finally:
        csv.field_size_limit(limit)
    return "\n\n".join(texts)


def _record_text(record: Any, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise CliError(f"{where}: expected a JSON object with a {text_field!r} field, got a {type(record).__name__}")
    if text_field not in record:
        raise CliError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, record)) or 'none'}); "
                       "set --text-field")
    return str(record[text_field])


def _default_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=256, intermediate_size=688,
                       num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=1024, use_cache=False)


_MODEL_KINDS = "give a model folder (with a config.json), a .gguf file or a hub id such as org/name"


def check_paths(model: str | None, data: str | None) -> None:
    """The checks of ``--model`` and ``--data`` that need only the file system (a missing path, a folder for a file,
    ...), so that a mistyped path is answered before the seconds that importing torch and transformers take.

    Raises:
        CliError: as :func:`read_text` and the model loaders do for the same mistakes.
    """
    if model is not None:
        _source(model)
    if data:
        p = Path(data)
        if p.is_dir():
            raise CliError(f"--data {data} is a folder: give a {DATA_FORMATS} file")
        if not p.is_file():
            raise CliError(f"--data file not found: {data}")


def _source(model: str) -> tuple[str, dict[str, Any]]:
    """Where transformers loads ``model`` from, and the ``gguf_file`` argument for a GGUF file.

    Raises:
        CliError: ``model`` is empty, a missing path, a file that is not ``.gguf``, a folder with no
            ``config.json``, or a ``.gguf`` file that does not start with the GGUF magic bytes.
    """
    if not model.strip():  # e.g. --model "$MODEL" with MODEL unset: Path("") would be the current folder
        raise CliError(f"--model {model!r} is empty: {_MODEL_KINDS}")
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CliError(f"--model GGUF file not found: {model}")
        _check_gguf_magic(path, model)
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = (f"it holds {', '.join(ggufs[:3])}: pass --model {path / ggufs[0]}" if ggufs else _MODEL_KINDS)
            raise CliError(f"--model {model} is a folder with no config.json (not a transformers model folder): {hint}")
        return str(path), {}
    if path.exists():
        raise CliError(f"--model {model} is a file but not a .gguf file: {_MODEL_KINDS}")
    if not _HUB_ID.fullmatch(model):  # a path (absolute, relative, or several levels deep) that is not there
        raise CliError(f"--model folder not found: {model}")
    return model, dict(_hub_options(model))  # a hub id, "name" or "org/name": transformers resolves it


@functools.lru_cache(maxsize=8)
def _hub_options(model: str) -> tuple[tuple[str, Any], ...]:
    """For a hub id: one quick look at the hub before transformers' downloads (which retry five times with backoff,
    36 s and 12 lines of warnings when the hub is unreachable). Unreachable: the local cache is used when it holds
    the model (``local_files_only``), else one line. No such model (or a gated one): one line. ``HF_HUB_OFFLINE=1``:
    nothing to check, transformers reads the cache.

    Raises:
        CliError: the model is not on the hub, is gated, or the hub is unreachable and the cache lacks it.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return ()
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    try:
        HfApi().model_info(model, timeout=10)
    except GatedRepoError:
        if cached:
            return ()
        raise CliError(f"--model {model} is a gated model on the Hugging Face hub: accept its terms on its hub page and "
                       "log in (huggingface-cli login), or pass a local folder") from None
    except RepositoryNotFoundError:
        raise CliError(f"--model {model}: no local folder or file of that name, and no such model on the Hugging Face "
                       "hub (a private one needs huggingface-cli login): check the name") from None
    except HfHubHTTPError:
        return ()  # the hub answered (an error of its own): transformers tries, and says what it gets
    except Exception as err:  # the hub cannot be reached: DNS, connection, timeout (requests' or httpx's errors)
        if cached:
            return (("local_files_only", True),)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CliError(f"--model {model} is not a local folder or file, not in the Hugging Face cache, and the hub "
                       f"cannot be reached ({type(err).__name__}: {first}): download it where there is a network "
                       f"(huggingface-cli download {model}) and pass its folder, or give a local path") from None
    return ()


def _check_gguf_magic(path: Path, model: str) -> None:
    with path.open("rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise CliError(f"--model {model} is not a GGUF file (it does not start with the GGUF magic bytes): give a "
                       ".gguf file as llama.cpp writes it, or a model folder")


# what a GGUF reader raises on a file that is cut short or damaged: numpy's reshape or view (ValueError), struct
# unpacking past the end (struct.error), an offset out of range (IndexError)
_GGUF_READ_ERRORS = (ValueError, struct.error, IndexError, EOFError)


@contextmanager
def _reading(model: str, gguf: dict[str, Any]) -> Iterator[None]:
    """Turn what transformers raises while reading ``model``'s config or a GGUF file into one-line
    :class:`CliError` s: a GGUF file that cannot be parsed, a missing ``gguf`` package, a config.json that names no
    model type."""
    gguf = {"gguf_file": gguf["gguf_file"]} if "gguf_file" in gguf else {}  # not the hub options
    try:
        yield
    except UsageError:
        raise
    except ImportError as err:
        if not gguf or "gguf" not in str(err).lower():
            raise
        raise CliError(f"--model {model} is a GGUF file, which needs the gguf package: pip install gguf") from err
    except _GGUF_READ_ERRORS as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if gguf and "not supported" in message:  # transformers read the file but has no loader for its architecture
            raise CliError(f"--model {model}: {message}") from err
        if gguf:
            raise CliError(f"--model {model} could not be read as a GGUF file (truncated or corrupt?): {message}; "
                           "download or convert it again") from err
        if isinstance(err, ValueError) and message.startswith("Unrecognized model"):
            raise CliError(f"--model {model}: its config.json names no model type (no 'model_type' key): "
                           "give a folder saved with save_pretrained, a .gguf file or a hub id") from err
        raise


def _not_loaded(model: str, source: str, err: OSError) -> CliError:
    where = ("" if source != model else " (not a local folder; looked up as a hub id in the local cache and, "
             "unless HF_HUB_OFFLINE=1, on the hub)")
    return CliError(f"could not load --model {model!r}{where}: {str(err).splitlines()[0]}")


def model_skeleton(model: str | None) -> Any:
    """The model's modules on the meta device, built from its config alone (no weight is read): for the checks
    that need only shapes (targets, ranks), before the weights and the tokenizer are loaded.

    Raises:
        CliError: the model cannot be found, or is not a causal LM (:func:`check_causal_lm`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model is None:
        config = _default_config()
    else:
        source, gguf = _source(model)
        try:
            with _reading(model, gguf):
                config = AutoConfig.from_pretrained(source, **gguf)
        except OSError as err:
            raise _not_loaded(model, source, err) from err
        check_causal_lm(config, model)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(model: str | None, dtype: Any, device: Any, seed: int) -> tuple[Any, Any, str]:
    """(model, tokenizer, description). ``model``: a folder, a ``.gguf`` file, a hub name, or None (default)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaForCausalLM,
    )

    if model is None:
        torch.manual_seed(seed)
        return (LlamaForCausalLM(_default_config()).to(device=device, dtype=dtype), ByteTokenizer(),
                "embedded default (LLaMA config, 256 hidden, 4 layers, random weights)")
    source, gguf = _source(model)
    try:
        with _reading(model, gguf):
            check_causal_lm(AutoConfig.from_pretrained(source, **gguf), model)
            tok = AutoTokenizer.from_pretrained(source, **gguf)
            loaded, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, dtype=dtype, **gguf)
    except OSError as err:
        raise _not_loaded(model, source, err) from err
    fresh = sorted(info.get("missing_keys") or [])
    if fresh:  # the checkpoint lacks part of the causal-LM model: those layers would start random, and be targeted
        raise CliError(f"--model {model}: loading it as {type(loaded).__name__} left {len(fresh)} weight(s) freshly "
                       f"initialized ({', '.join(fresh[:3])}{', ...' if len(fresh) > 3 else ''}): the checkpoint is not "
                       "a complete causal language model; use loraga_fast.preprocess_loraga with your own train_step")
    return loaded.to(device), tok, f"{type(loaded).__name__} from {model}"


def _json_error(err: Any) -> str:
    """The decoder's message ending in "at" for the position that follows ("Unterminated string starting at" keeps
    its own "at")."""
    msg = err.msg.rstrip()
    return msg if msg.endswith(" at") else f"{msg} at"


def check_causal_lm(config: Any, model: str) -> None:
    """Refuse, naming the model class, a checkpoint that is not a causal LM: ``loraga-fast init`` estimates with
    a next-token loss on text (encoders and seq2seq models need another objective: the library's
    ``preprocess_loraga`` takes any ``train_step``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = list(getattr(config, "architectures", None) or [])
    name = archs[0] if archs else f"model type {config.model_type!r}"
    use = ("loraga-fast init trains causal language models (next-token loss on text); for this model call "
           "loraga_fast.preprocess_loraga with a train_step computing its own loss (docs/usage.md)")
    if getattr(config, "is_encoder_decoder", False):
        raise CliError(f"--model {model} is {name}, an encoder-decoder (seq2seq) model: {use}")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not causal.intersection(archs)):
        raise CliError(f"--model {model} is {name}, which has no causal language-model head (an encoder, a "
                       f"classifier, ...): {use}")


def make_batches(text: str, tokenizer: Any, batches: int, batch_size: int, seq_len: int) -> list[Any]:
    import torch

    ids = tokenizer(text) if isinstance(tokenizer, ByteTokenizer) else tokenizer(text)["input_ids"]
    need = batches * batch_size * seq_len
    if len(ids) < need:
        raise CliError(
            f"the data has {len(ids)} tokens, but --batches {batches} x --batch-size {batch_size} x --seq-len {seq_len} "
            f"needs {need}: use more data or lower one of them"
        )
    t = torch.tensor(ids[:need], dtype=torch.long).view(batches, batch_size, seq_len)
    return [{"input_ids": b, "labels": b} for b in t]
