"""GPU benchmark: one prepared run that says whether jaxtune is fast where its users train.

One command (under 8 minutes on one H100/H200) measures, each part in its own fresh process so that
peak device memory is its own and a failure (a missing package, an out-of-memory) costs only that
part (it prints a line saying so; the rest goes on):

  train       a Llama-3.2-1B-shaped model (its config, random weights: throughput does not depend on
              the values) and SmolLM2-135M's shape, bf16 compute (frozen weights bf16, trained ones
              fp32 master copies, as `bf16: true` trains), rows of 2048 tokens packed with samples of
              seeded random lengths (each sample attends only to itself), every token trained; LoRA r=16
              (alpha 32) on all seven linear projections, and full fine-tuning; AdamW. jaxtune (attention
              `auto`: the Pallas kernel on a GPU) against transformers + PEFT on the same shapes and the
              same GPU: torch autocast bf16 with fp32 trained weights (the HF Trainer's `bf16=True`), the
              packing given as position_ids (transformers masks each sample), fused AdamW, `sdpa` and
              `flash_attention_2` where flash-attn is installed. Per run: tokens/s of the steady steps,
              MFU, peak device memory, the first step (jaxtune: tracing and compilation included).
  attention   jaxtune's attention backends (pallas, cudnn, blockwise, xla), forward + backward of one
              Llama-1B attention layer (32 query / 8 K/V heads x 64), bf16, on one row of 2k, 8k and
              32k tokens holding one sample and holding samples of 512 tokens (the Pallas kernel skips
              the tiles between samples); `cudnn-packed` is cuDNN's own packed layout, the reference for
              packed rows (jaxtune's `cudnn` backend hands packed rows to Pallas).
  rollout     GRPO's sampler on the 1B model: 8 prompts of 64 tokens x 8 completions (64 rows) x 128
              new tokens, temperature 1, LoRA adapters live, one shared prefill per prompt (`make_rollout`, what
              `rl: grpo` runs) against `transformers.generate` on the PEFT model with each prompt
              repeated 8 times (what TRL runs without vLLM): sampled tokens/s.
  breakdown   what the 1B model's step is made of, each piece jitted and timed alone in the step's
              shapes: the projections' matmuls (and their TFLOP/s alone), the LM head with its chunked
              cross-entropy, attention x layers, the AdamW update; the step less their sum is the rest
              (norms, activations, RoPE, casts, launch gaps).

Model FLOPs per training step are bench_train.py's (6 N T for full fine-tuning, 4 N T + 6 N_lora T for
LoRA, attention over the full seq x seq square of each row: packing is not discounted, so the same
count serves both frameworks). MFU = model FLOP/s against the chip's dense bf16 peak (the datasheet's,
by device name); the table also prints a measured 8192^3 bf16 matmul as the attainable peak.

Targets on an H100/H200: LoRA SFT of the 1B model MFU >= 45% and tokens/s >= 1.3x transformers + PEFT;
full fine-tuning MFU >= 50%; Pallas forward + backward on packed 8k rows within 10% of cuDNN and faster
than it on rows of many short samples.

    python scripts/bench_gpu.py [--out DIR] [--parts train,attention,rollout,breakdown] [--budget-s 460]
                                [--models llama-1b,...] [--modes lora,full] [--frameworks jaxtune,hf] [--smoke]

`--smoke` runs every code path at tiny shapes on any platform in about a minute (a default-suite test
runs it, so the script cannot rot between the times a GPU is available). The table and a JSON copy go
to --out (default outputs/bench_gpu), with errors.txt holding the stderr of every part that failed.
The measurements themselves are in bench_gpu_workers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_gpu_workers import RESULT_TAG  # noqa: E402  (the measurements; this file drives them)

LLAMA_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}}
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True}
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": True}

# Dense bf16 peaks from the vendors' datasheets (without sparsity), matched against jax's device_kind.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("B200", 2250e12), ("GB200", 2500e12)]
TARGETS = {("llama-1b", "lora", "mfu"): 45.0, ("llama-1b", "lora", "vs_hf"): 1.3, ("llama-1b", "full", "mfu"): 50.0}


def shapes(smoke: bool) -> dict:
    """Everything each part runs at: the real shapes, or tiny ones for --smoke."""
    if smoke:
        return {"models": {"tiny": TINY}, "batch": 2, "seq": 128, "sample_range": (16, 64), "steps": 2,
                "attn_lengths": [256], "attn_sample": 64, "attn_heads": (4, 2, 16), "attn_reps": 1,
                "prompts": 2, "generations": 2, "prompt_len": 8, "new_tokens": 8, "matmul": 256}
    return {"models": {"llama-1b": LLAMA_1B, "smollm2-135m": SMOLLM2_135M}, "batch": 8, "seq": 2048,
            "sample_range": (128, 1536), "steps": 5, "attn_lengths": [2048, 8192, 32768], "attn_sample": 512,
            "attn_heads": (32, 8, 64), "attn_reps": 3, "prompts": 8, "generations": 8, "prompt_len": 64,
            "new_tokens": 128, "matmul": 8192}


# ------------------------------------------------------------------------------------------- driver


class Driver:
    """Runs workers one at a time within a total time budget; a failed or skipped part is a line."""

    def __init__(self, budget_s: float, smoke: bool):
        self.deadline = time.monotonic() + budget_s
        self.smoke = smoke
        self.lines: list[str] = []
        self.errors: list[str] = []  # each failed part's stderr (written to errors.txt)

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def run(self, label: str, worker: str, spec: dict, timeout_s: float) -> dict | None:
        left = self.deadline - time.monotonic()
        if left < 10:
            self.say(f"  {label}: not run (the time budget is spent)")
            return None
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        print(f"[bench_gpu] {label} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(SCRIPTS / "bench_gpu_workers.py"), worker, json.dumps(spec)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=min(timeout_s, left))
        except subprocess.TimeoutExpired as e:
            self.errors.append(f"==== {label} (timed out)\n{str(e.stderr or '')[-20000:]}")
            self.say(f"  {label}: could not run (stopped after {min(timeout_s, left):.0f} s)")
            return None
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT_TAG)), None)
        if proc.returncode or line is None:
            self.errors.append(f"==== {label} (exit {proc.returncode})\n{proc.stderr[-20000:]}\n{proc.stdout[-2000:]}")
            why = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()] or [f"exit {proc.returncode}"]
            oom = any("RESOURCE_EXHAUSTED" in ln or "OutOfMemory" in ln or "out of memory" in ln for ln in why)
            self.say(f"  {label}: could not run ({'out of memory: ' if oom else ''}{why[-1].strip()[:240]})")
            return None
        return json.loads(line[len(RESULT_TAG):])


def chip_peak(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16:
        if name.lower() in device_kind.lower():
            return peak
    return None


def train_runs(d: Driver, s: dict, model_name: str, peak: float, results: dict) -> None:
    """LoRA and full fine-tuning of one model: jaxtune, then transformers (+ PEFT) per attention."""
    from importlib.util import find_spec

    import bench_train

    config = s["models"][model_name]
    attentions = ["sdpa"] + (["flash_attention_2"] if find_spec("flash_attn") else [])
    for mode in s["modes"]:
        spec = {"config": config, "mode": mode, "batch": s["batch"], "seq": s["seq"],
                "sample_range": s["sample_range"], "steps": s["steps"]}
        flops = bench_train.train_flops(config, s["batch"], s["seq"], mode)
        runs = {"jaxtune": d.run(f"jaxtune {model_name} {mode}", "train-jaxtune", spec, 240)}
        for attention in attentions if "hf" in s["frameworks"] else []:
            runs[f"HF+PEFT {attention}" if mode == "lora" else f"HF {attention}"] = d.run(
                f"transformers {model_name} {mode} {attention}", "train-hf", {**spec, "attention": attention}, 180)
        for framework, r in runs.items():
            if r is not None:
                r.update(model=model_name, mode=mode, framework=framework,
                         tokens_per_s=s["batch"] * s["seq"] / r["step_s"], mfu=100 * flops / r["step_s"] / peak)
                results.setdefault("train", []).append(r)


def train_table(d: Driver, s: dict, results: dict) -> None:
    from importlib.util import find_spec

    rows = results.get("train", [])
    d.say(f"train: {s['batch']} rows x {s['seq']} tokens packed with samples of {s['sample_range'][0]}-"
          f"{s['sample_range'][1]} tokens, bf16, AdamW; {s['steps']} steady steps after two")
    if not find_spec("flash_attn"):
        d.say("  transformers flash_attention_2: not run (flash-attn is not installed)")
    d.say(f"{'model':<14}{'mode':<6}{'framework':<24}{'tokens/s':>11}{'MFU %':>8}{'peak GB':>9}{'first step s':>14}"
          f"{'loss':>8}{'vs HF':>8}")
    for r in rows:
        hf = next((h for h in rows if h["model"] == r["model"] and h["mode"] == r["mode"]
                   and h["framework"].endswith(" sdpa")), None)
        r["vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"] if hf else None
        gb = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        name = r["framework"] + (f" ({r['attention']})" if "attention" in r else "")
        d.say(f"{r['model']:<14}{r['mode']:<6}{name:<24}{r['tokens_per_s']:>11,.0f}{r['mfu']:>8.1f}{gb:>9}"
              f"{r['first_step_s']:>14.1f}{r['loss']:>8.3f}" + (f"{r['vs_hf']:>7.2f}x" if r["vs_hf"] else f"{'-':>8}"))


def attention_runs(d: Driver, s: dict, results: dict) -> None:
    r = d.run("attention backends", "attention", {"lengths": s["attn_lengths"], "sample": s["attn_sample"],
                                                  "heads": s["attn_heads"], "reps": s["attn_reps"], "limit_gb": 60},
              240)
    if r is not None:
        results["attention"] = r


def attention_table(d: Driver, s: dict, results: dict) -> None:
    r = results.get("attention")
    if r is None:
        return
    heads, kv_heads, head_dim = s["attn_heads"]
    d.say(f"attention fwd+bwd, 1 row, {heads}/{kv_heads} heads x {head_dim}, causal, bf16: ms "
          "(pallas vs the cuDNN reference of the same layout)")
    d.say(f"{'seq':>7}  {'layout':<20}" + "".join(f"{b:>14}" for b in r["backends"]) + f"{'cuDNN/pallas':>14}")
    for row in r["rows"]:
        cells = "".join(f"{row[b]['ms']:>14.2f}" if row.get(b, {}).get("ms") else f"{'-':>14}" for b in r["backends"])
        ref = row.get("cudnn-packed" if row["layout"] != "1 sample" else "cudnn", {}).get("ms")
        pallas = row.get("pallas", {}).get("ms")
        d.say(f"{row['seq']:>7}  {row['layout']:<20}{cells}" + (f"{ref / pallas:>13.2f}x" if ref and pallas else ""))
        for b in r["backends"]:
            if row.get(b, {}).get("error") and not d.smoke:
                d.say(f"           {b}: {row[b]['error']}")


def breakdown_runs(d: Driver, s: dict, results: dict) -> None:
    model_name = next(iter(s["models"]))
    for mode in s["modes"]:
        spec = {"config": s["models"][model_name], "mode": mode, "batch": s["batch"], "seq": s["seq"],
                "sample_range": s["sample_range"]}
        r = d.run(f"breakdown {model_name} {mode}", "breakdown", spec, 180)
        if r is not None:
            results.setdefault("breakdown", []).append({"model": model_name, "mode": mode, **r})


def breakdown_table(d: Driver, results: dict) -> None:
    d.say("the step's pieces, each timed alone (ms): matmuls (projections and LoRA; their TFLOP/s alone), LM head "
          "+ chunked cross-entropy fwd+bwd, attention fwd+bwd x layers, AdamW; the rest = step - their sum")
    for b in results.get("breakdown", []):
        step = next((r["step_s"] for r in results.get("train", []) if r["framework"] == "jaxtune"
                     and r["model"] == b["model"] and r["mode"] == b["mode"]), None)
        pieces = b["matmuls_s"] + b["head_s"] + b["attention_s"] + b["adamw_s"]
        rest = f"{1e3 * (step - pieces):.1f}" if step else "-"
        d.say(f"  {b['model']} {b['mode']}: step {1e3 * step if step else float('nan'):.1f} = matmuls "
              f"{1e3 * b['matmuls_s']:.1f} ({b['matmul_flop_s'] / 1e12:.1f} TFLOP/s) + head {1e3 * b['head_s']:.1f} + "
              f"attention {1e3 * b['attention_s']:.1f} + AdamW {1e3 * b['adamw_s']:.1f} + rest {rest}")


def rollout_runs(d: Driver, s: dict, results: dict) -> None:
    model_name = next(iter(s["models"]))  # the first (largest) model
    spec = {"config": s["models"][model_name], "prompts": s["prompts"], "generations": s["generations"],
            "prompt_len": s["prompt_len"], "new_tokens": s["new_tokens"]}
    ours = d.run(f"rollout jaxtune {model_name}", "rollout-jaxtune", spec, 150)
    theirs = d.run(f"rollout transformers.generate {model_name}", "rollout-hf", spec, 150)
    results["rollout"] = [{"model": model_name, "jaxtune": ours, "hf": theirs}]


def rollout_table(d: Driver, s: dict, results: dict) -> None:
    rows = results.get("rollout", [])
    d.say(f"GRPO rollout: {s['prompts']} prompts x {s['generations']} completions, {s['prompt_len']} prompt + "
          f"{s['new_tokens']} new tokens, temperature 1, LoRA live: sampled tokens/s")
    for row in rows:
        ours, theirs = row["jaxtune"], row["hf"]
        ratio = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if ours and theirs else "-"
        d.say(f"  {row['model']:<14} jaxtune {ours['tokens_per_s'] if ours else float('nan'):>10,.0f}   "
              f"transformers.generate {theirs['tokens_per_s'] if theirs else float('nan'):>10,.0f}   ratio {ratio}")


def targets_part(d: Driver, results: dict) -> None:
    rows = results.get("train", [])
    d.say("targets:")
    for (model, mode, what), target in TARGETS.items():
        r = next((r for r in rows if r["model"] == model and r["mode"] == mode and r["framework"] == "jaxtune"), None)
        value = None if r is None else r[what]
        label = f"{model} {mode} " + (f"MFU >= {target:g}%" if what == "mfu" else f"tokens/s >= {target:g}x HF")
        if value is None:
            d.say(f"  ----  {label} (not measured)")
        else:
            d.say(f"  {'PASS' if value >= target else 'MISS'}  {label} ({value:.2f}{'%' if what == 'mfu' else 'x'})")
    attention = results.get("attention", {}).get("rows", [])
    for row in attention:
        if row["seq"] != 8192:
            continue
        ref_name = "cudnn" if row["layout"] == "1 sample" else "cudnn-packed"
        ref, pallas = row.get(ref_name, {}).get("ms"), row.get("pallas", {}).get("ms")
        if ref and pallas:
            d.say(f"  {'PASS' if pallas <= 1.1 * ref else 'MISS'}  pallas within 10% of {ref_name}, 8k {row['layout']} "
                  f"({pallas:.2f} vs {ref:.2f} ms)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench_gpu", help="folder for table.txt and results.json")
    parser.add_argument("--parts", default="train,attention,rollout,breakdown")
    parser.add_argument("--models", help="comma-separated subset of the models (default: all)")
    parser.add_argument("--modes", default="lora,full", help="train modes (default lora,full)")
    parser.add_argument("--frameworks", default="jaxtune,hf", help="train frameworks (default jaxtune,hf)")
    parser.add_argument("--budget-s", type=float, default=460.0, help="total seconds; parts past it are not run")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any platform, about a minute")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - {"train", "attention", "rollout", "breakdown"}
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}: choose from train, attention, rollout, breakdown")
    s = shapes(args.smoke)
    if args.models:
        missing = set(args.models.split(",")) - set(s["models"])
        if missing:
            parser.error(f"unknown model(s) {sorted(missing)}: choose from {', '.join(s['models'])}")
        s["models"] = {name: s["models"][name] for name in args.models.split(",")}
    s["modes"], s["frameworks"] = args.modes.split(","), args.frameworks.split(",")
    d = Driver(args.budget_s, args.smoke)
    started = time.monotonic()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "shapes": s}
    matmul = d.run("bf16 matmul peak", "matmul", {"n": s["matmul"]}, 120)
    if matmul is None:
        return 1
    datasheet = chip_peak(matmul["device"]) if matmul["platform"] == "gpu" else None
    peak = datasheet or matmul["flop_s"]
    results.update(device=matmul["device"], platform=matmul["platform"], matmul_flop_s=matmul["flop_s"],
                   peak_flop_s=peak)
    d.say(f"{matmul['device']} ({matmul['platform']}), {time.strftime('%Y-%m-%d')}: MFU against "
          + (f"the datasheet's dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if datasheet else
             f"the measured matmul rate {peak / 1e12:.3f} TFLOP/s (no datasheet peak for this device)")
          + f"; measured {s['matmul']}^3 bf16 matmul: {matmul['flop_s'] / 1e12:.1f} TFLOP/s")
    # The 1B model's training first, then attention and the rollout, the smaller model last: what the
    # budget cuts is the least important.
    models = list(s["models"])
    runs = {"train": lambda: train_runs(d, s, models[0], peak, results),
            "attention": lambda: attention_runs(d, s, results), "rollout": lambda: rollout_runs(d, s, results),
            "breakdown": lambda: breakdown_runs(d, s, results)}
    for part in [p for p in runs if p in parts]:
        runs[part]()
    for model_name in models[1:] if "train" in parts else []:
        train_runs(d, s, model_name, peak, results)
    tables = {"train": lambda: train_table(d, s, results), "attention": lambda: attention_table(d, s, results),
              "rollout": lambda: rollout_table(d, s, results), "breakdown": lambda: breakdown_table(d, results)}
    for part in [p for p in tables if p in parts]:
        tables[part]()
    targets_part(d, results)
    d.say(f"total {time.monotonic() - started:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [("table.txt", "\n".join(d.lines) + "\n"), ("results.json", json.dumps(results, indent=1)),
             ("errors.txt", "\n".join(d.errors) + "\n")]
    for name, text in files:
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
