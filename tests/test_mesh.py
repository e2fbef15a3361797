"""Training on a device mesh (8 forced CPU devices, in a subprocess) equals the single-device run,
with the parameters really sharded as the logical-axis rules say (jaxtune.parallel.mesh): FSDP,
FSDP with the sequence split (ring attention, balanced layout), data x FSDP x tensor, and ZeRO-2
with the optimizer state offloaded to host memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from transformers import LlamaConfig

from conftest import cpu_env, save_tiny

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jaxtune.checkpoint.hf import load_model, load_model_config
    from jaxtune.config import build_config
    from jaxtune.objectives.sft import SFT
    from jaxtune.optim import build_optimizer
    from jaxtune.parallel import mesh as M
    from jaxtune.peft import lora
    from jaxtune.peft.qlora import mark_quantized, quantizing_place
    from jaxtune.step import make_train_step

    from jaxtune.parallel import ring

    assert jax.device_count() == 8, jax.devices()
    ring_calls = []
    traced_ring = ring.ring_attention
    ring.ring_attention = lambda *a, **k: ring_calls.append(1) or traced_ring(*a, **k)
    path, kind = sys.argv[1], sys.argv[2]
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else None  # some of the meshes below
    adapter = kind in ("lora", "qlora")

    def batch(i):  # [accumulation 1, batch 8, length 32], three packed samples and padding per row
        ids = np.random.default_rng(i).integers(1, 128, (1, 8, 32)).astype(np.int32)
        seg = np.array([[1] * 13 + [2] * 11 + [3] * 6 + [0] * 2] * 8, np.int32)[None]
        pos = np.array([list(range(13)) + list(range(11)) + list(range(6)) + [0, 0]] * 8, np.int32)[None]
        return {"input_ids": ids, "labels": ids, "segment_ids": seg, "positions": pos}

    def run(plan):
        if kind == "qlora":  # NF4 frozen kernels (double-quantized), as build_model makes them
            arch = load_model_config(path).architecture
            model = load_model(path, attn_implementation="blockwise",
                               place=quantizing_place(None, architecture=arch, double_quant=True))
            mark_quantized(model)
        else:
            model = load_model(path, attn_implementation="blockwise")
        wrt = nnx.Param
        if adapter:
            spec = lora.LoraSpec(r=4, alpha=8, targets=tuple(lora.lora_targets(model)))
            lora.add_lora(model, spec, jax.random.key(0))
            wrt = lora.trainable_filter(model, spec)
        graphdef, trainable, frozen = nnx.split(model, wrt, ...)
        optimizer, schedule = build_optimizer(
            build_config({"optimizer": "adamw_torch", "learning_rate": 1e-3, "lr_scheduler": "constant"}), 5)
        if plan is None:
            opt_state, kwargs, mesh = optimizer.init(trainable), {}, None
        else:  # the trainer's own placement (jaxtune.trainer.Trainer)
            mesh = plan.make()
            placed = M.place_training_state(plan, mesh, trainable, frozen, optimizer)
            trainable, frozen, opt_state, kwargs = placed.trainable, placed.frozen, placed.opt_state, placed.step_shardings
        step = make_train_step(graphdef, SFT(), optimizer, schedule, use_rng=False, **kwargs)
        losses = []
        for i in range(5):
            b = batch(i)
            if mesh is None:
                trainable, opt_state, out = step(trainable, frozen, opt_state, b, jax.random.key(0), jnp.int32(i))
            else:
                with jax.set_mesh(mesh):
                    trainable, opt_state, out = step(trainable, frozen, opt_state, M.place_batch(b, mesh),
                                                     jax.random.key(0), jnp.int32(i))
            losses.append(float(out["loss"]))
        def describe(x):
            return [list(getattr(x.sharding, "spec", ())), getattr(x.sharding, "memory_kind", None)]
        specs = {jax.tree_util.keystr(p): describe(x)
                 for p, x in jax.tree_util.tree_leaves_with_path((trainable, frozen, opt_state))}
        calls = len(ring_calls)
        ring_calls.clear()
        return {"losses": losses, "traces": step.traces, "specs": specs, "ring_calls": calls}

    result = {"single": run(None)}
    meshes = {"fsdp8": {"fsdp": 8}, "fsdp4_sequence2": {"fsdp": 4, "sequence": 2},
              "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
              "zero2_offload_fsdp8": {"fsdp": 8, "stage": 2, "offload_optimizer": True}}
    for name, kw in meshes.items():
        if only is not None and name not in only:
            continue
        if kind != "qlora" or name in ("fsdp8", "data2_fsdp2_tensor2"):
            result[name] = run(M.MeshPlan(**kw))
    print("RESULT " + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return save_tiny(tmp_path_factory.mktemp("mesh"), cfg, "tiny8")


# What a model family changes on a mesh: its layers' parameter axes (tensor and fsdp splits) and its
# attention under ring attention. The other meshes (fsdp8, ZeRO-2 with offload) exercise placement
# machinery no family touches; the Llama tests run every mesh.
FAMILY_MESHES = ("fsdp4_sequence2", "data2_fsdp2_tensor2")


def _mesh_runs(path, adapter, meshes: tuple[str, ...] | None = None) -> dict:
    """Each mesh's run of SCRIPT (8 forced CPU devices; `meshes`: only those) checked against the
    single-device run."""
    env = cpu_env(8)
    extra = [",".join(meshes)] if meshes is not None else []
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), adapter, *extra], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    single = result.pop("single")
    for name, run in result.items():
        assert run["traces"] == 1, name
        for got, want in zip(run["losses"], single["losses"]):
            assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (name, run["losses"], single["losses"])
    assert all(r["ring_calls"] == 0 for n, r in result.items() if n != "fsdp4_sequence2")
    return result


def test_gpt_neox_mesh_training_equals_single_device(tmp_path):
    """The GPT-NeoX family (fused interleaved QKV, parallel residual, partial RoPE) on the same meshes:
    fsdp, fsdp x sequence (ring attention), data x fsdp x tensor, ZeRO-2 with offload."""
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128)
    result = _mesh_runs(save_tiny(tmp_path, cfg, "neox8"), "lora", FAMILY_MESHES)
    assert result["fsdp4_sequence2"]["ring_calls"] > 0
    qkv = "[1]['layers']['attention']['query_key_value']['kernel'].value"
    assert result["data2_fsdp2_tensor2"]["specs"][qkv][0] == [None, "fsdp", "tensor"]


@pytest.mark.parametrize("adapter", ["lora", "full", "qlora"])
def test_mesh_training_equals_single_device(tiny8, adapter):
    result = _mesh_runs(tiny8, adapter)
    if adapter == "qlora":  # NF4 blocks: the flat block axis over fsdp where it divides
        codes = "[1]['layers']['mlp']['down_proj']['kernel'].value.codes"
        assert result["fsdp8"]["specs"][codes][0] == [None, "fsdp"]
        assert result["data2_fsdp2_tensor2"]["specs"][codes][0] == [None, "fsdp"]
        return
    assert result["fsdp4_sequence2"]["ring_calls"] > 0  # attention ran as a ring over the sequence axis
    specs = result["data2_fsdp2_tensor2"]["specs"]
    down = "[0]['layers']['mlp']['down_proj']" if adapter == "lora" else "[0]['layers']['mlp']['down_proj']['kernel']"
    if adapter == "lora":  # adapters follow their base weight: [layers, mlp -> tensor, r], [layers, r, embed -> fsdp]
        assert specs[down + "['lora_a'].value"][0] == [None, "tensor", None]
        assert specs[down + "['lora_b'].value"][0] == [None, None, "fsdp"]
        assert specs["[1]['layers']['mlp']['down_proj']['kernel'].value"][0] == [None, "tensor", "fsdp"]
    else:
        assert specs[down + ".value"][0] == [None, "tensor", "fsdp"]
        assert specs["[0]['embed_tokens']['embedding'].value"][0] == ["tensor", "fsdp"]
    embed = "[1]['embed_tokens']['embedding'].value" if adapter == "lora" else "[0]['embed_tokens']['embedding'].value"
    assert result["fsdp8"]["specs"][embed][0] == [None, "fsdp"]
    assert result["fsdp4_sequence2"]["specs"][embed][0] == [None, "fsdp"]
    # ZeRO-2: parameters replicated over fsdp, the optimizer state sharded and kept in host memory
    zero2 = result["zero2_offload_fsdp8"]["specs"]
    moments = [v for k, v in zero2.items() if k.startswith("[2]") and v[0]]
    assert moments and all(v[1] == "pinned_host" for v in moments), moments
    params = [v for k, v in zero2.items() if k.startswith("[0]")]
    assert all("fsdp" not in v[0] for v in params), params
