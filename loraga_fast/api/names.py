"""The names of what loraga_fast writes into a folder: the original's initial-adapter sub-folder and the
``loraga-fast init`` run folder's files (:mod:`loraga_fast.api.runs`)."""

from __future__ import annotations

__all__ = ["ADAPTER_WEIGHTS", "INIT_CHECKPOINT", "MODEL_FOLDER", "OFFSETS_FILE", "RUN_ENTRIES", "RUN_ID_KEY",
           "SUMMARY_FILE"]

INIT_CHECKPOINT = "init_lora_checkpoint"  # the original's sub-folder for the initial adapter
OFFSETS_FILE = "base_offset.safetensors"  # a run folder's offset base weights
SUMMARY_FILE = "loraga_fast_init.json"  # a run folder's record of the run
MODEL_FOLDER = "model"  # a run folder's offset base as a transformers model folder (init --export-model)
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name
RUN_ID_KEY = "loraga_fast.run_id"  # safetensors metadata key
# what a run folder may hold, before and after save_loraga_model_final (peft also writes a README.md)
RUN_ENTRIES = frozenset({INIT_CHECKPOINT, OFFSETS_FILE, SUMMARY_FILE, MODEL_FOLDER, ADAPTER_WEIGHTS,
                         "adapter_config.json", "README.md"})
