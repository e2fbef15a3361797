"""Inference benchmark: jaxtune vs transformers on the bundled SmolLM2-135M-Instruct (CPU, fp32).

Measures, for each framework in its own fresh process (so peak RSS is its own):
  - load time and peak RSS (the RSS added by loading is printed too); transformers memory-maps
    the safetensors file and touches pages lazily, so its load figure grows on the first forward:
    the peak after generating is the like-for-like memory figure;
  - greedy generation tokens/s at batch 1 and 8, with a fixed number of new tokens (EOS ignored
    on both sides, so both generate exactly the same amount of work).
jaxtune's first generate call compiles; its compile time is printed and excluded from tokens/s,
as is transformers' warm-up call.

The last lines print a ceiling for each batch: the tokens/s of a decode step that did nothing but
its weight matmuls (each layer's seven projections at M = batch rows under a scan over the stacked
layers, as the model runs them, then the LM head), timed in the jaxtune process with the same
weight shapes (random values), as a multiple of transformers' measured tokens/s. Attention over
the cache, norms, the cache update, sampling and the prompt's prefill are left out, so the real
sampler can only be slower than the ceiling.

    python scripts/bench_inference.py [--new-tokens 64] [--repeats 3] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
    # jaxtune's runtime install has no torch (it is in this venv only for the reference side), but
    # transformers imports it whenever it is installed, which would add ~180 MB to jaxtune's RSS.
    # Hide it so the jaxtune process is what users run (as bench_train.py does).
    sys.modules["torch"] = None  # type: ignore[assignment]
    import jax
    # jaxtune reads configs and tokenizers with transformers: import it before the baseline, as the
    # transformers side does, so the figures below are jaxtune's own cost.
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
    for batch in (1, 8):
        result[f"ceiling_tok_s_b{batch}"] = batch / decode_matmul_seconds(model.cfg, batch, repeats)
    return result


def decode_matmul_seconds(cfg, batch: int, repeats: int) -> float:
    """Best time of one decode step's weight matmuls alone (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    d, f, heads, kv, hd, layers = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                                   cfg.head_dim, cfg.num_layers)
    shapes = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, f), (d, f), (f, d)]
    keys = jax.random.split(jax.random.key(0), len(shapes) + 2)
    weights = [0.02 * jax.random.normal(k, (layers, i, o), jnp.float32) for k, (i, o) in zip(keys, shapes)]
    head = 0.02 * jax.random.normal(keys[-2], (cfg.vocab_size, d), jnp.float32)
    x = jax.random.normal(keys[-1], (batch, d), jnp.float32)

    @jax.jit
    def step(weights, head, x):
        def layer(x, w):
            q, k, v, o, gate, up, down = w
            # Every product's result is used (one that were dropped would be compiled away); the key
            # and value products are returned, as a decode step writes them to its cache. (A row sum
            # of them here, an earlier stand-in for attention, was fused by XLA:CPU into the products
            # and made the step ~40% slower than its matmuls: a ceiling that was too low.)
            kv = (x @ k, x @ v)
            x = x + (x @ q) @ o
            return x + (jax.nn.silu(x @ gate) * (x @ up)) @ down, kv

        x, kv = jax.lax.scan(layer, x, weights)
        return jnp.argmax(x @ head.T, axis=-1), kv

    jax.block_until_ready(step(weights, head, x))
    times = []
    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        jax.block_until_ready(step(weights, head, x))
        times.append(time.perf_counter() - t0)
    return min(times)


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
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat both runs this many times and report medians (default 1)")
    parser.add_argument("--child", choices=["jaxtune", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = run_jaxtune if args.child == "jaxtune" else run_transformers
        print(json.dumps(fn(args.model_dir, args.new_tokens, args.repeats)))
        return

    from jaxtune import bundled

    model_dir = str(bundled.prepare("smollm2"))
    # Each round runs jaxtune then transformers; the figures are medians over rounds, so a slow spell
    # of this (shared) machine moves both sides of a ratio.
    runs = {"jaxtune": [], "transformers": []}
    for _ in range(args.rounds):
        for name in runs:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, "--model-dir", model_dir, "--new-tokens",
                 str(args.new_tokens), "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode:
                sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    j, h = ({key: statistics.median(r[key] for r in rs) for key in rs[0]} for rs in runs.values())
    print(f"SmolLM2-135M-Instruct fp32, CPU x{os.cpu_count()}, greedy, {args.new_tokens} new tokens, best of {args.repeats}"
          + (f"; medians of {args.rounds} rounds" if args.rounds > 1 else ""))
    print(f"{'metric':<28}{'jaxtune':>12}{'transformers':>14}{'ratio':>9}")
    rows = [("load time (s)", "load_s"), ("load peak RSS (MB)", "load_peak_mb"),
            ("RSS added by load (MB)", "load_added_mb"), ("generate tok/s, batch 1", "tok_s_b1"),
            ("generate tok/s, batch 8", "tok_s_b8"), ("peak RSS after generating (MB)", "final_peak_mb")]
    for label, key in rows:
        print(f"{label:<28}{j[key]:>12.2f}{h[key]:>14.2f}{j[key] / h[key]:>8.2f}x")
    print(f"jaxtune compile (first call): batch 1 {j['compile_s_b1']:.1f}s, batch 8 {j['compile_s_b8']:.1f}s")
    print("ceiling (a decode step of weight matmuls alone, stacked layers under a scan; attention, norms, "
          "cache, sampling and prefill free):")
    for batch in (1, 8):
        c = j[f"ceiling_tok_s_b{batch}"]
        print(f"  batch {batch}: {c:.1f} tok/s = {c / h[f'tok_s_b{batch}']:.2f}x transformers "
              f"(jaxtune reaches {j[f'tok_s_b{batch}'] / c:.0%} of it)")


if __name__ == "__main__":
    main()
