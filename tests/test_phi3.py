"""Phi-3 behind the family contract: logits of every config switch against transformers (fused qkv_proj /
gate_up_proj, partial RoPE, longrope on both sides of original_max_position_embeddings, sliding window,
tied embeddings), a LoRA step on the fused projections against PEFT, HF -> jaxtune -> HF bit-exact,
greedy decoding equal to transformers', and a sharded step equal to one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, save_tiny
from families import check_greedy_matches_transformers, check_qlora_trains_and_adapter_loads, check_round_trip_is_bit_exact
from test_mesh import FAMILY_MESHES, _mesh_runs
from test_train_step import check_lora_steps_match_peft
from transformers import Phi3Config

import jaxtune
from jaxtune.checkpoint.hf import load_model

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 10.0, 12.0]}
CASES = {
    "gqa": (dict(), 20),
    "partial-rope-tied": (dict(partial_rotary_factor=0.5, tie_word_embeddings=True,
                               rope_parameters={"rope_type": "default", "rope_theta": 500.0}), 20),
    "sliding": (dict(sliding_window=6), 24),
    # original 16 of 64 positions: 12 tokens use the short factors, 40 the long ones
    "longrope-short": (dict(original_max_position_embeddings=16, rope_parameters=LONGROPE), 12),
    "longrope-long": (dict(original_max_position_embeddings=16, rope_parameters=LONGROPE), 40),
}
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _config(**kw) -> Phi3Config:
    return Phi3Config(**{**BASE, **kw})


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("phi3"), _config(), "phi3")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    keys, length = CASES[case]
    path = save_tiny(tmp_path, _config(**keys), "phi3")
    ids = np.random.default_rng(0).integers(0, 96, (2, length))
    model, _ = jaxtune.load_pretrained(path)
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    assert np.abs(got - hf_logits(path, ids)).max() <= 1e-4, case


def test_config_switches_are_read(tmp_path):
    cfg = load_model(save_tiny(tmp_path, _config(partial_rotary_factor=0.75, sliding_window=5), "p")).cfg
    assert (cfg.rotary_dim, cfg.sliding_windows, cfg.num_kv_heads) == (12, (5, 5), 2)
    cfg = load_model(save_tiny(tmp_path / "l", _config(original_max_position_embeddings=16,
                                                        rope_parameters=LONGROPE), "p")).cfg
    assert cfg.rope.rope_type == "longrope" and cfg.rope.original_max_position_embeddings == 16
    assert cfg.rope.long_factor == tuple(LONGROPE["long_factor"])


def test_round_trip_is_bit_exact(tmp_path, phi3_dir):
    check_round_trip_is_bit_exact(phi3_dir, tmp_path / "out")


def test_greedy_matches_transformers_generate(phi3_dir):
    check_greedy_matches_transformers(phi3_dir)


def test_lora_steps_match_peft(phi3_dir):
    """LoRA on the fused qkv_proj and gate_up_proj, by PEFT's own module names."""
    check_lora_steps_match_peft(phi3_dir, TARGETS)


def test_mesh_training_equals_single_device(tmp_path):
    cfg = _config(vocab_size=128, intermediate_size=128, max_position_embeddings=128,
                  original_max_position_embeddings=128)
    result = _mesh_runs(save_tiny(tmp_path, cfg, "phi3_8"), "lora", FAMILY_MESHES)
    assert result["fsdp4_sequence2"]["ring_calls"] > 0


def test_qlora_trains_and_adapter_loads_in_peft(tmp_path, phi3_dir):
    check_qlora_trains_and_adapter_loads(phi3_dir, tmp_path, TARGETS)
