"""Inference benchmark: jaxtune vs transformers on the bundled SmolLM2-135M-Instruct (CPU, fp32).

Measures, for each framework in its own fresh process (so peak RSS is its own):
  - load time and peak RSS (the RSS added by loading is printed too); transformers memory-maps
    the safetensors file and touches pages lazily, so its load figure grows on the first forward:
    the peak after generating is the like-for-like memory figure;
  - greedy generation tokens/s at batch 1 and 8, with a fixed number of new tokens (EOS ignored
    on both sides, so both generate exactly the same amount of work).
jaxtune's first generate call compiles; its compile time is printed and excluded from tokens/s,
as is transformers' warm-up call.

    python scripts/bench_inference.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain gravity to a child.", "Give me a synonym for happy.", "What does a CPU do?",
    "Name a famous painter.", "How do plants make food?",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_jaxtune(model_dir: str, new_tokens: int, repeats: int) -> dict:
    import jax
    # jaxtune reads configs and tokenizers with transformers, whose first use imports torch when it is
    # installed (as here). Import them before the baseline, as the transformers side does, so the
    # figures below are jaxtune's own cost.
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    import jaxtune
    from jaxtune.generate import Sampler, SamplingConfig, encode_prompts

    jax.numpy.zeros(1).block_until_ready()
    base = current_rss_mb()
    t0 = time.perf_counter()
    model, tokenizer = jaxtune.load_pretrained(model_dir)
    jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, model.embed_tokens.embedding[...])))
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_mb()
    # An end-of-sequence id that never occurs: every row generates exactly new_tokens tokens.
    sampler = Sampler(model, eos_token_ids=[model.cfg.vocab_size + 1], pad_token_id=tokenizer.pad_token_id)
    result = {"load_s": load_s, "load_peak_mb": load_peak, "load_added_mb": load_peak - base}
    for batch in (1, 8):
        prompts = encode_prompts(tokenizer, PROMPTS[:batch])
        cfg = SamplingConfig(max_new_tokens=new_tokens)
        t0 = time.perf_counter()
        sampler(prompts, cfg)
        result[f"compile_s_b{batch}"] = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = sampler(prompts, cfg)
            times.append(time.perf_counter() - t0)
            assert (out.lengths == new_tokens).all()
        result[f"tok_s_b{batch}"] = batch * new_tokens / min(times)
    result["final_peak_mb"] = peak_rss_mb()
    return result


def run_transformers(model_dir: str, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = current_rss_mb()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_mb()
    tokenizer.padding_side = "left"
    result = {"load_s": load_s, "load_peak_mb": load_peak, "load_added_mb": load_peak - base}
    for batch in (1, 8):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in PROMPTS[:batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            model.generate(**enc, **kwargs)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = model.generate(**enc, **kwargs)
                times.append(time.perf_counter() - t0)
                assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
        result[f"tok_s_b{batch}"] = batch * new_tokens / min(times)
    result["final_peak_mb"] = peak_rss_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["jaxtune", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = run_jaxtune if args.child == "jaxtune" else run_transformers
        print(json.dumps(fn(args.model_dir, args.new_tokens, args.repeats)))
        return

    from jaxtune import bundled

    model_dir = str(bundled.prepare("smollm2"))
    results = {}
    for name in ("jaxtune", "transformers"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--model-dir", model_dir, "--new-tokens",
             str(args.new_tokens), "--repeats", str(args.repeats)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode:
            sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    j, h = results["jaxtune"], results["transformers"]
    print(f"SmolLM2-135M-Instruct fp32, CPU x{os.cpu_count()}, greedy, {args.new_tokens} new tokens, best of {args.repeats}")
    print(f"{'metric':<28}{'jaxtune':>12}{'transformers':>14}{'ratio':>9}")
    rows = [("load time (s)", "load_s"), ("load peak RSS (MB)", "load_peak_mb"),
            ("RSS added by load (MB)", "load_added_mb"), ("generate tok/s, batch 1", "tok_s_b1"),
            ("generate tok/s, batch 8", "tok_s_b8"), ("peak RSS after generating (MB)", "final_peak_mb")]
    for label, key in rows:
        print(f"{label:<28}{j[key]:>12.2f}{h[key]:>14.2f}{j[key] / h[key]:>8.2f}x")
    print(f"jaxtune compile (first call): batch 1 {j['compile_s_b1']:.1f}s, batch 8 {j['compile_s_b8']:.1f}s")


if __name__ == "__main__":
    main()
