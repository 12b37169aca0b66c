"""cache_file: safetensors round trip, skipping train_step, and mismatches that attach nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraga_fast import preprocess_loraga
from tests._helpers import (
    attached,
    lora_ga_config,
    tiny_llama,
    token_batches,
    train_step_for,
)


def _never() -> None:
    raise AssertionError("train_step must not run when the cache is used")


def test_cache_written_then_reused_without_train_step(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "grads.safetensors"  # parent folder is created
    first = tiny_llama()
    preprocess_loraga(first, lora_ga_config(), train_step_for(first, token_batches()), cache_file=str(path))
    with safe_open(str(path), framework="pt") as f:  # a real safetensors file, peft's key names
        assert "model.layers.0.self_attn.q_proj._peft_loraga_grad" in set(f.keys())
    second = tiny_llama()
    preprocess_loraga(second, lora_ga_config(), _never, cache_file=path)
    a, b = attached(first), attached(second)
    assert a.keys() == b.keys() and len(a) == 14
    for n in a:
        assert torch.equal(a[n], b[n]) and b[n].dtype == torch.float32
    assert not list(tmp_path.glob("sub/*.tmp-*"))


def test_empty_cache_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "grads.safetensors"
    path.touch()
    model = tiny_llama()
    preprocess_loraga(model, lora_ga_config(), train_step_for(model, token_batches(n=1)), cache_file=path)
    assert len(attached(model)) == 14 and path.stat().st_size > 0


def test_cache_for_other_targets_raises_and_attaches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "grads.safetensors"
    model = tiny_llama()
    preprocess_loraga(model, lora_ga_config(["q_proj"]), train_step_for(model, token_batches(n=1)), cache_file=path)
    other = tiny_llama()
    with pytest.raises(ValueError, match="no entry for target module 'model.layers.0.self_attn.k_proj'"):
        preprocess_loraga(other, lora_ga_config(["q_proj", "k_proj"]), _never, cache_file=path)
    assert not attached(other)
    with pytest.raises(ValueError, match="holds module 'model.layers.1.self_attn.q_proj'"):
        fewer = lora_ga_config(["q_proj"])
        fewer.exclude_modules = ["model.layers.1.self_attn.q_proj"]
        preprocess_loraga(other, fewer, _never, cache_file=path)
    assert not attached(other)


def test_cache_with_other_shapes_raises(tmp_path: Path) -> None:
    path = tmp_path / "grads.safetensors"
    model = tiny_llama()
    preprocess_loraga(model, lora_ga_config(), train_step_for(model, token_batches(n=1)), cache_file=path)
    wider = tiny_llama(hidden=64)
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.q_proj' has a cached gradient of shape \(32, 32\)"):
        preprocess_loraga(wider, lora_ga_config(), _never, cache_file=path)
    assert not attached(wider)


def test_pickle_cache_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "peft_cache.pt"
    torch.save({"model.layers.0.self_attn.q_proj._peft_loraga_grad": torch.zeros(32, 32)}, path)
    model = tiny_llama()
    with pytest.raises(ValueError, match="not a safetensors file"):
        preprocess_loraga(model, lora_ga_config(), _never, cache_file=path)
    assert not attached(model)


def test_cache_path_that_is_a_folder_is_refused_before_train_step(tmp_path: Path) -> None:
    from loraga_fast.api.preprocess import check_preprocess

    model = tiny_llama()
    with pytest.raises(ValueError, match=f"cache_file '{tmp_path}' is a folder: give a file path"):
        check_preprocess(model, lora_ga_config(), tmp_path)
    with pytest.raises(ValueError, match="is a folder"):
        preprocess_loraga(model, lora_ga_config(), _never, cache_file=tmp_path)
    assert not attached(model)
    check_preprocess(model, lora_ga_config(), tmp_path / "grads.safetensors")  # a file path: every check passes


@pytest.mark.parametrize("mask", [0o022, 0o077])
@pytest.mark.parametrize("mode", ["exact", "lowmem"])
def test_cache_files_get_the_users_umask(mask: int, mode: str, tmp_path: Path) -> None:
    """safetensors writes 0o600 whatever the umask: a cache shared with a group was unreadable to it."""
    import os
    import stat

    path = tmp_path / "grads.safetensors"
    model = tiny_llama()
    old = os.umask(mask)
    try:
        preprocess_loraga(model, lora_ga_config(), train_step_for(model, token_batches()), cache_file=str(path),
                          mode=mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
