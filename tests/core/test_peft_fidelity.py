"""The installed peft's own ``LoraLayer.lora_ga_init``, fed the very gradient loraga_fast attached, gives the same
adapters and base offsets as loraga_fast's batched path: every direction x scale, on an ``nn.Linear`` and on a
transformers ``Conv1D`` (GPT-2's layout). The gradients have well separated constructed spectra, so peft's
``torch.svd_lowrank`` and our factors agree to rSVD accuracy vector by vector (each singular vector up to its sign,
which an SVD leaves free), and a change in peft's math (a scale read from another dimension, another index set)
shows up here as a red test. The one documented deviation: ``weight_svd`` uses an accurate top singular value of
the weight where peft uses a ``q = r`` randomized estimate; the constructed weights have a separated top singular
value, so both agree here too.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraga_fast import preprocess_loraga

DIRECTIONS = ["ArBr", "A2rBr", "ArB2r", "random"]
SCALES = ["stable", "weight_svd", "gd_scale", "unit"]
R = 4
OUT, IN = 40, 24  # out != in, so a scale read from the wrong dimension of a Conv1D weight is caught


def _spectrum_matrix(m: int, n: int, gen: torch.Generator, decay: float, top: float = 1.0) -> torch.Tensor:
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64)).Q
    s = top * decay ** torch.arange(min(m, n), dtype=torch.float64)
    return ((u * s) @ v.T).float()


class OneLayer(nn.Module):
    """One target layer (``nn.Linear`` or ``Conv1D``, ``OUT x IN``) whose weight has a separated top singular value,
    and a linear loss whose weight gradient is exactly the constructed ``grad`` (``(OUT, IN)``, math layout): with
    ``X = I`` and ``loss = <Y, grad^T>``, ``dL/dW = grad`` (``Y = X W^T``)."""

    def __init__(self, kind: str, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = _spectrum_matrix(OUT, IN, gen, decay=0.6, top=3.0)
        self.grad = _spectrum_matrix(OUT, IN, gen, decay=0.75, top=0.02)
        if kind == "linear":
            self.proj = nn.Linear(IN, OUT, bias=False)
            self.proj.weight.data.copy_(w)
        else:
            self.proj = Conv1D(OUT, IN)
            self.proj.weight.data.copy_(w.T)
            self.proj.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.proj(x) * self.grad.T).sum()


def _config(direction: str, scale: str) -> LoraConfig:
    return LoraConfig(r=R, lora_alpha=8, target_modules=["proj"], init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig(direction=direction, scale=scale, stable_gamma=4))


def _layer_state(pm: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layer = pm.base_model.model.proj
    w = layer.get_base_layer().weight.detach()
    w = w.T if layer.fan_in_fan_out else w
    return layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone(), w.clone()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("direction,scale", list(itertools.product(DIRECTIONS, SCALES)))
def test_adapters_and_offsets_equal_peft_lora_ga_init(kind: str, direction: str, scale: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = OneLayer(kind, seed=3)
    w0 = (model.proj.weight.detach().T if kind == "conv1d" else model.proj.weight.detach()).clone()
    eye = torch.eye(IN)
    cfg = _config(direction, scale)
    preprocess_loraga(model, cfg, lambda: model(eye).backward())
    attached = model.proj._peft_loraga_grad
    expected = attached.T if kind == "conv1d" else attached
    torch.testing.assert_close(expected, model.grad, rtol=1e-5, atol=1e-8)  # the constructed gradient, captured

    twin = copy.deepcopy(model)  # not prepared: get_peft_model runs peft's own lora_ga_init on the same tensor
    # "random" draws its index set with torch.randperm: give both sides the same one
    perm = torch.randperm(2 * R, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **k: perm.clone() if n == 2 * R else torch.arange(n))
    a_o, b_o, w_o = _layer_state(get_peft_model(model, cfg))
    a_p, b_p, w_p = _layer_state(get_peft_model(twin, _config(direction, scale)))

    # each A row and B column is the same singular vector (times the same scale) up to its sign
    sign_a = torch.sign((a_o * a_p).sum(1, keepdim=True))
    sign_b = torch.sign((b_o * b_p).sum(0, keepdim=True))
    torch.testing.assert_close(a_o, a_p * sign_a, rtol=0, atol=1e-4 * a_p.abs().max().item())
    torch.testing.assert_close(b_o, b_p * sign_b, rtol=0, atol=1e-4 * b_p.abs().max().item())
    assert b_o.norm() > 0 and a_o.norm() > 0
    # the offsets: each side W - scaling B A with its own factors; with the signs aligned they are the same offset
    scaling = cfg.lora_alpha / R
    torch.testing.assert_close(w_o, w0 - scaling * b_o @ a_o, rtol=0, atol=1e-6)
    torch.testing.assert_close(w_p, w0 - scaling * b_p @ a_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(w0 - w_o, scaling * (b_p * sign_b) @ (a_p * sign_a), rtol=0,
                               atol=1e-4 * (w0 - w_p).abs().max().item())


def test_stable_scale_reads_the_dimension_the_installed_peft_reads() -> None:
    """peft >= 0.22 scales B by ``out_features ** 0.25``; 0.19-0.21 by ``weight.shape[0] ** 0.25`` (in_features
    for a ``Conv1D``). The norm ratio between a Conv1D and a Linear with the same gradient and weight tells which
    one ours used; it must be the installed peft's."""
    import peft
    from packaging.version import Version

    norms = {}
    for kind in ("linear", "conv1d"):
        model = OneLayer(kind, seed=5)
        cfg = _config("ArB2r", "stable")
        preprocess_loraga(model, cfg, lambda: model(torch.eye(IN)).backward())
        norms[kind] = _layer_state(get_peft_model(model, cfg))[1].norm()
    ratio = float(norms["conv1d"] / norms["linear"])
    expected = 1.0 if Version(peft.__version__).release >= (0, 22) else (IN / OUT) ** 0.25
    assert ratio == pytest.approx(expected, rel=1e-4)
