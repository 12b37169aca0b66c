"""The estimation flow every mode shares (:mod:`loraga_fast.core.passes`): the checks between passes, the random state
put back before each pass, the progress bar, and which layers were seen or are all zero."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

from loraga_fast import preprocess_loraga
from loraga_fast.core.passes import Progress, RandomState, run_passes, summarize
from loraga_fast.stores.sketch import SketchSpec, SketchStore
from loraga_fast.stores.exact import AccumulatorStore
from tests._helpers import (
    TwoBranch,
    assert_untouched,
    attached,
    lm_loss,
    lora_ga_config,
    prepared_factors,
    rel_err,
    subspace_cos,
    tiny_gpt2,
    tiny_llama,
    token_batches,
)

# ---- pass consistency (low-memory mode runs train_step once per pass) ---------------------------------------------


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
    assert_untouched(model)


def test_another_number_of_backward_passes_is_detected() -> None:
    model = tiny_llama()
    batches = iter(token_batches(n=5))

    def exhausting_step() -> None:  # a shared iterator: the second call gets what is left
        for _, b in zip(range(3), batches):
            lm_loss(model, b).backward()

    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' saw 3 backward pass\(es\) in the "
                                         r"first call of train_step but 2 in call 2"):
        preprocess_loraga(model, lora_ga_config(), exhausting_step, mode="lowmem")
    assert_untouched(model)


def _dropout_gpt2(p: float) -> tuple[nn.Module, object]:
    """tiny GPT-2 with every dropout at ``p`` and a train_step over a shuffling DataLoader."""
    model = tiny_gpt2()
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = p
    loader = torch.utils.data.DataLoader(torch.cat(token_batches(n=3)), batch_size=2, shuffle=True)
    return model, lambda: [lm_loss(model, b).backward() for b in loader] and None


def test_dropout_and_shuffling_repeat_across_passes() -> None:
    """The global random state is put back before each pass, as it was when preprocess_loraga was called: every pass
    sees the dropout masks and batch order that exact mode's single pass sees from the same state, so the factors
    are those of exact mode's mean gradient (k = min(m, n) here: exact up to rounding)."""
    model, step = _dropout_gpt2(0.2)
    cfg = lora_ga_config(["c_attn", "c_fc"])
    torch.manual_seed(5)
    preprocess_loraga(model, cfg, step, mode="lowmem")
    assert len(attached(model)) == 4

    exact_model, exact_step = _dropout_gpt2(0.2)
    torch.manual_seed(5)
    preprocess_loraga(exact_model, copy.deepcopy(cfg), exact_step)
    grads = {n: g.clone() for n, g in attached(exact_model).items()}
    plain_model, plain_step = _dropout_gpt2(0.0)
    torch.manual_seed(5)
    preprocess_loraga(plain_model, copy.deepcopy(cfg), plain_step)
    factors = prepared_factors(model)
    assert factors.keys() == grads.keys()
    for name, g in grads.items():
        assert rel_err(attached(plain_model)[name], g) > 0.1, name  # the dropout masks matter to the gradient
        u, s, vh = torch.linalg.svd(g.double())  # Conv1D: factors and gradient in the (in, out) layout
        f = factors[name]
        k = f.u.shape[1]
        # measured: 1 - cos 7e-11, singular values 8e-7 off
        assert 1 - subspace_cos(f.u, u[:, :k]) < 1e-9 and 1 - subspace_cos(f.v, vh[:k].T) < 1e-9, name
        assert ((f.s.double() - s[:k]).abs() / s[:k]).max() < 1e-5, name


def test_rank_is_checked_after_the_first_pass() -> None:
    """A rank too large for a layer is found before the remaining passes are spent."""
    model = tiny_llama()
    targets = [(n, m) for n, m in model.named_modules() if n.endswith("k_proj")]  # 16 x 32
    store = SketchStore([SketchSpec(n, *m.weight.shape, 16, m.weight.device) for n, m in targets], passes=3)
    calls = []

    def step() -> None:
        calls.append(1)
        lm_loss(model, token_batches(n=1)[0]).backward()

    with pytest.raises(ValueError, match=r"2 \* r <= min.*'model.layers.0.self_attn.k_proj'.*r=9"):
        run_passes(model, targets, store, step, ranks={n: 9 for n, _ in targets})
    assert len(calls) == 1


# ---- random state ----------------------------------------------------------------------------------------------------


def test_random_state_restores_torch_python_and_numpy() -> None:
    state = RandomState()
    first = (torch.rand(4), random.random(), np.random.rand(3))
    state.restore()
    again = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])
    assert not torch.equal(torch.rand(4), first[0])  # restore puts the state back, it does not freeze it


# ---- progress bar ----------------------------------------------------------------------------------------------------


class _Slot:
    def __init__(self, count: int) -> None:
        self.count = count


def test_progress_counts_the_busiest_layer_over_all_passes() -> None:
    bar = Progress(total=3, enabled=None, passes=2)
    assert bar.bar is not None and bar.bar.total == 6
    for p in range(2):
        bar.begin_pass()
        for count in (1, 2, 3):
            for _ in range(2):  # two layers per backward pass: counted once
                bar.callback(_Slot(count))  # type: ignore[misc]
        assert bar.bar.n == 3 * (p + 1)
    bar.close()
    assert Progress(total=None, enabled=None).callback is None  # nothing to show without a total
    assert Progress(total=3, enabled=False).callback is None
    shown = Progress(total=None, enabled=True)
    assert shown.bar is not None and shown.bar.total is None
    shown.close()


# ---- seen and zero layers --------------------------------------------------------------------------------------------


def test_summarize_seen_zero_and_non_finite() -> None:
    store = AccumulatorStore([(n, (2, 3), torch.device("cpu")) for n in ("a", "b", "c")])
    store.load("a", torch.ones(2, 3))
    store.load("b", torch.zeros(2, 3))
    assert summarize(store, ["a", "b", "c"]) == (["a", "b"], {"b"})
    assert summarize(store, ["c", "b"]) == (["b"], {"b"})  # in the order asked
    store.load("c", torch.tensor([[1.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"1 layer\(s\) is not finite \(NaN/Inf\).*step: c\. No weight"):
        summarize(store, ["a", "b", "c"])


def test_run_passes_single_pass_counts_every_backward() -> None:
    model = TwoBranch()
    targets = [("used", model.used), ("dead", model.dead)]
    store = AccumulatorStore([(n, tuple(m.weight.shape), m.weight.device) for n, m in targets])
    xs = [torch.randn(5, 16) for _ in range(3)]
    run_passes(model, targets, store, lambda: [model(x).backward() for x in xs] and None, ranks={"used": 4, "dead": 4})
    assert store.counts() == {"used": 3, "dead": 3}
    assert summarize(store, ["used", "dead"]) == (["used", "dead"], {"dead"})
