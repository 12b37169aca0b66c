"""Routing target layers through the capture op for the duration of a call.

While a :class:`CaptureSession` is open, every target ``nn.Linear`` / transformers ``Conv1D`` computes its
output through :class:`_CaptureLinear`, an autograd function whose backward receives the output gradient ``G``
and the saved input ``X``, hands ``G`` and ``X`` to the layer's :class:`Slot` (exact mode adds ``G^T X`` into an fp32 accumulator with
:func:`loraga_fast.ops.accumulate`)
and returns the input gradient only when the input needs one. Weights never require grad, so autograd never
allocates a weight gradient. A zero-size "anchor" tensor that requires grad is passed to every capture op so
that the outputs (and hence the loss) require grad even when nothing else in the model does.

Quantized targets (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, :mod:`loraga_fast.layers.quantized`) keep their own
forward, which computes the output and the input gradient from the quantized weight; :class:`_CaptureOutput`
wraps its output (identity forward) and adds ``G^T x_c`` in backward, ``x_c`` being the input as the quantized
matmul consumed it.

On exit, whatever happened inside, the model is put back as it was: original forwards, ``requires_grad`` flags
and per-module train/eval modes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import UsageError
from .kinds import conv1d_class, is_supported_layer, weight_layout_transposed
from .quantized import consumed_input, is_bnb_quantized

__all__ = ["CaptureSession", "Slot", "SlotMap", "check_capturable"]

_MISSING = object()


class Slot(ABC):
    """Where the capture op puts one layer's backward passes: :meth:`add` takes ``G`` and ``X`` and :attr:`count`
    is incremented once per pass. The stores (:mod:`loraga_fast.stores`) implement it, one slot per layer."""

    def __init__(self, name: str):
        self.name = name
        self.count = 0

    @abstractmethod
    def add(self, grad_out: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
        """Take this backward pass's output gradient ``G`` and input ``X`` (``transposed``: ``Conv1D`` layout)."""


class SlotMap(Protocol):
    """What a capture session writes into: the slot of each target, by name (every store is one)."""

    def __getitem__(self, name: str) -> Slot: ...


