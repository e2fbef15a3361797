"""The attention entry point: the masking rule and GQA without repeated K/V."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.errors import JaxtuneError
from jaxtune.kernels.attention import attention, attention_mask, cached_attention


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


def test_decode_over_a_shared_prefix_against_naive():
    """A decode step over a prefix shared by groups of rows (the sampler's prompt, read once for its G
    completions), the rows' own cache slots and the token itself: the textbook attention over those
    keys, and the same step with the prefix repeated into every row's cache (soft cap and window too)."""
    rng = np.random.default_rng(1)
    p, g, kv, n, h, w, s = 2, 3, 2, 6, 8, 5, 4
    b = p * g
    p_seg = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left-padded prompts
    p_pos = np.maximum(np.cumsum(p_seg, 1) - 1, 0)
    seg = np.array([[1, 1, 0, 0]] * b)  # two tokens decoded so far, two empty slots
    pos = p_pos[:, -1:].repeat(g, 0) + np.array([[1, 2, 0, 0]])
    q_pos = pos[:, 1:2] + 1
    pk, pv = (rng.normal(size=(p, kv, w, h)).astype(np.float32) for _ in range(2))
    ck, cv = (rng.normal(size=(b, kv, s, h)).astype(np.float32) for _ in range(2))
    q = rng.normal(size=(b, 1, n, h)).astype(np.float32)
    k1, v1 = (rng.normal(size=(b, 1, kv, h)).astype(np.float32) for _ in range(2))
    # every row's keys: its prompt's, its own slots', its own (token-major for _naive)
    keys = np.concatenate([np.repeat(pk, g, 0), ck, np.swapaxes(k1, 1, 2)], axis=2).transpose(0, 2, 1, 3)
    values = np.concatenate([np.repeat(pv, g, 0), cv, np.swapaxes(v1, 1, 2)], axis=2).transpose(0, 2, 1, 3)
    all_seg = np.concatenate([np.repeat(p_seg, g, 0), seg, np.ones((b, 1), int)], 1)
    all_pos = np.concatenate([np.repeat(p_pos, g, 0), pos, q_pos], 1)
    common = dict(q_segment_ids=jnp.ones((b, 1), jnp.int32), kv_segment_ids=jnp.asarray(seg),
                  q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(pos))
    prefix = tuple(jnp.asarray(a) for a in (pk, pv, p_pos, p_seg))
    for window, softcap in ((None, None), (3, None), (None, 2.0)):
        got = cached_attention(*(jnp.asarray(a) for a in (q, k1, v1, ck, cv)), sliding_window=window, softcap=softcap,
                               prefix=prefix, **common)
        repeated = cached_attention(
            *(jnp.asarray(a) for a in (q, k1, v1)), jnp.concatenate([jnp.repeat(pk, g, 0), ck], 2),
            jnp.concatenate([jnp.repeat(pv, g, 0), cv], 2), q_segment_ids=jnp.ones((b, 1), jnp.int32),
            kv_segment_ids=jnp.asarray(np.concatenate([np.repeat(p_seg, g, 0), seg], 1)),
            q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(np.concatenate([np.repeat(p_pos, g, 0), pos], 1)),
            sliding_window=window, softcap=softcap)
        np.testing.assert_allclose(np.asarray(got), np.asarray(repeated), atol=1e-5)
        if softcap is None:
            allowed = (all_seg[:, None, :] > 0) & (q_pos[:, :, None] >= all_pos[:, None, :])
            if window:
                allowed &= (q_pos[:, :, None] - all_pos[:, None, :]) < window
            np.testing.assert_allclose(np.asarray(got), _naive(q, keys, values, allowed), atol=1e-5)
    with pytest.raises(ValueError, match="single-token"):
        cached_attention(*(jnp.asarray(a) for a in (np.repeat(q, 2, 1), np.repeat(k1, 2, 1), np.repeat(v1, 2, 1),
                                                    ck, cv)), prefix=prefix, q_segment_ids=jnp.ones((b, 2), jnp.int32),
                         kv_segment_ids=jnp.asarray(seg), q_positions=jnp.asarray(np.repeat(q_pos, 2, 1)),
                         kv_positions=jnp.asarray(pos))


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


