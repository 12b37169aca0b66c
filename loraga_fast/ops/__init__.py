"""Numerical ops: one file per op, each with its plain-torch reference beside it (``*_ref``)."""

from .accumulate import accumulate, accumulate_ref

__all__ = ["accumulate", "accumulate_ref"]
