"""What low-memory mode attaches as ``_peft_loraga_grad`` (:mod:`loraga_fast.stores.placeholder`): no gradient, and an
error that explains why on every read, never a wrong value."""

from __future__ import annotations

import copy
import pickle
import re

import numpy as np
import pytest
import torch
from peft import get_peft_model

from loraga_fast import preprocess_loraga
from loraga_fast.stores.placeholder import LowMemGradient, LowMemGradientUnavailable
from tests._helpers import (
    attached,
    lora_ga_config,
    tiny_gpt2,
    tiny_llama,
    token_batches,
    train_step_for,
)

PREPARED_BY = r"'layer\.q' was prepared by loraga_fast\.preprocess_loraga\(mode='lowmem'\)"


READS = {
    "method": (lambda g: g.to(torch.float32), r"accessed \.to"),  # what peft's own lora_ga_init does first
    "attribute": (lambda g: g.shape, r"accessed \.shape"),
    "torch-function": (lambda g: torch.transpose(g, 0, 1), "passed to transpose"),
    "operator": (lambda g: torch.zeros(8, 4) + g, "passed to add"),
    "index": (lambda g: g[0], "indexed"),
    "float": (lambda g: float(g), "converted to a number"),
    "numpy": (lambda g: np.asarray(g), "converted to an array"),
}


@pytest.mark.parametrize("read,what", list(READS.values()), ids=list(READS))
def test_every_read_raises_with_the_reason(read, what: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LowMemGradientUnavailable, match=PREPARED_BY) as info:
        read(LowMemGradient("layer.q", (8, 4)))
    message = str(info.value)
    assert re.search(what, message), message
    assert "never forms the mean gradient" in message and "preprocess_loraga(mode='exact')" in message
    assert isinstance(info.value, RuntimeError)


def test_python_protocols_keep_working() -> None:
    grad = LowMemGradient("layer.q", (8, 4))
    assert repr(grad) == "<loraga_fast low-memory placeholder for 'layer.q' (8, 4): no gradient is held>"
    assert not hasattr(grad, "__len__")  # dunder lookups are plain AttributeErrors
    for clone in (copy.copy(grad), copy.deepcopy(grad), pickle.loads(pickle.dumps(grad))):
        assert isinstance(clone, LowMemGradient) and clone.name == "layer.q" and tuple(clone.weight_shape) == (8, 4)


def test_lowmem_attaches_a_placeholder_that_refuses_reads() -> None:
    model = tiny_gpt2()  # Conv1D: the weight layout is (in, out)
    cfg = lora_ga_config(["c_attn", "c_proj", "c_fc"])
    preprocess_loraga(model, cfg, train_step_for(model, token_batches()), mode="lowmem")
    grads = attached(model)
    assert len(grads) == 8 and all(isinstance(g, LowMemGradient) for g in grads.values())
    grad = model.transformer.h[0].attn.c_attn._peft_loraga_grad
    assert isinstance(grad, LowMemGradient)
    assert grad.name == "transformer.h.0.attn.c_attn" and tuple(grad.weight_shape) == (32, 96)
    with pytest.raises(LowMemGradientUnavailable, match=r"'transformer\.h\.0\.attn\.c_attn' was prepared by "
                                                        r"loraga_fast\.preprocess_loraga\(mode='lowmem'\)"):
        grad.to(torch.float32)  # what peft's own lora_ga_init does first
    with pytest.raises(LowMemGradientUnavailable, match="never forms the mean gradient"):
        torch.transpose(grad, 0, 1)  # type: ignore[call-overload]
    get_peft_model(model, cfg)
    assert not attached(model)  # the hand-off consumed every placeholder


def test_peft_path_reading_the_placeholder_fails_clearly() -> None:
    """A larger rank than prepared goes to peft's own lora_ga_init, which must not silently use a wrong value."""
    model = tiny_llama()
    cfg = lora_ga_config(["q_proj"])
    preprocess_loraga(model, cfg, train_step_for(model, token_batches()), mode="lowmem")
    bigger = lora_ga_config(["q_proj"])
    bigger.r = 8
    with pytest.raises(LowMemGradientUnavailable, match="run preprocess_loraga\\(mode='exact'\\)"):
        get_peft_model(model, bigger)