ON_GPU = jax.default_backend() == "gpu"
# Every backend runs here: the Pallas kernel in interpret mode off-GPU; cuDNN only on a GPU.
BACKENDS = ["blockwise", "pallas"] + (["cudnn"] if ON_GPU else [])


def _small_tiles(monkeypatch):
    """Small tiles so that the 45 tokens span several (and a partial last) tile in each direction;
    the Pallas kernel also runs off-GPU (interpreted)."""
    import jaxtune.kernels.attention as attention_mod
    import jaxtune.kernels.blockwise as blockwise
    import jaxtune.kernels.pallas_gpu as pallas_gpu

    monkeypatch.setattr(blockwise, "Q_BLOCK", 16)
    monkeypatch.setattr(blockwise, "KV_BLOCK", 8)
    # Triton's matrix products need blocks of at least 16 on a GPU.
    small = 16 if ON_GPU else 8
    for name, size in (("BLOCK_Q", 2 * small), ("BLOCK_K", small), ("BWD_OUTER", 2 * small), ("BWD_INNER", small)):
        monkeypatch.setattr(pallas_gpu, name, size)
    if not ON_GPU:
        monkeypatch.setitem(attention_mod._PLATFORMS, "pallas", (jax.default_backend(),))


# Gemma 2's attention soft cap, small enough that tanh bends the unit-variance scores hard (its own 50
# leaves them almost linear and would not tell a missing cap or a wrong derivative from a right one).
SOFTCAP = 0.8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["causal", "packed", "window", "softcap"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_backend_matches_reference(backend, kind, dtype, tol, monkeypatch):
    """Forward and gradients of every backend against the xla reference; "softcap" is the packed case
    with a window and the soft cap, which the reference applies as the published formula."""
    _small_tiles(monkeypatch)
    case = _case("packed" if kind == "softcap" else kind, dtype)
    if kind == "softcap":
        case = (*case[:5], 6)
    kw = {"softcap": SOFTCAP} if kind == "softcap" else {}
    out, grads = _run(backend, *case, **kw)
    ref_out, ref_grads = _run("xla", *(x.astype(jnp.float32) if hasattr(x, "astype") and x.dtype == dtype else x
                                       for x in case), **kw)
    assert out.dtype == dtype
    for name, got, want in [("out", out, ref_out), *zip(("dq", "dk", "dv"), grads, ref_grads)]:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= tol * scale, (name, float(np.abs(got - want).max()))


def test_blockwise_tiles_split_lengths_evenly(monkeypatch):
    """A length just over a multiple of the preferred tile is split into even tiles, not padded to the
    next multiple (640 tokens: two tiles of 320, not two of 512); the result is unchanged."""
    import jaxtune.kernels.blockwise as blockwise

    assert [blockwise.tile_length(n, 512) for n in (256, 512, 640, 1030, 2048)] == [256, 512, 320, 344, 512]
    monkeypatch.setattr(blockwise, "Q_BLOCK", 32)  # 45 tokens: two q tiles of 24, three kv tiles of 16
    monkeypatch.setattr(blockwise, "KV_BLOCK", 20)
    assert (blockwise.tile_length(45, 32), blockwise.tile_length(45, 20)) == (24, 16)
    case = _case("packed", jnp.float32)
    out, grads = _run("blockwise", *case)
    ref_out, ref_grads = _run("xla", *case)
    for got, want in [(out, ref_out), *zip(grads, ref_grads)]:
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("backend", ["blockwise", "pallas"])
def test_backend_skips_fully_masked_tiles(backend, monkeypatch):
    """A tile no query may attend is never computed: NaN keys/values there leave the outputs (and the
    gradients) of queries that cannot see them finite. The reference computes every tile (0 * NaN)."""
    import jaxtune.kernels.blockwise as blockwise
    import jaxtune.kernels.pallas_gpu as pallas_gpu

    _small_tiles(monkeypatch)
    for module, names in ((blockwise, ("Q_BLOCK", "KV_BLOCK")),
                          (pallas_gpu, ("BLOCK_Q", "BLOCK_K", "BWD_OUTER", "BWD_INNER"))):
        for name in names:
            monkeypatch.setattr(module, name, 8 if not ON_GPU else 16)
    edge = 8 if not ON_GPU else 16
    q, k, v, seg, pos, _ = _case("causal", jnp.float32)
    k = k.at[:, edge:].set(jnp.nan)
    v = v.at[:, edge:].set(jnp.nan)
    out, (dq, _, _) = _run(backend, q, k, v, seg, pos, None)
    # Causal: the queries of tile 0 only see key tile 0.
    assert np.isfinite(np.asarray(out[:, :edge])).all() and np.isfinite(np.asarray(dq[:, :edge])).all()
    ref_out, _ = _run("xla", q, k, v, seg, pos, None)
    assert not np.isfinite(np.asarray(ref_out[:, :edge])).all()


def _pair_rows(rng, b: int, length: int):
    """Rows of preference pairs laid out with shared prompts (jaxtune.batch), random lengths."""
    from jaxtune.data import preference

    seg, pos = np.zeros((b, length), np.int32), np.zeros((b, length), np.int32)
    for row in range(b):
        n = int(rng.integers(2, 5))
        ex = {f"{k}_ids": [[1] * int(rng.integers(1, 12)) for _ in range(n)] for k in ("prompt", "chosen", "rejected")}
        ex.update(chosen_labels=ex["chosen_ids"], rejected_labels=ex["rejected_ids"])
        rows, _ = preference.lay_out(ex, kind="preference", capacity=10**6, packed=True, share=row != 1)
        s, p = np.asarray(rows["segment_ids"][0][:length - 6]), np.asarray(rows["positions"][0][:length - 6])
        seg[row, :len(s)], pos[row, :len(p)] = s, p
        seg[row, len(s):] = -1 if row else 0
    return seg, pos


@pytest.mark.parametrize("rows", ["packed", "pairs"])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (False, None), (False, 9)])
def test_pallas_block_ranges_cover_every_allowed_tile_and_unmask_only_full_ones(causal, window, rows):
    """The Pallas kernel computes only the tiles its tables list, and masks none of the "full" run:
    so every tile with an allowed pair must be listed, and every unmasked tile fully allowed.
    Checked against the real mask for packed rows of random lengths (and a padded tail), and for rows
    of preference pairs whose answers attend to a shared prompt."""
    from jaxtune.kernels.pallas_gpu import block_ranges

    rng = np.random.default_rng(1)
    b, length, bq, bk = 3, 96, 16, 8
    seg, pos = np.zeros((b, length), np.int32), np.zeros((b, length), np.int32)
    for row in range(b if rows == "packed" else 0):
        start = 0
        while start < length - 10:
            n_tok = int(rng.integers(1, 40))
            seg[row, start:start + n_tok] = seg[row, max(start - 1, 0)] + 1
            pos[row, start:start + n_tok] = np.arange(len(seg[row, start:start + n_tok]))
            start += n_tok
        seg[row, start:] = -1 if row else 0  # a padded tail: the kernel's own padding, or the data's
    if rows == "pairs":
        seg, pos = _pair_rows(rng, b, length)
    q_seg = np.where(seg == -1, -2, seg)  # the kernel pads queries with -2, keys with -1
    qs, ks = (jnp.asarray(q_seg), jnp.asarray(pos)), (jnp.asarray(seg), jnp.asarray(pos))
    w = jnp.asarray(window or 0, jnp.int32)
    q_table, k_table = (np.asarray(t) for t in block_ranges(qs, ks, (w, causal, window is not None), bq, bk))
    mask = np.asarray(attention_mask(qs[0], ks[0], qs[1], ks[1], causal=causal, sliding_window=window))
    tiles = mask.reshape(b, length // bq, bq, length // bk, bk).transpose(0, 1, 3, 2, 4)  # [B, nq, nk, bq, bk]
    some, every = tiles.any((-1, -2)), tiles.all((-1, -2))
    for table, some_, every_ in ((q_table, some, every), (k_table, some.swapaxes(1, 2), every.swapaxes(1, 2))):
        first, f_first, f_end, end = np.moveaxis(table, -1, 0)
        index = np.arange(some_.shape[-1])
        listed = (index >= first[..., None]) & (index < end[..., None])
        unmasked = (index >= f_first[..., None]) & (index < f_end[..., None])
        assert not (some_ & ~listed).any(), "a tile with an allowed pair is not listed"
        assert not (unmasked & ~every_).any(), "a tile run without its mask is not fully allowed"
        assert (unmasked <= listed).all()
        if rows == "packed":  # and the unmasked run is not trivially empty (pairs' segments are too short)
            assert unmasked.sum() >= 0.5 * every_.sum()


# The TPU path runs interpreted; on a GPU the interpreter is slow and tells nothing more.
@pytest.mark.skipif(ON_GPU, reason="the TPU path is checked on CPU (interpreted)")
@pytest.mark.parametrize("kind", ["causal", "packed", "window", "softcap"])
def test_tpu_splash_path_matches_reference(kind):
    """The `pallas` backend's TPU path (JAX's splash attention, interpreted here) against the reference,
    forward and gradients, on the rows it defines (padding rows are nobody's output: their loss
    weight is 0); GQA 9/3 through its MQA form; "softcap": packed rows with the soft cap."""
    from jaxtune.kernels.splash_tpu import splash_attention

    q, k, v, seg, pos, window = _case("packed" if kind == "softcap" else kind, jnp.float32)
    weight = (seg != 0)[:, :, None, None] * jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos, causal=True,
              sliding_window=window, scale=q.shape[-1] ** -0.5, softcap=SOFTCAP if kind == "softcap" else None)

    def fallback(q, *args, **kwargs):  # traced in either case (lax.cond); NaN if it ever runs here
        return jnp.full_like(q, jnp.nan)

    def run(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(out * weight), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out * (seg != 0)[:, :, None, None], grads

    got = run(lambda q, k, v: splash_attention(q, k, v, fallback=fallback, fallback_name="none", interpret=True, **kw))
    want = run(lambda q, k, v: attention(q, k, v, implementation="xla", **kw))
    # Splash accumulates in its own blocks: dK and dV each sum T * G = 135 products, which fp32 gets
    # within 135 * eps ~ 2e-5 of exact relative to the leaf's scale (worst case); 1e-4 of the scale.
    # A key wrongly attended or dropped moves outputs and gradients by ~1/T ~ 2e-2 of it.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * max(1.0, float(np.abs(b).max())))


@pytest.mark.skipif(ON_GPU, reason="the TPU path is checked on CPU (interpreted)")
def test_tpu_splash_path_falls_back_where_it_cannot_express_the_mask():
    """Positions that do not count up within a sample (splash masks by index) and per-layer traced
    windows run the fallback, which must then give the reference's answer."""
    from jaxtune.kernels.blockwise import blockwise_attention
    from jaxtune.kernels.attention import positions_count_up
    from jaxtune.kernels.splash_tpu import splash_attention

    q, k, v, seg, pos, _ = _case("packed", jnp.float32)
    assert bool(positions_count_up(seg, pos))
    shifted = pos.at[:, 3].add(5)
    assert not bool(positions_count_up(seg, shifted))
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=shifted, kv_positions=shifted, causal=True,
              scale=0.125)
    got = splash_attention(q, k, v, sliding_window=None, fallback=blockwise_attention, fallback_name="blockwise",
                           interpret=True, **kw)
    want = attention(q, k, v, implementation="xla", sliding_window=None, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    traced = jax.jit(lambda w: splash_attention(q, k, v, sliding_window=w, fallback=blockwise_attention,
                                                fallback_name="blockwise", interpret=True, **kw))(jnp.int32(4))
    np.testing.assert_allclose(np.asarray(traced),
                               np.asarray(attention(q, k, v, implementation="xla", sliding_window=4, **kw)), atol=1e-5)


@pytest.mark.parametrize("head_dim", [128, 96, 40])
def test_pallas_kernel_head_dims(head_dim, monkeypatch):
    """The families' other head sizes: 128, and sizes that are no power of two (padded inside the
    kernel call), forward and gradients against the reference on packed rows with a window."""
    _small_tiles(monkeypatch)
    rng = np.random.default_rng(head_dim)
    b, t, n, kh = 1, 40, 4, 2
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, head_dim)), jnp.float32) for heads in (n, kh, kh))
    seg = jnp.asarray([[1] * 17 + [2] * 23], jnp.int32)
    pos = jnp.asarray([list(range(17)) + list(range(23))], jnp.int32)
    got = _run("pallas", q, k, v, seg, pos, 9)
    want = _run("xla", q, k, v, seg, pos, 9)
    for a, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=2e-5)


