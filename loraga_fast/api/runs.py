"""The run folder of ``loraga-fast init --out DIR``: written as one unit, stamped with one run id, loaded back.

A run folder holds

* ``init_lora_checkpoint/``: the initialized adapter (as :func:`~loraga_fast.save_loraga_model_init` writes it);
* ``base_offset.safetensors``: the target layers' base weights after the LoRA-GA offset ``W - (alpha / r) B0 A0``
  (``B0 A0`` = the initial adapter; not written for a quantized base, which ``--quantize`` leaves untouched);
* ``loraga_fast_init.json``: what was run (every parameter, timings, memory);
* ``model/`` (``--export-model`` only): the offset base as a complete transformers model folder
  (:func:`~loraga_fast.api.export.save_offset_model`), for frameworks that train from a model folder and an adapter.

The folder is built under a temporary name beside ``DIR`` and renamed into place only when complete, so an
interrupted run leaves no half-written ``DIR`` and never mixes its files with an older run's. Each file carries
the same run id (the json's ``run_id``; the safetensors files' metadata ``loraga_fast.run_id``;
``model/config.json``'s ``loraga_fast_run_id``), which :func:`load_initialized` checks. After training,
:func:`~loraga_fast.save_loraga_model_final` leaves just the adapter for the untouched base: the offset weights are
no longer needed (and can be recomputed from the base and the initial adapter if ever wanted); an adapter trained
elsewhere from ``model/`` and ``init_lora_checkpoint/`` is converted by :func:`~loraga_fast.finalize_adapter`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..layers.quantized import UNTOUCHED_BASES
from .names import ADAPTER_WEIGHTS, INIT_CHECKPOINT, MODEL_FOLDER, OFFSETS_FILE, RUN_ENTRIES, RUN_ID_KEY, SUMMARY_FILE
from .original import save_loraga_model_init

__all__ = ["check_out", "load_initialized", "new_run_id", "out_problem", "run_ids", "save_initialized",
           "write_atomically"]


def new_run_id() -> str:
    """A fresh run id (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` the run would clobber or could not write, before any work is done.

    Raises:
        UsageError: ``out`` is a file; or a mount point (a run folder is put in place by a rename, which cannot
            replace one); or a non-empty folder and ``overwrite`` is False; or, with ``overwrite``, a folder holding
            files that are not a run folder's (so ``--overwrite`` never deletes unrelated files); or no folder can
            be created where the run folder goes (a read-only file system, no permission, no space).
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: choose another --out")
    if out.is_dir() and os.path.ismount(out):
        raise UsageError(f"--out {out} is a mount point, which the finished run folder cannot replace (it is put in "
                         f"place by a rename): give a folder inside it, e.g. --out {out / 'loraga_init'}")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries:
        foreign = [name for name in entries if name not in RUN_ENTRIES]
        if foreign:
            raise UsageError(f"--out {out} holds files that are not from a loraga-fast run ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}): choose an empty or new --out")
        if not overwrite:
            ids = {i for i in run_ids(out).values() if i}
            which = f"run {', '.join(sorted(ids))}" if ids else "another run"
            raise UsageError(f"--out {out} already holds the files of {which}: pass --overwrite to replace them, or "
                             "choose another --out")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """Create and remove a probe folder where :func:`write_atomically` will create its temporary folder (in the
    nearest existing folder above ``out``), so that a read-only or full disk is refused before the run, not after."""
    out = out.absolute()
    base = out.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    probe = base / f".{out.name}.probe-{new_run_id()}"
    try:
        probe.mkdir()
    except OSError as err:
        raise UsageError(out_problem(out, err, f"{err.strerror or err}, creating a folder in {base}")) from err
    probe.rmdir()


# what the file system can answer that the user fixes by choosing another --out (or freeing space)
_OUT_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY, errno.ENOSPC, errno.EDQUOT, errno.EXDEV}


def out_problem(out: Path, err: OSError, detail: str | None = None) -> str:
    """One line for an :class:`OSError` met while creating or renaming the run folder ``out``: what happened
    (``detail``, by default the error's message and file names) and what to do."""
    if detail is None:
        names = " -> ".join(str(f) for f in (err.filename, err.filename2) if f)
        detail = f"{err.strerror or err}: {names}" if names else f"{err.strerror or err}"
    where = f" ({detail})"
    if err.errno == errno.EROFS:
        return f"--out {out} is on a read-only file system{where}: choose an --out on a writable disk"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"--out {out} cannot be written{where}: choose an --out in a folder you can write to"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"--out {out}: no space left{where}: free some space or choose an --out on another disk"
    if err.errno in (errno.EBUSY, errno.EXDEV):
        return (f"--out {out} could not be replaced by the new run folder{where}: is it a mount point or in use? "
                "Give a folder inside it or another --out")
    return f"--out {out} could not be written{where}: choose another --out"


def write_atomically(out: Path, run_id: str, write: Callable[[Path], None]) -> None:
    """Call ``write(folder)`` on a fresh temporary folder beside ``out``, then put it in place of ``out`` (an
    existing ``out`` is replaced only once the new folder is complete). On any error or Ctrl-C the temporary
    folder (and any parent folder created for it) is removed and ``out`` is left as it was.

    Raises:
        UsageError: the file system refused to create or rename the folders (read-only, no permission, no
            space, a mount point: :func:`out_problem`), or the writer met such an error; ``out`` is then as it was.
    """
    out = out.absolute()
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    partial = out.parent / f".{out.name}.partial-{run_id}"
    old = out.parent / f".{out.name}.old-{run_id}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
        write(partial)
        if out.exists():
            os.replace(out, old)
        os.replace(partial, out)
    except BaseException as err:
        restored = _undo(out, partial, old, created)
        if isinstance(err, OSError) and err.errno in _OUT_ERRNOS:
            raise UsageError(out_problem(out, err) + restored) from err
        raise
    shutil.rmtree(old, ignore_errors=True)


def _undo(out: Path, partial: Path, old: Path, created: list[Path]) -> str:
    """Put the previous run back in place, remove the temporary folder and the parent folders created for it;
    ``""``, or what the user must do by hand when the previous run could not be put back."""
    left = ""
    if old.exists() and not out.exists():
        try:
            os.replace(old, out)
        except OSError:
            left = f"; the previous run is in {old}: rename it to {out}"
    shutil.rmtree(partial, ignore_errors=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break
    return left


def _stamp(path: Path, run_id: str) -> None:
    """Rewrite a safetensors file with ``RUN_ID_KEY = run_id`` added to its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    save_file(load_file(str(path)), str(path), metadata={**metadata, RUN_ID_KEY: run_id})


def save_initialized(peft_model: Any, folder: Path, run_id: str, *, base_untouched: bool = False) -> None:
    """Write the adapter and (unless ``base_untouched``) the offset base weights of ``peft_model`` into ``folder``,
    both stamped with ``run_id``. Use through :func:`write_atomically`."""
    from safetensors.torch import save_file

    save_loraga_model_init(peft_model, folder)
    _stamp(folder / INIT_CHECKPOINT / ADAPTER_WEIGHTS, run_id)
    if base_untouched:
        return
    offsets = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            offsets[f"{name}.weight"] = module.get_base_layer().weight.detach().contiguous().cpu()
    save_file(offsets, str(folder / OFFSETS_FILE), metadata={"format": "pt", RUN_ID_KEY: run_id})


def run_ids(folder: str | os.PathLike[str]) -> dict[str, str | None]:
    """The run id each file of a run folder carries (None: the file has none), for the files present."""
    from safetensors import safe_open

    folder = Path(folder)
    ids: dict[str, str | None] = {}
    summary = folder / SUMMARY_FILE
    if summary.is_file():
        try:
            ids[SUMMARY_FILE] = json.loads(summary.read_text(encoding="utf-8")).get("run_id")
        except (json.JSONDecodeError, AttributeError):
            ids[SUMMARY_FILE] = None
    model = folder / MODEL_FOLDER
    shards = sorted(p.name for p in model.glob("*.safetensors")) if model.is_dir() else []
    if (model / "config.json").is_file():
        from .export import model_folder_run_id

        ids[f"{MODEL_FOLDER}/config.json"] = model_folder_run_id(model)
    for rel in (OFFSETS_FILE, f"{INIT_CHECKPOINT}/{ADAPTER_WEIGHTS}", *(f"{MODEL_FOLDER}/{s}" for s in shards)):
        path = folder / rel
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                ids[rel] = (f.metadata() or {}).get(RUN_ID_KEY)
    return ids


def _check_one_run(folder: str, ids: dict[str, str | None]) -> None:
    if len(set(ids.values())) > 1:
        listing = ", ".join(f"{name}: {run_id or 'no run id'}" for name, run_id in ids.items())
        raise UsageError(f"'{folder}' mixes files of different loraga-fast runs ({listing}): rerun loraga-fast init "
                         "with a fresh --out (or --overwrite) instead of copying files between run folders.")


def load_initialized(base_model: nn.Module, out_dir: str | os.PathLike[str]) -> Any:
    """Rebuild the LoRA-GA-initialized model that ``loraga-fast init --out DIR`` saved: apply the offset target
    weights (``DIR/base_offset.safetensors``) to ``base_model`` in place and load the initialized adapter
    (``DIR/init_lora_checkpoint``) as a trainable ``PeftModel``. A ``--quantize`` run left its quantized base
    untouched: ``base_model`` must then be loaded quantized the same way (:func:`loraga_fast.quantize_model`),
    and only the adapter is loaded. After training, ``save_loraga_model_final(model, DIR)`` writes a plain LoRA
    adapter for the untouched base model.

    Raises:
        FileNotFoundError: a file is missing (or ``DIR`` already holds the final adapter).
        ValueError: the files come from different runs, or the offsets do not match ``base_model``; nothing is
            modified then.
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    out_dir = os.fspath(out_dir)
    init_dir = os.path.join(out_dir, INIT_CHECKPOINT)
    offsets_path = os.path.join(out_dir, OFFSETS_FILE)
    if not os.path.isdir(init_dir):
        finalized = os.path.isfile(os.path.join(out_dir, "adapter_config.json"))
        raise FileNotFoundError(
            f"'{init_dir}' not found: '{out_dir}' holds the final adapter written by save_loraga_model_final (load it "
            "with PeftModel.from_pretrained on the untouched base)" if finalized else
            f"'{init_dir}' not found: is '{out_dir}' the --out folder of loraga-fast init?")
    ids = run_ids(out_dir)
    _check_one_run(out_dir, ids)
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    summary = json.loads(open(summary_path, encoding="utf-8").read()) if os.path.isfile(summary_path) else {}
    if summary.get("base_untouched"):  # --quantize: the quantized base was never offset
        model = PeftModel.from_pretrained(base_model, init_dir, is_trainable=True)
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
                UNTOUCHED_BASES.add(module)
        return model
    if not os.path.isfile(offsets_path):
        raise FileNotFoundError(f"'{offsets_path}' not found: is '{out_dir}' the --out folder of loraga-fast init?")
    params = dict(base_model.named_parameters())
    offsets = load_file(offsets_path)
    for key, value in offsets.items():
        if key not in params or params[key].shape != value.shape:
            raise UsageError(f"'{offsets_path}' does not match the model: no parameter '{key}' of shape {tuple(value.shape)}.")
    with torch.no_grad():
        for key, value in offsets.items():
            params[key].copy_(value)
    return PeftModel.from_pretrained(base_model, init_dir, is_trainable=True)
