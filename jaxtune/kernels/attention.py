"""The one attention entry point.

Every model calls `attention(...)`. It takes segment ids and positions so that packed sequences and
KV caches share one masking rule:

    query i may attend key j  iff  attends(segment[i], segment[j])   (never across samples)
                                   and position[j] <= position[i]     (causal)
                                   and position[i] - position[j] < w  (sliding window w, if any)

`attends` (jaxtune.batch) is segment equality, plus one case for preference data whose pairs share
their prompt: a token of a branch (segment id k + b * BRANCH) also attends to the prompt (id k).

Segment id 0 marks padding (or an empty cache slot); real samples use ids >= 1. Positions restart
at 0 for each packed sample, so comparing positions inside one segment is comparing indices.

Example (two samples packed into one row of 5 tokens, then one pad):

    segment_ids = [1, 1, 1, 2, 2, 0]
    positions   = [0, 1, 2, 0, 1, 0]

Token 3 (first token of sample 2) sees only itself; token 2 sees tokens 0..2.

Grouped-query attention is computed by grouping query heads over the K/V heads (a reshape), never
by materialising repeated K/V.

Backends, each tested against `xla`:
- `xla`: this file's reference, exact, memory O(T*S); any platform.
- `blockwise` (jaxtune.kernels.blockwise): the same rule tile by tile in plain XLA with an online
  softmax and a recomputing backward, memory linear in T, empty tiles skipped; any platform.
- `pallas`: on GPUs our Pallas (Triton) flash-attention kernel (jaxtune.kernels.pallas_gpu), forward
  and backward, GQA, segment-aware block skipping, sliding windows; on TPUs JAX's splash attention
  (jaxtune.kernels.splash_tpu) where it expresses the mask, else `blockwise`.
- `cudnn` (jaxtune.kernels.cudnn): cuDNN's fused attention where it can express the mask (bf16/fp16
  rows of one sample), else the `pallas` kernel; GPUs.
A backend the platform lacks runs `blockwise` instead, and says so once in the log.

When the mesh in context splits the sequence (context parallelism), training attention runs as a
ring over the devices (jaxtune.parallel.ring, registered here when jaxtune.parallel is imported), each
chunk pair with the blockwise kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.batch import attends
from jaxtune.errors import JaxtuneError
from jaxtune.logging import info_once

IMPLEMENTATIONS = ("xla", "blockwise", "pallas", "cudnn")
# Backends with a custom VJP that keeps only q, k, v, the output and the log-sum-exp: a model runs
# them outside its remat region (rematerialising them would recompute the whole forward).
OWN_VJP = frozenset({"blockwise", "pallas", "cudnn"})
# Backends that build their tile masks in XLA: a model passes them each layer's window as a traced
# value even when it is constant (else XLA hoists the loop-invariant tile masks out of the layer
# scan and stacks them, O(T^2) memory). The others take a static window where the model has one.
TRACED_WINDOW = frozenset({"blockwise"})
_PLATFORMS = {"pallas": ("gpu", "tpu"), "cudnn": ("gpu",)}  # backends that need a given platform


def platform_backend(implementation: str, platform: str | None = None) -> str:
    """The backend that runs `implementation` on `platform` (default: JAX's default backend):
    itself, or `blockwise` where the platform lacks it (logged once)."""
    platform = platform or jax.default_backend()
    needs = _PLATFORMS.get(implementation)
    if needs is None or platform in needs:
        return implementation
    info_once(f"attention: {implementation!r} needs a {' or '.join(needs).upper()}; running 'blockwise' on {platform}")
    return "blockwise"


def index_mask_reason(q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window) -> str | None:
    """Why a fused kernel that masks by index with one static window (cuDNN, splash) cannot take
    this call at all, or None. Whether positions count up inside each sample, which such a kernel
    also needs, is only known at run time (`positions_count_up`)."""
    if sliding_window is not None and not isinstance(sliding_window, (int, np.integer)):
        return "a sliding window that differs between layers (it needs one static window)"
    if q_segment_ids is not kv_segment_ids or q_positions is not kv_positions:
        return "queries and keys with their own segment ids / positions (a KV cache)"
    return None


def positions_count_up(segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """True if every real token's position is its index minus the index where its sample starts
    (then masking by index inside a sample is masking by position)."""
    index = jnp.arange(segment_ids.shape[1])[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return jnp.all((segment_ids == 0) | (positions == index - start))


# The attention that runs when the mesh in context splits the sequence: kernels sit under the mesh layer,
# so jaxtune.parallel registers its ring attention here rather than this module importing it.
_SPLIT_SEQUENCE: list = []


def register_split_sequence_attention(fn) -> None:
    """`fn(q, k, v, **attention's keyword arguments)` runs attention when the mesh splits the sequence."""
    _SPLIT_SEQUENCE[:] = [fn]


def _sequence_ways() -> int:
    """The `sequence` axis size of the mesh in context (`jax.set_mesh`), 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or "sequence" not in mesh.axis_names else mesh.shape["sequence"]


def best_backend(platform: str | None = None) -> str:
    """What `attn_implementation: auto` runs: the Pallas kernels on GPUs and TPUs, blockwise elsewhere."""
    return "pallas" if (platform or jax.default_backend()) in ("gpu", "tpu") else "blockwise"


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
    mask = attends(q_segment_ids[:, :, None], kv_segment_ids[:, None, :])
    distance = q_positions[:, :, None] - kv_positions[:, None, :]
    if causal:
        mask &= distance >= 0
    if sliding_window is not None:
        # A window <= 0 means "no window" so one traced value can switch it per layer.
        window = jnp.asarray(sliding_window)
        mask &= (window <= 0) | (distance < window)
    return mask


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """Gemma's logit soft-capping, cap * tanh(logits / cap) (identity when `cap` is None)."""
    if cap is None:
        return logits
    return jnp.float32(cap) * jnp.tanh(logits / jnp.float32(cap))


def _xla_attention(q_btnh, k_bskh, v_bskh, mask_bts, scale, softcap):
    b, t, n, h = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
    logits_bkgts = soft_cap(jnp.einsum(
        "btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32
    ) * jnp.float32(scale), softcap)
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
    softcap: float | None = None,
    implementation: str = "xla",
    band: tuple[int, int] | None = None,
) -> jax.Array:
    """Multi-head attention with GQA, packing and sliding windows.

    Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N a multiple of K; segment ids and positions
    [B, T] for queries and [B, S] for keys. Returns [B, T, N, H] in v's dtype. Softmax runs in
    float32. `scale` defaults to H ** -0.5. `softcap` (Gemma 2's attn_logit_softcapping) caps the
    scaled scores, cap * tanh(scores / cap), before the mask and the softmax, in every backend.

    `band` = (window, prefix), the caller's promise about its rows' layout (GRPO's: a prompt of at
    most `prefix` tokens, then completions of at most `window` tokens): a query attends only keys
    fewer than `window` indices before it or among its row's first `prefix`. Where the backend would
    be `xla` or `blockwise`, self-attention then reads only those keys
    (jaxtune.kernels.blockwise.band_attention) when they are at most half of a row's.
    """
    if implementation not in IMPLEMENTATIONS:
        raise JaxtuneError(
            f"attention implementation {implementation!r} is not available; choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    if q_btnh.shape[2] % k_bskh.shape[2]:
        raise ValueError(f"{q_btnh.shape[2]} query heads is not a multiple of {k_bskh.shape[2]} kv heads")
    scale = q_btnh.shape[-1] ** -0.5 if scale is None else scale
    kwargs = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                  kv_positions=kv_positions, causal=causal, sliding_window=sliding_window, scale=scale,
                  softcap=None if softcap is None else float(softcap))
    if q_segment_ids is kv_segment_ids and _sequence_ways() > 1:  # the sequence is split over devices
        if not _SPLIT_SEQUENCE:
            raise JaxtuneError("the mesh in context splits the sequence, but no attention for a split sequence is "
                               "registered: import jaxtune.parallel (it registers ring attention)")
        if implementation != "blockwise":
            info_once(f"attention: context parallelism runs ring attention with blockwise tiles (not {implementation!r})")
        return _SPLIT_SEQUENCE[0](q_btnh, k_bskh, v_bskh, **kwargs)
    implementation = platform_backend(implementation)
    if band is not None and causal and q_segment_ids is kv_segment_ids and implementation in ("xla", "blockwise"):
        from jaxtune.kernels.blockwise import band_attention, band_pays

        if band_pays(q_btnh, *band):
            return band_attention(q_btnh, k_bskh, v_bskh, window=band[0], prefix=band[1], **kwargs)
    if implementation == "blockwise":
        from jaxtune.kernels.blockwise import blockwise_attention

        return blockwise_attention(q_btnh, k_bskh, v_bskh, **kwargs)
    if implementation == "pallas" and jax.default_backend() == "tpu":
        from jaxtune.kernels.blockwise import blockwise_attention
        from jaxtune.kernels.splash_tpu import splash_attention

        return splash_attention(q_btnh, k_bskh, v_bskh, fallback=blockwise_attention, fallback_name="blockwise",
                                **kwargs)
    if implementation == "pallas":
        from jaxtune.kernels.pallas_gpu import flash_attention

        return flash_attention(q_btnh, k_bskh, v_bskh, **kwargs)
    if implementation == "cudnn":
        from jaxtune.kernels.cudnn import cudnn_attention
        from jaxtune.kernels.pallas_gpu import flash_attention

        return cudnn_attention(q_btnh, k_bskh, v_bskh, fallback=flash_attention, fallback_name="pallas", **kwargs)
    mask = attention_mask(
        q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=causal, sliding_window=sliding_window
    )
    return _xla_attention(q_btnh, k_bskh, v_bskh, mask, scale, softcap)


