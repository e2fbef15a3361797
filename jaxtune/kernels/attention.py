"""The one attention entry point.

Every model calls `attention(...)`. It takes segment ids and positions so that packed sequences and
KV caches share one masking rule:

    query i may attend key j  iff  segment[i] == segment[j]            (never across samples)
                                   and position[j] <= position[i]     (causal)
                                   and position[i] - position[j] < w  (sliding window w, if any)

Segment id 0 marks padding (or an empty cache slot); real samples use ids >= 1. Positions restart
at 0 for each packed sample, so comparing positions inside one segment is comparing indices.

Example (two samples packed into one row of 5 tokens, then one pad):

    segment_ids = [1, 1, 1, 2, 2, 0]
    positions   = [0, 1, 2, 0, 1, 0]

Token 3 (first token of sample 2) sees only itself; token 2 sees tokens 0..2.

Grouped-query attention is computed by grouping query heads over the K/V heads (a reshape), never
by materialising repeated K/V.

Backends: `xla` (this file's reference, exact, memory O(T*S)); `blockwise` (jaxtune.kernels.blockwise:
the same rule applied tile by tile with an online softmax and a recomputing backward, memory linear
in T, empty tiles skipped). Each is tested against `xla`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.errors import JaxtuneError

IMPLEMENTATIONS = ("xla", "blockwise")
# Backends with a custom VJP that keeps only q, k, v, the output and the log-sum-exp: a model runs
# them outside its remat region (rematerialising them would recompute the whole forward).
OWN_VJP = frozenset({"blockwise"})


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    causal: bool = True,
    sliding_window: jax.Array | int | None = None,
) -> jax.Array:
    """Boolean mask [batch, q_len, kv_len]: True where the query may attend the key."""
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    distance = q_positions[:, :, None] - kv_positions[:, None, :]
    if causal:
        mask &= distance >= 0
    if sliding_window is not None:
        # A window <= 0 means "no window" so one traced value can switch it per layer.
        window = jnp.asarray(sliding_window)
        mask &= (window <= 0) | (distance < window)
    return mask


def _xla_attention(q_btnh, k_bskh, v_bskh, mask_bts, scale):
    b, t, n, h = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
    logits_bkgts = jnp.einsum(
        "btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    big_negative = jnp.finfo(jnp.float32).min
    logits_bkgts = jnp.where(mask_bts[:, None, None, :, :], logits_bkgts, big_negative)
    probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
    return out_btkgh.reshape(b, t, n, h)


def attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    causal: bool = True,
    sliding_window: jax.Array | int | None = None,
    scale: float | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Multi-head attention with GQA, packing and sliding windows.

    Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N a multiple of K; segment ids and positions
    [B, T] for queries and [B, S] for keys. Returns [B, T, N, H] in v's dtype. Softmax runs in
    float32. `scale` defaults to H ** -0.5.
    """
    if implementation not in IMPLEMENTATIONS:
        raise JaxtuneError(
            f"attention implementation {implementation!r} is not available; choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    if q_btnh.shape[2] % k_bskh.shape[2]:
        raise ValueError(f"{q_btnh.shape[2]} query heads is not a multiple of {k_bskh.shape[2]} kv heads")
    scale = q_btnh.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "blockwise":
        from jaxtune.kernels.blockwise import blockwise_attention

        return blockwise_attention(q_btnh, k_bskh, v_bskh, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                   q_positions=q_positions, kv_positions=kv_positions, causal=causal,
                                   sliding_window=sliding_window, scale=scale)
    mask = attention_mask(
        q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=causal, sliding_window=sliding_window
    )
    return _xla_attention(q_btnh, k_bskh, v_bskh, mask, scale)
