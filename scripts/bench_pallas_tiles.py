"""Tile sweep of the Pallas (Triton) flash-attention kernel on a GPU: forward and forward+backward
time per tile/launch configuration, against cuDNN on the same shapes (one sample per row, where
jaxtune's `cudnn` backend runs cuDNN itself).

Shapes as bench_attention.py (SmolLM2: 9 query heads over 3 K/V heads, head_dim 64), bf16, causal,
one row of `seq` tokens cut into --packed samples. Each configuration sets the module globals of
jaxtune.kernels.pallas_gpu (the defaults there are the winners of this sweep on an H100).

    python3 scripts/bench_pallas_tiles.py [--lengths 8192,32768] [--packed 1] [--heads 9 --kv-heads 3 --head-dim 64]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_attention as ba  # noqa: E402

import jaxtune.kernels.pallas_gpu as pg  # noqa: E402
from jaxtune.kernels.attention import attention  # noqa: E402

FWD = [(64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (32, 64, 4, 3)]  # BLOCK_Q, BLOCK_K, warps, stages
BWD = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 128, 8, 2), (32, 64, 4, 2)]  # BWD_OUTER, BWD_INNER, warps, stages


def timed(fn, args_, reps):
    import time

    jax.block_until_ready(fn(*args_))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args_))
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def functions(impl):
    def out(q, k, v, seg, pos):
        return attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                         implementation=impl)

    def loss(q, k, v, seg, pos):
        return jnp.sum(out(q, k, v, seg, pos).astype(jnp.float32))

    return jax.jit(out), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--packed", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--heads", type=int, default=ba.HEADS)
    parser.add_argument("--kv-heads", type=int, default=ba.KV_HEADS)
    parser.add_argument("--head-dim", type=int, default=ba.HEAD_DIM)
    args = parser.parse_args()
    ba.HEADS, ba.KV_HEADS, ba.HEAD_DIM = args.heads, args.kv_heads, args.head_dim
    print(f"{args.heads}/{args.kv_heads} heads x {args.head_dim}, bf16, causal, {args.packed} sample(s) per row; ms")
    for seq in (int(x) for x in args.lengths.split(",")):
        data = ba.inputs(seq, args.packed, jnp.bfloat16)
        ref_fwd, ref_grad = functions("cudnn")
        print(f"seq {seq}: cudnn fwd {timed(ref_fwd, data, args.reps):.3f}  fwd+bwd {timed(ref_grad, data, args.reps):.3f}")
        for (bq, bk, warps, stages), (outer, inner, bwarps, bstages) in itertools.zip_longest(FWD, BWD):
            fwd_cfg = dict(BLOCK_Q=bq, BLOCK_K=bk, FWD_WARPS=warps, FWD_STAGES=stages) if bq else {}
            bwd_cfg = dict(BWD_OUTER=outer, BWD_INNER=inner, BWD_WARPS=bwarps, BWD_STAGES=bstages) if outer else {}
            for name, value in {**fwd_cfg, **bwd_cfg}.items():
                setattr(pg, name, value)
            fwd, grad = functions("pallas")
            try:
                line = f"  fwd {fwd_cfg} {timed(fwd, data, args.reps):.3f}  bwd {bwd_cfg} fwd+bwd {timed(grad, data, args.reps):.3f}"
            except Exception as e:  # a configuration Triton cannot compile: say so, go on
                line = f"  {fwd_cfg} {bwd_cfg}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
