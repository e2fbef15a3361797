"""Blockwise attention in plain XLA: flash attention's algorithm without a custom kernel.

Queries and keys are cut into blocks. For each query block, a loop over key blocks keeps a running
max `m`, normaliser `l` and output accumulator (the online softmax), so memory is linear in the
sequence length: no [T, S] score matrix exists, only one [q_block, kv_block] tile at a time. The
custom VJP keeps only the output and the per-row log-sum-exp; the backward pass recomputes each
tile's probabilities (the FlashAttention-2 backward):

    P = exp(Q K^T * scale - lse)        dV += P^T dO        dP = dO V^T
    dS = P * (dP - rowsum(dO * O))      dQ += dS K * scale  dK += dS^T Q * scale

Tiles whose mask is empty (above the causal diagonal, between two packed samples, outside a
sliding window) are skipped with `lax.cond`, in both passes: a packed batch of short samples costs
what its samples cost, not the square of the row. The mask of a tile comes from the same
`attention_mask` rule as the reference, so every case the reference expresses (causal, segment
ids, positions, sliding windows, GQA) this backend expresses too.

GQA: queries are grouped over the K/V heads ([B, T, K, G, H]); K and V are never repeated.
Shapes are padded up to whole blocks with segment ids no real token has (-1 for keys, -2 for
queries), so padded keys are never attended and padded query rows are dropped.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtune.kernels.attention import attention_mask, soft_cap

Q_BLOCK = 512
KV_BLOCK = 512


def tile_length(length: int, preferred: int) -> int:
    """Tokens per tile: `length` split evenly into ceil(length / preferred) tiles (rounded up to a
    multiple of 8), so that a length just over a multiple of `preferred` is not padded to the next
    one (640 tokens in 512-token tiles computed 3 tiles of 512^2 for 640 real rows: 2x XLA's work)."""
    if length <= preferred:
        return length
    tiles = -(-length // preferred)
    return -(-(-(-length // tiles)) // 8) * 8


def _pad_to(x: jax.Array, length: int, fill) -> jax.Array:
    extra = length - x.shape[1]
    if not extra:
        return x
    widths = [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=fill)


def _block(x: jax.Array, i, size: int, axis: int = 1) -> jax.Array:
    """Block i (of `size` entries) of x along `axis`."""
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _unless_masked(tile, rule, qs, ks, i, j, bq, bk, carry):
    """`tile(mask, carry)` for query block i and key block j, skipped (carry returned unchanged)
    when the tile's [B, bq, bk] mask is empty. `rule` = (window array, causal, use_window)."""
    window, causal, use_window = rule
    q_seg, q_pos = (_block(a, i, bq) for a in qs)
    k_seg, k_pos = (_block(a, j, bk) for a in ks)
    mask = attention_mask(q_seg, k_seg, q_pos, k_pos, causal=causal, sliding_window=window if use_window else None)
    return jax.lax.cond(jnp.any(mask), lambda c: tile(mask, c), lambda c: c, carry)


def _scores(q_blk, k_blk, scale, softcap):
    """[B, K, G, bq, bk] float32 scores of q [B, bq, K, G, H] against k [B, bk, K, H] (soft-capped
    when `softcap` is set)."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * jnp.float32(scale)
    return soft_cap(s, softcap)


def forward(q, k, v, qs, ks, rule, scale, bq, bk, softcap=None):
    """Output [B, Tp, K, G, H] (q's dtype) and log-sum-exp [B, K, G, Tp] (float32) of tiled inputs
    (`Tiles`); `rule` = (window array, causal, use_window)."""
    b, tp, kh, g, h = q.shape
    n_kv = k.shape[1] // bk

    def q_block(i):
        q_blk = _block(q, i, bq)

        def kv_step(j, carry):
            def tile(mask, carry):
                m, l, acc = carry
                v_blk = _block(v, j, bk)
                s = _scores(q_blk, _block(k, j, bk), scale, softcap)
                allowed = mask[:, None, None]
                m_new = jnp.maximum(m, jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.where(allowed, jnp.exp(s - m_safe[..., None]), 0.0)
                correction = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
                l = l * correction + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
                return m_new, l, acc * correction[..., None] + pv

            return _unless_masked(tile, rule, qs, ks, i, j, bq, bk, carry)

        init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, h), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, n_kv, kv_step, init)
        empty = l == 0  # padded query rows: nothing to attend
        l_safe = jnp.where(empty, 1.0, l)
        out = (acc / l_safe[..., None]).astype(q.dtype)  # [B, K, G, bq, H]
        lse = jnp.where(empty, -jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l_safe))  # log(0) = -inf
        return jnp.transpose(out, (0, 3, 1, 2, 4)), lse

    outs, lses = jax.lax.map(q_block, jnp.arange(tp // bq))  # [nq, B, bq, K, G, H], [nq, B, K, G, bq]
    out = jnp.moveaxis(outs, 0, 1).reshape(b, tp, kh, g, h)
    lse = jnp.moveaxis(lses, 0, 3).reshape(b, kh, g, tp)
    return out, lse


def backward(q, k, v, qs, ks, out, lse, d_out, rule, scale, bq, bk, cast: bool = True, softcap=None):
    """dQ, dK, dV (in the inputs' dtypes; float32 with cast=False) from the output and the log-sum-
    exp of the whole attention; with a part of the keys (ring attention), that part's share. With a
    soft cap, dS passes through its derivative: d(cap * tanh(s / cap)) / ds = 1 - (capped / cap)^2."""
    b, tp, kh, g, h = q.shape
    n_q, n_kv = tp // bq, k.shape[1] // bk
    # rowsum(dO * O): [B, K, G, Tp]
    delta = jnp.einsum("btkgh,btkgh->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def kv_block(j):
        """dK, dV of key block j, and this block's contribution to dQ (all query blocks)."""
        k_blk, v_blk = _block(k, j, bk), _block(v, j, bk)

        def q_step(i, carry):
            def tile(mask, carry):
                dk, dv, dq = carry
                q_blk, do_blk = _block(q, i, bq), _block(d_out, i, bq)
                lse_blk, delta_blk = _block(lse, i, bq, axis=3), _block(delta, i, bq, axis=3)
                s = _scores(q_blk, k_blk, scale, softcap)
                p = jnp.where(mask[:, None, None], jnp.exp(s - lse_blk[..., None]), 0.0)  # [B,K,G,bq,bk]
                dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do_blk.dtype), do_blk,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_blk[..., None]) * jnp.float32(scale)
                if softcap is not None:
                    ds = ds * (1.0 - jnp.square(s / jnp.float32(softcap)))
                ds = ds.astype(q.dtype)
                dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds, q_blk, preferred_element_type=jnp.float32)
                dq_blk = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_blk, preferred_element_type=jnp.float32)
                dq = jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, bq) + dq_blk, i * bq, axis=1)
                return dk, dv, dq

            return _unless_masked(tile, rule, qs, ks, i, j, bq, bk, carry)

        zeros_kv = jnp.zeros((b, bk, kh, h), jnp.float32)
        return jax.lax.fori_loop(0, n_q, q_step, (zeros_kv, zeros_kv, jnp.zeros(q.shape, jnp.float32)))

    def accumulate(dq, j):
        dk, dv, dq_j = kv_block(j)
        return dq + dq_j, (dk, dv)

    # Key blocks in sequence; dQ summed over them (one query-sized accumulator).
    dq, (dks, dvs) = jax.lax.scan(accumulate, jnp.zeros(q.shape, jnp.float32), jnp.arange(n_kv))
    dk = jnp.moveaxis(dks, 0, 1).reshape(b, n_kv * bk, kh, h)
    dv = jnp.moveaxis(dvs, 0, 1).reshape(b, n_kv * bk, kh, h)
    if not cast:
        return dq, dk, dv
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _attention(q, k, v, qs, ks, window, causal, use_window, scale, bq, bk, softcap):
    return forward(q, k, v, qs, ks, (window, causal, use_window), scale, bq, bk, softcap)[0]


def _attention_fwd(q, k, v, qs, ks, window, causal, use_window, scale, bq, bk, softcap):
    out, lse = forward(q, k, v, qs, ks, (window, causal, use_window), scale, bq, bk, softcap)
    return out, (q, k, v, qs, ks, window, out, lse)


def _attention_bwd(causal, use_window, scale, bq, bk, softcap, res, d_out):
    q, k, v, qs, ks, window, out, lse = res
    dq, dk, dv = backward(q, k, v, qs, ks, out, lse, d_out, (window, causal, use_window), scale, bq, bk,
                          softcap=softcap)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q_btnh, k_bskh, v_bskh, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                        causal: bool, sliding_window, scale: float, softcap: float | None = None,
                        q_block: int | None = None, kv_block: int | None = None):
    """Attention of q [B, T, N, H] over k, v [B, S, K, H] in tiles, masked by
    `jaxtune.kernels.attention.attention_mask` (same arguments). Returns [B, T, N, H] in q's dtype."""
    tiles = Tiles.of(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                     sliding_window, q_block, kv_block)
    out = _attention(tiles.q, tiles.k, tiles.v, tiles.qs, tiles.ks, tiles.window, causal, tiles.use_window,
                     float(scale), tiles.bq, tiles.bk, softcap)
    return tiles.unpad(out)


