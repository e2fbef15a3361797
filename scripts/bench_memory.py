"""Memory benchmark: peak RSS of one SmolLM2-135M LoRA training step at long sequence lengths.

Each configuration runs in its own fresh process (this script re-invoked with --worker), one at a
time: load the bundled SmolLM2-135M (fp32), add LoRA r=8 on all seven projections, and run one
AdamW step (compile included) on one row of `seq` random tokens, every token trained. The parent
polls the worker's resident memory and stops it above --limit-gb (reported as "does not fit").
Reported: the worker's peak RSS (VmHWM, model loading included) and the step's wall time.

The matrix: for each --lengths value, the cross-entropy plain (full [seq, vocab] fp32 logits) or
chunked (jaxtune.kernels.cross_entropy), and attention `xla` (the [seq, seq] reference) or
`blockwise` (jaxtune.kernels.blockwise), all with gradient checkpointing (`full` remat) as in the
HF reference. Then --longest doubles the length from the last --lengths value with chunked CE +
blockwise attention + remat until a step no longer fits (or --max-length), to find the longest
sequence that trains.

HF transformers + PEFT (LoRA r8, gradient checkpointing, sdpa, batch 1), measured on the project's
24 GB 2-core machine (issue 6): 4k tokens 7.1 GB, 8k 13.2 GB, 16k 16.6 GB, 32k does not fit.
Targets: chunked CE + blockwise + remat at 16k tokens <= half of HF's (8.3 GB), and a 32k step
that trains on this machine.

    .venv/bin/python scripts/bench_memory.py [--lengths 2048,8192,16384] [--longest] [--limit-gb 22]
                                             [--only chunked-blockwise] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RESULT_TAG = "BENCH_RESULT "
HF_REFERENCE_GB = {4096: 7.1, 8192: 13.2, 16384: 16.6, 32768: None}  # None: does not fit (issue 6)
COMBOS = {  # name: (chunked cross-entropy, attention backend)
    "plain-xla": (False, "xla"),
    "chunked-xla": (True, "xla"),
    "plain-blockwise": (False, "blockwise"),
    "chunked-blockwise": (True, "blockwise"),
}
LORA_R, LORA_ALPHA, SEED = 8, 16, 0


def worker(args) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # jaxtune's runtime has no torch
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxtune.checkpoint.hf import load_model
    from jaxtune.config import build_config
    from jaxtune.objectives.sft import SFT
    from jaxtune.optim import build_optimizer
    from jaxtune.peft import lora
    from jaxtune.models.llama import LORA_TARGETS
    from jaxtune.step import make_train_step

    chunked, attn = COMBOS[args.combo]
    model = load_model(args.model, dtype="float32", param_dtype="float32", attn_implementation=attn, remat="full")
    model.chunked_loss = chunked
    spec = lora.LoraSpec(r=LORA_R, alpha=LORA_ALPHA, targets=tuple(LORA_TARGETS))
    lora.add_lora(model, spec, jax.random.key(SEED))
    graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(model, spec), ...)
    del model
    cfg = build_config({"optimizer": "adamw_torch", "learning_rate": 1e-4, "lr_scheduler": "constant"})
    optimizer, schedule = build_optimizer(cfg, 2)
    opt_state = optimizer.init(trainable)
    with open(os.path.join(args.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ids = np.random.default_rng(SEED).integers(0, vocab, (1, args.seq), dtype=np.int32)
    batch = {"input_ids": ids[None], "labels": ids[None], "segment_ids": np.ones_like(ids)[None],
             "positions": np.arange(args.seq, dtype=np.int32)[None, None]}
    step = make_train_step(graphdef, SFT(), optimizer, schedule, use_rng=False)
    t0 = time.perf_counter()
    trainable, opt_state, out = step(trainable, frozen, opt_state, batch, jax.random.key(SEED), jnp.int32(0))
    loss = float(out["loss"])
    return {"step_s": time.perf_counter() - t0, "peak_rss_gb": peak_rss_gb(), "loss": loss}


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run(combo: str, seq: int, args) -> dict | None:
    """One configuration in a fresh process; None if it went over the memory limit."""
    print(f"[bench_memory] {combo} at {seq} tokens ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--combo", combo, "--seq", str(seq),
           "--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    highest = 0.0
    while proc.poll() is None:
        highest = max(highest, rss_gb(proc.pid))
        if highest > args.limit_gb:
            proc.kill()
            proc.wait()
            return None
        time.sleep(0.2)
    out, err = proc.communicate()
    results = [line[len(RESULT_TAG):] for line in out.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not results:
        if proc.returncode in (-9, 137):  # the kernel's OOM killer
            return None
        sys.exit(f"{combo} at {seq} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(results[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192,16384", help="comma-separated sequence lengths")
    parser.add_argument("--only", default=",".join(COMBOS), help=f"comma-separated subset of {', '.join(COMBOS)}")
    parser.add_argument("--longest", action="store_true", help="then double the length until a step does not fit")
    parser.add_argument("--max-length", type=int, default=32768, help="--longest stops here (default 32768)")
    parser.add_argument("--limit-gb", type=float, default=22.0, help="stop a worker above this RSS (default 22)")
    parser.add_argument("--model", help="HF model directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--combo", choices=sorted(COMBOS), help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return
    if args.model is None:
        from jaxtune import bundled

        args.model = str(bundled.prepare("smollm2"))
    lengths = [int(x) for x in args.lengths.split(",") if x]
    combos = [c for c in args.only.split(",") if c]
    unknown = sorted(set(combos) - set(COMBOS))
    if unknown:
        parser.error(f"unknown --only entries {unknown}; choose from {', '.join(COMBOS)}")

    print(f"SmolLM2-135M LoRA r={LORA_R} (all projections), fp32, batch 1, gradient checkpointing, one AdamW step; "
          f"peak RSS GB (step s); limit {args.limit_gb:g} GB; CPU x{os.cpu_count()}")
    print(f"{'seq':>7}" + "".join(f"{c:>22}" for c in combos) + f"{'HF+PEFT (issue 6)':>22}")
    table: dict[tuple[str, int], dict | None] = {}
    for seq in lengths:
        row = f"{seq:>7}"
        for combo in combos:
            r = table[combo, seq] = run(combo, seq, args)
            row += f"{'does not fit':>22}" if r is None else f"{r['peak_rss_gb']:>13.2f} ({r['step_s']:5.0f}s)"
        hf = HF_REFERENCE_GB.get(seq, "n/a")
        print(row + f"{'does not fit' if hf is None else hf:>22}", flush=True)

    longest = None
    if args.longest:
        seq = max(lengths)
        while seq * 2 <= args.max_length:
            seq *= 2
            r = run("chunked-blockwise", seq, args)
            status = "does not fit" if r is None else f"{r['peak_rss_gb']:.2f} GB ({r['step_s']:.0f}s)"
            print(f"{seq:>7} chunked-blockwise: {status}", flush=True)
            if r is None:
                break
            longest = seq

    print("targets:")
    best = table.get(("chunked-blockwise", 16384))
    if best is not None or ("chunked-blockwise", 16384) in table:
        ok = best is not None and best["peak_rss_gb"] <= 8.3
        value = "does not fit" if best is None else f"{best['peak_rss_gb']:.2f} GB"
        print(f"  {'PASS' if ok else 'MISS'}  16k-token step (chunked CE + blockwise + remat) <= 8.3 GB ({value})")
    fits_32k = (longest or 0) >= 32768 or any(r is not None for (c, s), r in table.items()
                                              if c == "chunked-blockwise" and s >= 32768)
    if args.longest or any(s >= 32768 for s in lengths):
        print(f"  {'PASS' if fits_32k else 'MISS'}  a 32k-token step trains on this machine"
              + (f" (longest that trained: {longest})" if args.longest else ""))


if __name__ == "__main__":
    main()
