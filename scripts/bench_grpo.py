"""GRPO benchmark: jaxtune vs TRL 1.16's GRPOTrainer + PEFT on the bundled SmolLM2-135M-Instruct (fp32).

The same prompts for both (the example's arithmetic questions, configs/data/grpo_train.jsonl), the same
reward (configs/grpo_rewards.py), LoRA r=16 (alpha 32, no dropout) on all seven linear projections,
AdamW lr 1e-5, 8 prompts x 8 completions per optimizer step (micro-batches of 8 completions, 8
accumulated), max_completion_length 64, temperature 1, loss dapo; beta 0 (no reference) and beta 0.04
(the reference: the policy with its adapters off). TRL generates with `transformers.generate` on the
PEFT model (colocated, no vLLM), as Axolotl runs it without a vLLM server.

Each run is its own fresh process (this script re-invoked with --worker NAME), one at a time, so its
peak RSS (VmHWM, model loading included) is its own and no two compete for the cores. Reported per
run: seconds per step (steady: the first step left out, and so is the compile of a later step whose rows
have a new padded length, reported apart) split into rollout (sampling), reward and
train (everything else: TRL's reference / old log-prob forwards and its loss passes; jaxtune's
step), rollout tokens/s (completion tokens sampled per second of sampling: the two sample different
completions, so tokens/s is the like-for-like figure), the first step (jaxtune: compilation included)
and peak RSS. The trainers' runs are minutes apart, and this host's speed drifts by 10-20% within
minutes, so the rollout target is judged head to head: one process holds both trainers and alternates
their rollouts on the same 64 rows (TRL's `_generate_single_turn`, jaxtune's rollout sampler; --rounds
each). A last run times `jaxtune generate`'s sampler at temperature 1 against greedy (64 rows x 64 new
tokens, EOS off).

Targets on the 2-core CPU: steps >= 2.5x faster than TRL's, rollout tokens/s >= 2.5x TRL's
`transformers.generate`, peak RSS <= TRL's, sampling at temperature 1 within 10% of greedy. Where a
target is out of reach, the ceiling lines say why: the rollout's floor is its weight matmuls alone
(each decode step's projections and head at 64 rows, as scripts/bench_inference.py measures them; for
the head-to-head rollouts also at only the rows still sampling at each position), and the sampler with
EOS off (every row decoding every position) measures its decode step against that floor.

    .venv/bin/python scripts/bench_grpo.py [--steps 3] [--rounds 4] [--only all|jaxtune|trl|rollouts|sampler]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import RESULT_TAG, run_script_worker  # noqa: E402  (one way to run a benchmark's workers)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, G, MAX_NEW, LR = 8, 8, 64, 1e-5
LORA_R, LORA_ALPHA = 16, 32
TARGET_STEP, TARGET_ROLLOUT, TARGET_SAMPLING = 2.5, 2.5, 0.10


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def prompt_rows(steps: int) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "configs" / "data" / "grpo_train.jsonl").read_text().splitlines()]
    return rows[:PROMPTS * steps]


# ------------------------------------------------------------------------------------------ workers


def jaxtune_config(beta: float, args):
    """jaxtune's config for one run (the driver prepares its data, the worker trains)."""
    from jaxtune.config import build_config

    work = Path(args.work)
    keys = {"base_model": "bundled:smollm2", "rl": "grpo", "bf16": False,
            "datasets": [{"path": str(work / "prompts.jsonl"), "type": "prompt"}], "sequence_len": 64,
            "dataset_prepared_path": str(work / "prep"), "adapter": "lora", "lora_r": LORA_R,
            "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "lora_target_linear": True, "micro_batch_size": G,
            "gradient_accumulation_steps": PROMPTS, "max_steps": args.steps, "optimizer": "adamw_torch",
            "learning_rate": LR, "lr_scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0,
            "save_strategy": "no", "logging_steps": 1, "output_dir": str(work / f"jaxtune-{beta}"), "seed": 0,
            "trl": {"num_generations": G, "max_completion_length": MAX_NEW, "temperature": 1.0, "beta": beta,
                    "reward_funcs": ["grpo_rewards.final_number"]}}
    return build_config(keys, base_dir=ROOT / "configs")