class Tiles(NamedTuple):
    """The inputs cut into whole tiles: q [B, Tp, K, G, H], k and v [B, Sp, K, H] in q's dtype,
    (segment ids, positions) of the queries (padding: -2) and keys (-1), the window."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    qs: tuple[jax.Array, jax.Array]
    ks: tuple[jax.Array, jax.Array]
    window: jax.Array
    use_window: bool
    bq: int
    bk: int
    shape: tuple[int, int, int, int]  # q's [B, T, N, H]

    @classmethod
    def of(cls, q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window,
           q_block: int | None = None, kv_block: int | None = None) -> Tiles:
        b, t, n, h = q_btnh.shape
        s, kh = k_bskh.shape[1], k_bskh.shape[2]
        bq, bk = tile_length(t, q_block or Q_BLOCK), tile_length(s, kv_block or KV_BLOCK)
        tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
        q = _pad_to(q_btnh.reshape(b, t, kh, n // kh, h), tp, 0)
        k, v = _pad_to(k_bskh, sp, 0).astype(q.dtype), _pad_to(v_bskh, sp, 0).astype(q.dtype)
        qs = (_pad_to(q_segment_ids.astype(jnp.int32), tp, -2), _pad_to(q_positions.astype(jnp.int32), tp, 0))
        ks = (_pad_to(kv_segment_ids.astype(jnp.int32), sp, -1), _pad_to(kv_positions.astype(jnp.int32), sp, 0))
        use_window = sliding_window is not None
        window = jnp.asarray(sliding_window if use_window else 0, jnp.int32)
        return cls(q, k, v, qs, ks, window, use_window, bq, bk, (b, t, n, h))

    def unpad(self, out: jax.Array) -> jax.Array:
        """[B, Tp, K, G, H] -> [B, T, N, H]."""
        b, t, n, h = self.shape
        return out[:, :t].reshape(b, t, n, h)


# ---------------------------------------------------------------------------------- band attention

BAND_BLOCK = 32  # tokens per block of `band_attention`
BAND_BUDGET = 64 << 20  # bytes of float32 scores `band_attention` may hold at once (one layer's)


def band_keys(length: int, window: int, prefix: int, block: int | None = None) -> int:
    """Keys each query block of `band_attention` reads for rows of `length` tokens: the blocks
    holding the row's first `prefix` tokens and the `window` tokens up to the query's own."""
    block = block or BAND_BLOCK
    blocks = -(-length // block)
    return (min(-(-prefix // block), blocks) + -(-(window - 1) // block) + 1) * block


def band_pays(q_btnh: jax.Array, window: int, prefix: int) -> bool:
    """Whether `band_attention` reads at most half of a row's keys and its scores fit BAND_BUDGET."""
    b, t, n, _ = q_btnh.shape
    keys = band_keys(t, window, prefix)
    return 2 * keys <= t and b * t * n * keys * 4 <= BAND_BUDGET


