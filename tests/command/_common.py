"""What the command tests share: small settings, and running ``loraga-fast init`` expecting one error line."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraga_fast.command.main import main

SMALL = ["--batches", "2", "--batch-size", "2", "--seq-len", "48", "--rank", "4"]


def one_line_error(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Run ``loraga-fast init ARGS`` (small settings, --out tmp_path/run unless given): (the error line, stderr),
    after checking it is the only line, the exit code is 2, and nothing was estimated or written."""
    out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
    small = [a for i, a in enumerate(SMALL) if not (a in args or (i and SMALL[i - 1] in args))]
    try:
        code = main(["init", *out, *small, *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1].strip() for line in err.splitlines()]
    lines = [line for line in lines if line and not line.startswith("loading:")]
    assert code == 2, err
    assert len(lines) == 1, lines  # argparse's usage block is not printed either
    assert "Traceback" not in err and "gradient estimation" not in err  # nothing was estimated
    assert not (tmp_path / "run").exists()  # and nothing written
    assert not [p.name for p in tmp_path.iterdir() if ".run." in p.name]  # no temporary folder left beside it
    return lines[-1], err
