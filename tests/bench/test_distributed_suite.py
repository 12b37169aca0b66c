"""The ``distributed`` suite's DeepSpeed ZeRO-3 mode: it runs beside data parallel on 2 gloo processes and reports
half the accumulators per rank and an extra peak; it is refused with one line where it cannot run (the suite asserts
nothing about time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("psutil", reason="the distributed suite measures memory with psutil")


def test_zero3_mode_refused_for_another_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    from loraga_fast.bench.distributed import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--modes", "zero3", "--dtype", "bf16"])
    assert exit_info.value.code == 2
    assert "--modes zero3 runs in fp32 only" in capsys.readouterr().err


@pytest.mark.slow
def test_zero3_mode_beside_data_parallel(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed", reason="the zero3 mode needs deepspeed (the test extra)")
    from loraga_fast.bench.distributed import main

    out = tmp_path / "distributed.json"
    main(["--preset", "tiny", "--ranks", "2", "--modes", "dp", "zero3", "--repeats", "1", "--json", str(out)])
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    dp, zero3 = rows["dp"], rows["zero3"]
    assert zero3["ranks"] == 2 and len(zero3["acc_bytes_each_rank"]) == 2
    assert zero3["acc_bytes_per_rank"] <= 0.55 * dp["acc_bytes_per_rank"]  # row shards: half of every accumulator
    assert zero3["reduce_scatter_input_bytes"] > 0 and dp["reduce_scatter_input_bytes"] == 0
    assert all(p > 0 for p in zero3["peak_extra_bytes_each_rank"] + dp["peak_extra_bytes_each_rank"])
    assert zero3["time_s"] > 0
