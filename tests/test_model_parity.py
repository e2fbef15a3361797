"""Logits against transformers (fp32) for tiny random models covering every config switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import jaxtune
from tests.conftest import hf_logits, save_tiny

BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


def _legacy_rope(cfg: dict) -> None:
    """Rewrite a transformers-5 config.json into the older layout: rope_scaling + top-level rope_theta."""
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = None if params.get("rope_type") == "default" else dict(params, type=params["rope_type"])


CASES = {
    "llama-gqa-untied": (LlamaConfig(**BASE, tie_word_embeddings=False, rope_theta=500.0), None, 20),
    "llama-tied-headdim": (LlamaConfig(**dict(BASE, num_key_value_heads=3), head_dim=12, tie_word_embeddings=True), None, 20),
    "llama-bias": (LlamaConfig(**BASE, attention_bias=True, mlp_bias=True), None, 20),
    "llama-rope-linear": (LlamaConfig(**BASE, rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 1000.0}), None, 20),
    "llama-rope-linear-legacy": (LlamaConfig(**BASE, rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 1000.0}), _legacy_rope, 20),
    # dynamic NTK only changes frequencies beyond max_position_embeddings: run past it.
    "llama-rope-dynamic": (LlamaConfig(**dict(BASE, max_position_embeddings=16), rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000.0}), None, 40),
    "llama-rope-llama3": (LlamaConfig(**BASE, rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}), None, 40),
    "llama-rope-yarn": (LlamaConfig(**BASE, rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}), None, 40),
    "llama-rope-yarn-legacy": (LlamaConfig(**BASE, rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0, "rope_theta": 10000.0}), _legacy_rope, 40),
    "mistral-sliding": (MistralConfig(**BASE, sliding_window=5), None, 24),
    "qwen2-bias-sliding": (Qwen2Config(**BASE, use_sliding_window=True, sliding_window=4, max_window_layers=1), None, 24),
    "qwen3-qknorm-headdim": (Qwen3Config(**BASE, head_dim=16, tie_word_embeddings=True), None, 20),
    "qwen3-sliding-bias": (Qwen3Config(**BASE, head_dim=8, attention_bias=True, use_sliding_window=True, sliding_window=6, max_window_layers=2), None, 24),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    config, edit, length = CASES[case]
    path = save_tiny(tmp_path, config, edit_config=edit)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, length))
    expected = hf_logits(path, ids)
    model, _ = jaxtune.load_pretrained(path)
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    assert np.abs(got - expected).max() <= 1e-4, case


def test_config_switches_are_read(tmp_path):
    """Guard against a switch silently defaulting: each case's config really differs."""
    from jaxtune.checkpoint.hf import load_model_config

    qwen2 = load_model_config(save_tiny(tmp_path, CASES["qwen2-bias-sliding"][0], "q2"))
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_windows == (None, 4, 4)
    qwen3 = load_model_config(save_tiny(tmp_path, CASES["qwen3-qknorm-headdim"][0], "q3"))
    assert qwen3.qk_norm and qwen3.head_dim == 16 and qwen3.tie_word_embeddings
    mistral = load_model_config(save_tiny(tmp_path, CASES["mistral-sliding"][0], "m"))
    assert mistral.sliding_windows == (5, 5, 5)
    legacy = load_model_config(save_tiny(tmp_path, CASES["llama-rope-yarn-legacy"][0], "y", edit_config=_legacy_rope))
    assert legacy.rope.rope_type == "yarn" and legacy.rope.beta_fast == 16.0 and legacy.rope.theta == 10000.0


def test_packed_sequences_do_not_attend_across_segments(tmp_path):
    """Logits of samples packed in one row equal the logits of each sample run alone."""
    path = save_tiny(tmp_path, CASES["llama-gqa-untied"][0])
    model, _ = jaxtune.load_pretrained(path)
    rng = np.random.default_rng(1)
    lengths = [5, 9, 3]
    samples = [rng.integers(0, 96, n) for n in lengths]
    packed = np.concatenate(samples + [np.zeros(3, int)])[None]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(3, int)])[None]
    got = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(segments)))
    start = 0
    for sample in samples:
        alone = np.asarray(model(jnp.asarray(sample[None])))
        np.testing.assert_allclose(got[0, start:start + len(sample)], alone[0], atol=1e-5)
        start += len(sample)


def test_left_padding_matches_unpadded(tmp_path):
    path = save_tiny(tmp_path, CASES["qwen3-qknorm-headdim"][0])
    model, _ = jaxtune.load_pretrained(path)
    ids = np.random.default_rng(2).integers(0, 96, 7)
    padded = np.concatenate([np.zeros(4, int), ids])[None]
    seg = np.concatenate([np.zeros(4, int), np.ones(7, int)])[None]
    pos = np.concatenate([np.zeros(4, int), np.arange(7)])[None]
    got = np.asarray(model(jnp.asarray(padded), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0, 4:], np.asarray(model(jnp.asarray(ids[None])))[0], atol=1e-5)


def test_bf16_params_and_compute(tmp_path):
    import torch

    path = save_tiny(tmp_path, CASES["llama-gqa-untied"][0], dtype=torch.bfloat16)
    model, _ = jaxtune.load_pretrained(path, dtype="bfloat16")
    assert model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    ids = np.random.default_rng(0).integers(0, 96, (1, 16))
    got = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    expected = hf_logits(path, ids)
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()


def test_layers_are_scanned_so_program_size_is_flat_in_depth(tmp_path):
    """The traced program does not grow with the number of layers (layers run under lax.scan)."""
    from flax import nnx

    from jaxtune.checkpoint.hf import load_model_config
    from jaxtune.models.llama import CausalLM

    sizes = []
    for layers in (2, 8):
        cfg = LlamaConfig(**dict(BASE, num_hidden_layers=layers))
        mcfg = load_model_config(save_tiny(tmp_path, cfg, f"l{layers}"))
        model = CausalLM(mcfg, rngs=nnx.Rngs(0))
        jaxpr = jax.make_jaxpr(lambda m, x: m(x))(model, jnp.zeros((1, 8), jnp.int32))
        sizes.append(len(str(jaxpr).splitlines()))
    assert sizes[0] == sizes[1]


def test_logical_axis_names_on_every_parameter(tmp_path):
    from flax import nnx

    path = save_tiny(tmp_path, CASES["qwen3-sliding-bias"][0])
    model, _ = jaxtune.load_pretrained(path)
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var.get_value().ndim, p
        if p[0] == "layers":
            assert names[0] == "layers", p


def test_remat_gives_same_gradients(tmp_path):
    from flax import nnx

    path = save_tiny(tmp_path, CASES["llama-gqa-untied"][0])
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)))
    grads = []
    for remat in ("none", "full"):
        model, _ = jaxtune.load_pretrained(path, remat=remat)
        g = nnx.grad(lambda m: jnp.mean(m(ids) ** 2))(model)
        grads.append(jax.tree.leaves(g))
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
