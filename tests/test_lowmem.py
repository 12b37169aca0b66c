"""Low-memory mode (``preprocess_loraga(..., mode="lowmem")``): accuracy against exact mode and against a constructed
low-rank-plus-noise gradient, the accumulator memory formula, pass consistency checks, the ``get_peft_model``
hand-off, the placeholder, the cache, exact-mode edge cases, and the sketch ops (torch and Triton interpreter)."""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from loraga_fast import handoff, memory_estimate, preprocess_loraga
from loraga_fast.estimate import run_passes
from loraga_fast.factors import LayerFactors
from loraga_fast.memory import extra_bytes_per_layer
from loraga_fast.ops.sketch import (
    factors_from_sketch,
    factors_from_sketch_ref,
    probe_accumulate,
    sketch_accumulate,
    sketch_accumulate_ref,
)
from loraga_fast.placeholder import LowMemGradient, LowMemGradientUnavailable
from loraga_fast.sketch_store import DEFAULT_SKETCH_PER_RANK, SketchSpec, SketchStore
from tests._helpers import (
    LLAMA_TARGETS,
    attached,
    lm_loss,
    lora_ga_config,
    rel_err,
    subspace_cos,
    tiny_gpt2,
    tiny_llama,
    token_batches,
    train_step_for,
)
from tests.test_init import TwoBranch
from tests.test_real_models import (  # noqa: F401
    MINILM_TARGETS,
    _contrastive_loss,
    _pair_batches,
    minilm,
)

LOWMEM = {"mode": "lowmem"}


def prepared_factors(model: nn.Module) -> dict[str, LayerFactors]:
    """The factors the get_peft_model hand-off holds for ``model``'s prepared layers (by module name)."""
    names = {module: name for name, module in model.named_modules()}
    out = {}
    for module, full_name in names.items():
        entry = handoff.prepared(module)
        if entry is not None and entry[1] in entry[0].factors():
            out[full_name] = entry[0].factors()[entry[1]]
    return out


