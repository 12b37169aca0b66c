"""The capture op on single layers: accumulated G^T X, input gradients, counts, and clean restoration."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraga_fast.layers.capture import CaptureSession
from loraga_fast.stores.exact import AccumulatorStore


def _store_for(named: dict[str, nn.Module]) -> AccumulatorStore:
    return AccumulatorStore([(n, tuple(m.weight.shape), m.weight.device) for n, m in named.items()])


class Twice(nn.Module):
    """Calls the same layer twice per forward."""

    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


def _autograd_reference(model: nn.Module, layer: str, xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """float64 autograd: summed weight gradient of `layer`, and each input's gradient."""
    import copy

    ref = copy.deepcopy(model).double()
    w = dict(ref.named_modules())[layer].weight
    w.requires_grad_(True)
    input_grads = []
    for x in xs:
        x64 = x.detach().double().requires_grad_(True)
        ref(x64).square().sum().backward()
        input_grads.append(x64.grad)
    return w.grad, input_grads


@pytest.mark.parametrize("shape", [(7, 6), (2, 5, 6), (2, 3, 4, 6)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize(
    "kind,bias", [("linear", True), ("linear", False), ("conv1d", True)], ids=["linear-bias", "linear-nobias", "conv1d"]
)
def test_single_layer_matches_autograd(shape: tuple[int, ...], bias: bool, kind: str) -> None:
    if kind == "linear":
        layer = nn.Linear(6, 6, bias=bias)
    else:  # transformers Conv1D always has a bias
        layer = Conv1D(6, 6)
        nn.init.normal_(layer.bias)
    model = Twice(layer)
    xs = [torch.randn(shape) for _ in range(3)]
    ref_w, ref_in = _autograd_reference(model, "lin", xs)

    store = _store_for({"lin": layer})
    with CaptureSession(model, [("lin", layer)], store):
        for x, want in zip(xs, ref_in):
            x = x.clone().requires_grad_(True)
            model(x).square().sum().backward()
            torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-6)
    slot = store["lin"]
    assert slot.count == 2 * len(xs)  # each call's backward counts
    assert slot.acc.shape == layer.weight.shape
    torch.testing.assert_close(slot.acc.double(), ref_w, rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None and layer.weight.requires_grad  # restored, never used
    assert "forward" not in layer.__dict__


def test_backward_works_when_nothing_requires_grad() -> None:
    layer = nn.Linear(4, 3)
    store = _store_for({"l": layer})
    x = torch.randn(5, 4)  # no grad anywhere: the capture op's anchor makes the loss differentiable
    with CaptureSession(layer, [("l", layer)], store):
        loss = layer(x).sum()
        assert loss.requires_grad
        loss.backward()
    torch.testing.assert_close(store["l"].acc, torch.ones(5, 3).t() @ x)
    assert all(p.grad is None for p in layer.parameters())


def test_restores_flags_modes_and_forwards_on_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.eval()
    model[1].train()
    model[0].bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    targets = [("0", model[0]), ("2", model[2])]
    store = _store_for(dict(targets))
    with pytest.raises(KeyboardInterrupt):
        with CaptureSession(model, targets, store):
            assert model.training and not any(p.requires_grad for p in model.parameters())
            model(torch.randn(3, 4)).sum().backward()
            raise KeyboardInterrupt
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_rejects_custom_forward_subclass() -> None:
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    layer = Scaled(3, 3)
    with pytest.raises(ValueError, match="'odd'.*Scaled.*overrides"):
        CaptureSession(layer, [("odd", layer)], _store_for({"odd": layer}))


def test_rejects_instance_forward_override() -> None:
    layer = nn.Linear(3, 3)
    layer.forward = lambda x: x  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="'patched'.*replaced on the instance"):
        CaptureSession(layer, [("patched", layer)], _store_for({"patched": layer}))


def test_accelerate_hooked_layer_keeps_its_hook() -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    calls = []

    class Recorder(ModelHook):
        def pre_forward(self, module, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append("pre")
            return args, kwargs

    layer = nn.Linear(4, 3)
    add_hook_to_module(layer, Recorder())
    hooked_forward = layer.__dict__["forward"]
    old_forward = layer.__dict__["_old_forward"]
    store = _store_for({"l": layer})
    x = torch.randn(5, 4)
    with CaptureSession(layer, [("l", layer)], store):
        layer(x).sum().backward()
    assert calls == ["pre"]
    torch.testing.assert_close(store["l"].acc, torch.ones(5, 3).t() @ x)
    assert layer.__dict__["forward"] is hooked_forward and layer.__dict__["_old_forward"] is old_forward
    remove_hook_from_module(layer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_layer_accumulates_in_fp32(dtype: torch.dtype) -> None:
    layer = nn.Linear(8, 5).to(dtype)
    store = _store_for({"l": layer})
    xs = [torch.randn(6, 8, dtype=dtype) for _ in range(4)]
    grads = [torch.randn(6, 5, dtype=dtype) for _ in range(4)]
    with CaptureSession(layer, [("l", layer)], store):
        for x, g in zip(xs, grads):
            layer(x).backward(g)
    expected = sum(g.double().t() @ x.double() for x, g in zip(xs, grads))
    assert store["l"].acc.dtype == torch.float32
    torch.testing.assert_close(store["l"].acc.double(), expected, rtol=1e-6, atol=1e-5)
