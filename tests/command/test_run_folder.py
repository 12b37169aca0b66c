"""The run folder of ``loraga-fast init --out``: written as one unit with one run id, never mixed with another run's
files, never half-written, and refused up front where it cannot be written (read-only, mount point, no permission)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from loraga_fast import UsageError, load_initialized
from loraga_fast.api.runs import OFFSETS_FILE, run_ids
from loraga_fast.command.inputs import load_model
from loraga_fast.command.main import main
from tests.command._common import SMALL, one_line_error

# ---- run folders ----------------------------------------------------------------------------------------------


def _init(out: Path, *extra: str) -> int:
    return main(["init", "--out", str(out), *SMALL, *extra])


def _reference_logits() -> tuple[torch.Tensor, torch.Tensor]:
    original, _, _ = load_model(None, torch.float32, torch.device("cpu"), seed=0)
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return x, original(x).logits


def test_overwrite_replaces_the_whole_run_and_every_file_carries_its_id(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _init(out) == 0
    first = json.loads((out / "loraga_fast_init.json").read_text())["run_id"]
    assert set(run_ids(out).values()) == {first} and len(run_ids(out)) == 3
    assert _init(out, "--overwrite", "--rank", "2") == 0
    second = json.loads((out / "loraga_fast_init.json").read_text())["run_id"]
    assert second != first and set(run_ids(out).values()) == {second} and len(run_ids(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary or old folder left behind
    x, before = _reference_logits()
    base, _, _ = load_model(None, torch.float32, torch.device("cpu"), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(load_initialized(base, out)(x).logits, before, rtol=1e-4, atol=1e-4)


def test_files_of_two_runs_are_never_loaded_together(tmp_path: Path) -> None:
    """The defect: a new adapter beside an older run's offset weights loaded silently, and the 'initialized'
    model's logits then differed from the base by ~2. Now the run ids disagree and nothing is modified."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert _init(a) == 0 and _init(b, "--seed", "1") == 0
    shutil.copy(b / OFFSETS_FILE, a / OFFSETS_FILE)
    ids = run_ids(a)
    base, _, _ = load_model(None, torch.float32, torch.device("cpu"), seed=0)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(UsageError, match=rf"'{a}' mixes files of different loraga-fast runs \(loraga_fast_init.json: "
                                         rf"{ids['loraga_fast_init.json']}, base_offset.safetensors: "
                                         rf"{ids['base_offset.safetensors']}"):
        load_initialized(base, a)
    assert all(torch.equal(v, weights[k]) for k, v in base.state_dict().items())


def test_ctrl_c_while_saving_leaves_the_previous_run_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import loraga_fast.api.runs as runs

    out = tmp_path / "run"
    assert _init(out) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = runs.save_initialized

    def interrupted(peft_model: object, folder: Path, run_id: str, **kw: object) -> None:
        real(peft_model, folder, run_id, **kw)  # the files are written, then Ctrl-C before the run is complete
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_initialized", interrupted)
    capsys.readouterr()
    assert _init(out, "--overwrite") == 130
    assert capsys.readouterr().err.strip().endswith(f"loraga-fast: interrupted; --out {out} was left as it was")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_finalized_folder_says_so(tmp_path: Path) -> None:
    from loraga_fast import save_loraga_model_final

    out = tmp_path / "run"
    assert _init(out) == 0
    base, _, _ = load_model(None, torch.float32, torch.device("cpu"), seed=0)
    save_loraga_model_final(load_initialized(base, out), out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "loraga_fast_init.json"]
    with pytest.raises(FileNotFoundError, match="holds the final adapter written by save_loraga_model_final"):
        load_initialized(base, out)
    assert _init(out) == 2  # still a run folder: refused without --overwrite, replaced with it
    assert _init(out, "--overwrite") == 0 and (out / "init_lora_checkpoint").is_dir()


