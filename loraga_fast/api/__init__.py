"""Entry points: what users call (re-exported by :mod:`loraga_fast`).

* :mod:`~loraga_fast.api.preprocess` -- the drop-in :func:`~loraga_fast.api.preprocess.preprocess_loraga` and
  :func:`~loraga_fast.api.preprocess.check_preprocess`;
* :mod:`~loraga_fast.api.original` -- the original LoRA-GA repository's utilities;
* :mod:`~loraga_fast.api.steps` -- one-line ``train_step`` callbacks from a DataLoader or a Trainer;
* :mod:`~loraga_fast.api.runs` and :mod:`~loraga_fast.api.names` -- the run folder ``loraga-fast init`` writes, and
  :func:`~loraga_fast.api.runs.load_initialized`;
* :mod:`~loraga_fast.api.quantize` -- loading a model quantized with bitsandbytes.
"""
