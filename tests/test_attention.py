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


# ----------------------------------------------------------------------- backends vs the reference

def _case(kind: str, dtype, seed: int = 0):
    """q, k, v and masking inputs for one case: 9 query heads over 3 K/V heads (SmolLM2's GQA)."""
    b, t, n, kh, h = 2, 45, 9, 3, 64
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, t, kh, h), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, t, kh, h), jnp.float32).astype(dtype)
    if kind == "packed":  # 3+ samples of odd lengths, then padding
        lengths = [[7, 13, 11, 9, 5], [19, 3, 17, 6]]
    else:
        lengths = [[t], [t]]
    seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for row, ls in enumerate(lengths):
        start = 0
        for i, n_tok in enumerate(ls):
            seg[row, start:start + n_tok] = i + 1 if start + n_tok <= t - 4 or kind != "packed" else 0
            pos[row, start:start + n_tok] = np.arange(n_tok)
            start += n_tok
    window = 6 if kind == "window" else None
    return q, k, v, jnp.asarray(seg), jnp.asarray(pos), window


def _run(impl, q, k, v, seg, pos, window, **kw):
    def loss(q, k, v):
        out = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                        sliding_window=window, implementation=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.shape[-1], dtype=jnp.float32))), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


BACKENDS = [name for name in ("blockwise",)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["causal", "packed", "window"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_backend_matches_reference(backend, kind, dtype, tol, monkeypatch):
    import jaxtune.kernels.blockwise as blockwise

    # Small tiles so that the 45 tokens span several (and a partial last) tile in each direction.
    monkeypatch.setattr(blockwise, "Q_BLOCK", 16)
    monkeypatch.setattr(blockwise, "KV_BLOCK", 8)
    case = _case(kind, dtype)
    out, grads = _run(backend, *case)
    ref_out, ref_grads = _run("xla", *(x.astype(jnp.float32) if hasattr(x, "astype") and x.dtype == dtype else x
                                       for x in case))
    assert out.dtype == dtype
    for name, got, want in [("out", out, ref_out), *zip(("dq", "dk", "dv"), grads, ref_grads)]:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= tol * scale, (name, float(np.abs(got - want).max()))


def test_blockwise_skips_fully_masked_tiles(monkeypatch):
    """A tile no query may attend is never computed: NaN keys/values there leave the outputs (and the
    gradients) of queries that cannot see them finite. The reference computes every tile (0 * NaN)."""
    import jaxtune.kernels.blockwise as blockwise

    monkeypatch.setattr(blockwise, "Q_BLOCK", 8)
    monkeypatch.setattr(blockwise, "KV_BLOCK", 8)
    q, k, v, seg, pos, _ = _case("causal", jnp.float32)
    k = k.at[:, 8:].set(jnp.nan)
    v = v.at[:, 8:].set(jnp.nan)
    out, (dq, _, _) = _run("blockwise", q, k, v, seg, pos, None)
    # Causal: queries 0..7 (tile 0) only see key tile 0.
    assert np.isfinite(np.asarray(out[:, :8])).all() and np.isfinite(np.asarray(dq[:, :8])).all()
    ref_out, _ = _run("xla", q, k, v, seg, pos, None)
    assert not np.isfinite(np.asarray(ref_out[:, :8])).all()