def test_cudnn_leaves_the_soft_cap_to_its_fallback():
    """jax.nn.dot_product_attention has no soft cap: a capped call is the fallback's, with the reason."""
    from jaxtune.kernels.cudnn import static_reason

    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    seg, pos = jnp.ones((1, 8), jnp.int32), jnp.arange(8)[None]
    assert static_reason(q, seg, seg, pos, pos, None) is None
    assert "soft-capping" in static_reason(q, seg, seg, pos, pos, None, softcap=50.0)


def test_cudnn_takes_only_rows_of_one_sample():
    """cuDNN's path runs only where its index mask equals jaxtune's rule: every row one sample from
    index 0 (then padding), positions counting up; anything else goes to the fallback at run time."""
    from jaxtune.kernels.cudnn import one_sample_rows

    seg = jnp.asarray([[1, 1, 1, 0], [4, 4, 4, 4]], jnp.int32)
    pos = jnp.asarray([[0, 1, 2, 0], [0, 1, 2, 3]], jnp.int32)
    ok, lengths = one_sample_rows(seg, pos)
    assert bool(ok) and lengths.tolist() == [3, 4]
    assert not bool(one_sample_rows(seg.at[0, 2].set(2), pos)[0])  # two samples in a row
    assert not bool(one_sample_rows(seg, pos.at[1, 3].set(7))[0])  # positions do not count up
    assert not bool(one_sample_rows(seg.at[0].set(0), pos)[0])  # a row of padding only
    assert not bool(one_sample_rows(jnp.asarray([[0, 1, 1, 1]] * 2, jnp.int32), pos)[0])  # padding first


