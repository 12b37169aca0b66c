"""Integrations with training libraries: thin modules over :mod:`loraga_fast.api` (they never re-implement
estimation, and nothing in the library below imports them).

* :mod:`~loraga_fast.integrations.trl` -- :func:`~loraga_fast.integrations.trl.init_lora_ga`: LoRA-GA for a TRL
  trainer (``SFTTrainer(..., peft_config=...)`` and the other TRL trainers that take ``peft_config``) or a
  transformers ``Trainer`` on a peft model, in one line, with one Trainer per process.

Importing this package imports neither TRL nor transformers.
"""
