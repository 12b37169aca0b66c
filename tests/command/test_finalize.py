"""LoRA-GA wherever people fine-tune: ``loraga-fast init --export-model`` writes the offset base as a model folder
that plain transformers loads; an adapter trained from it by code that never imports loraga_fast (plain transformers
+ peft, as LLaMA-Factory, axolotl, ms-swift and unsloth do) is turned by ``loraga-fast finalize`` into a plain LoRA
adapter (or a merged model) for the untouched base, with the trained model's outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraga_fast.api.names import RUN_ID_KEY
from loraga_fast.command.main import main
from tests.command._common import SMALL, one_line_error

VOCAB = 256  # the byte tokenizer's
TARGETS = "q_proj,v_proj,up_proj"

# plain transformers + peft, as a framework trains: load RUN/model, the initial adapter (trainable), 2 AdamW steps, save
TRAIN = r"""
import json, sys, torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

run, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(run + "/model")
model = PeftModel.from_pretrained(model, run + "/init_lora_checkpoint", is_trainable=True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
g = torch.Generator().manual_seed(1)
for _ in range(2):
    x = torch.randint(0, 256, (2, 16), generator=g)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
model.save_pretrained(out)
model.eval()
x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    save_file({"logits": model(input_ids=x).logits.contiguous()}, out + "/../trained_logits.safetensors")
print(json.dumps({"imported": sorted(m for m in sys.modules if m.split(".")[0] == "loraga_fast")}))
"""


def _byte_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _save_base(folder: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


def _init(base: Path, out: Path, *extra: str) -> None:
    from loraga_fast.api import export

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "SHARD_BYTES", 40_000)  # several shards and an index, as for a 7B model
        assert main(["init", "--model", str(base), "--targets", TARGETS, "--out", str(out), "--export-model",
                     *SMALL, *extra]) == 0


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The untouched base (a model folder with a tokenizer), its --export-model run, an adapter trained from the run
    in a fresh process that never imports loraga_fast, and a second run of rank 2 (another run's adapter)."""
    tmp = tmp_path_factory.mktemp("finalize")
    base = _save_base(tmp / "base", seed=0)
    run, other = tmp / "run", tmp / "other"
    _init(base, run)
    _init(base, other, "--rank", "2")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run([sys.executable, "-c", TRAIN, str(run), str(tmp / "trained" / "adapter")], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"imported": []}  # 'loraga_fast' not in sys.modules
    return {"tmp": tmp, "base": base, "run": run, "other": other, "trained": tmp / "trained" / "adapter",
            "trained_logits": tmp / "trained" / "trained_logits.safetensors"}


def _x() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_x()).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _plain(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    return model


def test_the_exported_model_loads_with_plain_transformers_and_the_initial_adapter_gives_the_original(
        work: dict[str, Path]) -> None:
    from peft import PeftModel
    from safetensors import safe_open

    run, model_dir = work["run"], work["run"] / "model"
    run_id = json.loads((run / "loraga_fast_init.json").read_text())["run_id"]
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    for shard in shards:  # every shard within the limit (none of these tensors is larger) and stamped
        with safe_open(str(model_dir / shard), framework="pt") as f:
            assert f.metadata()[RUN_ID_KEY] == run_id
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == shard)
        assert (model_dir / shard).stat().st_size < 40_000 + 4096
    assert json.loads((model_dir / "config.json").read_text())["loraga_fast_run_id"] == run_id
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "generation_config.json").is_file()

    original = _logits(_plain(work["base"]))
    offset = _plain(model_dir)
    assert _rel(_logits(offset), original) > 1e-3  # the base really is offset
    assert _rel(_logits(PeftModel.from_pretrained(offset, run / "init_lora_checkpoint")), original) < 1e-5

    # still a run folder like any other: load_initialized checks the model's ids too; --overwrite may replace it
    from loraga_fast import UsageError, load_initialized
    from loraga_fast.api.runs import check_out, run_ids

    assert set(run_ids(run).values()) == {run_id} and len(run_ids(run)) == 3 + 1 + len(shards)
    assert _rel(_logits(load_initialized(_plain(work["base"]), run)), original) < 1e-5
    check_out(run, overwrite=True)
    with pytest.raises(UsageError, match=f"already holds the files of run {run_id}: pass --overwrite"):
        check_out(run, overwrite=False)