def worker_jaxtune(beta: float, args) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # a jaxtune install has no torch
    from jaxtune import train

    cfg = jaxtune_config(beta, args)
    train.run(cfg)
    steps = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "step_seconds" in r]
    # A batch whose padded length is new compiles the step once more (rows are bucketed by length); the
    # steady figures leave that out and report it apart, as the first step's compile is.
    compiles = [r.get("timing/compile", 0.0) for r in steps[1:]]
    return {"name": f"jaxtune beta={beta}", "first_step_s": steps[0]["step_seconds"],
            "step_s": [r["step_seconds"] - c for r, c in zip(steps[1:], compiles)],
            "later_compile_s": sum(compiles), "rollout_s": [r["timing/rollout"] for r in steps[1:]],
            "reward_s": [r["timing/reward"] for r in steps[1:]],
            "tokens": [r["completions/mean_length"] * PROMPTS * G for r in steps[1:]],
            "mean_length": statistics.mean(r["completions/mean_length"] for r in steps),
            "peak_rss_mb": peak_rss_mb()}


def trl_trainer(beta: float, args, callbacks=()):
    """TRL's GRPOTrainer + PEFT on the bench's shape (colocated transformers.generate, no vLLM)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from jaxtune import bundled

    sys.path.insert(0, str(ROOT / "configs"))
    import grpo_rewards

    torch.manual_seed(0)
    model_dir = bundled.prepare("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in (Path(args.work) / "prompts.jsonl").read_text().splitlines()]
    config = GRPOConfig(output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=G,
                        gradient_accumulation_steps=PROMPTS, num_generations=G, max_completion_length=MAX_NEW,
                        temperature=1.0, beta=beta, max_steps=args.steps, learning_rate=LR,
                        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
                        use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                        dataloader_num_workers=0)
    peft = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear")
    return GRPOTrainer(model=model, reward_funcs=[grpo_rewards.final_number], args=config,
                       train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                       peft_config=peft, callbacks=list(callbacks))


def worker_trl(beta: float, args) -> dict:
    from transformers import TrainerCallback

    timing = {"step": [], "rollout": [], "reward": [], "tokens": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            timing["step"].append(time.perf_counter() - self.t)

    trainer = trl_trainer(beta, args, [Timer()])
    generate, score = trainer._generate_single_turn, trainer._calculate_rewards

    def timed_generate(*a, **k):
        started = time.perf_counter()
        completion_ids, logprobs = generate(*a, **k)
        timing["rollout"].append(time.perf_counter() - started)
        timing["tokens"].append(sum(len(c) for c in completion_ids))
        return completion_ids, logprobs

    def timed_score(*a, **k):
        started = time.perf_counter()
        out = score(*a, **k)
        timing["reward"].append(time.perf_counter() - started)
        return out

    trainer._generate_single_turn, trainer._calculate_rewards = timed_generate, timed_score
    trainer.train()
    return {"name": f"TRL+PEFT beta={beta}", "first_step_s": timing["step"][0], "step_s": timing["step"][1:],
            "rollout_s": timing["rollout"][1:], "reward_s": timing["reward"][1:], "tokens": timing["tokens"][1:],
            "mean_length": statistics.mean(timing["tokens"]) / (PROMPTS * G), "peak_rss_mb": peak_rss_mb()}


def worker_rollouts(args) -> dict:
    """Rollouts alone, head to head in one process on the same prompt rows: TRL's own
    (`GRPOTrainer._generate_single_turn`: transformers.generate on the PEFT model) against jaxtune's
    (the GRPO trainer's sampler, LoRA adapters live; and with `rollout_merge_adapters`, the same draws
    from merged weights), alternated so that a drift of the host's speed favours none. Each samples its
    own completions: the figure is completion tokens per second."""
    import jax
    import torch

    from jaxtune import train

    ours = train.build(jaxtune_config(0.0, args))[0]
    theirs = trl_trainer(0.0, args)
    rollouts = ours.rollouts
    prompt_ids = [list(r["prompt_ids"]) for r in rollouts._prompts()]
    repeated = [p for p in prompt_ids for _ in range(G)]  # TRL samples each prompt's G rows as repeats

    lengths = []  # jaxtune's completion lengths per timed rollout

    def jaxtune_rollout(i: int) -> int:
        out = rollouts._sample(ours.trainable, ours.frozen, prompt_ids, jax.random.fold_in(rollouts.key, i))
        lengths.append([int(n) for n in out["lengths"]])
        return int(out["lengths"].sum())

    def trl_rollout(i: int) -> int:
        torch.manual_seed(i)
        completion_ids, _ = theirs._generate_single_turn(repeated, None, {}, G)
        return sum(len(c) for c in completion_ids)

    from jaxtune.generate import make_rollout

    merged = copy.copy(rollouts)  # rollout_merge_adapters: the same draws from W + scale A B
    merged.sampler = make_rollout(ours.graphdef, max_new_tokens=MAX_NEW, eos_ids=rollouts.eos, pad_id=rollouts.pad_id,
                                  num_generations=G, merge_adapters=True)

    def merged_rollout(i: int) -> int:
        out = merged._sample(ours.trainable, ours.frozen, prompt_ids, jax.random.fold_in(rollouts.key, i))
        return int(out["lengths"].sum())

    runs = {"trl": trl_rollout, "jaxtune": jaxtune_rollout, "merged": merged_rollout}
    for fn in runs.values():  # compile / warm up
        fn(0)
    tokens, seconds = {k: [] for k in runs}, {k: [] for k in runs}
    for i in range(1, args.rounds + 1):
        for name, fn in runs.items():
            started = time.perf_counter()
            tokens[name].append(fn(i))
            seconds[name].append(time.perf_counter() - started)
    rate = {k: sum(tokens[k]) / sum(seconds[k]) for k in runs}
    rounds = [(tokens["jaxtune"][i] / seconds["jaxtune"][i]) / (tokens["trl"][i] / seconds["trl"][i])
              for i in range(args.rounds)]
    from bench_inference import decode_matmul_seconds  # scripts/ is on the path (this file's folder)

    # the same sampler with EOS off: every row samples every position (none leaves), the decode step's own
    # speed, to set against its weight matmuls alone at all rows in this process (the ceiling of any
    # sampler here that decodes every row every step)
    full = copy.copy(rollouts)
    full.sampler = make_rollout(ours.graphdef, max_new_tokens=MAX_NEW, eos_ids=[ours.model.cfg.vocab_size + 1],
                                pad_id=rollouts.pad_id, num_generations=G)
    full_s = []
    for i in range(3):  # the first compiles
        started = time.perf_counter()
        full._sample(ours.trainable, ours.frozen, prompt_ids, jax.random.fold_in(rollouts.key, i))
        full_s.append(time.perf_counter() - started)
    # the decode step's weight matmuls alone, timed once at 1, 8, 16, ..., 64 rows
    step_s = {n: decode_matmul_seconds(ours.model.cfg, n, 5) for n in sorted({1, *range(8, len(repeated) + 1, 8)})}
    ceiling = len(repeated) / step_s[len(repeated)]
    timed = lengths[1:]  # the rounds' rollouts (the first was the warm-up)
    return {"name": "rollouts", "tok_s": rate, "rounds": rounds, "ceiling": ceiling,
            "all_rows_tok_s": len(repeated) * MAX_NEW / min(full_s[1:]),
            # the same ceiling for a sampler that decodes every row until the rollout's longest completion ends
            "no_drop_ceiling": ceiling * sum(tokens["jaxtune"]) / sum(len(r) * max(r) for r in timed),
            "live_ceiling": sum(tokens["jaxtune"]) / rollout_floor_seconds(step_s, timed),
            "mean_length": {k: sum(tokens[k]) / (len(tokens[k]) * len(repeated)) for k in runs}}


def rollout_floor_seconds(step_s: dict[int, float], lengths: list[list[int]]) -> float:
    """A lower bound on the time of rollouts with these completion lengths: for each new token position,
    one decode step's weight matmuls alone at only the rows that sample a token there, as if a finished
    row left the batch at no cost. `step_s`: those matmuls' seconds by row count; a position's rows are
    rounded down to the nearest timed count (the matmuls take no less time for more rows)."""
    total = 0.0
    for rollout in lengths:
        for position in range(max(rollout)):
            live = sum(n > position for n in rollout)
            total += step_s[max(n for n in step_s if n <= live)]
    return total


def worker_sampler(args) -> dict:
    """`jaxtune generate`'s sampler: 64 rows x 64 new tokens, greedy vs temperature 1, and the decode
    step's weight matmuls alone (the ceiling of any sampler at this shape)."""
    sys.modules["torch"] = None  # type: ignore[assignment]
    sys.path.insert(0, str(ROOT / "scripts"))
    import jax

    import jaxtune
    from bench_inference import decode_matmul_seconds
    from jaxtune import bundled
    from jaxtune.generate import Sampler, SamplingConfig, encode_prompts

    model, tokenizer = jaxtune.load_pretrained(bundled.prepare("smollm2"))
    rows = PROMPTS * G
    questions = [r["prompt"][-1]["content"] for r in prompt_rows(args.steps)][:PROMPTS]
    prompts = [p for p in encode_prompts(tokenizer, questions) for _ in range(G)]
    sampler = Sampler(model, eos_token_ids=[model.cfg.vocab_size + 1], pad_token_id=tokenizer.pad_token_id)
    settings = {"greedy": SamplingConfig(max_new_tokens=MAX_NEW, seed=1),
                "temperature 1": SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, seed=1)}
    sampler(prompts, settings["greedy"])  # compile (settings are traced: one compile serves both)
    times = {name: [] for name in settings}
    for _ in range(4):  # alternated, so that a drift of the host's speed does not favour either
        for name, cfg in settings.items():
            started = time.perf_counter()
            sampler(prompts, cfg)
            times[name].append(time.perf_counter() - started)
    out = {name: rows * MAX_NEW / min(t) for name, t in times.items()}
    out["ceiling"] = rows / decode_matmul_seconds(model.cfg, rows, 5)
    jax.clear_caches()
    return {"name": "sampler", **out}


