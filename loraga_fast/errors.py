"""The library's error for mistakes the caller can fix (configuration, inputs, data, caches)."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A mistake in what the caller passed (a bad target or rank, a cache for another model, a ``train_step``
    that runs different batches per pass, ...): the message names the layer or argument and the fix.

    A ``ValueError``, so code written against peft's ``preprocess_loraga`` (which raises ``ValueError``) catches
    it unchanged; the ``loraga-fast`` command prints it as one line, and keeps the traceback of any other error.
    """
