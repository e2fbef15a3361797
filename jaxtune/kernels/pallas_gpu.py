"""Flash attention for GPUs as a Pallas (Triton) kernel, forward and backward.

JAX bundles a Pallas flash-attention kernel for GPUs (`jax.experimental.pallas.ops.gpu.attention.mha`,
Triton) and a Hopper one (`attention_mgpu`). Neither does what fine-tuning needs: `mha` has one
segment-id array shared by queries and keys, masks by index rather than position, repeats K/V for
grouped-query attention (it takes one head count), has no sliding window, and computes every tile of
a packed row (its only skipping is the causal bound); `attention_mgpu` has no segment ids at all.
So this module is our own kernel, on `mha`'s structure (one program per query block and head, an
online softmax in base 2, the FlashAttention-2 backward with dK/dV and dQ in one program):

- The mask is `jaxtune.kernels.attention.attention_mask` exactly: segment ids and positions for
  queries and keys separately, causal by position, a sliding window (a traced value, 0 = none).
- GQA: a program for query head n reads K/V head n // G through its BlockSpec; K and V are never
  repeated. dK/dV come out per query head in float32 and are summed over each group.
- Block skipping: before the kernel, each query block gets the range of key blocks it may need (and
  each key block the range of query blocks), from per-block minima and maxima of segment ids and
  positions (`block_ranges`). A block whose segment range does not overlap, that lies wholly in the
  future, or wholly outside the window is outside the range and never loaded. The ranges only
  bound the work; every tile inside them is masked exactly, so a conservative range costs time,
  never correctness. Packed rows of short samples cost what their samples cost.
- Any head_dim: padded with zeros to a power of two (Triton's block shapes need one) when it is not
  one; zero columns change neither the scores nor the kept part of the output.
- Any length: padded to whole blocks with segment ids no real token has (-2 queries, -1 keys).

Off-GPU the same kernel runs with `interpret=True` (the CPU tests do, on small blocks).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxtune.batch import BRANCH, attends

# Tiles and launch parameters: the fastest of scripts/bench_pallas_tiles.py on an H100 (bf16,
# head_dim 64, 2k-32k tokens); module globals so that tests and the sweep can set them.
BLOCK_Q = 64  # forward: query block of a program
BLOCK_K = 64  # forward: key block of an inner step
# Backward: program j computes dK/dV of key block j and dQ of query block j (BWD_OUTER tokens each),
# stepping over query (for dK/dV) and key (for dQ) blocks of BWD_INNER tokens.
BWD_OUTER = 64
BWD_INNER = 64
FWD_WARPS, FWD_STAGES = 4, 4
BWD_WARPS, BWD_STAGES = 4, 3
LOG2E = math.log2(math.e)


def block_ranges(qs, ks, rule, bq: int, bk: int):
    """Which tiles of query blocks (`bq` tokens) x key blocks (`bk` tokens) a kernel must compute.

    `qs` / `ks` are (segment ids, positions) [B, L]; `rule` is (window array, causal, use_window).
    Returns two int32 tables, [B, nq, 4] (per query block, over key blocks) and [B, nk, 4] (per key
    block, over query blocks), each row (first, first full, end of full, end): the blocks in
    [first, end) may hold an allowed pair, the blocks in [first full, end of full) hold only allowed
    pairs and need no mask. Both come from each block's segment and position ranges: the outer
    range is conservative (a listed block may still be fully masked; the kernel masks it exactly,
    a block with an allowed pair is always listed), the full range exact (a listed block is full).
    For packed rows sorted by segment (as jaxtune's packer writes them) the listed blocks are just
    those of the samples a block's tokens belong to; padding at the end of a row stays apart."""
    window, causal, use_window = rule
    big = jnp.iinfo(jnp.int32).max

    def span(values, where):
        return jnp.where(where, values, big).min(-1), jnp.where(where, values, -big).max(-1)

    def summary(seg, pos, block):
        """Per block: the range of its real tokens' sample ids (segment id mod BRANCH) and branch
        numbers (segment id // BRANCH, 0 outside branches), the range of sample ids of its tokens
        outside branches (the prompts branches attend to; jaxtune.batch), whether it holds data padding
        (segment 0, which attends only itself), whether it is one real segment throughout, and the
        range of positions of its tokens (kernel padding, segment < 0, matches nothing)."""
        b, length = seg.shape
        seg, pos = seg.reshape(b, length // block, block), pos.reshape(b, length // block, block)
        real, valid = seg > 0, seg >= 0
        sample, branch = seg & (BRANCH - 1), seg >> 24
        s_min, s_max = span(seg, real)
        return dict(sample=span(sample, real), branch=span(branch, real), prefix=span(sample, real & (branch == 0)),
                    pad=(seg == 0).any(-1), one=real.all(-1) & (s_min == s_max), s_min=s_min, pos=span(pos, valid))

    def overlap(a, b):
        return jnp.maximum(a[0], b[0]) <= jnp.minimum(a[1], b[1])

    q = jax.tree.map(lambda a: a[:, :, None], summary(*qs, bq))
    k = jax.tree.map(lambda a: a[:, None, :], summary(*ks, bk))
    # A query reaches keys of its own segment (same sample, same branch) and, in a branch, its sample's
    # prompt (keys outside branches): whenever a tile holds such a pair, these ranges overlap.
    live = (overlap(q["sample"], k["sample"]) & (overlap(q["branch"], k["branch"]) | overlap(q["sample"], k["prefix"]))
            | (q["pad"] & k["pad"]))  # [B, nq, nk]
    full = q["one"] & k["one"] & (q["s_min"] == k["s_min"])
    (q_pmin, q_pmax), (k_pmin, k_pmax) = q["pos"], k["pos"]
    if causal:
        live &= k_pmin <= q_pmax
        full &= k_pmax <= q_pmin
    if use_window:
        live &= (window <= 0) | (q_pmin - k_pmax < window)
        full &= (window <= 0) | (q_pmax - k_pmin < window)

    def table(live, full):  # [B, n, m] -> [B, n, 4] over the last axis
        m = live.shape[-1]
        index = jnp.arange(m)

        def span(x):
            some = x.any(-1)
            first = jnp.where(some, jnp.argmax(x, axis=-1), 0)
            end = jnp.where(some, m - jnp.argmax(x[..., ::-1], axis=-1), 0)
            return first, end

        first, end = span(live)
        f_first, f_end = span(full)
        # The unmasked run must be contiguous; otherwise every listed block is masked.
        inside = (index >= f_first[..., None]) & (index < f_end[..., None])
        contiguous = jnp.all(full | ~inside, axis=-1) & (f_end > f_first)
        f_first, f_end = jnp.where(contiguous, f_first, first), jnp.where(contiguous, f_end, first)
        return jnp.stack([first, f_first, f_end, end], axis=-1).astype(jnp.int32)

    return table(live, full), table(jnp.swapaxes(live, 1, 2), jnp.swapaxes(full, 1, 2))


def _mask(q_seg, q_pos, k_seg, k_pos, window, causal: bool, use_window: bool):
    """[bq, bk] tile of the attention rule (`attention_mask`) inside a kernel."""
    mask = attends(q_seg[:, None], k_seg[None, :])
    if causal or use_window:
        distance = q_pos[:, None] - k_pos[None, :]
        if causal:
            mask &= distance >= 0
        if use_window:
            limit = jnp.where(window <= 0, jnp.iinfo(jnp.int32).max, window)
            mask &= distance < limit
    return mask


def _dot(a, b, *, trans_a=False, trans_b=False):
    # fp32 inputs multiply in full precision (Triton would otherwise use TF32).
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _sweep(table_ref, row, body, carry):
    """Run `body(j, carry, masked)` over the listed blocks of `row` of a `block_ranges` table: the
    masked ones before and after the full run, the full run without a mask."""
    first, f_first, f_end, end = (table_ref[row, c] for c in range(4))
    carry = jax.lax.fori_loop(first, f_first, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(f_first, f_end, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(f_end, end, functools.partial(body, masked=True), carry)


def _scores(q, k, scale, softcap):
    """Base-2 logits of a tile, soft-capped (in natural units) when `softcap` is set."""
    s = _dot(q, k, trans_b=True) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    return s * LOG2E


def _forward_kernel(table_ref, window_ref, q_seg_ref, q_pos_ref, k_seg_ref, k_pos_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, scale, softcap, causal, use_window, bk):
    window = window_ref[0]
    q = q_ref[...]
    q_seg, q_pos = q_seg_ref[...], q_pos_ref[...]
    bq, h = q.shape

    def body(j, carry, masked):
        acc, m, l = carry
        keys = pl.ds(j * bk, bk)
        s = _scores(q, k_ref[keys, :], scale, softcap)
        if masked:
            s = jnp.where(_mask(q_seg, q_pos, k_seg_ref[keys], k_pos_ref[keys], window, causal, use_window), s,
                          -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing allowed yet
        p = jnp.exp2(s - m_safe[:, None])
        correction = jnp.exp2(m - m_safe)
        v = v_ref[keys, :]
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * correction + jnp.sum(p, axis=1)

    init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = _sweep(table_ref, pl.program_id(0), body, init)
    empty = l == 0.0  # padded query rows
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(l_safe))  # base 2


def _backward_kernel(q_table_ref, k_table_ref, window_ref, q_seg_ref, q_pos_ref, k_seg_ref, k_pos_ref, q_ref, k_ref,
                     v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, *, scale, softcap, causal, use_window,
                     outer, inner):
    j = pl.program_id(0)
    window = window_ref[0]
    h = q_ref.shape[-1]
    here = pl.ds(j * outer, outer)

    def probs(q, k, q_rows, k_rows, masked):
        """P [rows, cols] of query rows `q_rows` against key rows `k_rows`, and the factor dS passes
        through for the soft cap (1 - tanh^2; 1 without one)."""
        s = _scores(q, k, scale, softcap)
        through = 1.0 if softcap is None else 1.0 - jnp.square(s / (softcap * LOG2E))
        if masked:
            mask = _mask(q_seg_ref[q_rows], q_pos_ref[q_rows], k_seg_ref[k_rows], k_pos_ref[k_rows], window, causal,
                         use_window)
            s = jnp.where(mask, s, -jnp.inf)
        return jnp.exp2(s - lse_ref[q_rows][:, None]), through

    # dK, dV of key block j: over the query blocks that may attend it.
    k, v = k_ref[here, :], v_ref[here, :]

    def dkv_body(i, carry, masked):
        dk, dv = carry
        rows = pl.ds(i * inner, inner)
        q, do = q_ref[rows, :], do_ref[rows, :]
        p, through = probs(q, k, rows, here, masked)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta_ref[rows][:, None]) * through
        return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

    zeros = jnp.zeros((outer, h), jnp.float32)
    dk, dv = _sweep(k_table_ref, j, dkv_body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

    # dQ of query block j: over the key blocks it may attend.
    q, do, delta = q_ref[here, :], do_ref[here, :], delta_ref[here]

    def dq_body(i, dq, masked):
        cols = pl.ds(i * inner, inner)
        k, v = k_ref[cols, :], v_ref[cols, :]
        p, through = probs(q, k, here, cols, masked)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None]) * through
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _sweep(q_table_ref, j, dq_body, zeros)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _forward(q, k, v, qs, ks, window, causal, use_window, scale, softcap, interpret):
    """q [B, L, N, H], k/v [B, L, K, H], qs / ks (segment ids, positions) [B, L], all padded to whole
    blocks -> out [B, L, N, H], lse [B, N, L] (base 2)."""
    b, length, n, h = q.shape
    group = n // k.shape[2]
    bq, bk = min(BLOCK_Q, length), min(BLOCK_K, length)
    table, _ = block_ranges(qs, ks, (window, causal, use_window), bq, bk)
    nq = length // bq
    row = pl.BlockSpec((None, length), lambda i, bi, ni: (bi, 0))
    q_block = pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i))
    kv_rows = pl.BlockSpec((None, length, None, h), lambda i, bi, ni: (bi, 0, ni // group, 0))
    kernel = functools.partial(_forward_kernel, scale=scale, softcap=softcap, causal=causal, use_window=use_window,
                               bk=bk)
    return pl.pallas_call(
        kernel,
        grid=(nq, b, n),
        in_specs=[
            pl.BlockSpec((None, nq, 4), lambda i, bi, ni: (bi, 0, 0)), pl.BlockSpec((1,), lambda i, bi, ni: (0,)),
            q_block, q_block, row, row,
            pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0)), kv_rows, kv_rows,
        ],
        out_specs=[pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, length), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=FWD_WARPS, num_stages=FWD_STAGES),
        interpret=interpret,
        name="jaxtune_flash_forward",
    )(table, window.reshape(1), *qs, *ks, q, k, v)


