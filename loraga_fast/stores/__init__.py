"""Stores: where captured gradients go, one store per mode, behind one interface (:mod:`~loraga_fast.stores.base`).

* :mod:`~loraga_fast.stores.exact` -- exact mode: fp32 accumulators grouped by shape;
* :mod:`~loraga_fast.stores.sharded` -- exact mode on FSDP models: row shards filled by reduce-scatter;
* :mod:`~loraga_fast.stores.sketch` -- low-memory mode: skinny sketches over several passes;
* :mod:`~loraga_fast.stores.factors` -- what every store turns into for the hand-off: prepared shape groups and
  their factors (the batched randomized SVD of exact mode runs there);
* :mod:`~loraga_fast.stores.files` and :mod:`~loraga_fast.stores.cached` -- cache files (safetensors) and reading
  them back;
* :mod:`~loraga_fast.stores.placeholder` -- what low-memory mode attaches instead of a gradient.

Depends on layers, distributed and ops; never on peft.
"""
