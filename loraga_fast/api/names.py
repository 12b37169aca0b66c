"""The names of what loraga_fast writes into a folder: the original's initial-adapter sub-folder and the
``loraga-fast init`` run folder's files (:mod:`loraga_fast.api.runs`)."""

from __future__ import annotations

__all__ = ["ADAPTER_WEIGHTS", "INIT_CHECKPOINT", "OFFSETS_FILE", "RUN_ID_KEY", "RUN_ENTRIES", "SUMMARY_FILE"]

INIT_CHECKPOINT = "init_lora_checkpoint"  # the original's sub-folder for the initial adapter
OFFSETS_FILE = "base_offset.safetensors"  # a run folder's offset base weights
SUMMARY_FILE = "loraga_fast_init.json"  # a run folder's record of the run
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name
RUN_ID_KEY = "loraga_fast.run_id"  # safetensors metadata key
# what a run folder may hold, before and after save_loraga_model_final (peft also writes a README.md)
RUN_ENTRIES = frozenset({INIT_CHECKPOINT, OFFSETS_FILE, SUMMARY_FILE, ADAPTER_WEIGHTS, "adapter_config.json",
                         "README.md"})