def _backward(q, k, v, qs, ks, window, out, lse, d_out, causal, use_window, scale, softcap, interpret):
    b, length, n, h = q.shape
    kh = k.shape[2]
    group = n // kh
    outer = min(BWD_OUTER, length)
    inner = min(BWD_INNER, outer)
    rule = (window, causal, use_window)
    # Per query block of `outer`: its key blocks of `inner`; per key block of `outer`: its query
    # blocks of `inner` (one call gives both when the two sizes agree).
    q_table, k_table = block_ranges(qs, ks, rule, outer, inner)
    if inner != outer:
        k_table = block_ranges(qs, ks, rule, inner, outer)[1]
    delta = jnp.einsum("blnh,blnh->bnl", d_out.astype(jnp.float32), out.astype(jnp.float32))
    n_blocks = length // outer
    row = pl.BlockSpec((None, length), lambda j, bi, ni: (bi, 0))
    table = pl.BlockSpec((None, n_blocks, 4), lambda j, bi, ni: (bi, 0, 0))
    q_rows = pl.BlockSpec((None, length, None, h), lambda j, bi, ni: (bi, 0, ni, 0))
    kv_rows = pl.BlockSpec((None, length, None, h), lambda j, bi, ni: (bi, 0, ni // group, 0))
    per_head = pl.BlockSpec((None, None, length), lambda j, bi, ni: (bi, ni, 0))
    out_block = pl.BlockSpec((None, outer, None, h), lambda j, bi, ni: (bi, j, ni, 0))
    kernel = functools.partial(_backward_kernel, scale=scale, softcap=softcap, causal=causal, use_window=use_window,
                               outer=outer, inner=inner)
    dq, dk, dv = pl.pallas_call(
        kernel,
        grid=(n_blocks, b, n),
        in_specs=[table, table, pl.BlockSpec((1,), lambda j, bi, ni: (0,)), row, row, row, row,
                  q_rows, kv_rows, kv_rows, q_rows, per_head, per_head],
        out_specs=[out_block, out_block, out_block],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + [jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=BWD_WARPS, num_stages=BWD_STAGES),
        interpret=interpret,
        name="jaxtune_flash_backward",
    )(q_table, k_table, window.reshape(1), *qs, *ks, q, k, v, d_out.astype(q.dtype), lse, delta)
    # dK/dV per query head -> per K/V head (sum over each group), in float32 before the cast.
    dk = dk.reshape(b, length, kh, group, h).sum(3).astype(k.dtype)
    dv = dv.reshape(b, length, kh, group, h).sum(3).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _attention(q, k, v, qs, ks, window, causal, use_window, scale, softcap, interpret):
    return _forward(q, k, v, qs, ks, window, causal, use_window, scale, softcap, interpret)[0]


def _attention_fwd(q, k, v, qs, ks, window, causal, use_window, scale, softcap, interpret):
    out, lse = _forward(q, k, v, qs, ks, window, causal, use_window, scale, softcap, interpret)
    return out, (q, k, v, qs, ks, window, out, lse)


def _attention_bwd(causal, use_window, scale, softcap, interpret, res, d_out):
    q, k, v, qs, ks, window, out, lse = res
    dq, dk, dv = _backward(q, k, v, qs, ks, window, out, lse, d_out, causal, use_window, scale, softcap, interpret)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _next_power_of_2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def flash_attention(q_btnh, k_bskh, v_bskh, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                    causal: bool, sliding_window, scale: float, softcap: float | None = None,
                    interpret: bool | None = None):
    """Attention of q [B, T, N, H] over k, v [B, S, K, H] by the Pallas kernel, masked by
    `jaxtune.kernels.attention.attention_mask` (same arguments). Returns [B, T, N, H] in q's dtype.
    `interpret` (default: off a GPU) runs the kernel through Pallas' interpreter.

    Queries and keys are padded to one common length L (a multiple of every block), so that one
    backward program computes both the dK/dV of key block j and the dQ of query block j."""
    b, t, n, h = q_btnh.shape
    s = k_bskh.shape[1]
    multiple = max(BLOCK_Q, BLOCK_K, BWD_OUTER, BWD_INNER)
    length = -(-max(t, s) // multiple) * multiple
    hp = _next_power_of_2(h)

    def pad(x, fill=0):
        widths = [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
        if x.ndim == 4:
            widths[-1] = (0, hp - h)
        return jnp.pad(x, widths, constant_values=fill)

    qs = (pad(q_segment_ids.astype(jnp.int32), -2), pad(q_positions.astype(jnp.int32)))
    ks = (pad(kv_segment_ids.astype(jnp.int32), -1), pad(kv_positions.astype(jnp.int32)))
    use_window = sliding_window is not None
    window = jnp.asarray(sliding_window if use_window else 0, jnp.int32)
    dtype = q_btnh.dtype
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    out = _attention(pad(q_btnh), pad(k_bskh.astype(dtype)), pad(v_bskh.astype(dtype)), qs, ks, window, causal,
                     use_window, float(scale), softcap, interpret)
    return out[:, :t, :, :h]
