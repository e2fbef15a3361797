"""Attention benchmark: forward + backward time and memory of each backend across sequence lengths.

One SmolLM2 attention layer's shapes (9 query heads over 3 K/V heads, head_dim 64), one row of
`seq` tokens, causal, as one packed sample (`--packed N` cuts the row into N samples instead, so
the blockwise backend can skip the tiles between them). For each backend the jitted function
computes the output and dq, dk, dv. Reported per backend and length:

  - time: the best of --reps runs after one warm-up (compile excluded);
  - memory: XLA's own accounting of the compiled function (temporary buffers + arguments + outputs,
    `compiled.memory_analysis()`), which is what the step adds on top of the model.

A backend whose memory would exceed --limit-gb is not run ("too big"). On CPU the backends are
`xla` (the reference: [seq, seq] scores per head) and `blockwise`; on a GPU also `pallas` (our
Triton kernel) and `cudnn` (cuDNN through jax.nn; rows that pack several samples fall back to
`pallas` at run time, so with --packed > 1 it times the fallback plus cuDNN's check). On a GPU one
more column, `cudnn-packed`, times cuDNN's own packed layout (the segment offsets/lengths form of
JAX's internal cuDNN entry point, which jaxtune does not use: a private API) as the reference for
"the Pallas kernel at least as fast as cuDNN on packed batches".

    .venv/bin/python scripts/bench_attention.py [--lengths 512,1024,2048,4096,8192] [--packed 1]
                                                [--dtype float32] [--reps 3] [--limit-gb 12]
                                                [--backends xla,blockwise]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.kernels.attention import _PLATFORMS, IMPLEMENTATIONS, attention

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def inputs(seq: int, packed: int, dtype, *, heads: int = HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, seq, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (1, seq, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (1, seq, kv_heads, head_dim), jnp.float32).astype(dtype)
    bounds = np.linspace(0, seq, packed + 1).astype(int)
    seg = np.zeros((1, seq), np.int32)
    pos = np.zeros((1, seq), np.int32)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg[0, a:b], pos[0, a:b] = i + 1, np.arange(b - a)
    return q, k, v, jnp.asarray(seg), jnp.asarray(pos)


def cudnn_packed(q, k, v, seqlen, offsets):
    """cuDNN's packed layout (segment lengths and offsets per row) through JAX's internal entry point."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    n, kh = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)  # its packed path wants equal heads
    return dot_product_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
                                 scale=q.shape[-1] ** -0.5, mask_type=MaskType.CAUSAL)


def packed_layout(seg):
    """cuDNN's [1, M] segment lengths and [1, M + 1] offsets of a packed row."""
    seg = np.asarray(seg[0])
    starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
    bounds = np.concatenate([starts, [seg.size]])
    return jnp.asarray(np.diff(bounds)[None], jnp.int32), jnp.asarray(bounds[None], jnp.int32)


def fwd_bwd(impl: str):
    def loss(q, k, v, seg, pos):
        if impl == "cudnn-packed":  # `pos` holds the layout here
            out = cudnn_packed(q, k, v, *pos)
        else:
            out = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                            implementation=impl)
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def measure(impl: str, args_, reps: int, limit_gb: float) -> tuple[float | None, float]:
    fn = fwd_bwd(impl)
    if impl == "cudnn-packed":
        args_ = (*args_[:4], packed_layout(args_[3]))
    compiled = fn.lower(*args_).compile()
    mem = compiled.memory_analysis()
    gb = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**30
    if gb > limit_gb:
        return None, gb
    jax.block_until_ready(compiled(*args_))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args_))
        times.append(time.perf_counter() - t0)
    return min(times), gb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--packed", type=int, default=1, help="samples packed into the row (default 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--limit-gb", type=float, default=12.0, help="skip a run needing more (default 12)")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every backend this platform runs)")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    platform = jax.default_backend()
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in IMPLEMENTATIONS if platform in _PLATFORMS.get(b, (platform,))]
        backends += ["cudnn-packed"] if platform == "gpu" else []
    print(f"attention fwd+bwd, 1 x seq tokens, {HEADS} heads / {KV_HEADS} KV heads x {HEAD_DIM}, causal, "
          f"{args.packed} sample(s) per row, {args.dtype}, {jax.devices()[0].platform} x{jax.device_count()}; "
          "time ms (memory GB)")
    ratios = [("xla", "blockwise"), ("cudnn", "pallas"), ("cudnn-packed", "pallas")]
    ratios = [(a, b) for a, b in ratios if a in backends and b in backends]
    print(f"{'seq':>7}" + "".join(f"{b:>24}" for b in backends) + "".join(f"{a + '/' + b:>22}" for a, b in ratios))
    for seq in (int(x) for x in args.lengths.split(",")):
        data = inputs(seq, args.packed, dtype)
        row, times = f"{seq:>7}", {}
        for impl in backends:
            try:
                t, gb = measure(impl, data, args.reps, args.limit_gb)
            except Exception as e:  # a backend that cannot run this shape: say why, go on
                print(f"  {impl} at {seq}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                t, gb = None, float("nan")
            times[impl] = t
            row += f"{'-':>14} ({gb:6.2f})" if t is None else f"{t * 1e3:>14.2f} ({gb:6.2f})"
        for a, b in ratios:
            row += f"{times[a] / times[b]:>21.2f}x" if times.get(a) and times.get(b) else f"{'-':>22}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
