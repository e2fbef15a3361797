"""The `pallas` backend on TPUs: JAX's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`).

Splash attention already does what the GPU kernel (pallas_gpu.py) had to be written for: segment
ids for queries and keys, grouped-query attention (its MQA form: every query head of a group against
one K/V head, so K/V are never repeated), causal and local (sliding-window) masks whose empty blocks
it skips, a forward and a backward kernel. We use it as is. Its masks are by index, so it expresses
jaxtune's rule (`attention_mask`, by position) exactly for self-attention in which positions count
0, 1, 2, ... within each sample, as packed training data does; where they do not, or where the
window is a traced value (layers with different windows), or queries and keys differ (a KV cache),
the call runs `fallback` instead, logged once (the positions check is a `lax.cond` at run time).

Rows of padding (segment 0) are outputs nobody reads: splash lets padding attend earlier padding
(by index), where the reference lets it attend all padding of the same position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

from jaxtune.kernels.attention import index_mask_reason, positions_count_up
from jaxtune.logging import info_once

BLOCK = 128  # splash's tiles (its defaults); rows are padded to a multiple


@functools.lru_cache(maxsize=32)
def _kernel(length: int, group: int, causal: bool, window: int | None, softcap: float | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (length, length)
    if window:
        head_mask = masks.LocalMask(shape, window_size=(window - 1, 0 if causal else None), offset=0)
    elif causal:
        head_mask = masks.CausalMask(shape)
    else:
        head_mask = masks.FullMask(shape)
    sizes = splash.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=BLOCK,
                              block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK, block_kv_dq=BLOCK)
    return splash.make_splash_mqa(masks.MultiHeadMask([head_mask] * group), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


def splash_attention(q_btnh, k_bskh, v_bskh, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                     causal: bool, sliding_window, scale: float, fallback, fallback_name: str,
                     softcap: float | None = None, interpret: bool | None = None):
    """jaxtune's attention through splash attention, or `fallback` (same keyword arguments) where
    splash cannot express the mask. Returns [B, T, N, H] in q's dtype. A soft cap is splash's own
    `attn_logits_soft_cap` (applied to the scaled scores: the queries are scaled before the kernel)."""
    kwargs = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                  kv_positions=kv_positions, causal=causal, sliding_window=sliding_window, scale=scale,
                  softcap=softcap)
    reason = index_mask_reason(q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window)
    if reason is not None:
        info_once(f"attention: splash cannot express {reason}; running {fallback_name!r} instead")
        return fallback(q_btnh, k_bskh, v_bskh, **kwargs)
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    b, t, n, h = q_btnh.shape
    kh = k_bskh.shape[2]
    length = -(-t // BLOCK) * BLOCK
    window = int(sliding_window) if sliding_window is not None and int(sliding_window) > 0 else None
    kernel = _kernel(length, n // kh, causal, window, softcap, interpret)

    def pad(x, fill=0):
        return jnp.pad(x, [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)

    # [B, K, G, L, H] queries (scaled: splash takes none), [B, K, L, H] keys and values.
    q = jnp.moveaxis(pad(q_btnh * jnp.asarray(scale, q_btnh.dtype)).reshape(b, length, kh, n // kh, h), 1, 3)
    k = jnp.moveaxis(pad(k_bskh.astype(q_btnh.dtype)), 1, 2)
    v = jnp.moveaxis(pad(v_bskh.astype(q_btnh.dtype)), 1, 2)
    segments = SegmentIds(q=pad(q_segment_ids.astype(jnp.int32), -2), kv=pad(kv_segment_ids.astype(jnp.int32), -1))

    def fused(q, k, v):
        per_kv_head = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s), in_axes=(0, 0, 0, None))
        out = jax.vmap(per_kv_head)(q, k, v, segments)  # [B, K, G, L, H]
        return jnp.moveaxis(out, 3, 1).reshape(b, length, n, h)[:, :t].astype(q_btnh.dtype)

    info_once(f"attention: splash (TPU); batches whose positions do not count up within each sample run "
              f"{fallback_name!r}")
    return jax.lax.cond(positions_count_up(q_segment_ids, q_positions), fused,
                        lambda *_: fallback(q_btnh, k_bskh, v_bskh, **kwargs), q, k, v)
