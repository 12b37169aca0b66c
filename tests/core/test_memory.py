"""Accumulator memory before anything runs (:func:`loraga_fast.memory_estimate`), checked against the documented
formula written out here: ``4 m n`` bytes per layer in exact mode; ``4 (m + n) k`` in low-memory mode with
``k = sketch_size or 24 r`` (at most ``min(m, n)``), plus a 4 x 4 fp32 fingerprint (64 bytes) and at most one
``(m + n) x 4`` fp32 probe pair (``16 (m + n)`` bytes) per layer."""

from __future__ import annotations

import copy

from loraga_fast import memory_estimate
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
