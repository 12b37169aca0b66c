"""DeepSpeed ZeRO-3 on 2 gloo processes (DeepSpeed's CPU accelerator), every weight really partitioned
(``stage3_param_persistence_threshold: 0``): the gradients, adapters and offsets equal a single-process run on the
union of the batches; weights stay partitioned; each process holds half the accumulators; the cache is written
once and read back; the paths users take (an engine, a model no engine wraps yet, the engine rebuilt for training)
and the mistakes they make (uneven batches, a cache of another model, NVMe offload) each behave. Partitions offloaded
to CPU and ZeRO++ hierarchical partitioning (a secondary copy of each partition that forward gathers from) give the
same adapters with the offset in place; quantized partitions, a partition group smaller than the run and a train_step
that calls an engine without optimizer are refused.

Trainer and accelerate: ``test_zero3_hf.py``."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM  # imported before any zero.Init: see _partitioned_llama

from loraga_fast import UsageError, preprocess_loraga
from tests._helpers import VOCAB, attached, lora_ga_config, rel_err, spawn, subspace_cos, token_batches

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed ZeRO-3 tests need deepspeed (the test extra)")

CONFIG = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
TARGETS = ["q_proj", "v_proj", "down_proj"]
NUM_BATCHES = 4


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


def _partitioned_llama(config: dict[str, Any] = CONFIG, **init: Any) -> torch.nn.Module:
    # the model classes must be imported outside zero.Init: a class created inside it (transformers' modeling
    # module imported there) loses what other packages patch into its __init__ when DeepSpeed restores it on exit
    with deepspeed.zero.Init(config_dict_or_path=config, **init):
        return _llama()


def _init(rank: int, world: int, init_file: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # DeepSpeed's optional shared-memory collectives: a 2-minute compile. (Not `import deepspeed.comm.torch as m`:
    # that binds deepspeed.comm's attribute `torch`, the torch package.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")


def _step(model: torch.nn.Module, batches: list[torch.Tensor]) -> Any:
    return lambda: [model(input_ids=b, labels=b).loss.backward() for b in batches] and None


def _factors(peft_model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for n, m in peft_model.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}


def _full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters([p for p in model.parameters() if hasattr(p, "ds_id")]):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _error(fn: Any) -> str:
    try:
        fn()
    except UsageError as err:
        return str(err)
    return "no error"


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:  # noqa: PLR0915 (one launch, many checks)
    _init(rank, world, init_file)
    try:
        import peft

        from loraga_fast.core.plan import Plan
        from loraga_fast.distributed.zero3 import is_hooked

        nbytes: list[int] = []
        new_store = Plan.new_store

        def measured(plan: Plan) -> Any:
            store = new_store(plan)
            nbytes.append(store.nbytes)
            return store

        Plan.new_store = measured  # type: ignore[method-assign]
        out: dict[str, Any] = {}
        batches = token_batches(n=NUM_BATCHES)[rank::world]
        probe = token_batches(n=1, seed=7)[0]
        cache = os.path.join(out_dir, "grads.safetensors")

        model, again, bare, lowmem, onepass, other, nvme, uneven = (_partitioned_llama() for _ in range(8))

        # (a) an engine wraps the model: estimate, initialize, rebuild the engine for training
        out["weights"] = _full_weights(model)
        engine, *_ = deepspeed.initialize(model=model, config=CONFIG)
        with torch.no_grad():
            before = model(input_ids=probe).logits
        cfg = lora_ga_config(TARGETS)
        preprocess_loraga(model, cfg, _step(model, batches), cache_file=cache)
        out["grads"] = {n: g.full_tensor() for n, g in attached(model).items()}
        out["acc_bytes"] = nbytes[-1]
        pm = peft.get_peft_model(model, cfg)
        q = model.model.layers[0].self_attn.q_proj.base_layer
        out["partitioned"] = q.weight.numel() == 0 and 0 < q.weight.ds_tensor.numel() < q.weight.ds_numel
        with torch.no_grad():
            after = pm(input_ids=probe).logits
        out["out_diff"], out["out_scale"] = (after - before).abs().max().item(), before.abs().max().item()
        out["factors"] = _factors(pm)
        out["offset"] = {n: w for n, w in _full_weights(pm).items() if n.endswith("base_layer.weight")}
        engine.destroy()
        trainable = [p for p in pm.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=pm, optimizer=torch.optim.SGD(trainable, lr=1e-2), config=CONFIG)
        losses = []
        for b in batches[:2]:
            loss = engine(input_ids=b, labels=b).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out["losses"] = losses
        engine.destroy()

        # the cache: written once, read back by a later run without running train_step
        cfg2 = lora_ga_config(TARGETS)
        preprocess_loraga(again, cfg2, lambda: (_ for _ in ()).throw(AssertionError("train_step ran")),
                          cache_file=cache)
        out["cached"] = {n: g.full_tensor() for n, g in attached(again).items()}
        out["cached_factors"] = _factors(peft.get_peft_model(again, cfg2))

        # (c) no engine yet (preprocess before the Trainer builds one): a temporary one, gone afterwards
        for mode, scale in (("exact", "weight_svd"), ("lowmem", "stable"), ("lowmem1", "stable")):
            m = {"lowmem": lowmem, "lowmem1": onepass}.get(mode, bare)
            c = lora_ga_config(TARGETS, scale=scale)
            preprocess_loraga(m, c, _step(m, batches), **_options(mode))
            out[f"hooked_{mode}"] = any(is_hooked(x) for x in m.modules())
            out[f"factors_{mode}_{scale}"] = _factors(peft.get_peft_model(m, c))

        # mistakes: a cache of another model, NVMe offload, uneven batches (checked before and during the run)
        other.model.layers[0].self_attn.q_proj.weight.ds_shape = torch.Size((65, 64))  # a stand-in for another shape
        other.model.layers[0].self_attn.q_proj.out_features = 65
        out["cache_error"] = _error(lambda: preprocess_loraga(other, lora_ga_config(TARGETS), _step(other, batches),
                                                               cache_file=cache))
        location = nvme.model.layers[1].mlp.down_proj.weight.ds_tensor
        location.final_location = type("Nvme", (), {"value": "nvme"})()
        out["nvme_error"] = _error(lambda: preprocess_loraga(nvme, lora_ga_config(TARGETS), _step(nvme, batches)))
        flags = [p.requires_grad for p in uneven.parameters()]
        out["uneven_error"] = _error(lambda: preprocess_loraga(uneven, lora_ga_config(TARGETS),
                                                                _step(uneven, batches[: 2 - rank])))
        out["uneven_restored"] = flags == [p.requires_grad for p in uneven.parameters()] and not attached(uneven)
        out["uneven_unhooked"] = not any(is_hooked(x) for x in uneven.modules())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _options(mode: str) -> dict[str, object]:
    """``lowmem1``: one-pass low-memory mode (each process folds its own batches; merged after the pass)."""
    return {"mode": "lowmem", "passes": 1} if mode == "lowmem1" else {"mode": mode}


@pytest.mark.slow
def test_zero3_equals_single_process_and_refuses_mistakes(tmp_path: Path) -> None:
    import peft

    spawn(_worker, 2, tmp_path, timeout=420.0)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _llama()
    single.load_state_dict(results[0]["weights"])
    batches = token_batches(n=NUM_BATCHES)
    base = {k: v.clone() for k, v in single.state_dict().items()}
    with torch.no_grad():
        probe_logits = single(input_ids=token_batches(n=1, seed=7)[0]).logits
    expected = {}
    for mode, scale in (("exact", "stable"), ("exact", "weight_svd"), ("lowmem", "stable"), ("lowmem1", "stable")):
        single.load_state_dict(base)
        cfg = lora_ga_config(TARGETS, scale=scale)
        preprocess_loraga(single, cfg, _step(single, batches), **_options(mode))
        grads = {n: g.clone() for n, g in attached(single).items()} if mode == "exact" else {}
        pm = peft.get_peft_model(single, cfg)
        expected[mode, scale] = (grads, _factors(pm), {n: w.clone() for n, w in pm.state_dict().items()
                                                       if n.endswith("base_layer.weight")})
        single = pm.unload()
    grads, factors, offsets = expected["exact", "stable"]
    from tests._helpers import hook_reference

    fresh = _llama()
    fresh.load_state_dict(base)
    reference = hook_reference(fresh, list(grads), batches)  # float64 over the same X and G
    full_bytes = 4 * sum(g.numel() for g in grads.values())

    def same_factors(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
        assert got.keys() == want.keys() and want, where
        for n, (a, b) in got.items():
            a0, b0 = want[n]
            assert subspace_cos(a.T, a0.T) > 0.9999 and subspace_cos(b, b0) > 0.9999, (where, n)
            assert rel_err(b @ a, b0 @ a0) < 1e-4, (where, n)

    for r, res in enumerate(results):
        assert res["grads"].keys() == grads.keys() and grads
        for n, g in res["grads"].items():
            assert rel_err(g, reference[n]) <= 1e-6, (r, n)  # the all-process mean, within 1e-6 of float64
            assert rel_err(g, grads[n]) <= 1e-6, (r, n)
            assert torch.equal(res["cached"][n], g), (r, n)  # read back from the cache as written
        assert res["acc_bytes"] <= 0.55 * full_bytes, (r, res["acc_bytes"], full_bytes)
        same_factors(res["factors"], factors, f"engine rank {r}")
        same_factors(res["cached_factors"], factors, f"cache rank {r}")
        same_factors(res["factors_exact_weight_svd"], expected["exact", "weight_svd"][1], f"weight_svd rank {r}")
        same_factors(res["factors_lowmem_stable"], expected["lowmem", "stable"][1], f"lowmem rank {r}")
        same_factors(res["factors_lowmem1_stable"], expected["lowmem1", "stable"][1], f"one-pass rank {r}")
        assert res["offset"].keys() == offsets.keys() and offsets
        for n, w in res["offset"].items():
            assert rel_err(w, offsets[n]) < 1e-5, (r, n)  # W - s B A, written partition by partition
        assert res["partitioned"], r  # the offset went into the partitions: nothing stayed gathered
        assert res["out_diff"] <= 1e-5 * res["out_scale"], r  # W - s B A + s B A = W
        assert all(torch.isfinite(torch.tensor(res["losses"]))), r
        assert not res["hooked_exact"] and not res["hooked_lowmem"] and not res["hooked_lowmem1"], r  # the temporary engine left no hook
        assert "does not match the model" in res["cache_error"], res["cache_error"]
        assert "offloaded to NVMe" in res["nvme_error"] and "down_proj" in res["nvme_error"], res["nvme_error"]
        assert "ranks ran different numbers of forward passes" in res["uneven_error"], res["uneven_error"]
        assert res["uneven_restored"] and res["uneven_unhooked"], r
    assert probe_logits.abs().max() > 0
    assert not (tmp_path / "grads.safetensors.tmp-0").exists()


OFFLOAD = {**CONFIG, "zero_optimization": {**CONFIG["zero_optimization"], "offload_param": {"device": "cpu"}}}
HPZ = {**CONFIG, "zero_optimization": {**CONFIG["zero_optimization"], "zero_hpz_partition_size": 2}}


def _offload_hpz_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    try:
        import peft

        out: dict[str, Any] = {}
        batches = token_batches(n=NUM_BATCHES)[rank::world]
        probe = token_batches(n=1, seed=7)[0]
        for label, config in (("offload", OFFLOAD), ("hpz", HPZ)):
            model = _partitioned_llama(config)
            out[f"weights_{label}"] = _full_weights(model)
            engine, *_ = deepspeed.initialize(model=model, config=config)
            weight = model.model.layers[0].self_attn.q_proj.weight
            out[f"secondary_{label}"] = getattr(weight, "ds_secondary_tensor", None) is not None
            with torch.no_grad():
                before = model(input_ids=probe).logits
            cfg = lora_ga_config(TARGETS)
            preprocess_loraga(model, cfg, _step(model, batches))
            pm = peft.get_peft_model(model, cfg)
            with torch.no_grad():  # forward gathers from the secondary copy under hpZ: it must hold the offset too
                after = pm(input_ids=probe).logits
            out[f"out_diff_{label}"] = (after - before).abs().max().item() / before.abs().max().item()
            out[f"factors_{label}"] = _factors(pm)
            engine.destroy()
            trainable = [p for p in pm.parameters() if p.requires_grad]
            engine, *_ = deepspeed.initialize(model=pm, optimizer=torch.optim.SGD(trainable, lr=1e-2), config=config)
            for b in batches[:2]:
                loss = engine(input_ids=b, labels=b).loss
                engine.backward(loss)
                engine.step()
                out.setdefault(f"losses_{label}", []).append(loss.item())
            engine.destroy()

        # refused by name, before anything runs, the model left as it was
        quantized = _partitioned_llama()
        # a stand-in for ZeRO++ zero_quantized_nontrainable_weights (its quantizer has no CPU implementation)
        quantized.model.layers[1].self_attn.v_proj.weight.ds_tensor.ds_quant_scale = torch.ones(1)
        groups = [dist.new_group([r]) for r in range(world)]
        alone = _partitioned_llama(data_parallel_group=groups[rank])  # partitioned over this process only
        wrapped = _partitioned_llama()
        engine, *_ = deepspeed.initialize(model=wrapped, config=CONFIG)  # no optimizer: refuses loss.backward()
        cases = (("quantized", quantized, _step(quantized, batches)), ("group", alone, _step(alone, batches)),
                 ("engine", wrapped, _step(engine, batches)))  # train_step calls the engine, not the model
        for label, m, step in cases:
            flags = [p.requires_grad for p in m.parameters()]
            out[f"{label}_error"] = _error(lambda m=m, step=step: preprocess_loraga(m, lora_ga_config(TARGETS), step))
            out[f"{label}_untouched"] = flags == [p.requires_grad for p in m.parameters()] and not attached(m)
        out["engine_released"] = wrapped.model.layers[0].self_attn.q_proj.weight.numel() == 0
        engine.destroy()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_zero3_offload_and_hierarchical_partitions(tmp_path: Path) -> None:
    import peft

    spawn(_offload_hpz_worker, 2, tmp_path, timeout=300.0)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _llama()
    single.load_state_dict(results[0]["weights_offload"])
    cfg = lora_ga_config(TARGETS)
    preprocess_loraga(single, cfg, _step(single, token_batches(n=NUM_BATCHES)))
    expected = _factors(peft.get_peft_model(single, cfg))
    for r, res in enumerate(results):
        for label in ("offload", "hpz"):
            for name, w in res[f"weights_{label}"].items():
                assert torch.equal(w, results[0]["weights_offload"][name]), (r, label, name)
            got = res[f"factors_{label}"]
            assert got.keys() == expected.keys() and expected, (r, label)
            for n, (a, b) in got.items():
                assert rel_err(b @ a, expected[n][1] @ expected[n][0]) < 1e-4, (r, label, n)
            assert res[f"out_diff_{label}"] <= 1e-5, (r, label, res[f"out_diff_{label}"])  # W - s B A + s B A = W
            assert len(res[f"losses_{label}"]) == 2 and all(torch.isfinite(torch.tensor(res[f"losses_{label}"]))), r
        assert res["secondary_hpz"] and not res["secondary_offload"], r  # hpZ really kept a secondary copy
        assert "stored quantized" in res["quantized_error"] and "v_proj" in res["quantized_error"], res
        assert "'model.layers.0.self_attn.q_proj'" in res["group_error"], res["group_error"]
        assert "over 1 of the 2 processes" in res["group_error"], res["group_error"]
        assert "through a DeepSpeed engine that has no optimizer" in res["engine_error"], res["engine_error"]
        assert res["quantized_untouched"] and res["group_untouched"] and res["engine_untouched"], r
        assert res["engine_released"], r  # the weights the failed pass gathered are partitioned again