def _grpo_rows(length: int, seed: int = 0):
    """Two GRPO rows as `lay_out_group` lays them out (a prompt once, then six completions as
    branches; prompts of 4 and 9 tokens, completions of 1 to 12: 68 and 85 tokens), padded to
    `length` (or cut to it): segment ids and positions [2, length], and the layout's (window, prefix)
    for prompts <= 10 and completions <= 12."""
    from jaxtune.objectives.grpo import collate_rows, lay_out_group

    rng = np.random.default_rng(seed)
    rows = []
    for prompt_len, lengths in ((4, (12, 1, 7, 12, 12, 11)), (9, (5, 12, 11, 12, 9, 12))):
        completions = [list(rng.integers(5, 50, n)) for n in lengths]
        rows.append(lay_out_group(list(rng.integers(5, 50, prompt_len)), completions,
                                  [np.zeros(n, np.float32) for n in lengths], [1.0] * 6, [True] * 6))
    batch = collate_rows(rows, 96, pad_id=0)
    return jnp.asarray(batch["segment_ids"][:, :length]), jnp.asarray(batch["positions"][:, :length]), (12 + 1, 10 - 1)


@pytest.mark.parametrize("kind", ["plain", "window", "softcap"])
def test_band_attention_on_grpo_rows_matches_reference(kind, monkeypatch):
    """GRPO's rows promise that a query attends only its prompt and the tokens of its own branch
    (`band`): with it, attention reads only those blocks of keys (several 8-token blocks here, rows of
    96 tokens with 40 keys per query), and its output on the real tokens and its gradients equal the
    reference's (padding rows attend other keys; their outputs are never read)."""
    import jaxtune.kernels.blockwise as blockwise

    monkeypatch.setattr(blockwise, "BAND_BLOCK", 8)
    calls = []
    band_attention = blockwise.band_attention
    monkeypatch.setattr(blockwise, "band_attention", lambda *a, **kw: calls.append(1) or band_attention(*a, **kw))
    seg, pos, band = _grpo_rows(96)
    assert blockwise.band_keys(96, *band) == 40
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (2, 96, 4, 16))
    k, v = jax.random.normal(ks[1], (2, 96, 2, 16)), jax.random.normal(ks[2], (2, 96, 2, 16))
    weights = jnp.where((seg > 0)[..., None, None], jax.random.normal(ks[3], q.shape), 0.0)  # the real queries
    window = 6 if kind == "window" else None
    kw = {"softcap": SOFTCAP} if kind == "softcap" else {}

    def run(impl, band):
        def loss(q, k, v):
            out = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                            sliding_window=window, implementation=impl, band=band, **kw)
            return jnp.sum(out * weights), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return jnp.where((seg > 0)[..., None, None], out, 0.0), grads

    want = run("xla", None)
    for impl in ("blockwise", "xla"):
        got = run(impl, band)
        for name, g, w in [("out", got[0], want[0]), *zip(("dq", "dk", "dv"), got[1], want[1])]:
            assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5 * max(1.0, float(np.abs(w).max())), (impl, name)
    assert len(calls) == 2
    # rows too short for the band to halve the keys read: the backend as usual, the same result
    seg, pos, band = _grpo_rows(64)
    assert 2 * blockwise.band_keys(64, *band) > 64
    q, k, v, weights = q[:, :64], k[:, :64], v[:, :64], weights[:, :64]
    got, want = run("blockwise", band), run("xla", None)
    assert len(calls) == 2
    assert np.abs(np.asarray(got[0]) - np.asarray(want[0])).max() <= 1e-5 * max(1.0, float(np.abs(want[0]).max()))


