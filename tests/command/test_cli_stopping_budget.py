"""loraga-fast init --until-converged and --rank-budget: what the run folder records, that it reloads at the allocated
ranks with the model's function unchanged, that one-pass low-memory mode stops too, and the flags' one-line errors
before anything is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraga_fast import load_initialized
from loraga_fast.command.inputs import load_model
from loraga_fast.command.main import main
from tests.command._common import one_line_error


def test_until_converged_and_a_rank_budget_are_recorded_and_reload(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["init", "--out", str(out), "--batches", "6", "--batch-size", "2", "--seq-len", "32", "--rank", "4",
                 "--until-converged", "--rank-budget", "uniform", "--max-rank", "8"]) == 0
    printed = capsys.readouterr().out
    assert "convergence" in printed and "rank budget     uniform:" in printed
    summary = json.loads((out / "loraga_fast_init.json").read_text())
    # random tokens never converge: every batch runs, and the record says so with the last check's figures
    assert summary["batches_used"] == 6 and summary["tokens"] == 6 * 2 * 32
    conv = summary["convergence"]
    assert conv["converged"] is False and conv["check_every"] == 4 and conv["last_check"]["backward_passes"] == 4
    budget = summary["rank_budget"]
    ranks = budget["ranks"]
    assert budget["budget"] == "uniform" and len(ranks) == 8 and all(1 <= r <= 8 for r in ranks.values())
    costs = {n: 2 * 256 for n in ranks}  # q_proj and v_proj of the embedded model: 256 x 256
    assert budget["lora_params"] == sum(r * costs[n] for n, r in ranks.items()) == 4 * sum(costs.values())
    adapter = json.loads((out / "init_lora_checkpoint" / "adapter_config.json").read_text())
    assert adapter["rank_pattern"] == ranks

    original, _, _ = load_model(None, torch.float32, torch.device("cpu"), seed=0)
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        before = original(x).logits
    base, _, _ = load_model(None, torch.float32, torch.device("cpu"), seed=0)
    model = load_initialized(base, out)
    loaded = {n.removeprefix("base_model.model."): m.lora_A["default"].weight.shape[0]
              for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert loaded == ranks
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-4)


def test_one_pass_low_memory_mode_stops_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--mode lowmem --passes 1 --until-converged runs, and records the checks (random tokens: all 6 batches)."""
    out = tmp_path / "out"
    assert main(["init", "--out", str(out), "--batches", "6", "--batch-size", "2", "--seq-len", "32", "--rank", "4",
                 "--mode", "lowmem", "--passes", "1", "--until-converged"]) == 0
    assert "convergence" in capsys.readouterr().out
    summary = json.loads((out / "loraga_fast_init.json").read_text())
    assert summary["mode"] == "lowmem" and summary["passes"] == 1 and summary["batches_used"] == 6
    conv = summary["convergence"]
    assert conv["converged"] is False and conv["checks"] == 1 and conv["last_check"]["backward_passes"] == 4


@pytest.mark.parametrize(("args", "expected"), [
    (["--convergence-tol", "0.1"], "--convergence-tol applies with --until-converged only"),
    (["--until-converged", "--convergence-tol", "1.5"], "--convergence-tol: must be in (0, 1)"),
    (["--until-converged", "--mode", "lowmem"], "--until-converged with --mode lowmem needs --passes 1"),
    (["--until-converged", "--mode", "lowmem", "--passes", "2"], "needs --passes 1 (one pass keeps each gradient sum's"),
    (["--max-rank", "3"], "--min-rank and --max-rank apply with --rank-budget only"),
    (["--rank-budget", "uniform", "--max-rank", "200"], "--max-rank 200 is over min(m, n) / 2 = 128"),
    (["--rank-budget", "10"], "is smaller than --min-rank 1 on every target"),
    (["--rank-budget", "lots"], "--rank-budget: expected 'uniform' or a whole number"),
    (["--passes", "1"], "--passes applies with --mode lowmem only"),
])
def test_flag_mistakes_are_one_line_before_anything_is_read(args: list[str], expected: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    line, _ = one_line_error(args, tmp_path, capsys)
    assert expected in line, line