def worker_floor(args) -> dict:
    """The train part's floor at beta 0: one micro-batch row of --row-len tokens (a prompt and its G
    completions) through the LoRA step's matmuls alone, each product timed alone with XLA's kernel
    (bench_train.py's step_dots), times the PROMPTS micro-batches of a step, plus the AdamW update."""
    sys.modules["torch"] = None  # type: ignore[assignment]
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_train
    from jaxtune import bundled

    ns = argparse.Namespace(model=str(bundled.prepare("smollm2")), batch=1, seq=args.row_len, matmul_reps=3)
    dots = bench_train.worker_dots_jax("lora", ns)
    return {"name": "floor", "train_floor_s": PROMPTS * dots["dots_s"] + dots["optimizer_s"]}


def mean_prompt_tokens(steps: int) -> float:
    from transformers import AutoTokenizer

    from jaxtune import bundled

    tokenizer = AutoTokenizer.from_pretrained(bundled.prepare("smollm2"))
    rows = prompt_rows(steps)
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    return statistics.mean(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


# ------------------------------------------------------------------------------------------ driver


def _summary(r: dict) -> dict:
    """Mean seconds per step after the first, split rollout / reward / train, and rollout tokens/s."""
    step, rollout, reward = (statistics.mean(r[k]) for k in ("step_s", "rollout_s", "reward_s"))
    return {"step": step, "rollout": rollout, "reward": reward, "train": step - rollout - reward,
            "tok_s": sum(r["tokens"]) / sum(r["rollout_s"])}


def run_worker(name: str, args) -> dict:
    return run_script_worker(__file__, name, ["--work", args.work, "--steps", str(args.steps),
                                              "--row-len", str(args.row_len), "--rounds", str(args.rounds)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is reported apart)")
    parser.add_argument("--only", choices=("all", "jaxtune", "trl", "rollouts", "sampler"), default="all")
    parser.add_argument("--rounds", type=int, default=4, help="alternated rollouts per side in the head-to-head run")
    parser.add_argument("--worker")
    parser.add_argument("--work")
    parser.add_argument("--row-len", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    if args.worker:
        kind, _, beta = args.worker.partition(":")
        result = {"jaxtune": lambda: worker_jaxtune(float(beta), args), "trl": lambda: worker_trl(float(beta), args),
                  "rollouts": lambda: worker_rollouts(args), "sampler": lambda: worker_sampler(args),
                  "floor": lambda: worker_floor(args)}[kind]()
        print(RESULT_TAG + json.dumps(result))
        return 0

    args.work = tempfile.mkdtemp(prefix="bench_grpo_")
    (Path(args.work) / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(args.steps)))
    if args.only in ("all", "jaxtune", "rollouts"):  # tokenized here (`datasets` imports torch when present): workers read the cache
        from jaxtune.data.prepare import prepare

        for beta in (0.0, 0.04):
            prepare(jaxtune_config(beta, args))
    names = {"all": ["trl:0.0", "jaxtune:0.0", "trl:0.04", "jaxtune:0.04", "rollouts", "sampler"],
             "jaxtune": ["jaxtune:0.0", "jaxtune:0.04"], "trl": ["trl:0.0", "trl:0.04"], "rollouts": ["rollouts"],
             "sampler": ["sampler"]}
    results = {}
    for name in names[args.only]:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(name, args)
    ours = results.get("jaxtune:0.0")
    if ours and "error" not in ours:  # the floor at the rows jaxtune trained: mean prompt + G x (completion + 1)
        args.row_len = round(mean_prompt_tokens(args.steps) + G * (ours["mean_length"] + 1))
        print("running floor ...", file=sys.stderr, flush=True)
        results["floor"] = run_worker("floor", args)
    print(f"SmolLM2-135M-Instruct fp32, LoRA r={LORA_R} on all linear projections, CPU x{os.cpu_count()}; "
          f"{PROMPTS} prompts x {G} completions per step, up to {MAX_NEW} new tokens, temperature 1; "
          f"{args.steps} steps per run (the first reported apart)")
    print(f"{'run':<22}{'s/step':>8}{'rollout':>9}{'reward':>8}{'train':>8}{'rollout tok/s':>15}{'mean len':>10}"
          f"{'first step s':>14}{'peak RSS MB':>13}")
    summaries = {}
    for name, r in results.items():
        if name in ("rollouts", "sampler", "floor"):
            continue
        if "error" in r:
            print(f"{r['name']:<22} failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        s = summaries[name] = _summary(r)
        print(f"{r['name']:<22}{s['step']:>8.1f}{s['rollout']:>9.1f}{s['reward']:>8.3f}{s['train']:>8.1f}"
              f"{s['tok_s']:>15.1f}{r['mean_length']:>10.1f}{r['first_step_s']:>14.1f}{r['peak_rss_mb']:>13.0f}"
              + (f"   (+ {r['later_compile_s']:.1f} s compiling new row lengths after the first step, left out)"
                 if r.get("later_compile_s") else ""))
    for beta in ("0.0", "0.04"):
        ours, trl = summaries.get(f"jaxtune:{beta}"), summaries.get(f"trl:{beta}")
        if not ours or not trl:
            continue
        rss = results[f"jaxtune:{beta}"]["peak_rss_mb"] / results[f"trl:{beta}"]["peak_rss_mb"]
        print(f"beta={beta}: step {trl['step'] / ours['step']:.2f}x faster, rollout tokens/s "
              f"{ours['tok_s'] / trl['tok_s']:.2f}x (runs minutes apart), peak RSS {rss:.2f}x")
        for label, ok in ((f"step >= {TARGET_STEP}x TRL's", trl["step"] / ours["step"] >= TARGET_STEP),
                          ("peak RSS <= TRL's", rss <= 1.0)):
            print(f"  {'PASS' if ok else 'MISS'}  {label}")
    head = results.get("rollouts")
    if head and "error" not in head:
        ratio = head["tok_s"]["jaxtune"] / head["tok_s"]["trl"]
        print(f"rollouts head to head (one process, the same {PROMPTS * G} rows, {args.rounds} alternated rounds): "
              f"transformers.generate {head['tok_s']['trl']:.0f} tok/s (mean length {head['mean_length']['trl']:.1f}), "
              f"jaxtune {head['tok_s']['jaxtune']:.0f} tok/s (mean length {head['mean_length']['jaxtune']:.1f}) = "
              f"{ratio:.2f}x (rounds {min(head['rounds']):.2f}x-{max(head['rounds']):.2f}x)")
        print(f"  {'PASS' if ratio >= TARGET_ROLLOUT else 'MISS'}  rollout tokens/s >= {TARGET_ROLLOUT}x transformers.generate"
              f"   (ceiling in that process: the decode step's weight matmuls alone at {PROMPTS * G} rows allow "
              f"{head['ceiling']:.0f} tok/s = {head['ceiling'] / head['tok_s']['trl']:.2f}x transformers.generate's; "
              f"jaxtune reaches {head['tok_s']['jaxtune'] / head['ceiling']:.0%} of it)")
        merged = head["tok_s"]["merged"] / head["tok_s"]["trl"]
        print(f"  {'PASS' if merged >= TARGET_ROLLOUT else 'MISS'}  the same with rollout_merge_adapters (the adapters "
              f"merged into a copy of the weights for each rollout): {head['tok_s']['merged']:.0f} tok/s = "
              f"{merged:.2f}x transformers.generate")
        live, step, no_drop = head["live_ceiling"], head["all_rows_tok_s"] / head["ceiling"], head["no_drop_ceiling"]
        print(f"  ceiling of a sampler that decodes every row until the longest completion ends (as "
              f"transformers.generate does) on these rollouts: {no_drop:.0f} tok/s = "
              f"{no_drop / head['tok_s']['trl']:.2f}x transformers.generate's; beyond that only dropping finished "
              f"rows gains")
        print(f"  ceiling of these rollouts: each new token position's decode matmuls alone at only the rows still "
              f"sampling there (finished rows dropped at no cost) allow {live:.0f} tok/s = "
              f"{live / head['tok_s']['trl']:.2f}x transformers.generate's; jaxtune reaches "
              f"{head['tok_s']['jaxtune'] / live:.0%} of it")
        print(f"  jaxtune's decode step: with EOS off (all {PROMPTS * G} rows x {MAX_NEW} positions) the sampler makes "
              f"{head['all_rows_tok_s']:.0f} tok/s (prefill included), {step:.0%} of its matmuls alone; at that "
              f"step's speed, a sampler dropping finished rows at no cost would reach {step * live:.0f} tok/s = "
              f"{step * live / head['tok_s']['trl']:.2f}x transformers.generate's on these rollouts")
    elif head:
        print(f"rollouts failed: {head['error'].strip().splitlines()[-1] if head['error'].strip() else '?'}")
    sampler = results.get("sampler")
    if sampler and "error" not in sampler:
        slower = 1 - sampler["temperature 1"] / sampler["greedy"]
        print(f"jaxtune generate, {PROMPTS * G} rows x {MAX_NEW} tokens: greedy {sampler['greedy']:.0f} tok/s, "
              f"temperature 1 {sampler['temperature 1']:.0f} tok/s ({slower:+.1%} slower)  "
              f"{'PASS' if slower <= TARGET_SAMPLING else 'MISS'}")
        trl = summaries.get("trl:0.0")
        ceiling = sampler["ceiling"]
        print(f"ceiling: the decode step's weight matmuls alone at {PROMPTS * G} rows allow {ceiling:.0f} tok/s"
              + (f" = {ceiling / trl['tok_s']:.2f}x transformers.generate's rollout tokens/s" if trl else "")
              + f"; jaxtune's rollouts reach {sampler['temperature 1'] / ceiling:.0%} of it")
    elif sampler:
        print(f"sampler failed: {sampler['error'].strip().splitlines()[-1] if sampler['error'].strip() else '?'}")
    floor, ours, trl = results.get("floor"), summaries.get("jaxtune:0.0"), summaries.get("trl:0.0")
    if floor and "error" not in floor and sampler and "error" not in sampler and ours and trl:
        tokens = PROMPTS * G * results["jaxtune:0.0"]["mean_length"]
        rollout_floor = tokens / sampler["ceiling"]
        step_floor = rollout_floor + floor["train_floor_s"]
        print(f"ceiling (beta 0): the rollout's decode matmuls {rollout_floor:.1f} s + the train step's matmuls and AdamW "
              f"alone ({PROMPTS} rows of {args.row_len} tokens) {floor['train_floor_s']:.1f} s = {step_floor:.1f} s/step "
              f"= {trl['step'] / step_floor:.2f}x TRL's step (target {TARGET_STEP}x; jaxtune's step "
              f"{ours['step']:.1f} s is {step_floor / ours['step']:.0%} of the floor's speed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
