"""Gemma 2 and Gemma 3 (text) behind the family contract: logits of every config switch against
transformers (RMSNorm(1 + w), sandwich norms, GeGLU, embedding scale, query_pre_attn_scalar, attention
and final soft caps, alternating sliding / global layers, Gemma 3's q/k norms and per-layer-type RoPE
with scaling on the global layers), the loss and gradients through the blockwise kernel and the
chunked cross-entropy against transformers' loss and the plain path, bf16, a LoRA step against PEFT,
HF -> jaxtune -> HF bit-exact, greedy decoding equal to transformers', QLoRA with a PEFT-loadable
adapter, and a sharded step equal to one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_logits, save_tiny
from families import (
    check_greedy_matches_transformers,
    check_qlora_trains_and_adapter_loads,
    check_round_trip_is_bit_exact,
)
from test_mesh import FAMILY_MESHES, _mesh_runs
from test_train_step import check_lora_steps_match_peft
from transformers import Gemma2Config, Gemma3TextConfig

import jaxtune
from jaxtune.checkpoint.hf import load_model

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, sliding_window=6, query_pre_attn_scalar=24)
# Tiny random models have logits of ~0.5 and attention scores of ~1: caps this small bend them hard,
# so a cap left out, or applied in the wrong place, moves the logits far past the tolerance.
HARD_CAPS = dict(attn_logit_softcapping=0.7, final_logit_softcapping=0.3)
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
               "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
CASES = {  # (config, sequence length): 24 tokens run well past the window of 6
    "gemma2-defaults": (Gemma2Config, dict(), 24),  # caps 50 / 30, alternating layers
    "gemma2-hard-caps-bias-untied": (Gemma2Config, dict(**HARD_CAPS, attention_bias=True, tie_word_embeddings=False), 24),
    "gemma2-gelu-exact-no-caps": (Gemma2Config, dict(hidden_activation="gelu", attn_logit_softcapping=None,
                                                     final_logit_softcapping=None), 24),
    "gemma3-pattern-rope-per-type": (Gemma3TextConfig, dict(sliding_window_pattern=2, rope_parameters=GEMMA3_ROPE), 24),
    # transformers' Gemma 3 applies the final cap and ignores the attention cap: so do we (with a warning)
    "gemma3-default-pattern-caps": (Gemma3TextConfig, dict(num_hidden_layers=7, **HARD_CAPS), 20),
}
ARCHITECTURE = {Gemma2Config: "Gemma2ForCausalLM", Gemma3TextConfig: "Gemma3ForCausalLM"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(kind, **kw):
    cfg = kind(**{**BASE, **kw})
    cfg.architectures = [ARCHITECTURE[kind]]
    return cfg


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gemma2"), _config(Gemma2Config, **HARD_CAPS), "gemma2")


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gemma3"), _config(Gemma3TextConfig, sliding_window_pattern=2,
                                                                rope_parameters=GEMMA3_ROPE), "gemma3")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    kind, keys, length = CASES[case]
    path = save_tiny(tmp_path, _config(kind, **keys), "gemma")
    ids = np.random.default_rng(0).integers(0, 96, (2, length))
    model, _ = jaxtune.load_pretrained(path)
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    assert np.abs(got - hf_logits(path, ids)).max() <= 1e-4, case


def test_config_switches_are_read(tmp_path):
    cfg = load_model(save_tiny(tmp_path, _config(Gemma2Config, **HARD_CAPS), "g2")).cfg
    assert cfg.sliding_windows == (6, None, 6, None) and cfg.tie_word_embeddings
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.attn_scale) == (0.7, 0.3, 24 ** -0.5)
    assert not cfg.qk_norm and cfg.hidden_act == "gelu_pytorch_tanh"
    cfg = load_model(save_tiny(tmp_path / "g3", _config(Gemma3TextConfig, num_hidden_layers=7, **HARD_CAPS),
                               "g3")).cfg
    assert cfg.sliding_windows == (6,) * 5 + (None, 6) and cfg.qk_norm
    assert (cfg.attn_softcap, cfg.final_softcap) == (None, 0.3)  # as transformers' Gemma 3 applies them
    thetas = [r.theta for r in cfg.layer_ropes]
    assert thetas == [10000.0] * 5 + [1e6, 10000.0]  # Gemma 3's local and global bases
    with pytest.raises(jaxtune.errors.ModelLoadError, match="use_bidirectional_attention"):
        load_model(save_tiny(tmp_path / "bi", _config(Gemma3TextConfig, use_bidirectional_attention=True), "b"))


def test_loss_and_gradients_through_kernels_match(gemma2_dir):
    """The training path (blockwise attention with the soft cap in its custom VJP, chunked cross-entropy
    with the final cap) gives transformers' loss, and the gradients of the plain path (xla attention,
    full logits); both caps bend hard here."""
    from transformers import AutoModelForCausalLM

    ids = np.random.default_rng(3).integers(0, 96, (2, 24))
    hf = AutoModelForCausalLM.from_pretrained(gemma2_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        want = float(hf(torch.tensor(ids), labels=torch.tensor(ids)).loss)
    x, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])

    def loss_and_grads(attention, chunked):
        model = load_model(gemma2_dir)
        model.attn_implementation, model.chunked_loss = attention, chunked
        from flax import nnx

        def loss(m):
            return m.target_nll_sum(m.hidden_states(x), targets, jnp.ones(targets.shape)) / targets.size

        return nnx.value_and_grad(loss)(model)

    fast_loss, fast = loss_and_grads("blockwise", True)
    plain_loss, plain = loss_and_grads("xla", False)
    assert abs(float(fast_loss) - want) <= 1e-5 * want and abs(float(plain_loss) - want) <= 1e-5 * want
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * max(1.0, float(np.abs(np.asarray(b)).max()))


def test_bf16_as_close_to_fp32_as_transformers_bf16(tmp_path):
    """In bfloat16 (parameters and compute) the logits are as close to the float32 ones as transformers'
    own bfloat16 run is (embedding scale, (1 + w) norms and caps rounded where transformers rounds them)."""
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path, _config(Gemma3TextConfig, sliding_window_pattern=2, rope_parameters=GEMMA3_ROPE,
                                       **HARD_CAPS), "g3", dtype=torch.bfloat16)
    ids = np.random.default_rng(0).integers(0, 96, (2, 24))
    exact = hf_logits(path, ids)
    model, _ = jaxtune.load_pretrained(path, dtype="bfloat16")
    ours = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)).astype(jnp.float32))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.float().numpy()
    hf_error = np.abs(theirs - exact).max()
    assert 0 < hf_error and np.abs(ours - exact).max() <= 2 * hf_error, (np.abs(ours - exact).max(), hf_error)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_round_trip_is_bit_exact(tmp_path, family, request):
    check_round_trip_is_bit_exact(request.getfixturevalue(f"{family}_dir"), tmp_path / "out")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_greedy_matches_transformers_generate(family, request):
    """Through the KV cache: per-layer windows and RoPE, the soft caps in the decode step."""
    check_greedy_matches_transformers(request.getfixturevalue(f"{family}_dir"))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_lora_steps_match_peft(family, request):
    check_lora_steps_match_peft(request.getfixturevalue(f"{family}_dir"), TARGETS)


def test_qlora_trains_and_adapter_loads_in_peft(tmp_path, gemma3_dir):
    check_qlora_trains_and_adapter_loads(gemma3_dir, tmp_path, TARGETS)


def test_mesh_training_equals_single_device(tmp_path):
    """Gemma 2 with both caps and alternating windows on the family meshes of test_mesh (fsdp x sequence:
    ring attention with the cap; data x fsdp x tensor)."""
    cfg = _config(Gemma2Config, vocab_size=128, intermediate_size=128, max_position_embeddings=128,
                  num_hidden_layers=2, **HARD_CAPS)
    result = _mesh_runs(save_tiny(tmp_path, cfg, "gemma2_8"), "lora", FAMILY_MESHES)
    assert result["fsdp4_sequence2"]["ring_calls"] > 0
