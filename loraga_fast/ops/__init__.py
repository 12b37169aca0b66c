"""Numerical ops: one file per op, each with its plain-torch reference beside it (``*_ref``)."""

from .accumulate import accumulate, accumulate_ref, accumulate_triton

__all__ = ["accumulate", "accumulate_ref", "accumulate_triton"]
