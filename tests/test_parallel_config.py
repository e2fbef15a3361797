"""The parallelism keys resolve to the mesh Axolotl's users expect (jaxtune.config.parallel,
jaxtune.parallel.mesh.plan_for), the multi-host settings are checked, and `jaxtune plan` counts the
parameters, gradients and optimizer state exactly and shards them by the rules."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxtune.config import ConfigError, build_config
from jaxtune.errors import JaxtuneError
from jaxtune.parallel.mesh import MeshPlan, plan_for


def _plan(keys, devices=8):
    return plan_for(build_config(keys), devices)


def test_mesh_from_axolotl_keys(tmp_path):
    assert _plan({}) == MeshPlan(data=8, stage=3)  # plain data parallelism over every device
    assert _plan({"dp_shard_size": 4, "tensor_parallel_size": 2}) == MeshPlan(fsdp=4, tensor=2)
    assert _plan({"sequence_parallel_degree": 2}) == MeshPlan(data=4, sequence=2)  # the old name
    assert _plan({"dp_replicate_size": 2, "dp_shard_size": 2, "tensor_parallel_size": 2}) == \
        MeshPlan(data=2, fsdp=2, tensor=2)
    assert _plan({"fsdp": ["full_shard", "auto_wrap"]}) == MeshPlan(fsdp=8)
    assert _plan({"fsdp": "shard_grad_op auto_wrap", "context_parallel_size": 2}) == MeshPlan(fsdp=4, sequence=2,
                                                                                              stage=2)
    assert _plan({"fsdp": ["full_shard"], "fsdp_config": {"reshard_after_forward": False}}).stage == 2
    assert _plan({"fsdp": ["no_shard"]}) == MeshPlan(data=8)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    assert _plan({"deepspeed": str(ds)}) == MeshPlan(fsdp=8, stage=2, offload_optimizer=True)
    assert _plan({"deepspeed": "deepspeed_configs/zero1.json"}) == MeshPlan(fsdp=8, stage=1)
    assert MeshPlan(data=2, fsdp=2, tensor=2).batch_ranks == 4


def test_parallel_key_errors(tmp_path):
    with pytest.raises(JaxtuneError, match="tensor_parallel_size=3"):
        _plan({"tensor_parallel_size": 3})
    with pytest.raises(JaxtuneError, match="is not the 8 devices"):
        _plan({"dp_shard_size": 3})
    with pytest.raises(JaxtuneError, match="dp_shard_size=4 shards over 4 devices, but fsdp says no sharding"):
        _plan({"dp_shard_size": 4, "fsdp": ["no_shard"]})
    with pytest.raises(ConfigError, match="deepspeed: z3.json not found"):
        build_config({"deepspeed": "z3.json"})
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="parameter offload is not supported"):
        build_config({"deepspeed": str(ds)})
    with pytest.raises(ConfigError, match="fsdp: unknown option full_sharded"):
        build_config({"fsdp": ["full_sharded"]})
    with pytest.raises(ConfigError, match="fsdp_config: unknown key 'fsdp_sharding_stratgy'"):
        build_config({"fsdp": ["full_shard"], "fsdp_config": {"fsdp_sharding_stratgy": "FULL_SHARD"}})
    with pytest.raises(ConfigError, match="fsdp and deepspeed cannot both be set"):
        build_config({"fsdp": ["full_shard"], "deepspeed": "zero3.json"})
    with pytest.raises(ConfigError, match="unknown config key 'dp_shard_sze'; did you mean 'dp_shard_size'"):
        build_config({"dp_shard_sze": 2})
    # FSDP's activation checkpointing is remat; torch-only settings are accepted with a warning
    cfg = build_config({"fsdp": ["full_shard"], "fsdp_config": {"fsdp_activation_checkpointing": True,
                                                               "fsdp_state_dict_type": "FULL_STATE_DICT"}})
    assert cfg.gradient_checkpointing is True


def test_distributed_settings(monkeypatch):
    from jaxtune.parallel import distributed

    for var in ("JAXTUNE_COORDINATOR", "JAXTUNE_NUM_PROCESSES", "JAXTUNE_PROCESS_ID", "SLURM_JOB_ID",
                "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize(build_config({})) is False  # one process: nothing to start
    monkeypatch.setenv("JAXTUNE_COORDINATOR", "10.0.0.1:1234")
    with pytest.raises(JaxtuneError, match="missing the process count .*, process id"):
        distributed.initialize(build_config({}))
    monkeypatch.setenv("JAXTUNE_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXTUNE_PROCESS_ID", "2")
    with pytest.raises(JaxtuneError, match=r"process_id 2 is not in \[0, 2\)"):
        distributed.initialize(build_config({}))
    with pytest.raises(ConfigError, match="process_id 3 is not below num_processes 2"):
        build_config({"num_processes": 2, "process_id": 3})
    monkeypatch.delenv("JAXTUNE_COORDINATOR")
    monkeypatch.delenv("JAXTUNE_NUM_PROCESSES")
    monkeypatch.delenv("JAXTUNE_PROCESS_ID")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed._cluster() == "SLURM"


def test_plan_counts_state_exactly_and_shards_it(tiny_chat_dir):
    from jaxtune.build import build_model
    from jaxtune.optim import build_optimizer
    from jaxtune.peft.lora import trainable_filter
    from jaxtune.plan import parse_bytes, plan_memory

    keys = {"base_model": str(tiny_chat_dir), "adapter": "lora", "lora_target_linear": True, "lora_r": 4,
            "lora_alpha": 8, "sequence_len": 128, "micro_batch_size": 2}
    cfg = build_config(keys)
    model, spec, _ = build_model(cfg)
    _, trainable, frozen = nnx.split(model, trainable_filter(model, spec), ...)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    optimizer, _ = build_optimizer(cfg, 10)
    one = plan_memory(cfg, devices=1, platform="cpu")
    assert one.params == nbytes((trainable, frozen)) and one.trainable == nbytes(trainable)
    assert one.gradients == nbytes(trainable)
    assert one.optimizer == nbytes(optimizer.init(trainable))  # AdamW: two moments (+ a step count)
    assert one.activations > 0 and one.total > one.params + one.optimizer
    # FSDP over 4 devices: the frozen weights (embed axes all divide) split 4 ways; LoRA's A / B
    # split where their base weight's embed axis is theirs (A of q/k/v/gate/up, B of o/down)
    four = plan_memory(build_config({**keys, "dp_shard_size": 4}), devices=4, platform="cpu")
    frozen_bytes = nbytes(frozen)
    assert four.params - four.trainable == pytest.approx(frozen_bytes / 4, rel=1e-3)
    halves = {"q_proj": "a", "k_proj": "a", "v_proj": "a", "gate_proj": "a", "up_proj": "a", "o_proj": "b",
              "down_proj": "b"}
    expected = 0
    for path, x in nnx.to_flat_state(trainable):
        sharded = path[-1] in ("lora_a", "lora_b") and path[-1][-1] == halves.get(path[-2])
        expected += x.get_value().nbytes // (4 if sharded else 1)
    assert four.gradients == expected and four.trainable == expected
    # ZeRO-2: parameters whole on every device, optimizer state and gradients split
    zero2 = plan_memory(build_config({**keys, "fsdp": ["shard_grad_op"]}), devices=4, platform="cpu")
    assert zero2.params == one.params and zero2.gradients == four.gradients
    # more activations with more rows; the largest micro-batch that fits shrinks with the memory
    assert plan_memory(build_config({**keys, "micro_batch_size": 4}), devices=1).activations > one.activations
    roomy = plan_memory(cfg, devices=1, platform="gpu", device_memory=parse_bytes("2GiB"))
    tight = plan_memory(cfg, devices=1, platform="gpu", device_memory=parse_bytes("100MiB"))
    assert roomy.max_micro_batch > (tight.max_micro_batch or 0)
    assert "largest micro_batch_size that fits" in roomy.report()
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("24 GB") == 24 * 10**9
    with pytest.raises(JaxtuneError, match="cannot read '80 gigs'"):
        parse_bytes("80 gigs")
    assert np.isfinite(one.total)


def test_plan_command(tiny_chat_dir, tmp_path, capsys):
    import yaml

    from jaxtune.cli import main

    config = tmp_path / "x.yml"
    config.write_text(yaml.safe_dump({"base_model": str(tiny_chat_dir), "adapter": "lora", "lora_target_linear": True,
                                      "sequence_len": 256, "micro_batch_size": 4}))
    assert main(["plan", str(config), "--devices", "8", "--device-memory", "1GiB", "--platform", "gpu",
                 "dp_shard_size=8"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=1 x fsdp=8 x sequence=1 x tensor=1 (8 devices, gpu)" in out
    assert "largest micro_batch_size that fits" in out and "meshes that fit" in out
    assert main(["plan", str(config), "--device-memory", "1MiB", "--platform", "gpu"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