def adapters(pm: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n.removeprefix("base_model.model."): (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
            for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


# ---- accuracy ----------------------------------------------------------------------------------------------------


def test_minilm_lowmem_matches_exact_mode(minilm) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Defaults (k = 16 r, 3 passes) on a pretrained model's real gradients: the top-2r subspaces, singular values,
    adapters, and the model's outputs after get_peft_model."""
    model, tokenizer = minilm
    batches = _pair_batches(tokenizer)
    probe = _pair_batches(tokenizer, 1)[0]
    with torch.no_grad():
        before = model(**probe).last_hidden_state
    results = {}
    for mode in ("exact", "lowmem"):
        m = copy.deepcopy(model)
        cfg = lora_ga_config(MINILM_TARGETS)
        preprocess_loraga(m, cfg, lambda m=m: [_contrastive_loss(m, b).backward() for b in batches] and None, mode=mode)
        factors = prepared_factors(m)
        pm = get_peft_model(m, cfg)
        with torch.no_grad():  # W - scaling B A + scaling B A: the outputs do not move
            torch.testing.assert_close(pm(**probe).last_hidden_state, before, rtol=1e-4, atol=1e-4)
        results[mode] = (factors, adapters(pm))
    (exact_f, exact_ad), (low_f, low_ad) = results["exact"], results["lowmem"]
    assert low_f.keys() == exact_f.keys() and len(low_f) == 36
    k = 2 * 4
    for n, e in exact_f.items():
        lo = low_f[n]
        assert lo.u.shape == e.u.shape and lo.v.shape == e.v.shape
        assert subspace_cos(lo.u[:, :k], e.u[:, :k]) >= 0.99, n
        assert subspace_cos(lo.v[:, :k], e.v[:, :k]) >= 0.99, n
        assert ((lo.s[:k] - e.s[:k]).abs() / e.s[:k]).max() <= 0.02, n
    assert exact_ad.keys() == low_ad.keys()
    for n in exact_f:
        (a, b), (ea, eb) = low_ad[n], exact_ad[n]
        assert subspace_cos(a.T, ea.T) >= 0.99 and subspace_cos(b, eb) >= 0.99, n
        # B's columns carry the singular values (times the same stable scale)
        assert rel_err(b.norm(dim=0), eb.norm(dim=0)) <= 0.02, n


def _wide_llama() -> nn.Module:
    """One LLaMA block large enough that k = 16 r is well below min(m, n): q/o 256x256, k/v 128x256,
    gate/up 512x256, down 256x512."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _low_rank_plus_noise(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A strong rank-4 part (10, 8, 6, 5), a decaying tail of 28 directions (2 .. 0.5) and dense noise."""
    u = torch.linalg.qr(torch.randn(m, 32, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, 32, generator=gen, dtype=torch.float64)).Q
    s = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0], dtype=torch.float64), torch.linspace(2.0, 0.5, 28, dtype=torch.float64)])
    return (u * s) @ v.T + 0.01 * torch.randn(m, n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("passes", [None, 2, 4], ids=["default", "2", "4"])
def test_constructed_low_rank_plus_noise_on_a_llama_block(passes: int | None) -> None:
    """Each target of a LLaMA block sees inputs X with orthonormal columns and output gradients G = X A^T, so the
    summed gradient G^T X is exactly a constructed A; the top-2r triplets must match A's exact SVD. Even pass
    counts end on an adjoint product (U and V swap roles)."""
    model = _wide_llama()
    r = 2
    cfg = lora_ga_config(LLAMA_TARGETS)
    cfg.r = r
    gen = torch.Generator().manual_seed(7)
    targets = [(n, mod) for n, mod in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    designed, inputs = {}, {}
    for name, mod in targets:
        m, n = mod.weight.shape
        designed[name] = _low_rank_plus_noise(m, n, gen)
        inputs[name] = torch.linalg.qr(torch.randn(600, n, generator=gen, dtype=torch.float64)).Q  # X^T X = I

    def train_step() -> None:
        for half in (slice(0, 300), slice(300, 600)):  # two backward passes per layer: the mean is A / 2
            for name, mod in targets:
                x = inputs[name][half].float()
                grad_out = (inputs[name][half] @ designed[name].T).float()
                (mod(x) * grad_out).sum().backward()

    preprocess_loraga(model, cfg, train_step, mode="lowmem", passes=passes)
    factors = prepared_factors(model)
    assert factors.keys() == designed.keys()
    bar = 0.97 if passes == 2 else 0.99  # two passes (no power iteration) are measurably less accurate
    for name, a in designed.items():
        u0, s0, vh0 = torch.linalg.svd(a / 2)
        f = factors[name]
        assert f.u.shape == (a.shape[0], 2 * r) and f.v.shape == (a.shape[1], 2 * r)
        assert subspace_cos(f.u, u0[:, : 2 * r]) >= bar, name
        assert subspace_cos(f.v, vh0[: 2 * r].T) >= bar, name
        assert ((f.s.double() - s0[: 2 * r]).abs() / s0[: 2 * r]).max() <= 0.02, name
    k = DEFAULT_SKETCH_PER_RANK * r
    assert k < min(mod.weight.shape[0] for _, mod in targets)  # the sketch is a real compression here


# ---- memory ------------------------------------------------------------------------------------------------------


class _LargestAllocation(TorchDispatchMode):
    """Records the largest new storage (in fp32 elements) any torch op allocates (views and in-place results,
    which share an input's storage, do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        from torch.utils._pytree import tree_flatten

        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // 4)
        return out


def test_accumulator_memory_is_the_skinny_formula() -> None:
    model = _wide_llama()
    cfg = lora_ga_config(LLAMA_TARGETS)
    cfg.r = 2
    targets = [(n, mod) for n, mod in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    k = DEFAULT_SKETCH_PER_RANK * 2
    specs = [SketchSpec(n, *mod.weight.shape, k, mod.weight.device) for n, mod in targets]
    store = SketchStore(specs)
    expected = sum((mod.weight.shape[0] + mod.weight.shape[1]) * k * 4 for _, mod in targets)
    assert store.sketch_nbytes == expected
    # documented extras: a 4x4 fingerprint per layer, one (m + n) x 4 probe pair per shape group
    extras = sum(4 * 16 for _ in targets) + sum((g.m + g.n) * 4 * 4 for g in store.groups)
    assert store.nbytes == expected + extras
    assert all(g.m_side.shape == (len(g.slots), g.m, k) and g.n_side.shape == (len(g.slots), g.n, k) for g in store.groups)
    estimate = memory_estimate(model, cfg)
    assert estimate.lowmem_bytes == expected + sum(extra_bytes_per_layer(*mod.weight.shape) for _, mod in targets)
    assert estimate.exact_bytes == sum(mod.weight.numel() * 4 for _, mod in targets)
    assert estimate.lowmem_bytes >= store.nbytes and estimate.exact_bytes > 3 * estimate.lowmem_bytes


@pytest.mark.parametrize("mode", ["exact", "lowmem"])
def test_no_gradient_sized_tensor_is_ever_allocated_in_lowmem_mode(mode: str) -> None:
    """Every storage allocated during the call is recorded; low-memory mode never allocates one as large as the
    largest target weight (only its (B, m, k) sketch groups and (T, k) products; exact mode does: its
    accumulators, which shows the check can fail)."""
    model = _wide_llama()
    cfg = lora_ga_config(LLAMA_TARGETS)
    cfg.r = 2
    largest = max(mod.weight.numel() for n, mod in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS)
    step = train_step_for(model, token_batches(n=2, bsz=2, seq=8))
    with _LargestAllocation() as probe:
        preprocess_loraga(model, cfg, step, mode=mode)
    if mode == "lowmem":
        assert probe.largest == 2 * 512 * 32  # the gate/up sketch group: (B=2, m=512, k=16 r=32)
    else:
        assert probe.largest >= largest


# ---- pass consistency ------------------------------------------------------------------------------------------------


def _assert_untouched(model: nn.Module) -> None:
    assert not attached(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_other_batches_on_a_later_pass_are_detected() -> None:
    model = tiny_llama()
    calls = []

    def drifting_step() -> None:  # a shared generator: each call gets new batches
        calls.append(1)
        for b in token_batches(n=2, seed=len(calls)):
            lm_loss(model, b).backward()

    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' saw different data in call 2"):
        preprocess_loraga(model, lora_ga_config(), drifting_step, mode="lowmem")
    assert len(calls) == 2
    _assert_untouched(model)


def test_another_number_of_backward_passes_is_detected() -> None:
    model = tiny_llama()
    batches = iter(token_batches(n=5))

    def exhausting_step() -> None:  # a shared iterator: the second call gets what is left
        for _, b in zip(range(3), batches):
            lm_loss(model, b).backward()

    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' saw 3 backward pass\(es\) in the "
                                         r"first call of train_step but 2 in call 2"):
        preprocess_loraga(model, lora_ga_config(), exhausting_step, mode="lowmem")
    _assert_untouched(model)


def test_dropout_and_shuffling_repeat_across_passes() -> None:
    """The global random state is reset before each pass: dropout masks and a shuffled DataLoader repeat."""
    model = tiny_gpt2()
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.2
    loader = torch.utils.data.DataLoader(torch.cat(token_batches(n=3)), batch_size=2, shuffle=True)
    step = lambda: [lm_loss(model, b).backward() for b in loader] and None
    preprocess_loraga(model, lora_ga_config(["c_attn", "c_fc"]), step, mode="lowmem")
    assert len(attached(model)) == 4


# ---- hand-off and placeholder -------------------------------------------------------------------------------------------


def test_get_peft_model_after_lowmem_and_the_placeholder() -> None:
    base = tiny_gpt2()  # Conv1D: the weight layout is (in, out)
    x = token_batches(n=1)[0]
    with torch.no_grad():
        before = base(x).logits
    results = {}
    for mode in ("exact", "lowmem"):
        model = copy.deepcopy(base)
        cfg = lora_ga_config(["c_attn", "c_proj", "c_fc"])
        preprocess_loraga(model, cfg, train_step_for(model, token_batches()), mode=mode)
        if mode == "lowmem":
            grad = model.transformer.h[0].attn.c_attn._peft_loraga_grad
            assert isinstance(grad, LowMemGradient)
            with pytest.raises(LowMemGradientUnavailable, match=r"'transformer\.h\.0\.attn\.c_attn' was prepared by "
                                                                r"loraga_fast\.preprocess_loraga\(mode='lowmem'\)"):
                grad.to(torch.float32)  # what peft's own lora_ga_init does first
            with pytest.raises(LowMemGradientUnavailable, match="never forms the mean gradient"):
                torch.transpose(grad, 0, 1)  # type: ignore[call-overload]
        pm = get_peft_model(model, cfg)
        with torch.no_grad():
            torch.testing.assert_close(pm(x).logits, before, rtol=1e-4, atol=1e-4)
        assert not attached(model)  # the hand-off consumed every placeholder
        results[mode] = adapters(pm)
    assert results["exact"].keys() == results["lowmem"].keys() and len(results["lowmem"]) == 8
    for n, (ea, eb) in results["exact"].items():
        a, b = results["lowmem"][n]
        assert a.shape == ea.shape and b.shape == eb.shape
        # tiny layers: k = 16 r covers the whole space, so the result is exact up to rounding
        assert subspace_cos(a.T, ea.T) >= 0.999 and subspace_cos(b, eb) >= 0.999, n


def test_peft_path_reading_the_placeholder_fails_clearly() -> None:
    """A larger rank than prepared goes to peft's own lora_ga_init, which must not silently use a wrong value."""
    model = tiny_llama()
    cfg = lora_ga_config(["q_proj"])
    preprocess_loraga(model, cfg, train_step_for(model, token_batches()), mode="lowmem")
    bigger = lora_ga_config(["q_proj"])
    bigger.r = 8
    with pytest.raises(LowMemGradientUnavailable, match="run preprocess_loraga\\(mode='exact'\\)"):
        get_peft_model(model, bigger)


# ---- exact mode's edge cases -----------------------------------------------------------------------------------------


def test_zero_gradient_warns_and_gets_default_init(caplog: pytest.LogCaptureFixture) -> None:
    model = TwoBranch()
    dead_w = model.dead.weight.detach().clone()
    xs = [torch.randn(12, 16) for _ in range(2)]
    cfg = lora_ga_config(["used", "dead"])
    with caplog.at_level(logging.WARNING, logger="loraga_fast"):
        preprocess_loraga(model, cfg, lambda: [model(x).backward() for x in xs] and None, mode="lowmem")
    assert "all zero" in caplog.text and "dead" in caplog.text
    pm = get_peft_model(model, cfg)
    dead = pm.base_model.model.dead
    assert dead.lora_A["default"].weight.abs().sum() > 0
    assert torch.equal(dead.lora_B["default"].weight, torch.zeros(16, 4))
    assert torch.equal(dead.get_base_layer().weight, dead_w)
    assert pm.base_model.model.used.lora_B["default"].weight.abs().sum() > 0


def test_non_finite_gradient_raises_before_anything_is_modified() -> None:
    model = tiny_llama()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def overflowing_step() -> None:
        calls.append(1)
        (lm_loss(model, token_batches(n=1)[0]) * float("inf")).backward()

    with pytest.raises(ValueError, match=r"not finite \(NaN/Inf\).*model\.layers\.0\.self_attn\.q_proj"):
        preprocess_loraga(model, lora_ga_config(), overflowing_step, mode="lowmem")
    assert len(calls) == 1  # found after the first pass
    _assert_untouched(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_rank_too_large_for_a_layer_raises() -> None:
    model = tiny_llama()
    cfg = lora_ga_config(["k_proj"])  # 16 x 32
    cfg.r = 9
    with pytest.raises(ValueError, match=r"2 \* r <= min.*'model.layers.0.self_attn.k_proj'.*r=9"):
        preprocess_loraga(model, cfg, train_step_for(model, token_batches(n=1)), mode="lowmem")
    _assert_untouched(model)


def test_layers_without_backward_and_bad_arguments(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="loraga_fast"):
        preprocess_loraga(model, lora_ga_config(), lambda: None, mode="lowmem")
    assert "14 of 14 target layers saw no backward pass" in caplog.text and not attached(model)
    with pytest.raises(ValueError, match="mode must be 'exact' or 'lowmem'"):
        preprocess_loraga(model, lora_ga_config(), lambda: None, mode="sketch")
    with pytest.raises(ValueError, match="apply to mode='lowmem' only"):
        preprocess_loraga(model, lora_ga_config(), lambda: None, passes=4)
    with pytest.raises(ValueError, match="passes >= 2"):
        preprocess_loraga(model, lora_ga_config(), lambda: None, mode="lowmem", passes=1)
    with pytest.raises(ValueError, match="sketch_size=4 must be at least 2 \\* r = 8"):
        preprocess_loraga(model, lora_ga_config(), lambda: None, mode="lowmem", sketch_size=4)


# ---- cache --------------------------------------------------------------------------------------------------------------


def _never() -> None:
    raise AssertionError("train_step must not run when the cache is used")


def test_cache_round_trip_and_mode_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "factors.safetensors"
    first = tiny_llama()
    preprocess_loraga(first, lora_ga_config(), train_step_for(first, token_batches()), cache_file=path, mode="lowmem")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # factors, not gradients
        keys = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.loraga_fast.u" in keys and not any("_peft_loraga_grad" in k for k in keys)
    second = tiny_llama()
    preprocess_loraga(second, lora_ga_config(), _never, cache_file=path, mode="lowmem")
    a, b = prepared_factors(first), prepared_factors(second)
    assert a.keys() == b.keys() and len(a) == 14
    for n in a:
        assert torch.equal(a[n].u, b[n].u) and torch.equal(a[n].s, b[n].s) and torch.equal(a[n].v, b[n].v)
    x = token_batches(n=1)[0]
    p1, p2 = get_peft_model(first, lora_ga_config()), get_peft_model(second, lora_ga_config())
    for n, (a1, b1) in adapters(p1).items():
        a2, b2 = adapters(p2)[n]
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    with torch.no_grad():
        torch.testing.assert_close(p1(x).logits, p2(x).logits)

    third = tiny_llama()
    with pytest.raises(ValueError, match="holds low-memory factors.*pass mode='lowmem'"):
        preprocess_loraga(third, lora_ga_config(), _never, cache_file=path)
    bigger = lora_ga_config()
    bigger.r = 8
    with pytest.raises(ValueError, match="written for a smaller rank: module 'model.layers.0.self_attn.q_proj'"):
        preprocess_loraga(third, bigger, _never, cache_file=path, mode="lowmem")
    exact_path = tmp_path / "grads.safetensors"
    preprocess_loraga(third, lora_ga_config(), train_step_for(third, token_batches(n=1)), cache_file=exact_path)
    fourth = tiny_llama()
    with pytest.raises(ValueError, match="holds exact-mode mean gradients.*pass mode='exact'"):
        preprocess_loraga(fourth, lora_ga_config(), _never, cache_file=exact_path, mode="lowmem")
    assert not attached(fourth)


# ---- ops -------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t,m,n,k", [(1, 5, 7, 3), (63, 40, 24, 8), (130, 33, 70, 16)], ids=str)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_sketch_accumulate_matches_reference(backend: str, t: int, m: int, n: int, k: int, dtype: torch.dtype,
                                             rtol: float) -> None:
    g = torch.randn(2, t, m).to(dtype)
    x = torch.randn(2, t, n).to(dtype)
    p = torch.randn(n, k)
    q = torch.randn(m, k)
    start = torch.randn(m, k)
    acc = start.clone()
    sketch_accumulate(acc, g, x, p)  # A P
    dense = g.double().reshape(-1, m).T @ x.double().reshape(-1, n)
    assert rel_err(acc - start, dense @ p.double()) < rtol
    ref = sketch_accumulate_ref(start.clone(), g, x, p)
    assert rel_err(acc, ref) < rtol
    acc_t = torch.zeros(n, k)
    sketch_accumulate(acc_t, x, g, q)  # A^T Q
    assert rel_err(acc_t, dense.T @ q.double()) < rtol
    fp = torch.zeros(3, 3)
    pm, pn = torch.randn(m, 3), torch.randn(n, 3)
    probe_accumulate(fp, g, x, pm, pn)
    assert rel_err(fp, pm.double().T @ dense @ pn.double()) < rtol


def test_sketch_accumulate_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shapes do not match"):
        sketch_accumulate(torch.zeros(4, 3), torch.randn(5, 4), torch.randn(5, 6), torch.randn(7, 3))
    with pytest.raises(TypeError, match="must be float32"):
        sketch_accumulate(torch.zeros(4, 3, dtype=torch.float64), torch.randn(5, 4), torch.randn(5, 6), torch.randn(6, 3))


def test_factors_from_sketch_matches_dense_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 50, 8, generator=gen) @ torch.randn(2, 8, 30, generator=gen)  # rank 8
    basis = torch.linalg.qr(a.mT @ torch.randn(2, 50, 12, generator=gen)).Q  # (2, 30, 12) spans the row space
    u, s, v = factors_from_sketch(basis, a @ basis, 6)
    ur, sr, vr = factors_from_sketch_ref(basis, a @ basis, 6)
    u0, s0, vh0 = torch.linalg.svd(a.double())
    assert rel_err(s, s0[:, :6]) < 1e-5 and rel_err(sr, s0[:, :6]) < 1e-5
    for i in range(2):
        assert subspace_cos(u[i], u0[i, :, :6]) > 0.9999 and subspace_cos(v[i], vh0[i, :6].T) > 0.9999
        assert subspace_cos(u[i], ur[i]) > 0.9999 and subspace_cos(v[i], vr[i]) > 0.9999


def test_run_passes_under_the_triton_interpreter(backend: str) -> None:
    """The whole low-memory estimation with each backend gives the same factors."""
    model = tiny_llama()
    targets = [(n, mod) for n, mod in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    ranks = {n: 2 for n, _ in targets}
    # k = min(m, n): the sketch spans everything, so both backends must give the exact top subspaces
    store = SketchStore([SketchSpec(n, *mod.weight.shape, 32, mod.weight.device) for n, mod in targets], passes=3)
    run_passes(model, targets, store, train_step_for(model, token_batches(n=2)), ranks=ranks)
    assert min(store.max_abs().values()) > 0 and set(store.counts().values()) == {2}
    factors = store.factors(ranks)
    ref_model = tiny_llama()
    preprocess_loraga(ref_model, lora_ga_config(["q_proj", "down_proj"]), train_step_for(ref_model, token_batches(n=2)))
    exact = prepared_factors(ref_model)
    for n, f in factors.items():
        assert subspace_cos(f.u, exact[n].u[:, :4]) > 0.99 and subspace_cos(f.v, exact[n].v[:, :4]) > 0.99, (backend, n)


# ---- data parallel ---------------------------------------------------------------------------------------------------


def _dp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = token_batches(n=5)[rank::world]
        model = tiny_llama()
        cfg = lora_ga_config()
        preprocess_loraga(model, cfg, train_step_for(model, batches), mode="lowmem",
                          cache_file=os.path.join(out_dir, "dp.safetensors"))
        factors = {n: (f.u.clone(), f.s.clone(), f.v.clone()) for n, f in prepared_factors(model).items()}
        torch.save(factors, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_equals_single_process(tmp_path: Path) -> None:
    single = tiny_llama()
    preprocess_loraga(single, lora_ga_config(), train_step_for(single, token_batches(n=5)), mode="lowmem")
    expected = prepared_factors(single)
    mp.spawn(_dp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, res in enumerate(results):
        assert res.keys() == expected.keys() and len(res) == 14
        for n, (u, s, v) in res.items():
            assert torch.equal(u, results[0][n][0]) and torch.equal(s, results[0][n][1]), (r, n)  # ranks agree
            assert rel_err(s, expected[n].s) < 1e-4, (r, n)
            assert subspace_cos(u, expected[n].u) > 0.999 and subspace_cos(v, expected[n].v) > 0.999, (r, n)
    assert (tmp_path / "dp.safetensors").is_file()