def _record(ctx: Any, grad_out: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
    """One backward pass through a target: ``G^T X`` into its slot, its count, the caller's callback."""
    slot: Slot = ctx.slot
    slot.add(grad_out, x, transposed)
    slot.count += 1
    if ctx.on_backward is not None:
        ctx.on_backward(slot)


class _CaptureLinear(torch.autograd.Function):
    """``y = x W^T + b`` (or ``x W + b`` for Conv1D) whose backward accumulates ``G^T X`` instead of ``dW``.

    Under autocast the layer's matmul consumes ``x`` and ``W`` cast to the autocast dtype; the op does that cast
    itself and saves the cast ``x``, so backward hands the accumulate kernel the very operands autograd's own
    weight gradient would use (two 16-bit tensors: the tensor-core path, no fp32 copy), and holds ``x`` in 16 bits
    between forward and backward as autograd would.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, anchor: torch.Tensor,
                slot: Slot, transposed: bool, on_backward: Callable[[Slot], None] | None) -> torch.Tensor:
        ctx.input_dtype = x.dtype
        device_type = x.device.type
        w = weight
        if torch.is_autocast_enabled(device_type) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(device_type)
            x, w = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            if transposed:  # transformers Conv1D: weight (in, out)
                out_shape = x.shape[:-1] + (w.shape[1],)
                x2d = x.reshape(-1, x.shape[-1])
                y = torch.addmm(bias, x2d, w) if bias is not None else x2d @ w
                y = y.view(out_shape)
            else:
                y = nn.functional.linear(x, w, bias)
        # the layer's own weight is saved (re-cast in backward), never a 16-bit copy held from forward to backward
        ctx.save_for_backward(x, weight)
        ctx.slot = slot
        ctx.transposed = transposed
        ctx.on_backward = on_backward
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None, None, None]:
        x, weight = ctx.saved_tensors
        _record(ctx, grad_out, x, ctx.transposed)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight.to(grad_out.dtype)
            grad_x = grad_out.matmul(w.t() if ctx.transposed else w).to(ctx.input_dtype)
        return grad_x, None, None, None, None, None, None


class _CaptureOutput(torch.autograd.Function):
    """Identity on a quantized layer's output ``y``; backward adds ``G^T x_c`` into the layer's slot and passes
    ``G`` on to the layer's own graph (which computes the input gradient from the quantized weight)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor, slot: Slot,
                on_backward: Callable[[Slot], None] | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.slot = slot
        ctx.on_backward = on_backward
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (x,) = ctx.saved_tensors
        _record(ctx, grad_out, x, False)
        return grad_out, None, None, None, None


class CaptureSession:
    """Context manager that routes ``targets`` through the capture op and restores the model on exit.

    Args:
        model: the model whose parameters are frozen (``requires_grad=False``) and which is put in train mode
            while the session is open, like peft's ``preprocess_loraga`` does.
        targets: ``(name, module)`` pairs; each module must be a supported layer with the standard forward.
        store: where the captured passes go: the slot of each target name (a store).
        on_backward: optional callback, called with the layer's slot after each backward pass through a target.
    """

    def __init__(self, model: nn.Module, targets: Sequence[tuple[str, nn.Module]], store: SlotMap,
                 on_backward: Callable[[Slot], None] | None = None):
        check_capturable(targets)
        self.model = model
        self.targets = list(targets)
        self.store = store
        self.on_backward = on_backward
        self._undo: list[Callable[[], None]] = []
        # zero-size tensors that require grad, so capture outputs (and the loss) require grad even when no
        # parameter does; one per device, so backward never hops to another device's autograd thread
        self._anchors: dict[torch.device, torch.Tensor] = {}

    def __enter__(self) -> CaptureSession:
        try:
            self._freeze()
            for name, module in self.targets:
                self._route(module, self.store[name])
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _freeze(self) -> None:
        modes = [(m, m.training) for m in self.model.modules()]
        flags = [(p, p.requires_grad) for p in self.model.parameters()]

        def undo() -> None:
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode

        self._undo.append(undo)
        self.model.train()
        for p, _ in flags:
            p.requires_grad_(False)

    def _route(self, module: nn.Module, slot: Slot) -> None:
        transposed = weight_layout_transposed(module)
        device = module.weight.device
        if device not in self._anchors:
            self._anchors[device] = torch.empty(0, device=device, requires_grad=True)
        anchor = self._anchors[device]
        on_backward = self.on_backward

        # accelerate's hooks replace `forward` on the instance and call `module._old_forward` at call time:
        # route that one so the hook's pre/post-forward (device placement, offload) keeps running.
        attr = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"
        previous = module.__dict__.get(attr, _MISSING)

        if is_bnb_quantized(module):  # its own forward runs; the capture wraps its output
            own = previous if previous is not _MISSING else type(module).forward.__get__(module)

            def captured_forward(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
                (x,) = (*args, *kwargs.values())
                y = own(x)  # sets the layer's compute dtype on its first call, so read the consumed input after
                return _CaptureOutput.apply(y, consumed_input(module, x).detach(), anchor, slot, on_backward)
        else:
            def captured_forward(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
                (x,) = (*args, *kwargs.values())  # nn.Linear.forward(input) / Conv1D.forward(x)
                return _CaptureLinear.apply(x, module.weight, module.bias, anchor, slot, transposed, on_backward)

        object.__setattr__(module, attr, captured_forward)

        def undo() -> None:
            if previous is _MISSING:
                module.__dict__.pop(attr, None)
            else:
                object.__setattr__(module, attr, previous)

        self._undo.append(undo)

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def check_capturable(targets: Sequence[tuple[str, nn.Module]]) -> None:
    """Raise ``ValueError`` naming the first target the capture op cannot stand in for.

    ``G^T X`` equals the weight gradient only for the standard ``nn.Linear`` / ``Conv1D`` forward; a subclass
    with its own forward, or an instance whose forward was replaced by something other than accelerate's
    hooks, would be silently changed by the routing.
    """
    conv1d = conv1d_class()
    standard = {nn.Linear.forward} | ({conv1d.forward} if conv1d is not None else set())
    for name, module in targets:
        if not is_supported_layer(module):
            raise UsageError(f"Layer '{name}' ({type(module).__name__}) is not an nn.Linear or Conv1D layer.")
        quantized = is_bnb_quantized(module)  # its own forward runs (wrapped), on a quantized weight
        if not quantized and type(module).forward not in standard:
            raise UsageError(
                f"Layer '{name}' is a {type(module).__qualname__} whose forward overrides the standard linear forward; "
                "loraga_fast captures G^T X, which is the weight gradient only for y = x W^T + b. Exclude it from "
                "target_modules (exclude_modules=[...]) or use peft.preprocess_loraga for this model."
            )
        if "forward" in module.__dict__ and not hasattr(module, "_hf_hook"):
            raise UsageError(
                f"Layer '{name}' has its forward replaced on the instance ({module.__dict__['forward']!r}); loraga_fast "
                "would bypass that replacement. Remove it before calling preprocess_loraga."
            )
        if not quantized and not module.weight.is_floating_point():
            raise UsageError(f"Layer '{name}' has a {module.weight.dtype} weight; LoRA-GA needs a floating-point weight.")
