"""cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`), where it can
express jaxtune's mask.

cuDNN's public JAX entry point knows a causal mask by index, a left window of static size, and a
valid length per row (`query_seq_lengths` / `key_value_seq_lengths`); it does grouped-query attention
natively. It has no segment ids and no positions, so it expresses jaxtune's rule
(`attention_mask`) exactly for self-attention over rows that hold one sample followed by padding,
with positions 0, 1, 2, ... Everything else runs on `fallback` (the Pallas kernel on a GPU), chosen
at trace time where the reason is static and logged once:

- float32 inputs (cuDNN's flash attention takes bf16 / fp16);
- attention logit soft-capping (Gemma 2; the JAX entry point has none);
- a window that is a traced value (a model whose layers have different windows);
- queries and keys with different segment ids or positions (a KV cache);

and at run time, with `lax.cond`, for a batch in which some row packs several samples (or whose
positions do not count up from 0). The padding rows of a one-sample row are outputs nobody reads;
cuDNN leaves them zero where the reference would let padding attend padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.kernels.attention import index_mask_reason, positions_count_up
from jaxtune.logging import info_once

PAD_TO = 64  # rows padded to a multiple of this for cuDNN

def static_reason(q, q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window,
                  softcap=None) -> str | None:
    """Why cuDNN cannot take this call at all (None if it can, for rows of one sample)."""
    if softcap is not None:
        return "attention logit soft-capping (jax.nn.dot_product_attention has no soft cap)"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"{q.dtype} inputs (cuDNN's fused attention takes bfloat16 / float16)"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} (cuDNN's flash attention takes multiples of 8 up to 256)"
    return index_mask_reason(q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window)


def one_sample_rows(segment_ids, positions) -> tuple[jax.Array, jax.Array]:
    """(every row is one sample then padding with positions 0..n-1, [B] lengths)."""
    length = jnp.sum(segment_ids != 0, axis=1)
    index = jnp.arange(segment_ids.shape[1])[None, :]
    expected = jnp.where(index < length[:, None], segment_ids[:, :1], 0)
    ok = jnp.all((segment_ids[:, 0] != 0) & jnp.all(segment_ids == expected, axis=1))
    return ok & positions_count_up(segment_ids, positions), length.astype(jnp.int32)


def cudnn_attention(q_btnh, k_bskh, v_bskh, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                    causal: bool, sliding_window, scale: float, fallback, fallback_name: str,
                    softcap: float | None = None):
    """jaxtune's attention through cuDNN, or `fallback` (same keyword arguments) where cuDNN cannot
    express the mask. Returns [B, T, N, H] in q's dtype."""
    kwargs = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                  kv_positions=kv_positions, causal=causal, sliding_window=sliding_window, scale=scale,
                  softcap=softcap)
    reason = static_reason(q_btnh, q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window,
                           softcap)
    if reason is not None:
        info_once(f"attention: cudnn cannot express {reason}; running {fallback_name!r} instead")
        return fallback(q_btnh, k_bskh, v_bskh, **kwargs)
    info_once(f"attention: cudnn for rows of one sample; batches with packed rows run {fallback_name!r} "
              "(cuDNN's attention API has no segment ids)")
    window = None if sliding_window is None or int(sliding_window) <= 0 else (int(sliding_window) - 1, 0)
    single, lengths = one_sample_rows(q_segment_ids, q_positions)

    t = q_btnh.shape[1]
    padded = -(-t // PAD_TO) * PAD_TO

    def fused(q, k, v):
        # cuDNN takes some lengths only: pad the rows (past each row's length, so never attended).
        q, k, v = (jnp.pad(x, [(0, 0), (0, padded - t), (0, 0), (0, 0)]).astype(q.dtype) for x in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, query_seq_lengths=lengths,
                                           key_value_seq_lengths=lengths, local_window_size=window,
                                           implementation="cudnn")
        return out[:, :t]

    return jax.lax.cond(single, fused, lambda q, k, v: fallback(q, k, v, **kwargs), q_btnh, k_bskh, v_bskh)