def band_attention(q_btnh, k_bskh, v_bskh, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                   causal: bool, sliding_window, scale: float, softcap: float | None = None, window: int,
                   prefix: int):
    """Self-attention of rows whose layout promises that every query attends only keys fewer than
    `window` indices before it (itself included) or among the row's first `prefix` tokens: GRPO's
    rows, a prompt of at most `prefix` tokens then completions of at most `window` tokens as branches
    after it (jaxtune.objectives.grpo). The mask is still the reference's (`attention_mask` on the
    keys' own segment ids and positions); the layout only decides which keys are read. Each block of
    BAND_BLOCK queries reads the prompt's blocks and the blocks of its band, gathered by static
    shifts into one batched product for all blocks (no loop, no tile conditionals): 160 keys per query
    instead of 512 for scripts/bench_grpo.py's rows, the 30 layers' attention forward and backward 6x
    faster than `blockwise` on 2 CPU cores. The backward recomputes the scores (jax.checkpoint), so
    only q, k and v are kept, as the tiled backends keep them. Rows of padding (segment 0) attend only
    the padding among those keys (their output is never read). Shapes and result as `attention`'s."""
    if not causal:
        raise ValueError("band attention reads the keys before each query: it needs causal attention")
    return _band(q_btnh, k_bskh, v_bskh, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
                 q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32),
                 jnp.asarray(sliding_window if sliding_window is not None else 0, jnp.int32),
                 sliding_window is not None, float(scale), softcap, window, prefix, BAND_BLOCK)


