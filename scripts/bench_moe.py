"""Mixture-of-experts benchmark: jaxtune vs transformers + PEFT on a small Qwen3-MoE (CPU, fp32).

A Qwen3-MoE shaped like Qwen3-30B-A3B scaled to fit a CPU (default: 4 layers, hidden 512, 32 experts
of intermediate 256, top-4, 8 query / 4 key-value heads, vocabulary 8192; random weights, seeded), one
training step after another on the same seeded random batch, AdamW (lr 1e-4, clipping at 1.0):

  - `lora`: LoRA r=16 on the attention projections and on every expert (PEFT's target_parameters
    `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`: one adapter per expert), the router frozen;
  - `full`: full fine-tuning;

each with jaxtune (its grouped matmul over the tokens routed to each expert) and with transformers
(its experts run in a Python loop over the experts hit) + PEFT. Per run: the first step's time
(jaxtune's includes compiling), the mean of the following --steps steps, tokens/s, and peak RSS (the
process' VmHWM). Every run is its own fresh process (this script re-invoked with --worker), one at
a time.

Then the grouped matmul alone, forward and backward of one layer's experts on the tokens of one batch
(batch x seq x top-k rows sorted by expert): jaxtune's `batched` (the CPU path) and `ragged`
(`jax.lax.ragged_dot`, the GPU/TPU path, which XLA:CPU runs as a dense product) against the dense
computation of every expert on every row (what capacity-free routing must avoid).

Targets: jaxtune tokens/s >= 2x transformers + PEFT in both modes, peak RSS no higher than theirs.
The last line of each mode prints the ceiling, as a multiple of transformers' tokens/s: the tokens/s of
a step whose model FLOPs all ran at JAX's measured large-matmul peak on this machine (2048^2 fp32).
Model FLOPs per step, T = batch x seq tokens, counting the matmuls of the active parameters (each
token's top-k experts, not all of them):

    N = layers * (attention projections + router + k * 3 * D * I) + D * V (the head)
    full FT : 6 * N * T + ATTN;   LoRA: 4 * N * T + 6 * N_lora_active * T + ATTN
    ATTN    = 12 * layers * heads * head_dim * seq * T

A target above that ceiling cannot be met by any implementation on XLA's matmuls on that machine.
The floor line is tighter: the step's own matmuls (experts perfectly balanced), each run alone with
XLA's kernel, plus the AdamW update alone (see step_dots).

    .venv/bin/python scripts/bench_moe.py [--batch 4] [--seq 256] [--steps 4] [--only all|lora|full]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import (RESULT_TAG, adamw_seconds, dots_seconds, peak_rss_mb, spawn_worker,  # noqa: E402
                         token_batch, training_state, worker_matmul_jax)

SEED = 0
LR = 1e-4
MAX_GRAD_NORM = 1.0
LORA_R, LORA_ALPHA = 16, 32
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
TARGET = 2.0
SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
             norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False)


def make_model(out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(Qwen3MoeConfig(**SHAPE)).save_pretrained(out)


def timed(run, steps: int) -> tuple[float, float, float, float]:
    t0 = time.perf_counter()
    first_loss = run(0)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        last_loss = run(i)
    return first_s, (time.perf_counter() - t0) / steps, first_loss, last_loss


def worker_jaxtune(mode: str, args) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # as users run it (see bench_train)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune.objectives.sft import SFT
    from jaxtune.peft import lora
    from jaxtune.step import make_train_step, release_freed_host_memory

    spec = (lora.LoraSpec(r=LORA_R, alpha=LORA_ALPHA, targets=ATTENTION, parameters=EXPERT_PARAMETERS)
            if mode == "lora" else None)
    graphdef, trainable, frozen, optimizer, schedule, opt_state = training_state(args.model, spec, args.steps + 1)
    ids = token_batch(SHAPE["vocab_size"], args.batch, args.seq)
    batch = jax.device_put({"input_ids": ids[None], "labels": ids[None], "segment_ids": np.ones_like(ids)[None],
                            "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), ids.shape)[None].copy()})
    step = make_train_step(graphdef, SFT(), optimizer, schedule, use_rng=False)
    rng = jax.random.key(SEED)

    def run(i):
        nonlocal trainable, opt_state
        if i == 0:  # as jaxtune's Trainer runs a new batch shape: compiled, the compiler's freed memory
            step.lower(trainable, frozen, opt_state, batch, rng, jnp.int32(0)).compile()
            release_freed_host_memory()  # returned to the OS, then run
        trainable, opt_state, out = step(trainable, frozen, opt_state, batch, rng, jnp.int32(i))
        jax.block_until_ready((trainable, opt_state, out))
        return float(out["loss"])

    first_s, steady_s, first_loss, last_loss = timed(run, args.steps)
    return {"first_step_s": first_s, "steady_step_s": steady_s, "tokens_per_s": args.batch * args.seq / steady_s,
            "peak_rss_mb": peak_rss_mb(), "first_loss": first_loss, "last_loss": last_loss,
            "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable)))}


def worker_hf(mode: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(ATTENTION),
                                                 target_parameters=list(EXPERT_PARAMETERS), lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    ids = torch.from_numpy(token_batch(SHAPE["vocab_size"], args.batch, args.seq).astype("int64"))

    def run(_):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_s, steady_s, first_loss, last_loss = timed(run, args.steps)
    return {"first_step_s": first_s, "steady_step_s": steady_s, "tokens_per_s": args.batch * args.seq / steady_s,
            "peak_rss_mb": peak_rss_mb(), "first_loss": first_loss, "last_loss": last_loss,
            "trainable_params": sum(p.numel() for p in params)}


def worker_grouped(args) -> dict:
    """Forward + backward of one layer's experts (gate_up then down) on batch x seq x top-k routed rows."""
    sys.modules["torch"] = None  # type: ignore[assignment]
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune.models.moe import grouped_matmul

    e, d, i, k = SHAPE["num_experts"], SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], SHAPE["num_experts_per_tok"]
    rng = np.random.default_rng(SEED)
    rows = args.batch * args.seq * k
    expert_of = np.sort(rng.integers(0, e, rows))
    sizes = jnp.asarray(np.bincount(expert_of, minlength=e), jnp.int32)
    x = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
    w1 = jnp.asarray(rng.normal(size=(e, d, 2 * i)) * 0.02, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(e, i, d)) * 0.02, jnp.float32)
    one_hot = jax.nn.one_hot(jnp.asarray(expert_of), e)

    def grouped(impl):
        def f(x, w1, w2):
            h = grouped_matmul(x, w1, sizes, impl)
            return jnp.sum(grouped_matmul(jax.nn.silu(h[:, :i]) * h[:, i:], w2, sizes, impl) ** 2)
        return f

    def dense(x, w1, w2):  # every expert on every row, the routed one kept
        h = jnp.einsum("md,edn->emn", x, w1)
        y = jnp.einsum("emi,eid->emd", jax.nn.silu(h[..., :i]) * h[..., i:], w2)
        return jnp.sum(jnp.einsum("emd,me->md", y, one_hot) ** 2)

    out = {}
    for name, f in (("batched", grouped("batched")), ("ragged", grouped("ragged")), ("dense", dense)):
        g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
        jax.block_until_ready(g(x, w1, w2))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            jax.block_until_ready(g(x, w1, w2))
        out[name] = (time.perf_counter() - t0) / args.steps
    return out


