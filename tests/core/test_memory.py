"""Accumulator memory before anything runs (:func:`loraga_fast.memory_estimate`), checked against the documented
formula written out here: ``4 m n`` bytes per layer in exact mode; ``4 (m + n) k`` in low-memory mode with
``k = sketch_size or 24 r`` (at most ``min(m, n)``), plus a 4 x 4 fp32 fingerprint (64 bytes) and at most one
``(m + n) x 4`` fp32 probe pair (``16 (m + n)`` bytes) per layer."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from loraga_fast import memory_estimate
from loraga_fast.core.memory import MemoryEstimate
from loraga_fast.stores.sketch import DEFAULT_SKETCH_PER_LORA_RANK, SketchSpec, SketchStore
from tests._helpers import (
    LLAMA_TARGETS,
    lora_ga_config,
    tiny_gpt2,
    tiny_llama,
    wide_llama,
)

# wide_llama's targets (out, in): q, o 256 x 256; k, v 128 x 256; gate, up 512 x 256; down 256 x 512
WIDE_SHAPES = {"q_proj": (256, 256), "k_proj": (128, 256), "v_proj": (128, 256), "o_proj": (256, 256),
               "gate_proj": (512, 256), "up_proj": (512, 256), "down_proj": (256, 512)}


def _lowmem_bytes(m: int, n: int, k: int) -> int:
    return 4 * (m + n) * min(k, m, n) + 64 + 16 * (m + n)


def test_memory_estimate_is_the_documented_formula() -> None:
    model = wide_llama()
    cfg = lora_ga_config(LLAMA_TARGETS)
    cfg.r = 2
    estimate = memory_estimate(model, cfg)
    # k = 24 r = 48 for every layer; sum of (m + n) = 4096, sum of m n = 589824
    assert estimate.exact_bytes == 4 * 589824 == 2359296
    assert estimate.lowmem_bytes == 4 * 4096 * 48 + 7 * 64 + 16 * 4096 == 852416
    assert estimate.lowmem_bytes == sum(_lowmem_bytes(m, n, 48) for m, n in WIDE_SHAPES.values())
    assert estimate.num_layers == 7 and set(estimate.sketch_columns.values()) == {48}
    # the bounded workspace: 6 fp32 (max(m, n), k) temporaries of the widest layer (gate/up/down: 512), one layer
    # at a time; the top-2r factors kept after the last pass: 4 (m + n) 2r per layer
    assert estimate.workspace_bytes == 4 * 6 * 512 * 48 == 589824
    assert estimate.factor_bytes == 4 * 4096 * 4 == 65536
    assert estimate.lowmem_peak_bytes == 852416 + 65536 + 589824
    assert ("exact mode 2.2 MiB, low-memory mode 1.4 MiB (sketches 832.4 KiB, factors 64.0 KiB, workspace 576.0 KiB; "
            "1.6x less, 3 passes") in str(estimate)
    # the store preprocess_loraga builds holds no more than that (probes are shared within a shape group)
    targets = [(n, mod) for n, mod in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    store = SketchStore([SketchSpec(n, *mod.weight.shape, DEFAULT_SKETCH_PER_LORA_RANK * 2, mod.weight.device)
                         for n, mod in targets])
    assert estimate.lowmem_bytes >= store.nbytes and estimate.exact_bytes > 2.7 * estimate.lowmem_bytes
    assert estimate.exact_bytes == sum(mod.weight.numel() * 4 for _, mod in targets)


def test_sketch_size_rank_pattern_conv1d_and_the_cap() -> None:
    llama = tiny_llama()  # q, o 32 x 32; k, v 16 x 32; gate, up 48 x 32; down 32 x 48; two layers
    cfg = lora_ga_config(["q_proj", "k_proj"])
    cfg.r = 1
    cfg.rank_pattern = {"k_proj": 2}
    est = memory_estimate(llama, cfg)
    # q: k = 24 r = 24; k_proj: 24 r = 48, capped at min(16, 32) = 16
    assert est.sketch_columns == {"model.layers.0.self_attn.q_proj": 24, "model.layers.0.self_attn.k_proj": 16,
                                  "model.layers.1.self_attn.q_proj": 24, "model.layers.1.self_attn.k_proj": 16}
    assert est.lowmem_bytes == 2 * (_lowmem_bytes(32, 32, 24) + _lowmem_bytes(16, 32, 48))
    assert memory_estimate(llama, cfg, sketch_size=8).lowmem_bytes == 2 * (_lowmem_bytes(32, 32, 8) + _lowmem_bytes(16, 32, 8))
    gpt2 = tiny_gpt2()  # Conv1D weights are stored (in, out): c_attn is (32, 96), i.e. out = 96, in = 32
    est = memory_estimate(gpt2, lora_ga_config(["c_attn"]))
    assert est.exact_bytes == 2 * 4 * 96 * 32
    assert est.lowmem_bytes == 2 * _lowmem_bytes(96, 32, 64) == 2 * (4 * 128 * 32 + 64 + 16 * 128)


def test_config_untouched_and_summary() -> None:
    model = tiny_llama()
    cfg = lora_ga_config(None)  # peft's defaults for llama are filled in a copy only
    before = copy.deepcopy(cfg)
    est = memory_estimate(model, cfg)
    assert cfg.target_modules is None and cfg == before
    assert est.num_layers == 4  # peft's llama defaults: q_proj and v_proj, two layers
    assert str(est).startswith("LoRA-GA accumulator memory for 4 target layers: exact mode ")
    assert est.exact_bytes == 2 * 4 * (32 * 32 + 16 * 32) == 12288
    assert est.lowmem_bytes == 2 * (_lowmem_bytes(32, 32, 64) + _lowmem_bytes(16, 32, 64)) == 26368
    assert est.workspace_bytes == 4 * 6 * 32 * 32 and est.factor_bytes == 2 * 4 * (64 * 8 + 48 * 8)  # r = 4
    assert ("exact mode 12.0 KiB, low-memory mode 56.8 KiB (sketches 25.8 KiB, factors 7.0 KiB, workspace 24.0 KiB; "
            "4.7x more, 3 passes over the batches") in str(est)


def _line(exact: int, sketches: int, factors: int, workspace: int) -> str:
    return str(MemoryEstimate(exact_bytes=exact, lowmem_bytes=sketches, num_layers=3, factor_bytes=factors,
                              workspace_bytes=workspace))


def test_the_line_says_how_much_less_or_more_low_memory_mode_takes() -> None:
    """x less / x more from the peak (sketches + factors + workspace) against the exact accumulators; within 5%
    "about the same as exact mode" (it printed "1.0x less", a saving that is not there)."""
    head = "LoRA-GA accumulator memory for 3 target layers: "
    tail = ", 3 passes over the batches by default)"
    # 6 MiB against 1 + 0.5 + 0.5 = 2 MiB: 3.0x less
    assert _line(6 * 2**20, 2**20, 2**19, 2**19) == (
        head + "exact mode 6.0 MiB, low-memory mode 2.0 MiB (sketches 1.0 MiB, factors 512.0 KiB, workspace "
        "512.0 KiB; 3.0x less" + tail)
    # 1 MiB against 1 + 0.5 + 1 = 2.5 MiB: 2.5x more
    assert _line(2**20, 2**20, 2**19, 2**20) == (
        head + "exact mode 1.0 MiB, low-memory mode 2.5 MiB (sketches 1.0 MiB, factors 512.0 KiB, workspace "
        "1.0 MiB; 2.5x more" + tail)
    # 100 000 B against 96 000 B (4.0% less) and 104 000 B (4.0% more): about the same
    assert _line(100_000, 90_000, 4_000, 2_000) == (
        head + "exact mode 97.7 KiB, low-memory mode 93.8 KiB (sketches 87.9 KiB, factors 3.9 KiB, workspace "
        "2.0 KiB; about the same as exact mode" + tail)
    assert _line(100_000, 98_000, 4_000, 2_000).endswith("low-memory mode 101.6 KiB (sketches 95.7 KiB, factors "
                                                         "3.9 KiB, workspace 2.0 KiB; about the same as exact mode" + tail)
    # just past 5% either way: a ratio again (100 000 / 94 000 = 1.064; 106 000 / 100 000 = 1.06)
    assert "; 1.1x less, " in _line(100_000, 94_000, 0, 0) and "; 1.1x more, " in _line(100_000, 106_000, 0, 0)
    assert "; 1.0x" not in _line(100_000, 100_000, 0, 0)


# the embedded default: 4 layers of hidden size 256, so q_proj, k_proj and v_proj are 256 x 256; per layer, exact
# 4 x 256 x 256 = 256 KiB; k = 24 r, sketches 4 x 512 x k + 64 + 16 x 512, factors 4 x 512 x 2r, and the workspace
# 4 x 6 x 256 x k once (one layer at a time)
COMMAND_LINES = [
    # r = 2, q and v (8 layers): 2 MiB against 8 x 106 560 + 65 536 + 294 912 = 1 212 928 B: 1.73x less
    (["--rank", "2"], "8 target layers: exact mode 2.0 MiB, low-memory mode 1.2 MiB (sketches 832.5 KiB, factors "
                      "64.0 KiB, workspace 288.0 KiB; 1.7x less"),
    # r = 4, q and v: 2 MiB against 8 x 204 864 + 131 072 + 589 824 = 2 359 808 B: 1.13x more
    (["--rank", "4"], "8 target layers: exact mode 2.0 MiB, low-memory mode 2.3 MiB (sketches 1.6 MiB, factors "
                      "128.0 KiB, workspace 576.0 KiB; 1.1x more"),
    # r = 4, q, k and v (12 layers): 3 MiB against 12 x 204 864 + 196 608 + 589 824 = 3 244 800 B: 3.1% more
    (["--rank", "4", "--targets", "q_proj,k_proj,v_proj"],
     "12 target layers: exact mode 3.0 MiB, low-memory mode 3.1 MiB (sketches 2.3 MiB, factors 192.0 KiB, "
     "workspace 576.0 KiB; about the same as exact mode"),
]


@pytest.mark.parametrize(("args", "line"), COMMAND_LINES, ids=["less", "more", "about-the-same"])
def test_the_command_prints_the_line_before_estimating(args: list[str], line: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from loraga_fast.command.main import main

    assert main(["init", "--out", str(tmp_path / "run"), "--batches", "1", "--batch-size", "1", "--seq-len", "16",
                 *args]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f"LoRA-GA accumulator memory for {line}, 3 passes over the batches by default) "
                          "-> mode exact")
