"""Chunked cross-entropy (jaxtune.kernels.cross_entropy) against the plain full-logits computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels.cross_entropy import default_chunk_size, linear_cross_entropy, linear_token_logprobs
from jaxtune.objectives.sft import next_token_targets

N, D, V = 45, 24, 131  # 45 tokens: chunk sizes 8 and 16 leave a partial last chunk


def _inputs(dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(k[0], (N, D), jnp.float32).astype(dtype)
    head = (0.3 * jax.random.normal(k[1], (V, D), jnp.float32)).astype(dtype)
    targets = jax.random.randint(k[2], (N,), 0, V)
    weights = (jax.random.uniform(k[3], (N,)) > 0.3).astype(jnp.float32)
    targets = jnp.where(weights > 0, targets, -100)  # ignored tokens carry -100, as labels do
    coeffs = jax.random.normal(k[4], (N,), jnp.float32)
    return hidden, head, targets, weights, coeffs


def _plain_logprobs(hidden, head, targets, softcap=None):
    logits = jnp.einsum("nd,vd->nv", hidden, head, preferred_element_type=jnp.float32)
    if softcap is not None:  # transformers' Gemma 2: logits / cap, tanh, * cap
        logits = jnp.tanh(logits / softcap) * softcap
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]


def _plain_loss(hidden, head, targets, weights, softcap=None):
    return -jnp.sum(jnp.where(weights > 0, weights * _plain_logprobs(hidden, head, targets, softcap), 0.0))


# Logits here have a spread of ~1.5: a cap of 1.5 bends them hard (tanh' falls to 0.4 at one cap).
SOFTCAPS = [None, 1.5]


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("vocab_axis", [0, 1])
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_linear_cross_entropy_matches_plain(chunk, vocab_axis, softcap):
    hidden, head, targets, weights, _ = _inputs()
    layout = (lambda w: w) if vocab_axis == 0 else (lambda w: w.T)  # noqa: E731

    def chunked(h, w):
        return linear_cross_entropy(h, layout(w), targets, weights, vocab_axis=vocab_axis, chunk_size=chunk,
                                    softcap=softcap)

    def plain(h, w):
        return _plain_loss(h, w, targets, weights, softcap)

    # A sum of N nll terms, each a logsumexp over V logits, differently ordered: fp32 rounds each to
    # about (log2 N + log2 V) * eps ~ 2e-6 relative. A dropped or doubled token is off by 1/N ~ 2e-2.
    np.testing.assert_allclose(float(chunked(hidden, head)), float(plain(hidden, head)), rtol=1e-5)
    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, head)
    want = jax.grad(plain, argnums=(0, 1))(hidden, head)
    assert _max_diff(got, want) < 1e-5


@pytest.mark.parametrize("chunk", [8, 16])
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_token_logprobs_match_plain(chunk, softcap):
    hidden, head, targets, _, coeffs = _inputs(seed=1)
    targets = jnp.maximum(targets, 0)

    def chunked(h, w):
        return jnp.sum(coeffs * linear_token_logprobs(h, w.T, targets, vocab_axis=1, chunk_size=chunk,
                                                      softcap=softcap))

    def plain(h, w):
        return jnp.sum(coeffs * _plain_logprobs(h, w, targets, softcap))

    np.testing.assert_allclose(np.asarray(linear_token_logprobs(hidden, head, targets, chunk_size=chunk,
                                                                softcap=softcap)),
                               np.asarray(_plain_logprobs(hidden, head, targets, softcap)), atol=1e-5)
    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, head)
    want = jax.grad(plain, argnums=(0, 1))(hidden, head)
    assert _max_diff(got, want) < 1e-5


@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_token_logprobs_with_a_frozen_head(softcap):
    """A frozen head (LoRA): the log-probs' gradient w.r.t. the hidden states comes from the
    forward's per-token d log p / d hidden, scaled by each token's cotangent. It equals the plain
    gradient (with the entropy computed alongside), and the whole computation has two head matmuls
    (the logits, the derivative), not three (the backward recomputing the logits, then dh)."""
    hidden, head, targets, _, coeffs = _inputs(seed=2)
    targets = jnp.maximum(targets, 0)

    def chunked(h):
        logp, entropy = linear_token_logprobs(h, head, targets, chunk_size=16, softcap=softcap, with_entropy=True)
        return jnp.sum(coeffs * logp) + 0.0 * jnp.sum(entropy)

    got = jax.jit(jax.grad(chunked))(hidden)
    want = jax.grad(lambda h: jnp.sum(coeffs * _plain_logprobs(h, head, targets, softcap)))(hidden)
    assert _max_diff(got, want) < 1e-5
    assert jax.jit(jax.grad(chunked)).lower(hidden).as_text().count("dot_general") == 2


def test_frozen_head_gets_no_weight_gradient_matmul():
    """Differentiating w.r.t. the hidden states only (a LoRA run's frozen head) skips the head's
    gradient matmul; the hidden-state gradient is unchanged."""
    hidden, head, targets, weights, _ = _inputs()

    def loss(h, w):
        return linear_cross_entropy(h, w, targets, weights, chunk_size=16)

    def dots(argnums):
        return jax.jit(jax.grad(loss, argnums=argnums)).lower(hidden, head).as_text().count("dot_general")

    assert dots(0) == 2 and dots((0, 1)) == 3  # logits and dh; plus dhead
    want = jax.grad(lambda h: _plain_loss(h, head, targets, weights))(hidden)
    assert _max_diff(jax.grad(loss)(hidden, head), want) < 1e-5


def test_bf16_close_to_fp32():
    hidden, head, targets, weights, _ = _inputs()
    want = jax.grad(lambda h, w: _plain_loss(h, w, targets, weights), argnums=(0, 1))(hidden, head)
    got = jax.grad(lambda h, w: linear_cross_entropy(h, w, targets, weights, chunk_size=16), argnums=(0, 1))(
        hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16))
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
    scale = max(float(jnp.max(jnp.abs(w))) for w in want)
    assert _max_diff(got, want) < 2e-2 * scale


def test_default_chunk_size():
    # Never longer than the input: a small vocabulary's chunk (2**16 tokens at V=131) must not pad
    # 45 tokens up to a whole chunk.
    hidden, head, targets, weights, _ = _inputs()
    assert default_chunk_size(V) == 2**16
    hlo = jax.jit(lambda h: linear_cross_entropy(h, head, targets, weights)).lower(hidden).as_text()
    assert f"{2**16}x" not in hlo
    assert default_chunk_size(49152, "cpu") == 256
    assert default_chunk_size(151936, "cpu") == 64
    assert default_chunk_size(10**9, "cpu") == 16
    assert default_chunk_size(128256, "gpu") == 1024  # accelerators take larger chunks (see CHUNK_ELEMENTS)
    assert default_chunk_size(49152, "tpu") == 2048


def test_default_chunks_split_the_tokens_evenly(monkeypatch):
    """The fewest chunks of at most default_chunk_size() tokens, evenly sized (to 8): a GRPO micro-batch
    of 576 tokens at SmolLM2's 49k vocabulary is 3 x 192 (not 3 x 256, a third of them padding); an
    explicit chunk_size is kept. The loss and gradients equal the plain computation's."""
    from jaxtune.kernels import cross_entropy

    assert cross_entropy.chunk_rows(576, 49152) == 192 and cross_entropy.chunk_rows(2048, 49152) == 256
    assert cross_entropy.chunk_rows(1025, 49152) == 208 and cross_entropy.chunk_rows(576, 49152, 16) == 16
    hidden, head, targets, weights, _ = _inputs()
    monkeypatch.setitem(cross_entropy.CHUNK_ELEMENTS, "cpu", 16 * V)  # 16 tokens per chunk at most
    assert cross_entropy.chunk_rows(hidden.shape[0], V) == 16  # 45 tokens: 3 chunks of 15, rounded to 16

    def chunked(h, w):
        return linear_cross_entropy(h, w, targets, weights)

    np.testing.assert_allclose(float(chunked(hidden, head)), float(_plain_loss(hidden, head, targets, weights, None)),
                               rtol=1e-5)
    got = jax.grad(chunked, argnums=(0, 1))(hidden, head)
    want = jax.grad(lambda h, w: _plain_loss(h, w, targets, weights, None), argnums=(0, 1))(hidden, head)
    assert _max_diff(got, want) < 1e-5


def test_next_token_targets_respect_segments_and_ignored_labels():
    labels = jnp.array([[-100, 2, 3, 4, 0, -100]])
    segments = jnp.array([[1, 1, 1, 2, 2, 0]])
    targets, trained = next_token_targets(labels, segments)
    # position t predicts labels[t+1] within a segment: 0->2, 1->3; 2->4 crosses into segment 2;
    # 3->0 is inside segment 2; 4->pad is not; the last position predicts nothing.
    assert np.asarray(trained).tolist() == [[True, True, False, True, False, False]]
    assert np.asarray(targets).tolist() == [[2, 3, 0, 0, 0, 0]]