def step_flops(mode: str, batch: int, seq: int) -> float:
    s = SHAPE
    d, inter, layers, k = s["hidden_size"], s["moe_intermediate_size"], s["num_hidden_layers"], s["num_experts_per_tok"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    attention = d * q + 2 * d * kv + q * d
    n = layers * (attention + d * s["num_experts"] + k * 3 * d * inter) + d * s["vocab_size"]
    t = batch * seq
    attn = 12 * layers * s["num_attention_heads"] * s["head_dim"] * seq * t
    if mode == "full":
        return 6 * n * t + attn
    lora = layers * LORA_R * ((d + q) + 2 * (d + kv) + (q + d) + k * ((d + 2 * inter) + (inter + d)))
    return 4 * n * t + 6 * lora * t + attn


def step_dots(mode: str, batch: int, seq: int) -> list[tuple[str, tuple, tuple, int]]:
    """Every matmul of one training step in its own shapes, with the experts' load perfectly balanced
    (each expert batch x seq x top-k / E rows, one batched product over the experts): per layer each
    attention projection's and the router's forward and input gradient, each expert projection's
    (gate_up, down) forward and input gradient as batched products, then for full fine-tuning their
    weight gradients, for LoRA the adapters' six products (batched over the experts on experts);
    attention's QK^T / PV and their backward products over the seq x seq square; the head's forward,
    input gradient (and weight gradient for full fine-tuning). As scripts/bench_train.py's step_dots."""
    s = SHAPE
    d, inter, layers, k, e = (s["hidden_size"], s["moe_intermediate_size"], s["num_hidden_layers"],
                              s["num_experts_per_tok"], s["num_experts"])
    q, kv, heads, v = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"], \
        s["num_attention_heads"], s["vocab_size"]
    t, r, rows = batch * seq, LORA_R, batch * seq * k // e
    dots = []
    for g, (i, o), lora in [((), (d, q), True), ((), (d, kv), True), ((), (d, kv), True), ((), (q, d), True),
                            ((), (d, e), False), ((e,), (d, 2 * inter), True), ((e,), (inter, d), True)]:
        n = rows if g else t  # an expert's rows, or every token
        b = "e" if g else ""

        def dot(spec, lhs, rhs, g=g, b=b):
            return (spec.replace("@", b), (*g, *lhs), (*g, *rhs), layers)
        dots += [dot("@ti,@io->@to", (n, i), (i, o)), dot("@to,@io->@ti", (n, o), (i, o))]
        if mode == "full":
            dots.append(dot("@ti,@to->@io", (n, i), (n, o)))
        elif lora:
            dots += [dot("@ti,@ir->@tr", (n, i), (i, r)), dot("@tr,@ro->@to", (n, r), (r, o)),
                     dot("@tr,@to->@ro", (n, r), (n, o)), dot("@to,@ro->@tr", (n, o), (r, o)),
                     dot("@ti,@tr->@ir", (n, i), (n, r)), dot("@tr,@ir->@ti", (n, r), (i, r))]
    bh, hd = batch * heads, s["head_dim"]
    dots += [("bqh,bkh->bqk", (bh, seq, hd), (bh, seq, hd), 2 * layers), ("bqk,bkh->bqh", (bh, seq, seq), (bh, seq, hd),
                                                                         2 * layers),
             ("bqk,bqh->bkh", (bh, seq, seq), (bh, seq, hd), 2 * layers),
             ("td,dv->tv", (t, d), (d, v), 1), ("tv,dv->td", (t, v), (d, v), 1)]
    if mode == "full":
        dots.append(("td,tv->dv", (t, d), (t, v), 1))
    return dots


def trained_params(mode: str) -> int:
    s = SHAPE
    d, inter, layers, e = s["hidden_size"], s["moe_intermediate_size"], s["num_hidden_layers"], s["num_experts"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    attention = [(d, q), (d, kv), (d, kv), (q, d)]
    if mode == "lora":
        return layers * LORA_R * (sum(i + o for i, o in attention) + e * ((d + 2 * inter) + (inter + d)))
    return layers * (sum(i * o for i, o in attention) + d * e + e * 3 * d * inter + 2 * d) + 2 * d * s["vocab_size"] + d


def worker_floor(mode: str, args) -> dict:
    """The step's matmuls alone (balanced experts) and its AdamW update alone: no implementation built
    on XLA's kernels runs the step faster than their sum."""
    sys.modules["torch"] = None  # type: ignore[assignment]
    return {"dots_s": dots_seconds(step_dots(mode, args.batch, args.seq), args.matmul_reps),
            "optimizer_s": adamw_seconds(trained_params(mode), args.matmul_reps)}


def run_worker(name: str, args) -> dict:
    return spawn_worker(__file__, name, ["--model", args.model, "--seq", str(args.seq), "--batch", str(args.batch),
                                         "--steps", str(args.steps)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", choices=["all", "lora", "full"], default="all")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, _, mode = args.worker.partition("-")
        args.matmul_size, args.matmul_reps = 2048, 5
        result = {"jaxtune": lambda: worker_jaxtune(mode, args), "hf": lambda: worker_hf(mode, args),
                  "grouped": lambda: worker_grouped(args), "matmul": lambda: worker_matmul_jax(args),
                  "floor": lambda: worker_floor(mode, args)}[kind]()
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.model = os.path.join(tmp, "qwen3moe")
        make_model(args.model)
        tokens = args.batch * args.seq
        print(f"Qwen3-MoE {SHAPE['num_hidden_layers']} layers, hidden {SHAPE['hidden_size']}, {SHAPE['num_experts']} "
              f"experts (intermediate {SHAPE['moe_intermediate_size']}), top-{SHAPE['num_experts_per_tok']}; "
              f"{args.batch} x {args.seq} = {tokens} tokens per step, fp32, CPU ({os.cpu_count()} cores)")
        print(f"{'mode':6} {'framework':22} {'first s':>8} {'step s':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'loss':>14}")
        verdicts = []
        peak = run_worker("matmul-", args)["flop_s"]
        for mode in (["lora", "full"] if args.only == "all" else [args.only]):
            hf, ours = run_worker(f"hf-{mode}", args), run_worker(f"jaxtune-{mode}", args)
            for name, r in (("transformers + PEFT", hf), ("jaxtune", ours)):
                print(f"{mode:6} {name:22} {r['first_step_s']:8.2f} {r['steady_step_s']:8.3f} {r['tokens_per_s']:9.0f} "
                      f"{r['peak_rss_mb']:12.0f} {r['first_loss']:6.3f}->{r['last_loss']:6.3f}")
            speed, rss = ours["tokens_per_s"] / hf["tokens_per_s"], ours["peak_rss_mb"] / hf["peak_rss_mb"]
            ok = speed >= TARGET and rss <= 1.0
            verdicts.append(ok)
            print(f"{mode:6} jaxtune / HF: tokens/s {speed:.2f}x (target >= {TARGET}x), peak RSS {rss:.2f}x "
                  f"(target <= 1.0x): {'met' if ok else 'NOT met'}")
            flops = step_flops(mode, args.batch, args.seq)
            ceiling = tokens / (flops / peak) / hf["tokens_per_s"]
            print(f"{mode:6} model FLOPs {flops / 1e9:.1f} G/step: jaxtune at {flops / ours['steady_step_s'] / peak:.0%}, "
                  f"transformers at {flops / hf['steady_step_s'] / peak:.0%} of JAX's {peak / 1e9:.0f} GFLOP/s matmul "
                  f"peak; ceiling {ceiling:.2f}x transformers' tokens/s")
            floor = run_worker(f"floor-{mode}", args)
            floor_s = floor["dots_s"] + floor["optimizer_s"]
            print(f"{mode:6} floor: the step's matmuls alone {floor['dots_s']:.3f} s + AdamW {floor['optimizer_s']:.3f} s "
                  f"= {floor_s:.3f} s/step ({floor_s / ours['steady_step_s']:.0%} of jaxtune's step): at most "
                  f"{hf['steady_step_s'] / floor_s:.2f}x transformers' tokens/s on XLA's kernels")
        g = run_worker("grouped-", args)
        print(f"grouped matmul, one layer's experts fwd+bwd on {tokens * SHAPE['num_experts_per_tok']} routed rows: "
              f"batched {g['batched'] * 1e3:.1f} ms, ragged_dot {g['ragged'] * 1e3:.1f} ms, every expert on every row "
              f"{g['dense'] * 1e3:.1f} ms (batched {g['dense'] / g['batched']:.1f}x faster than dense)")
        sys.exit(0 if all(verdicts) else 1)


if __name__ == "__main__":
    main()
