"""The attention entry point: the masking rule and GQA without repeated K/V."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.errors import JaxtuneError
from jaxtune.kernels.attention import attention, attention_mask


def _naive(q, k, v, allowed):
    """Per-head loops with K/V repeated to the query heads: the textbook definition."""
    b, t, n, h = q.shape
    group = n // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for ni in range(n):
            logits = q[bi, :, ni] @ k[bi, :, ni // group].T / np.sqrt(h)
            logits = np.where(allowed[bi], logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, ni] = p @ v[bi, :, ni // group]
    return out


def test_packed_causal_gqa_window_against_naive():
    rng = np.random.default_rng(0)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0]])
    pos = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0]])
    q = rng.normal(size=(1, 10, 6, 8)).astype(np.float32)
    k = rng.normal(size=(1, 10, 2, 8)).astype(np.float32)
    v = rng.normal(size=(1, 10, 2, 8)).astype(np.float32)
    for window in (None, 2):
        allowed = (seg[:, :, None] == seg[:, None, :]) & (pos[:, :, None] >= pos[:, None, :])
        if window:
            allowed &= (pos[:, :, None] - pos[:, None, :]) < window
        got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=jnp.asarray(seg),
                        kv_segment_ids=jnp.asarray(seg), q_positions=jnp.asarray(pos),
                        kv_positions=jnp.asarray(pos), sliding_window=window)
        np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, allowed), atol=1e-5)


def test_mask_examples():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])
    pos = jnp.asarray([[0, 1, 2, 0, 1, 0]])
    m = np.asarray(attention_mask(seg, seg, pos, pos))[0]
    assert m[3].tolist() == [False, False, False, True, False, False]  # first token of sample 2
    assert m[2].tolist() == [True, True, True, False, False, False]
    # A window <= 0 disables the window (per-layer traced value).
    assert np.array_equal(np.asarray(attention_mask(seg, seg, pos, pos, sliding_window=0)), m[None])


def test_gradients_do_not_leak_across_segments():
    rng = np.random.default_rng(1)
    seg = jnp.asarray([[1, 1, 2, 2]])
    pos = jnp.asarray([[0, 1, 0, 1]])
    q, k, v = (jnp.asarray(rng.normal(size=(1, 4, 2, 4)), jnp.float32) for _ in range(3))

    def first_sample_output(k):
        out = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
        return out[:, :2].sum()

    dk = np.asarray(jax.grad(first_sample_output)(k))
    assert np.abs(dk[:, 2:]).max() == 0 and np.abs(dk[:, :2]).max() > 0


def test_unknown_implementation_is_an_error():
    x = jnp.zeros((1, 2, 2, 4))
    ids = jnp.ones((1, 2), jnp.int32)
    with pytest.raises(JaxtuneError, match="xla"):
        attention(x, x, x, q_segment_ids=ids, kv_segment_ids=ids, q_positions=ids, kv_positions=ids,
                  implementation="flash")
