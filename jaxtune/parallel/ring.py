"""Ring attention over the mesh's `sequence` axis (context parallelism).

With context_parallel_size = C, each of C devices holds 1/C of every row's tokens (queries, keys,
values, segment ids, positions). Attention needs every key, so the key/value chunks travel round a
ring (`lax.ppermute` to the next device) while each device keeps its queries: after C steps every
query chunk has met every key chunk. Each step is one call of the blockwise kernel's forward
(jaxtune.kernels.blockwise: output and log-sum-exp of the chunk pair, empty tiles skipped); the
partial results merge with the online softmax

    lse = logaddexp(lse_a, lse_b)      out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

The backward pass goes round the ring again with the global output and log-sum-exp (the
FlashAttention-2 backward needs nothing else): each device adds its queries' dQ, and the dK / dV
accumulators travel with their key chunk, arriving back at its owner after the last step. Memory
per device is linear in the chunk length; no device ever holds the whole row.

Masking is the one rule of kernels/attention.py (segment ids, positions, window), evaluated on the
chunks' own segment ids and positions, so packed samples never attend across samples and any token
order is exact. Causal masks leave the first chunks little work and the last ones all of it; the
trainer therefore lays rows out load-balanced (jaxtune.parallel.sequence: device i holds chunks i and
2C-1-i of 2C), which the position-based mask handles unchanged.

`ring_attention` is called by `kernels.attention.attention` when the mesh in context
(`jax.set_mesh`) has a `sequence` axis larger than 1; model code knows no mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxtune.kernels.attention import register_split_sequence_attention
from jaxtune.kernels.blockwise import Tiles, backward, forward
from jaxtune.parallel.mesh import axes_dividing

AXIS = "sequence"


def _rotate(tree, ways: int):
    """Send every array of `tree` to the next device of the ring."""
    perm = [(i, (i + 1) % ways) for i in range(ways)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, perm), tree)


def _weight(lse, total):
    """exp(lse - total) laid out like the output [B, T, K, G, 1]; 0 where both are -inf."""
    w = jnp.where(jnp.isneginf(total), 0.0, jnp.exp(lse - jnp.where(jnp.isneginf(total), 0.0, total)))
    return jnp.moveaxis(w, 3, 1)[..., None]


def _ring_forward(q, k, v, qs, ks, rule, scale, bq, bk, ways, softcap):
    out = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full((q.shape[0], q.shape[2], q.shape[3], q.shape[1]), -jnp.inf, jnp.float32)
    for step in range(ways):
        out_b, lse_b = forward(q, k, v, qs, ks, rule, scale, bq, bk, softcap)
        total = jnp.logaddexp(lse, lse_b)
        out = out * _weight(lse, total) + out_b.astype(jnp.float32) * _weight(lse_b, total)
        lse = total
        if step < ways - 1:
            k, v, ks = _rotate((k, v, ks), ways)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11, 12))
def _ring(q, k, v, qs, ks, window, causal, use_window, scale, bq, bk, ways, softcap):
    return _ring_forward(q, k, v, qs, ks, (window, causal, use_window), scale, bq, bk, ways, softcap)[0]


def _ring_fwd(q, k, v, qs, ks, window, causal, use_window, scale, bq, bk, ways, softcap):
    out, lse = _ring_forward(q, k, v, qs, ks, (window, causal, use_window), scale, bq, bk, ways, softcap)
    return out, (q, k, v, qs, ks, window, out, lse)


def _ring_bwd(causal, use_window, scale, bq, bk, ways, softcap, res, d_out):
    q, k, v, qs, ks, window, out, lse = res
    rule = (window, causal, use_window)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for step in range(ways):
        dq_b, dk_b, dv_b = backward(q, k, v, qs, ks, out, lse, d_out, rule, scale, bq, bk, cast=False,
                                    softcap=softcap)
        dq, dk, dv = dq + dq_b, dk + dk_b, dv + dv_b
        if step < ways - 1:
            k, v, ks, dk, dv = _rotate((k, v, ks, dk, dv), ways)
        else:  # the accumulators go home: device i + 1 gets the chunk it owns
            dk, dv = _rotate((dk, dv), ways)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_btnh, k_bskh, v_bskh, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                   causal: bool, sliding_window, scale: float, softcap: float | None = None):
    """Attention of q [B, T, N, H] over k, v [B, T, K, H] (the same tokens: training, not a KV
    cache) with T split over the mesh's `sequence` axis; same masking and result as
    `kernels.attention.attention`. Batch and heads stay split as the mesh has them (batch over
    data/fsdp, heads over tensor) where the sizes divide."""
    mesh = jax.sharding.get_abstract_mesh()
    ways = mesh.shape[AXIS]
    b, t, n, _ = q_btnh.shape
    kh = k_bskh.shape[2]
    if t % ways:
        raise ValueError(f"ring attention: {t} tokens do not split over sequence={ways} devices")
    batch = axes_dividing(b, ("data", "fsdp", "expert"), mesh)
    heads = "tensor" if axes_dividing(n, ("tensor",), mesh) and axes_dividing(kh, ("tensor",), mesh) else None
    tokens = PartitionSpec(batch, AXIS)
    per_head = PartitionSpec(batch, AXIS, heads, None)
    window = None if sliding_window is None else jnp.asarray(sliding_window, jnp.int32)

    def local(q, k, v, q_seg, kv_seg, q_pos, kv_pos, window):
        tiles = Tiles.of(q, k, v, q_seg, kv_seg, q_pos, kv_pos, window)
        out = _ring(tiles.q, tiles.k, tiles.v, tiles.qs, tiles.ks, tiles.window, causal, tiles.use_window,
                    float(scale), tiles.bq, tiles.bk, ways, softcap)
        return tiles.unpad(out)

    window_spec = None if window is None else PartitionSpec()
    return jax.shard_map(local, in_specs=(per_head, per_head, per_head, tokens, tokens, tokens, tokens, window_spec),
                         out_specs=per_head, check_vma=False)(
        q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, q_positions, kv_positions, window)


def _split_sequence_attention(*args, **kwargs):
    return ring_attention(*args, **kwargs)  # the module's ring_attention at call time


register_split_sequence_attention(_split_sequence_attention)
