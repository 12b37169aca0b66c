"""What low-memory mode attaches as ``_peft_loraga_grad``: a placeholder that holds no gradient.

Low-memory mode never forms the mean gradient, only its top singular factors. The ``get_peft_model`` hand-off
recognises the placeholder by identity; anything else that reads it gets an error explaining why, never a wrong
value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["LowMemGradient", "LowMemGradientUnavailable"]


class LowMemGradientUnavailable(RuntimeError):
    """Raised when code reads the gradient of a layer prepared in low-memory mode (it was never formed)."""


class LowMemGradient:
    """What low-memory mode attaches as ``module._peft_loraga_grad``: no gradient, only a marker that
    loraga_fast's ``get_peft_model`` hand-off recognises by identity. Any other use (peft's own
    ``lora_ga_init`` when the hand-off is bypassed, a user reading the tensor, a torch function) raises
    :class:`LowMemGradientUnavailable` explaining why, instead of returning a wrong value."""

    __slots__ = ("name", "weight_shape")

    def __init__(self, name: str, weight_shape: tuple[int, ...]):
        self.name = name
        self.weight_shape = weight_shape

    def _fail(self, what: str) -> NoReturn:
        raise LowMemGradientUnavailable(
            f"Layer '{self.name}' was prepared by loraga_fast.preprocess_loraga(mode='lowmem'), which never forms the "
            f"mean gradient (only its top singular factors), so `_peft_loraga_grad` holds no tensor ({what}). "
            "Initialize it with peft.get_peft_model(model, lora_config) in this process, with the LoraConfig (rank) it "
            "was prepared for; to get the gradient itself, run preprocess_loraga(mode='exact')."
        )

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # keep Python's protocols (copy, pickle, hasattr on dunders) working
            raise AttributeError(attr)
        self._fail(f"accessed .{attr}")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        for arg in (*args, *(kwargs or {}).values()):
            if isinstance(arg, LowMemGradient):
                arg._fail(f"passed to {getattr(func, '__name__', func)}")
        return NotImplemented

    def __getitem__(self, index: Any) -> NoReturn:
        self._fail("indexed")

    def __array__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._fail("converted to an array")

    def __float__(self) -> NoReturn:
        self._fail("converted to a number")

    def __repr__(self) -> str:
        return f"<loraga_fast low-memory placeholder for '{self.name}' {tuple(self.weight_shape)}: no gradient is held>"
