"""Optimizers by Axolotl's names: 8-bit AdamW against bitsandbytes (its code books, its quantizer and its
AdamW8bit on the same arrays) and against 32-bit AdamW over 50 training steps; Muon with Axolotl's
parameter split against optax's Muon and AdamW leaf by leaf; the names Axolotl configs use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import save_tiny

from jaxtune.config import ConfigError, build_config
from jaxtune.optim import (BLOCK_SIZE, MIN_8BIT_SIZE, Blockwise, blockwise_moments, build_optimizer,
                           dequantize_blockwise, dynamic_code, quantize_blockwise)

bnb = pytest.importorskip("bitsandbytes")  # in the test extra: the reference for the 8-bit state
torch = pytest.importorskip("torch")


def _cfg(**keys):
    return build_config({"base_model": "unused", "datasets": [{"path": "unused.jsonl", "type": "completion"}],
                         "learning_rate": 1e-2, "lr_scheduler": "constant", "weight_decay": 0.1, **keys})


def test_code_books_are_bitsandbytes():
    import bitsandbytes.functional as bnbf

    for signed in (True, False):
        code = dynamic_code(signed)
        np.testing.assert_array_equal(code, bnbf.create_dynamic_map(signed=signed).numpy())
        assert code.shape == (256,) and np.all(np.diff(code) >= 0) and code[-1] == 1.0 and 0.0 in code
        assert (code.min() < -0.99) if signed else (code.min() == 0.0)


def test_quantization_rounds_each_block_to_its_nearest_code():
    """Blocks of 256 consecutive elements (a ragged last block), each scaled by its own absmax; the stored
    byte is the nearest code (checked by brute force against every code), so dequantizing loses at most
    half a code spacing. bitsandbytes' compiled kernel finds the code by a binary search that sometimes
    stops short (here on ~6% of these heavy-tailed values, up to 4 codes off): wherever the two differ,
    ours is the nearer."""
    rng = np.random.default_rng(0)
    n = BLOCK_SIZE * 40 + 17
    x = (rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32)
    code = dynamic_code(True)
    q = quantize_blockwise(jnp.asarray(x), jnp.asarray(code))
    codes, absmax = np.asarray(q.codes).reshape(-1), np.asarray(q.absmax)
    flat = x.reshape(-1)
    block_of = np.arange(flat.size) // BLOCK_SIZE
    np.testing.assert_array_equal(absmax, [np.abs(flat[block_of == b]).max() for b in range(absmax.size)])
    scaled = flat / absmax[block_of]
    distance = np.abs(code[None, :] - scaled[:, None])
    chosen = distance[np.arange(flat.size), codes]
    assert np.all(chosen <= distance.min(axis=1) + 1e-7)  # nearest (a tie within float rounding allowed)
    back = np.asarray(dequantize_blockwise(q, jnp.asarray(code))).reshape(-1)
    np.testing.assert_array_equal(back, code[codes] * absmax[block_of])

    ref_codes, ref_absmax = torch.ops.bitsandbytes.quantize_blockwise(torch.from_numpy(flat), torch.from_numpy(code),
                                                                      BLOCK_SIZE)
    np.testing.assert_array_equal(ref_absmax.numpy(), absmax)
    ref_codes = ref_codes.numpy().astype(int)
    differ = ref_codes != codes
    assert np.mean(differ) < 0.1
    assert np.all(chosen[differ] <= distance[np.arange(flat.size), ref_codes][differ])


def _adamw8(lr, wd):
    return optax.chain(blockwise_moments(optax.scale_by_adam(0.9, 0.999, 1e-8)), optax.add_decayed_weights(wd),
                       optax.scale_by_learning_rate(lr))


@pytest.mark.parametrize("shape", [(48, 256), (37, 200), (40, 50)])
def test_8bit_adamw_steps_track_bitsandbytes(shape):
    """Ten AdamW8bit steps on the same parameters and gradients as bitsandbytes' AdamW8bit. The two differ
    only where their nearest-code searches disagree (<= 2% of the moment bytes, by one code), so the
    parameters' movement agrees to 2% in norm (measured 0.5-0.9%); a tensor under 4096 elements keeps
    32-bit moments in both, which agree to float32 rounding (1e-6 of the movement)."""
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(shape).astype(np.float32)
    grads = [(rng.standard_normal(shape) * (1 + i)).astype(np.float32) for i in range(10)]
    ref = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = bnb.optim.AdamW8bit([ref], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    tx = _adamw8(1e-2, 0.1)
    params = jnp.asarray(p0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        ref.grad = torch.from_numpy(g.copy())
        opt.step()
        u, state = update(jnp.asarray(g), state, params)
        params = params + u
    moved_ref = ref.detach().numpy() - p0
    moved = np.asarray(params) - p0
    rel = np.linalg.norm(moved - moved_ref) / np.linalg.norm(moved_ref)
    mu = state[0].mu
    if p0.size >= MIN_8BIT_SIZE:
        assert isinstance(mu, Blockwise) and mu.codes.dtype == jnp.uint8 and mu.codes.shape == shape
        ref_state = opt.state[ref]
        assert np.mean(ref_state["state1"].numpy() == np.asarray(mu.codes)) >= 0.98
        assert rel <= 2e-2, rel
    else:
        assert mu.dtype == jnp.float32 and opt.state[ref]["state1"].dtype == torch.float32
        assert rel <= 1e-5, rel


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128)
    return save_tiny(tmp_path_factory.mktemp("optim"), cfg, "tiny")


def _train(model_dir, optimizer: str, steps: int = 50):
    """Full fine-tuning of the tiny Llama on four fixed batches, cycled: (losses, trainable, opt_state)."""
    from flax import nnx

    from jaxtune.checkpoint.hf import load_model
    from jaxtune.objectives.sft import SFT
    from jaxtune.step import make_train_step

    model = load_model(model_dir)
    cfg = _cfg(optimizer=optimizer, learning_rate=3e-3, weight_decay=0.01, max_grad_norm=1.0)
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    tx, schedule = build_optimizer(cfg, total_steps=steps)
    opt_state = tx.init(trainable)
    step = make_train_step(graphdef, SFT(), tx, schedule, use_rng=False)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        ids = rng.integers(0, 96, (1, 4, 32)).astype(np.int32)
        batches.append({"input_ids": ids, "labels": ids.copy(), "segment_ids": np.ones_like(ids),
                        "positions": np.broadcast_to(np.arange(32, dtype=np.int32), ids.shape).copy()})
    losses = []
    for i in range(steps):
        trainable, opt_state, out = step(trainable, frozen, opt_state, batches[i % 4], jax.random.key(0), jnp.int32(i))
        losses.append(float(out["loss"]))
    return np.array(losses), trainable, opt_state


def test_8bit_adamw_trains_like_32bit_adamw_over_50_steps(tiny_dir):
    """adamw_bnb_8bit against adamw_torch on the same 50 full fine-tuning steps (the loss falls from 4.6
    to 1.2 nats). The 8-bit moments perturb each update by their quantization error, a few % of it, so
    the two trajectories part by a few % of the distance travelled: at every step the losses differ by
    at most 3% of the whole run's loss drop (measured 1.7%), and the parameters
    travel the same way (cosine of the two movements >= 0.95; measured 0.985). The moment bytes are a quarter of 32-bit AdamW's, plus
    4 bytes per 256-element block."""
    losses32, params32, state32 = _train(tiny_dir, "adamw_torch")
    losses8, params8, state8 = _train(tiny_dir, "adamw_bnb_8bit")
    drop = losses32[0] - losses32[-1]
    assert drop > 2.0
    assert np.abs(losses8 - losses32).max() <= 0.03 * drop
    _, start, _ = _train(tiny_dir, "adamw_torch", steps=0)
    move32 = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params32, start)
    move8 = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params8, start)
    dot = sum(np.sum(a * b) for a, b in zip(jax.tree.leaves(move8), jax.tree.leaves(move32)))
    norms = [np.sqrt(sum(np.sum(x ** 2) for x in jax.tree.leaves(m))) for m in (move8, move32)]
    assert dot / (norms[0] * norms[1]) >= 0.95, dot / (norms[0] * norms[1])

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    quantized = [x for x in jax.tree.leaves(state8, is_leaf=lambda x: isinstance(x, Blockwise))
                 if isinstance(x, Blockwise)]
    assert quantized and all(q.codes.dtype == jnp.uint8 for q in quantized)
    assert nbytes(state8) < 0.3 * nbytes(state32)


def test_muon_uses_axolotls_split():
    """optimizer: muon -- each weight matrix (a stacked layer's [layers, in, out] kernel included) takes
    optax's Muon update, computed on that leaf alone; embeddings, the head and vectors (norm scales) take
    AdamW's, embeddings and head without weight decay, as Axolotl's Muon factory groups them."""
    from optax.contrib import MuonDimensionNumbers

    rng = np.random.default_rng(2)
    shapes = {"embed_tokens": {"embedding": (96, 64)}, "norm": {"scale": (64,)}, "lm_head": {"kernel": (64, 96)},
              "layers": {"self_attn": {"q_proj": {"kernel": (2, 64, 64)}}, "input_layernorm": {"scale": (2, 64)}}}
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    cfg = _cfg(optimizer="muon", max_grad_norm=0)
    tx, _ = build_optimizer(cfg, 10)
    updates, _ = tx.update(grads, tx.init(params), params)

    def alone(tx_one, leaf, grad):
        return tx_one.update(grad, tx_one.init(leaf), leaf)[0]

    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    muon_ref = optax.contrib.muon(1e-2, beta=0.95, nesterov=True, weight_decay=0.1,
                                  muon_weight_dimension_numbers=MuonDimensionNumbers(1, 2))
    np.testing.assert_allclose(updates["layers"]["self_attn"]["q_proj"]["kernel"],
                               alone(muon_ref, q, grads["layers"]["self_attn"]["q_proj"]["kernel"]), rtol=1e-5,
                               atol=1e-7)
    for path, decay in ((("embed_tokens", "embedding"), 0.0), (("lm_head", "kernel"), 0.0), (("norm", "scale"), 0.0),
                        (("layers", "input_layernorm", "scale"), 0.0)):
        leaf, grad, got = params, grads, updates
        for key in path:
            leaf, grad, got = leaf[key], grad[key], got[key]
        ref = alone(optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=decay), leaf, grad)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8, err_msg="/".join(path))
    # and Muon differs from AdamW on the matrix (the split is not a no-op)
    adam_q = alone(optax.adamw(1e-2, weight_decay=0.1), q, grads["layers"]["self_attn"]["q_proj"]["kernel"])
    assert not np.allclose(updates["layers"]["self_attn"]["q_proj"]["kernel"], adam_q, rtol=0.1)


def test_optimizer_names_as_axolotl_writes_them():
    assert _cfg(optimizer="ao_adamw_8bit").optimizer == "adamw_torch_8bit"
    assert _cfg(optimizer="paged_adamw_8bit").optimizer == "paged_adamw_8bit"
    with pytest.raises(ConfigError, match="4-bit optimizer states are not implemented; adamw_8bit"):
        _cfg(optimizer="adamw_torch_4bit")
    with pytest.raises(ConfigError, match="did you mean 'adamw_8bit'"):
        _cfg(optimizer="adamw_8bt")


def test_plan_counts_the_8bit_state(tiny_dir):
    """`jaxtune plan` sizes the optimizer state from the optimizer's own init: 8-bit moments are about a
    quarter of 32-bit ones (tensors under 4096 elements keep 32-bit moments)."""
    from jaxtune.plan import plan_memory

    base = {"base_model": str(tiny_dir), "datasets": [{"path": "x.jsonl", "type": "completion"}], "sequence_len": 64}
    full = plan_memory(build_config({**base, "optimizer": "adamw_torch"}), devices=1)
    small = plan_memory(build_config({**base, "optimizer": "adamw_bnb_8bit"}), devices=1)
    assert 0.25 <= small.optimizer / full.optimizer <= 0.3
    assert "8-bit" in small.report()
