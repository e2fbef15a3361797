"""DPO benchmark: jaxtune vs TRL 1.16's DPOTrainer + PEFT on the bundled SmolLM2-135M (CPU, fp32).

The same pairs for both (seeded random-word prompts and answers, each prompt + answer at most
--seq tokens, lengths varied), tokenized the same way (TRL's rule: the completion follows the
tokenized prompt, EOS appended; jaxtune's `user_defined.default` type does exactly that), LoRA r=16
(alpha 32, no dropout) on all seven linear projections, AdamW lr 1e-5 without decay, clipping at
1.0, beta 0.1, sigmoid loss, reference = the base model (adapters off), 4 pairs per step on average.

Each measurement runs in its own fresh process (this script re-invoked with --worker NAME, one
JSON line back), one at a time: its peak RSS (VmHWM, model loading included) is its own and no
two compete for the cores. Reported per run: the first step (jaxtune: tracing + compilation
included), steady pairs/s and tokens/s (real tokens of the pairs as TRL lays them out, the same
count for every run, so the ratio is the speed ratio), the tokens each layout computes, peak RSS.

jaxtune runs: `packed+shared` (the default: several pairs per row of 2 x --seq tokens, each pair's
prompt once), `rows+shared` (one pair per row, prompt once) and `rows+whole` (one pair per row,
the prompt twice: TRL's token count), so the saving of packing and of prefix sharing show apart.
`full FT memory` compares the peak RSS of full fine-tuning DPO with precompute_ref_log_probs (no
reference weights in the step) against full-fine-tuning SFT on the same rows.

Targets on the 2-core CPU: pairs/s >= 1.5x TRL's, peak RSS <= TRL's, first step < 30 s; full-FT DPO
with precompute_ref_log_probs needs no more memory than full-FT SFT.

    .venv/bin/python scripts/bench_dpo.py [--pairs 32] [--seq 256] [--only all|jaxtune|trl|memory]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_TAG = "BENCH_RESULT "
PAIRS_PER_STEP = 4
LR, BETA, LORA_R, LORA_ALPHA = 1e-5, 0.1, 16, 32
TARGET_SPEED, TARGET_FIRST_STEP = 1.5, 30.0


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def make_pairs(tokenizer, n: int, seq: int, seed: int = 0) -> list[dict]:
    """Random-word pairs: prompts of 16-160 tokens, answers of 8 to (seq - prompt - 8) tokens."""
    rng = random.Random(seed)
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and 3 <= len(w) <= 8)[:4000]

    def text(tokens: int) -> str:
        words, out = [], ""
        while len(tokenizer(out, add_special_tokens=False)["input_ids"]) < tokens:
            words.append(rng.choice(vocab))
            out = " ".join(words)
        return out

    pairs = []
    for _ in range(n):
        p = rng.randint(16, 160)
        room = seq - p - 8
        pairs.append({"prompt": text(p), "chosen": " " + text(rng.randint(8, room)),
                      "rejected": " " + text(rng.randint(8, room))})
    return pairs


def sequence_tokens(tokenizer, pairs) -> int:
    """Tokens of the pairs as TRL lays them out (prompt + chosen, prompt + rejected, EOS)."""
    eos = tokenizer.eos_token
    return sum(len(tokenizer(p["prompt"] + p[s] + eos)["input_ids"]) for p in pairs for s in ("chosen", "rejected"))


# ----------------------------------------------------------------------------------------- workers


def jaxtune_keys(name: str, args) -> dict:
    """The config of one jaxtune run."""
    from jaxtune import bundled

    work = Path(args.work)
    packed, share = {"packed+shared": (True, True), "rows+shared": (False, True), "rows+whole": (False, False),
                     "full_dpo_precompute": (True, True), "full_sft": (True, True)}[name]
    keys = {"base_model": str(bundled.prepare("smollm2")), "sequence_len": args.seq, "sample_packing": packed,
            "prefix_sharing": share, "optimizer": "adamw_torch", "learning_rate": LR, "lr_scheduler": "constant",
            "weight_decay": 0.0, "max_grad_norm": 1.0, "save_strategy": "no", "logging_steps": 1,
            "dataset_prepared_path": str(work / "prep"), "output_dir": str(work / name), "bf16": False,
            "shuffle_merged_datasets": False, "dataset_processes": 1}
    if name == "full_sft":
        keys.update(datasets=[{"path": str(work / "sft.jsonl"), "type": "completion"}], sequence_len=2 * args.seq,
                    micro_batch_size=args.rows_per_step)
    else:
        keys.update(rl="dpo", rl_beta=BETA, datasets=[{"path": str(work / "pairs.jsonl"), "type": "user_defined.default"}],
                    micro_batch_size=args.rows_per_step if packed else PAIRS_PER_STEP)
    if name.startswith("full"):
        keys.update(max_steps=3, precompute_ref_log_probs=True if name == "full_dpo_precompute" else None)
    else:
        keys.update(adapter="lora", lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, lora_target_linear=True)
    return {k: v for k, v in keys.items() if v is not None}


def worker_jaxtune(name: str, args) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # a jaxtune install has no torch
    import yaml

    from jaxtune import train
    from jaxtune.config import build_config

    work = Path(args.work)
    keys = jaxtune_keys(name, args)
    (work / f"{name}.yml").write_text(yaml.safe_dump(keys))
    started = time.perf_counter()
    train.run(build_config(keys))
    total = time.perf_counter() - started
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_seconds" in r]
    times = [r["step_seconds"] for r in steps]
    return {"name": name, "first_step_s": times[0], "steady_s": sum(times[1:]), "steps": len(times),
            "pairs": sum(r.get("pairs", 0) for r in steps),
            "layout_tokens": round(sum(r["tokens_per_sec"] * r["step_seconds"] for r in steps)),
            "slots": sum(r["token_slots"] for r in steps),
            "peak_rss_mb": peak_rss_mb(), "wall_s": total}


def worker_trl(args) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from jaxtune import bundled

    torch.manual_seed(0)
    model_dir = bundled.prepare("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in (Path(args.work) / "pairs.jsonl").read_text().splitlines()]
    steps = []

    slots = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t)

    config = DPOConfig(output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=PAIRS_PER_STEP,
                       num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                       max_grad_norm=1.0, optim="adamw_torch", use_cpu=True, bf16=False, report_to=[],
                       logging_steps=1, save_strategy="no", beta=BETA, max_length=args.seq, seed=0,
                       dataloader_num_workers=0)
    peft = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear")
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(rows),
                         peft_config=peft, callbacks=[Timer()])
    original = trainer.data_collator

    def counting(examples):
        batch = original(examples)
        slots.append(int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    return {"name": "TRL+PEFT", "first_step_s": steps[0], "steady_s": sum(steps[1:]), "steps": len(steps),
            "pairs": len(rows), "peak_rss_mb": peak_rss_mb(), "slots_trl": sum(slots)}


# ------------------------------------------------------------------------------------------ driver


def run_script_worker(script: str, name: str, flags: list[str]) -> dict:
    """Run `script --worker NAME FLAGS` in a fresh CPU process; its result line, or {"error": stderr}."""
    proc = subprocess.run([sys.executable, script, "--worker", name, *flags], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)), None)
    if proc.returncode != 0 or line is None:
        return {"name": name, "error": proc.stderr[-1500:]}
    return json.loads(line[len(RESULT_TAG):])


def run_worker(name: str, args) -> dict:
    return run_script_worker(__file__, name, ["--work", args.work, "--seq", str(args.seq),
                                              "--rows-per-step", str(args.rows_per_step)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows-per-step", type=int, default=2, help="packed rows per jaxtune step (~4 pairs)")
    parser.add_argument("--only", choices=("all", "jaxtune", "trl", "memory"), default="all")
    parser.add_argument("--worker")
    parser.add_argument("--work")
    args = parser.parse_args(argv)
    if args.worker:
        result = worker_trl(args) if args.worker == "TRL+PEFT" else worker_jaxtune(args.worker, args)
        print(RESULT_TAG + json.dumps(result))
        return 0

    from transformers import AutoTokenizer

    from jaxtune import bundled

    tokenizer = AutoTokenizer.from_pretrained(bundled.prepare("smollm2"))
    args.work = tempfile.mkdtemp(prefix="bench_dpo_")
    pairs = make_pairs(tokenizer, args.pairs, args.seq)
    work = Path(args.work)
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (work / "sft.jsonl").write_text("".join(json.dumps({"text": p["prompt"] + p["chosen"]}) + "\n" for p in pairs))
    real = sequence_tokens(tokenizer, pairs)
    from jaxtune.config import build_config
    from jaxtune.data.prepare import prepare

    for name in ("packed+shared", "rows+shared", "rows+whole", "full_sft"):  # tokenized here (`datasets`
        prepare(build_config(jaxtune_keys(name, args)))  # imports torch when present): workers read the cache
    names = {"all": ["TRL+PEFT", "packed+shared", "rows+shared", "rows+whole", "full_dpo_precompute", "full_sft"],
             "jaxtune": ["packed+shared", "rows+shared", "rows+whole"], "trl": ["TRL+PEFT"],
             "memory": ["full_dpo_precompute", "full_sft"]}[args.only]
    results = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(name, args)
    print(f"SmolLM2-135M-Instruct fp32, LoRA r={LORA_R} on all linear projections, CPU x{os.cpu_count()}; "
          f"{args.pairs} pairs of up to {args.seq} tokens per sequence, {PAIRS_PER_STEP} per step "
          f"({real} tokens as TRL lays them out)")
    print(f"{'run':<16}{'pairs/s':>10}{'tokens/s':>10}{'first step s':>14}{'real tokens':>13}{'slots':>8}"
          f"{'peak RSS MB':>13}")
    trl = results.get("TRL+PEFT")
    for name in names:
        r = results[name]
        if "error" in r:
            print(f"{name:<16} failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        if name.startswith("full"):
            continue
        steady_pairs = r["pairs"] * (r["steps"] - 1) / max(r["steps"], 1)
        pps = steady_pairs / max(r["steady_s"], 1e-9)
        r["pairs_per_s"] = pps
        tokens, slots = r.get("layout_tokens", real), r.get("slots", r.get("slots_trl", 0))
        print(f"{name:<16}{pps:>10.3f}{real * pps / args.pairs:>10.1f}{r['first_step_s']:>14.1f}"
              f"{tokens:>13}{slots:>8}{r['peak_rss_mb']:>13.0f}")
    best = results.get("packed+shared")
    if trl and best and "error" not in trl and "error" not in best:
        print("ratios jaxtune (packed+shared) / TRL: pairs/s "
              f"{best['pairs_per_s'] / trl['pairs_per_s']:.2f}x, peak RSS {best['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x")
        for label, ok in ((f"pairs/s >= {TARGET_SPEED}x TRL's", best["pairs_per_s"] >= TARGET_SPEED * trl["pairs_per_s"]),
                          ("peak RSS <= TRL's", best["peak_rss_mb"] <= trl["peak_rss_mb"]),
                          (f"first step < {TARGET_FIRST_STEP:.0f} s", best["first_step_s"] < TARGET_FIRST_STEP)):
            print(f"  {'PASS' if ok else 'MISS'}  {label}")
    rows, whole = results.get("rows+shared"), results.get("rows+whole")
    if best and rows and whole and not any("error" in r for r in (best, rows, whole)):
        print(f"prefix sharing saves {1 - rows['layout_tokens'] / whole['layout_tokens']:.1%} of the real tokens "
              f"(rows+shared vs rows+whole); packing saves {1 - best['slots'] / rows['slots']:.1%} of the token "
              "slots, padding included (packed+shared vs rows+shared)")
    full, sft = results.get("full_dpo_precompute"), results.get("full_sft")
    if full and sft and "error" not in full and "error" not in sft:
        ok = full["peak_rss_mb"] <= sft["peak_rss_mb"]
        print(f"full FT memory: DPO with precompute_ref_log_probs {full['peak_rss_mb']:.0f} MB vs SFT "
              f"{sft['peak_rss_mb']:.0f} MB  {'PASS' if ok else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