def cached_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     *, q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window=None,
                     scale: float | None = None, softcap: float | None = None,
                     implementation: str = "xla", prefix=None) -> jax.Array:
    """Attention of T new tokens (q, k, v [B, T, ., H]) over a KV cache of S slots laid out head-major,
    [B, K, S, H] (jaxtune.models.cache; `kv_segment_ids` / `kv_positions` [B, S] describe its slots,
    empty ones segment 0), and over themselves. A decode step (T = 1) multiplies and reduces in place:
    each row's cached keys are read once, contiguously (memory-bound, as decoding is; batched
    [G, H] x [H, S] products were slower on CPUs). A prefill (T > 1) runs `implementation` over the
    cache and the new tokens together, token-major.

    `prefix` (decode steps only): a shared cache (k, v [P, K, W, H], positions, segment_ids [P, W])
    that consecutive groups of B / P rows attend as well (a prompt's slots, read once for the G
    completions sampled from it, multiplied and reduced like the cache's: at 8 prompts x 8 rows, 64
    prompt and 64 own slots, the 30 layers' attention took 13 ms against 21 ms with the prompt's slots
    in every row's cache, and einsum products 18 ms). One softmax runs over the prefix's slots, the
    cache's and the token itself."""
    b, t, n, h = q_btnh.shape
    if prefix is not None and t > 1:
        raise ValueError("a shared prefix cache serves single-token decode steps; prefill into a cache of its own")
    if t > 1:
        keys = jnp.concatenate([jnp.swapaxes(k_cache, 1, 2), k_btkh], axis=1)
        values = jnp.concatenate([jnp.swapaxes(v_cache, 1, 2), v_btkh], axis=1)
        return attention(q_btnh, keys, values, q_segment_ids=q_segment_ids,
                         kv_segment_ids=jnp.concatenate([kv_segment_ids, q_segment_ids], axis=1),
                         q_positions=q_positions, kv_positions=jnp.concatenate([kv_positions, q_positions], axis=1),
                         sliding_window=sliding_window, scale=scale, softcap=softcap,
                         implementation=implementation)
    kv_heads = k_cache.shape[1]
    scale = h ** -0.5 if scale is None else scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                          sliding_window=sliding_window)[:, 0]  # [B, S]
    q = q_btnh.reshape(b, kv_heads, n // kv_heads, h).astype(jnp.float32)
    k_self = k_btkh.reshape(b, kv_heads, 1, h).astype(jnp.float32)
    v_self = v_btkh.reshape(b, kv_heads, 1, h).astype(jnp.float32)
    logits = jnp.sum(q[:, :, :, None] * k_cache[:, :, None].astype(jnp.float32), axis=-1)  # [B, K, G, S]
    logits = jnp.where(mask[:, None, None], soft_cap(logits * jnp.float32(scale), softcap), jnp.finfo(jnp.float32).min)
    # [B, K, G, 1]: a token sees itself
    own = soft_cap(jnp.sum(q * k_self, axis=-1, keepdims=True) * jnp.float32(scale), softcap)
    parts = [logits, own]
    if prefix is not None:
        pk, pv, p_positions, p_segments = prefix
        p, width = pk.shape[0], pk.shape[2]
        group = b // p
        p_mask = attention_mask(q_segment_ids, jnp.repeat(p_segments, group, axis=0), q_positions,
                                jnp.repeat(p_positions, group, axis=0), sliding_window=sliding_window)[:, 0]
        grouped = q.reshape(p, group, kv_heads, n // kv_heads, h)
        p_logits = jnp.sum(grouped[:, :, :, :, None] * pk[:, None, :, None].astype(jnp.float32), axis=-1)
        p_logits = p_logits.reshape(b, kv_heads, -1, width)  # [B, K, G, W]
        parts.insert(0, jnp.where(p_mask[:, None, None], soft_cap(p_logits * jnp.float32(scale), softcap),
                                  jnp.finfo(jnp.float32).min))
    probs = jax.nn.softmax(jnp.concatenate(parts, axis=-1), axis=-1)
    if prefix is not None:
        p_probs = probs[..., :width].reshape(p, group, kv_heads, n // kv_heads, width)
        prefix_out = jnp.sum(p_probs[..., None] * pv[:, None, :, None].astype(jnp.float32), axis=-2)
        prefix_out = prefix_out.reshape(b, kv_heads, -1, h)
        probs = probs[..., width:]
    out = jnp.sum(probs[..., :-1, None] * v_cache[:, :, None].astype(jnp.float32), axis=-2) \
        + probs[..., -1:] * v_self
    if prefix is not None:
        out = out + prefix_out
    return out.reshape(b, 1, n, h).astype(v_cache.dtype)
