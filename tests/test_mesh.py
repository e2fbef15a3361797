"""Training on a device mesh (8 forced CPU devices, in a subprocess) equals the single-device run,
with the parameters really sharded as the logical-axis rules say (jaxtune.parallel.mesh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from transformers import LlamaConfig

from tests.conftest import save_tiny

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jaxtune.checkpoint.hf import load_model
    from jaxtune.config import build_config
    from jaxtune.objectives.sft import SFT
    from jaxtune.optim import build_optimizer
    from jaxtune.parallel import mesh as M
    from jaxtune.peft import lora
    from jaxtune.trainer import make_train_step

    assert jax.device_count() == 8, jax.devices()
    path, adapter = sys.argv[1], sys.argv[2] == "lora"

    def batch(i):  # [accumulation 1, batch 8, length 32], three packed samples and padding per row
        ids = np.random.default_rng(i).integers(1, 128, (1, 8, 32)).astype(np.int32)
        seg = np.array([[1] * 13 + [2] * 11 + [3] * 6 + [0] * 2] * 8, np.int32)[None]
        pos = np.array([list(range(13)) + list(range(11)) + list(range(6)) + [0, 0]] * 8, np.int32)[None]
        return {"input_ids": ids, "labels": ids, "segment_ids": seg, "positions": pos}

    def run(mesh_kw):
        model = load_model(path, attn_implementation="blockwise")
        wrt = nnx.Param
        if adapter:
            spec = lora.LoraSpec(r=4, alpha=8, targets=tuple(lora.LINEAR_PATHS))
            lora.add_lora(model, spec, jax.random.key(0))
            wrt = lora.trainable_filter(model, spec)
        graphdef, trainable, frozen = nnx.split(model, wrt, ...)
        optimizer, schedule = build_optimizer(
            build_config({"optimizer": "adamw_torch", "learning_rate": 1e-3, "lr_scheduler": "constant"}), 5)
        mesh = M.make_mesh(**mesh_kw) if mesh_kw is not None else None
        if mesh is not None:
            trainable, frozen = M.shard_state(trainable, mesh), M.shard_state(frozen, mesh)
        opt_state = optimizer.init(trainable)
        shardings = None
        if mesh is not None:
            opt_state = M.replicate_rest(opt_state, mesh)
            shardings = (M.shardings_of(trainable), M.shardings_of(opt_state))
        step = make_train_step(graphdef, SFT(), optimizer, schedule, use_rng=False, state_shardings=shardings)
        losses = []
        for i in range(5):
            b = batch(i)
            if mesh is not None:
                b = {k: jax.device_put(v, M.batch_sharding(mesh)) for k, v in b.items()}
            trainable, opt_state, out = step(trainable, frozen, opt_state, b, jax.random.key(0), jnp.int32(i))
            losses.append(float(out["loss"]))
        specs = {jax.tree_util.keystr(p): list(getattr(x.sharding, "spec", ()))
                 for p, x in jax.tree_util.tree_leaves_with_path((trainable, frozen))}
        return {"losses": losses, "traces": step.traces, "specs": specs}

    result = {"single": run(None)}
    for name, kw in (("fsdp8", {"fsdp": 8}), ("fsdp4_tensor2", {"fsdp": 4, "tensor": 2}),
                     ("data2_fsdp2_tensor2", {"data": 2, "fsdp": 2, "tensor": 2})):
        result[name] = run(kw)
    print("RESULT " + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return save_tiny(tmp_path_factory.mktemp("mesh"), cfg, "tiny8")


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_mesh_training_equals_single_device(tiny8, adapter):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny8), adapter], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    single = result.pop("single")
    for name, run in result.items():
        assert run["traces"] == 1, name
        for got, want in zip(run["losses"], single["losses"]):
            assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (name, run["losses"], single["losses"])
    specs = result["data2_fsdp2_tensor2"]["specs"]
    down = "[0]['layers']['mlp']['down_proj']" if adapter == "lora" else "[0]['layers']['mlp']['down_proj']['kernel']"
    if adapter == "lora":  # adapters follow their base weight: [layers, mlp -> tensor, r], [layers, r, embed -> fsdp]
        assert specs[down + "['lora_a'].value"] == [None, "tensor", None]
        assert specs[down + "['lora_b'].value"] == [None, None, "fsdp"]
        assert specs["[1]['layers']['mlp']['down_proj']['kernel'].value"] == [None, "tensor", "fsdp"]
    else:
        assert specs[down + ".value"] == [None, "tensor", "fsdp"]
        assert specs["[0]['embed_tokens']['embedding'].value"] == ["tensor", "fsdp"]
    assert result["fsdp8"]["specs"]["[1]['embed_tokens']['embedding'].value" if adapter == "lora"
                                    else "[0]['embed_tokens']['embedding'].value"] == [None, "fsdp"]
