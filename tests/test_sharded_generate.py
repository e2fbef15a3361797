"""The sampler runs a model whose parameters are sharded over a mesh (4 forced CPU devices)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from transformers import LlamaConfig

from conftest import cpu_env, save_tiny

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jaxtune
    from jaxtune.checkpoint.hf import load_model
    from jaxtune.generate import Sampler, SamplingConfig

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    rules = {"heads": "model", "kv_heads": "model", "mlp": "model"}

    def place(path, host, axes):
        return jax.device_put(host, NamedSharding(mesh, P(*(rules.get(a) for a in axes))))

    path = sys.argv[1]
    plain = load_model(path)
    sharded = load_model(path, place=place)
    spec = sharded.layers.mlp.up_proj.kernel[...].sharding.spec
    assert tuple(spec) == (None, None, "model"), spec
    prompts = [[1, 2, 3, 4], [7, 8]]
    outs = []
    for model in (plain, sharded):
        sampler = Sampler(model, eos_token_ids=[63], pad_token_id=0)
        outs.append(sampler(prompts, SamplingConfig(max_new_tokens=12)).tokens)
    assert np.array_equal(outs[0], outs[1]), outs
    print("SHARDED-OK")
    """
)


def test_sampler_with_parameters_sharded_over_a_mesh(tmp_path):
    path = save_tiny(tmp_path, LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    env = cpu_env(4)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHARDED-OK" in proc.stdout


ROLLOUT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jaxtune.checkpoint.hf import load_model
    from jaxtune.generate import SamplingConfig, left_pad, make_rollout
    from jaxtune.parallel import mesh as M

    assert jax.device_count() == 4, jax.devices()
    model = load_model(sys.argv[1])
    graphdef, state = nnx.split(model)
    rollout = make_rollout(graphdef, max_new_tokens=10, eos_ids=[63], pad_id=0, num_generations=4)
    ids, seg = left_pad([[1, 2, 3, 4], [7, 8], [9], [5, 6, 7]], 0, 8)
    settings = SamplingConfig(temperature=1.0, top_k=20).traced()
    key = jax.random.key(3)
    empty = nnx.State({})
    want = rollout(state, empty, ids, seg, key, settings)
    for shape in ({"data": 2, "fsdp": 2}, {"data": 1, "fsdp": 2, "tensor": 2}):
        mesh = M.make_mesh(**shape)
        placed = M.shard_state(state, mesh)
        prompts = NamedSharding(mesh, M.spec(("batch", None), ids.shape, mesh))
        with jax.set_mesh(mesh):
            got = rollout(placed, empty, M.place(ids, prompts), M.place(seg, prompts), key, settings)
        assert np.array_equal(np.asarray(got.tokens), np.asarray(want.tokens)), shape
        assert np.array_equal(np.asarray(got.lengths), np.asarray(want.lengths)), shape
        np.testing.assert_allclose(np.asarray(got.logps), np.asarray(want.logps), atol=1e-5, err_msg=str(shape))

    # rollout_merge_adapters on the mesh (fsdp x tensor): W + scale A B made from sharded kernels and
    # adapters samples what live adapters sample on one device
    from jaxtune.peft import lora
    lora.add_lora(model, lora.LoraSpec(r=4, alpha=8, targets=tuple(lora.lora_targets(model))), jax.random.key(0))
    for i, (_, m) in enumerate(model.iter_modules()):
        if isinstance(m, lora.LoraLinear):  # B != 0: the adapters change the model
            m.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(10 + i), m.lora_b.get_value().shape))
    graphdef, state = nnx.split(model)
    live = make_rollout(graphdef, max_new_tokens=10, eos_ids=[63], pad_id=0, num_generations=4)
    merged = make_rollout(graphdef, max_new_tokens=10, eos_ids=[63], pad_id=0, num_generations=4, merge_adapters=True)
    want = live(state, empty, ids, seg, key, settings)
    mesh = M.make_mesh(data=1, fsdp=2, tensor=2)
    placed = M.shard_state(state, mesh)
    prompts = NamedSharding(mesh, M.spec(("batch", None), ids.shape, mesh))
    with jax.set_mesh(mesh):
        got = merged(placed, empty, M.place(ids, prompts), M.place(seg, prompts), key, settings)
    assert np.array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logps), np.asarray(want.logps), atol=1e-5)
    assert not np.allclose(np.asarray(want.logps), np.asarray(rollout(nnx.split(load_model(sys.argv[1]))[1], empty,
                                                                       ids, seg, key, settings).logps), atol=1e-3)
    print("ROLLOUT-OK")
    """
)


def test_rollouts_on_the_training_mesh_equal_one_device(tmp_path):
    """GRPO's sampler on the training mesh (prompts over the data axes, weights and the KV cache by the
    logical-axis rules, data x fsdp and fsdp x tensor; 4 forced CPU devices), G = 4 completions per
    prompt from one shared prefill: the same tokens and log-probs as on one device; with LoRA adapters
    merged for the rollout on the fsdp x tensor mesh, the same as with them live on one device."""
    path = save_tiny(tmp_path, LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    env = cpu_env(4)
    proc = subprocess.run([sys.executable, "-c", ROLLOUT, str(path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROLLOUT-OK" in proc.stdout