@functools.partial(jax.checkpoint, static_argnums=(8, 9, 10, 11, 12, 13))
def _band(q, k, v, q_seg, k_seg, q_pos, k_pos, window_array, use_window, scale, softcap, window, prefix, block):
    b, t, n, h = q.shape
    kh = k.shape[2]
    tp = -(-t // block) * block
    nq = tp // block

    def blocked(x, fill):  # [B, T, ...] -> [B, nq, block, ...], padded to whole blocks
        x = _pad_to(x, tp, fill)
        return x.reshape(b, nq, block, *x.shape[2:])

    qb = blocked(q.reshape(b, t, kh, n // kh, h), 0)
    kb, vb = blocked(k.astype(q.dtype), 0), blocked(v.astype(q.dtype), 0)
    qs, qp = blocked(q_seg, -2), blocked(q_pos, 0)
    ks, kp = blocked(k_seg, -1), blocked(k_pos, 0)
    first = min(-(-prefix // block), nq)  # blocks holding the prompt: read by every query block
    span = -(-(window - 1) // block) + 1  # block offsets 0 .. span - 1 back hold the band

    def shifted(x, d, fill):  # query block i reads block i - d (before the row: `fill`)
        if d == 0:
            return x
        return jnp.concatenate([jnp.full((b, min(d, nq), *x.shape[2:]), fill, x.dtype), x[:, :max(nq - d, 0)]], 1)

    def prompt_blocks(x):
        flat = x[:, :first].reshape(b, 1, first * block, *x.shape[3:])
        return jnp.broadcast_to(flat, (b, nq, *flat.shape[2:]))

    index = jnp.arange(nq)[None, :, None]
    parts = [(prompt_blocks(kb), prompt_blocks(vb), prompt_blocks(ks), prompt_blocks(kp))] if first else []
    for d in range(span):
        # a block the prompt part already holds is read once: its copy in the band is masked out
        seg = jnp.where(index - d < first, -1, shifted(ks, d, -1))
        parts.append((shifted(kb, d, 0), shifted(vb, d, 0), seg, shifted(kp, d, 0)))
    keys, values, key_seg, key_pos = (jnp.concatenate(p, axis=2) for p in zip(*parts))
    s = keys.shape[2]
    mask = attention_mask(qs.reshape(b * nq, block), key_seg.reshape(b * nq, s), qp.reshape(b * nq, block),
                          key_pos.reshape(b * nq, s), sliding_window=window_array if use_window else None)
    mask = mask.reshape(b, nq, 1, 1, block, s)
    scores = _scores(qb.reshape(b * nq, *qb.shape[2:]), keys.reshape(b * nq, *keys.shape[2:]), scale, softcap)
    scores = scores.reshape(b, nq, *scores.shape[1:])  # [B, nq, K, G, block, S]
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # a query with nothing to attend (tile padding) gives 0
    out = jnp.einsum("bnkgqs,bnskh->bnqkgh", probs.astype(q.dtype), values, preferred_element_type=jnp.float32)
    return out.reshape(b, tp, n, h)[:, :t].astype(q.dtype)