def test_write_atomically_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    from loraga_fast.api.runs import write_atomically

    def half_written(folder: Path) -> None:
        (folder / "base_offset.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path / "run", "0123456789ab", half_written)
    assert list(tmp_path.iterdir()) == []
    write_atomically(tmp_path / "run", "0123456789ab", lambda folder: (folder / "x").write_text("done"))
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and (tmp_path / "run" / "x").read_text() == "done"


# ---- --out on a file system that refuses ------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_read_only_out_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The defect: the whole run (model, estimation, initialization) went through, then creating the run folder
    printed 'OSError: [Errno 30] Read-only file system' with a traceback. CI cannot mount a read-only file system:
    every folder creation under tmp_path fails as it would there."""
    import os

    real = Path.mkdir

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        if self.is_relative_to(tmp_path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "runs" / "run"
    line, err = one_line_error(["--out", str(out)], tmp_path, capsys)
    assert line == (f"loraga-fast: error: --out {out} is on a read-only file system (Read-only file system, creating a "
                    f"folder in {tmp_path}): choose an --out on a writable disk")
    assert "loading:" not in err and list(tmp_path.iterdir()) == []  # refused before the model was loaded


@pytest.mark.parametrize("where", ["chmod", "sysfs"])
def test_a_real_folder_that_cannot_be_written_is_refused(where: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Without monkeypatching: a folder without write permission (not as root, where chmod stops nothing), and
    Linux's /sys, where no folder can be created even by root."""

    if where == "chmod":
        if os.geteuid() == 0:
            pytest.skip("running as root: a chmod 555 folder can still be written")
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
    else:
        folder = Path("/sys")
        if not os.path.ismount(folder):
            pytest.skip("no sysfs at /sys")
    out = folder / "loraga_fast_test_run"
    try:
        line, err = one_line_error(["--out", str(out)], tmp_path, capsys)
    finally:
        if where == "chmod":
            folder.chmod(0o755)
    assert line.startswith(f"loraga-fast: error: --out {out} cannot be written ("), line
    assert line.endswith(f", creating a folder in {folder}): choose an --out in a folder you can write to"), line
    assert "loading:" not in err and not out.exists()


@pytest.mark.parametrize("errno_name", ["EBUSY", "EROFS"])
@pytest.mark.parametrize("step", ["move-the-old-run-aside", "put-the-new-run-in-place"])
def test_a_failed_rename_leaves_the_previous_run_intact(step: str, errno_name: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The defect: ``--overwrite`` of an --out that is a mount point printed 'OSError: [Errno 16] Device or
    resource busy' with a traceback after the whole run. Each of the two renames that put the new run folder in
    place now fails as one line, with the previous run back in place and no temporary folder left beside it."""
    import os

    import loraga_fast.api.runs as runs

    out = tmp_path / "run"
    assert _init(out) == 0
    before = _snapshot(out)
    code = getattr(errno, errno_name)
    real = os.replace

    def refuse(src: object, dst: object) -> None:
        moving = Path(src) == out if step == "move-the-old-run-aside" else Path(dst) == out and ".partial-" in str(src)
        if moving:
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
        real(src, dst)

    monkeypatch.setattr(runs.os, "replace", refuse)
    capsys.readouterr()
    assert _init(out, "--overwrite") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("loraga-fast")]
    assert len(lines) == 1 and "Traceback" not in err, err
    expected = ("could not be replaced by the new run folder" if errno_name == "EBUSY" else
                "is on a read-only file system")
    src, dst = (out, "/.run.old-") if step == "move-the-old-run-aside" else ("/.run.partial-", out)
    assert lines[0].startswith(f"loraga-fast: error: --out {out} {expected} ({os.strerror(code)}: "), lines[0]
    assert f"{src}" in lines[0].split(" -> ")[0] and f"{dst}" in lines[0].split(" -> ")[1], lines[0]
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_mount_point_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A mount point cannot be renamed: refused up front (even empty, without --overwrite), naming a folder inside."""

    out = tmp_path / "mnt"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    line, err = one_line_error(["--out", str(out), "--overwrite"], tmp_path, capsys)
    assert line == (f"loraga-fast: error: --out {out} is a mount point, which the finished run folder cannot replace "
                    f"(it is put in place by a rename): give a folder inside it, e.g. --out {out}/loraga_init")
    assert "loading:" not in err and [p.name for p in tmp_path.iterdir()] == ["mnt"] and not list(out.iterdir())


def test_write_atomically_removes_the_parent_folders_it_created(tmp_path: Path) -> None:
    from loraga_fast.api.runs import write_atomically

    def fails(folder: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "a" / "b" / "run", "0123456789ab", fails)
    assert list(tmp_path.iterdir()) == []


# ---- --keep-base ------------------------------------------------------------------------------------------------


def test_keep_base_writes_just_an_adapter_for_the_original_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _init(out, "--keep-base") == 0
    summary = json.loads((out / "loraga_fast_init.json").read_text())
    assert summary["keep_base"] == "a-only" and summary["base_untouched"] is True
    assert summary["params"]["alpha"] == 8  # the alpha used (2 x --rank 4), not None
    assert not (out / OFFSETS_FILE).exists()  # nothing to offset: the adapter is for the original model
    x, before = _reference_logits()
    base, _, _ = load_model(None, torch.float32, torch.device("cpu"), seed=0)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = load_initialized(base, out)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)  # B = 0: the original function
    assert all(torch.equal(v, weights[k]) for k, v in base.state_dict().items() if k in weights)


@pytest.mark.parametrize(("args", "match"), [
    (["--keep-base", "--export-model"], "--export-model with --keep-base: the base is left untouched"),
    (["--keep-base", "--rank-budget", "uniform"], "--keep-base cannot be combined with --rank-budget"),
])
def test_keep_base_mistakes_are_one_line(args: list[str], match: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    line, _ = one_line_error(args, tmp_path, capsys)
    assert match in line
