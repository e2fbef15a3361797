"""Scaling benchmark: tokens/s of the SmolLM2-135M LoRA training step at a fixed global batch on 1,
2, 4 and 8 devices (FSDP over all of them, jaxtune.parallel.mesh, the trainer's own placement).

On this CPU machine the "devices" are forced host devices sharing 2 cores
(XLA_FLAGS=--xla_force_host_platform_device_count=N), so the figures show the overhead of the
sharded step (collectives, smaller matmuls), not a speed-up: it checks that scaling costs little
and that every mesh trains to the same loss. Each device count runs in a fresh process. On a GPU
(when one is lent) the same step also reports its model FLOPs utilisation (MFU): 6 x parameters x
tokens (+ attention's 12 x layers x T x hidden per token) over the step time, against the GPU's
dense bf16 peak.

    .venv/bin/python scripts/bench_scale.py [--devices 1,2,4,8] [--global-batch 8] [--seq 256]
                                            [--steps 3] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RESULT_TAG = "BENCH_RESULT "
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU


def worker(args) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # jaxtune's runtime has no torch
    import jax
    import numpy as np
    from flax import nnx

    from jaxtune.build import best_backend
    from jaxtune.checkpoint.hf import load_model
    from jaxtune.config import build_config
    from jaxtune.objectives.sft import SFT
    from jaxtune.optim import build_optimizer
    from jaxtune.parallel import mesh as M
    from jaxtune.peft import lora
    from jaxtune.models.llama import LORA_TARGETS
    from jaxtune.step import make_train_step

    n = jax.device_count()
    gpu = jax.default_backend() == "gpu"
    dtype = "bfloat16" if gpu else "float32"
    model = load_model(args.model, dtype=dtype, param_dtype=dtype, attn_implementation=best_backend(), remat="full")
    spec = lora.LoraSpec(r=8, alpha=16, targets=tuple(LORA_TARGETS))
    lora.add_lora(model, spec, jax.random.key(0))
    cfg = model.cfg
    graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(model, spec), ...)
    del model
    optimizer, schedule = build_optimizer(
        build_config({"optimizer": "adamw_torch", "learning_rate": 1e-4, "lr_scheduler": "constant"}), 10)
    plan = M.MeshPlan(fsdp=n)
    mesh = plan.make()
    placed = M.place_training_state(plan, mesh, trainable, frozen, optimizer)
    step = make_train_step(graphdef, SFT(), optimizer, schedule, use_rng=False, **placed.step_shardings)
    trainable, frozen, opt_state = placed.trainable, placed.frozen, placed.opt_state
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (1, args.global_batch, args.seq), dtype=np.int32)
    batch = {"input_ids": ids, "labels": ids, "segment_ids": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), ids.shape).copy()}
    losses, times = [], []
    with jax.set_mesh(mesh):
        for i in range(args.steps + 1):  # the first compiles
            t0 = time.perf_counter()
            trainable, opt_state, out = step(trainable, frozen, opt_state, M.place_batch(batch, mesh),
                                             jax.random.key(0), np.int32(i))
            losses.append(float(out["loss"]))
            times.append(time.perf_counter() - t0)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    tokens = args.global_batch * args.seq
    result = {"devices": n, "step_s": step_s, "tokens_per_s": tokens / step_s, "losses": losses}
    if gpu:
        params = sum(x.size for x in jax.tree.leaves((trainable, frozen)))
        flops = tokens * (6 * params + 12 * cfg.num_layers * args.seq * cfg.num_heads * cfg.head_dim)
        kind = jax.devices()[0].device_kind
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
        result.update(device=kind, tflops=flops / step_s / 1e12,
                      mfu=None if peak is None else flops / step_s / 1e12 / (peak * n))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts (forced CPU devices)")
    parser.add_argument("--global-batch", type=int, default=8, help="rows per step, split over the devices")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the compiling one")
    parser.add_argument("--model", help="HF model directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from jaxtune import bundled

        args.model = str(bundled.resolve("bundled:smollm2"))
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return
    rows = []
    for n in [int(x) for x in args.devices.split(",")]:
        env = dict(os.environ)
        if n > 1 or "JAX_PLATFORMS" not in env:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--global-batch", str(args.global_batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--model", args.model]
        print(f"[bench_scale] {n} device(s) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [line[len(RESULT_TAG):] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
        if proc.returncode or not found:
            sys.exit(f"{n} devices failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(found[-1]))
    base = rows[0]
    print(f"SmolLM2-135M LoRA r=8, global batch {args.global_batch} x {args.seq} tokens, FSDP over all devices")
    print(f"{'devices':>8} {'step s':>9} {'tokens/s':>10} {'vs first':>9} {'loss 1st step':>14} {'last loss':>10}")
    for r in rows:
        print(f"{r['devices']:>8} {r['step_s']:>9.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>8.2f}x {r['losses'][0]:>14.5f} {r['losses'][-1]:>10.5f}")
        if r.get("tflops") is not None:
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"{'':>8} {r['device']}: {r['tflops']:.1f} TFLOP/s, MFU {mfu}")
    spread = max(abs(r["losses"][-1] - base["losses"][-1]) for r in rows)
    print(f"largest difference of the last loss from {base['devices']} device(s): {spread:.2e}")


if __name__ == "__main__":
    main()