def test_an_adapter_trained_elsewhere_is_finalized_for_the_untouched_base(work: dict[str, Path]) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    final = work["tmp"] / "final"
    assert main(["finalize", str(work["run"]), str(work["trained"]), "--out", str(final)]) == 0
    trained = load_file(str(work["trained_logits"]))["logits"]
    assert _rel(trained, _logits(_plain(work["base"]))) > 1e-3  # training changed the model
    assert _rel(_logits(PeftModel.from_pretrained(_plain(work["base"]), final)), trained) < 1e-5
    config = json.loads((final / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    assert config["base_model_name_or_path"] == str(work["base"])
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in work["tmp"].iterdir() if ".final." in p.name) == []  # no temporary folder left
    umask = os.umask(0)
    os.umask(umask)
    assert [oct(p.stat().st_mode & 0o777) for p in (final, *final.iterdir())] == [
        oct(0o777 & ~umask)] + [oct(0o666 & ~umask)] * 2

    # the very tensors peft's own conversion writes (save_pretrained with path_initial_model_for_weight_conversion)
    init_copy = work["tmp"] / "peft_conversion" / "init_lora_checkpoint"
    shutil.copytree(work["run"] / "init_lora_checkpoint", init_copy)
    model = PeftModel.from_pretrained(_plain(work["run"] / "model"), work["trained"])
    model.save_pretrained(init_copy.parent / "converted", path_initial_model_for_weight_conversion=str(init_copy))
    theirs = load_file(str(init_copy.parent / "converted" / "adapter_model.safetensors"))
    ours = load_file(str(final / "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(ours) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_merge_writes_the_untouched_base_with_the_trained_adapter_merged(work: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    merged = work["tmp"] / "merged"
    assert main(["finalize", str(work["run"]), str(work["trained"]), "--out", str(merged), "--merge"]) == 0
    trained = load_file(str(work["trained_logits"]))["logits"]
    assert _rel(_logits(_plain(merged)), trained) < 1e-5
    assert (merged / "tokenizer.json").is_file() and not (merged / ".adapter").exists()


def _refused(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``loraga-fast finalize ARGS --out OUT``: the one error line, after checking exit code 2 and that nothing
    was written (no OUT, no temporary folder beside it)."""
    before = sorted(p.name for p in out.parent.iterdir())
    capsys.readouterr()
    code = main(["finalize", *args, "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1].strip() for line in err.splitlines()]
    lines = [line for line in lines if line and not line.startswith("Loading weights")]  # transformers' progress bar
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in out.parent.iterdir()) == before
    return lines[0].removeprefix("loraga-fast: error: ")


def test_bad_inputs_are_refused_in_one_line_and_nothing_is_written(work: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    run, other, trained, out = work["run"], work["other"], work["trained"], tmp_path / "final"
    run_id = json.loads((run / "loraga_fast_init.json").read_text())["run_id"]
    other_id = json.loads((other / "loraga_fast_init.json").read_text())["run_id"]
    head = f"the trained adapter {{}} is not from run {run} ({run_id})"

    # another run's adapter, with its run id (a framework that kept the file) and without it (peft re-saved it)
    line = _refused([str(run), str(other / "init_lora_checkpoint")], out, capsys)
    assert line == (head.format(other / "init_lora_checkpoint") + f": its weights carry run id {other_id} (another "
                    "run's adapter): finalize it with its own run folder")
    stripped = tmp_path / "stripped"
    shutil.copytree(other / "init_lora_checkpoint", stripped)
    save_file(load_file(str(stripped / "adapter_model.safetensors")), str(stripped / "adapter_model.safetensors"))
    line = _refused([str(run), str(stripped)], out, capsys)
    assert line == head.format(stripped) + ": layer 'model.layers.0.mlp.up_proj' has rank 2, the run's 4"

    # a model folder instead of an adapter: the exported base, and a merged model
    for folder in (run / "model", work["base"]):
        assert _refused([str(run), str(folder)], out, capsys) == (
            f"the trained adapter {folder} is a model folder (config.json and model weights), not a LoRA adapter: a "
            "merged or fully fine-tuned model cannot be converted; give the folder holding adapter_config.json and "
            "adapter_model.safetensors (peft's save_pretrained)")
    # a missing folder; a trainer's output folder whose adapters are in checkpoint sub-folders
    assert _refused([str(run), str(tmp_path / "nope")], out, capsys).startswith(
        f"the trained adapter {tmp_path / 'nope'} not found: give the folder holding adapter_config.json")
    assert _refused([str(run), str(trained.parent)], out, capsys) == (
        f"the trained adapter {trained.parent} holds no adapter_config.json, but {trained} does: pass that "
        "folder (a trainer's checkpoint)")
    # RUN is not a run folder: a model folder, the adapter (RUN and TRAINED_ADAPTER swapped), a missing folder
    assert _refused([str(work["base"]), str(trained)], out, capsys) == (
        f"{work['base']} is not a loraga-fast run folder (no loraga_fast_init.json, no init_lora_checkpoint/): give the "
        "--out folder of loraga-fast init")
    assert _refused([str(trained), str(run)], out, capsys) == (
        f"{trained} is not a loraga-fast run folder (no loraga_fast_init.json, no init_lora_checkpoint/) (it holds an "
        "adapter: is the order RUN TRAINED_ADAPTER swapped?): give the --out folder of loraga-fast init")
    assert _refused([str(tmp_path / "no_run"), str(trained)], out, capsys) == (
        f"run folder {tmp_path / 'no_run'} not found: give the --out folder of loraga-fast init")
    # --out that holds files; --base without --merge; --merge on another base model
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _refused([str(run), str(trained)], out, capsys) == (
        f"--out {out} already exists and is not empty: choose a new --out (finalize never replaces files)")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    shutil.rmtree(out)
    assert _refused([str(run), str(trained), "--base", str(work["base"])], out, capsys).startswith(
        f"--base {work['base']} applies with --merge only")
    wrong = _save_base(tmp_path / "wrong_base", seed=1)
    assert _refused([str(run), str(trained), "--merge", "--base", str(wrong)], out, capsys).startswith(
        f"--base {wrong} is not the model {run} was initialized from: its 'model.layers.0.mlp.up_proj.weight' minus "
        "the initial adapter differs from the run's offset weight by ")


def test_a_finalized_adapter_is_not_finalized_twice(work: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "first"
    assert main(["finalize", str(work["run"]), str(work["trained"]), "--out", str(first)]) == 0
    assert _refused([str(work["run"]), str(first)], tmp_path / "again", capsys) == (
        f"the trained adapter {first} is already a finalized adapter for the untouched base (written by loraga-fast "
        "finalize): use it as it is")


def test_finalize_adapter_takes_a_save_loraga_model_init_folder(work: dict[str, Path], tmp_path: Path) -> None:
    """From Python: save_loraga_model_init's folder (the initial adapter, no run record) is enough."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from loraga_fast import finalize_adapter

    save_dir = tmp_path / "save_dir"
    shutil.copytree(work["run"] / "init_lora_checkpoint", save_dir / "init_lora_checkpoint")
    final = finalize_adapter(save_dir, work["trained"], tmp_path / "final")
    trained = load_file(str(work["trained_logits"]))["logits"]
    assert _rel(_logits(PeftModel.from_pretrained(_plain(work["base"]), final)), trained) < 1e-5
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_a_run_whose_quantized_base_was_left_untouched_keeps_the_trained_adapter(work: dict[str, Path],
                                                                                 tmp_path: Path) -> None:
    """--quantize runs never offset the base: the trained adapter is already the one for it, copied as it is."""
    from safetensors.torch import load_file

    run = tmp_path / "quantized_run"
    shutil.copytree(work["run"], run)
    summary = json.loads((run / "loraga_fast_init.json").read_text())
    (run / "loraga_fast_init.json").write_text(json.dumps({**summary, "base_untouched": True}))
    final = tmp_path / "final"
    assert main(["finalize", str(run), str(work["trained"]), "--out", str(final)]) == 0
    ours, trained = (load_file(str(p / "adapter_model.safetensors")) for p in (final, work["trained"]))
    assert sorted(ours) == sorted(trained) and all(torch.equal(ours[k], trained[k]) for k in ours)
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4


def test_export_model_with_quantize_is_refused_before_loading(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    line, err = one_line_error(["--quantize", "nf4", "--export-model"], tmp_path, capsys)
    assert line == ("loraga-fast: error: --export-model with --quantize nf4: a quantized base is left untouched, so "
                    "there is no offset base to export; train RUN/init_lora_checkpoint on --model itself, loaded "
                    "quantized the same way (docs/frameworks.md), or drop --quantize")
    assert "loading:" not in err


def test_ctrl_c_while_exporting_leaves_no_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from loraga_fast.api import export

    real = export.save_offset_model

    def interrupted(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_offset_model", interrupted)
    out = tmp_path / "run"
    assert main(["init", "--out", str(out), "--export-model", *SMALL]) == 130
    assert list(tmp_path.iterdir()) == []