BAND_ON_MESH = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
import jaxtune.kernels.blockwise as blockwise
from jaxtune.kernels.attention import attention
from test_attention import _grpo_rows

assert jax.device_count() == 4, jax.devices()
blockwise.BAND_BLOCK = 8
seg, pos, band = _grpo_rows(96)
ks = jax.random.split(jax.random.key(5), 4)
q = jax.random.normal(ks[0], (2, 96, 4, 16))
k, v = jax.random.normal(ks[1], (2, 96, 2, 16)), jax.random.normal(ks[2], (2, 96, 2, 16))
weights = jnp.where((seg > 0)[..., None, None], jax.random.normal(ks[3], q.shape), 0.0)

def loss(q, k, v, seg, pos):
    out = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                    implementation="blockwise", band=band)
    return jnp.sum(out * weights)

step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
want = step(q, k, v, seg, pos)
mesh = jax.make_mesh((2, 2), ("data", "heads"), axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as jaxtune's meshes
rows, heads = NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data", None, "heads"))
with jax.set_mesh(mesh):
    got = step(*(jax.device_put(x, heads) for x in (q, k, v)), jax.device_put(seg, rows), jax.device_put(pos, rows))
assert got[1][0].sharding.spec[:3] == ("data", None, "heads"), got[1][0].sharding
for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5 * max(1.0, float(np.abs(np.asarray(w)).max()))
print("BAND-MESH-OK")
"""


def test_band_attention_on_a_mesh_equals_one_device():
    """Band attention with rows split over one mesh axis and heads over another (4 CPU devices)
    gives one device's output and gradients, the gradients sharded as their inputs."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import cpu_env

    tests = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", BAND_ON_MESH, tests], capture_output=True, text=True,
                          env=cpu_env(4), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BAND-MESH-OK" in proc.stdout
