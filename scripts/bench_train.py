"""Training benchmark: jaxtune vs transformers + PEFT (torch) on the bundled SmolLM2-135M (CPU, fp32).

Measures, in one run, one training step after another on the same seeded random batch
(batch x seq tokens, every token trained, no padding), fp32 weights and compute, AdamW
(lr 1e-4, no weight decay, gradient clipping at 1.0):

  - LoRA (r=16, alpha=32, no dropout, on all seven linear projections of every layer) and
    full fine-tuning, each with jaxtune and with HF transformers (sdpa attention) + PEFT;
  - per run: the first step's time (for jaxtune it includes tracing and XLA compilation), the
    mean time of the following --steps steady steps, tokens/s = batch * seq * steps / their time,
    and peak RSS (the process' VmHWM: its own high-water mark, model loading included);
  - the FLOP/s of a large fp32 matmul (n x n @ n x n, best of --matmul-reps) in JAX (jitted
    jnp.dot) and in torch (torch.mm), as each framework's attainable peak on this machine.

The jaxtune workers hide torch from transformers (jaxtune's runtime install has no torch).
Every measurement runs in its own fresh process (this script re-invoked with --worker NAME,
reporting one JSON line), one at a time, so each peak RSS belongs to one framework and one mode
and no two measurements compete for the cores.

Model FLOPs per training step (the same formula for both frameworks, so the ratios are fair),
with T = batch * seq tokens, N_lin the weights of the layers' linear projections (q, k, v, o,
gate, up, down), N_head = hidden * vocab (the LM head; a matmul even when tied to the
embedding; the embedding lookup itself is not counted) and N_lora = layers * sum over the seven
projections of r * (in + out):

    full FT : 6 * (N_lin + N_head) * T + ATTN        forward 2, input-gradient 2, weight-gradient 2
    LoRA    : 4 * (N_lin + N_head) * T + 6 * N_lora * T + ATTN
              (frozen weights need no weight gradient, only the gradient flowing through them)
    ATTN    = 12 * layers * heads * head_dim * seq * T
              (QK^T and PV: 4 * seq * heads * head_dim per token and layer forward, x3 with the
              backward; the full seq x seq square, causal masking not discounted)

Norms, activations, softmax, the loss and the optimizer update are not counted. Achieved
FLOP/s = model FLOPs / steady step time; "% peak" is that against the same framework's matmul
FLOP/s.

Targets (at the default batch 4 x 256 on the project's 2-core CPU): jaxtune LoRA >= 1.6x HF+PEFT
tokens/s, full fine-tuning >= 1.4x, jaxtune's peak RSS no higher than HF's, jaxtune's first step
(compile included) under 20 s. The last lines print two ceilings, as multiples of HF's measured
tokens/s: the tokens/s of a step whose model FLOPs all ran at the measured large-matmul peak, and the
tighter one of a step that did nothing but its own matmuls, in their own shapes (`step_dots`), each
timed alone with XLA's kernel: the projections of this model (576-1536 wide, 1024 rows) run
below the 2048^2 peak, and the LoRA products (rank 16) are memory-bound. A target above a ceiling
cannot be met by an implementation built on XLA's matmuls on that run's machine state.

    .venv/bin/python scripts/bench_train.py [--seq 256] [--batch 4] [--steps 5] [--only all|lora|full]
                                            [--model DIR] [--rounds N]
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

LORA_R, LORA_ALPHA, LR, MAX_GRAD_NORM, SEED = 16, 32, 1e-4, 1.0, 0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULT_TAG = "BENCH_RESULT "
TARGETS = {"lora": 1.6, "full": 1.4}
FIRST_STEP_TARGET_S = 20.0
SPEC_SHAPE = (4, 256)  # (batch, seq) the targets are defined at


def peak_rss_mb() -> float:
    """This process' peak resident set (VmHWM), falling back to ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def token_batch(vocab_size: int, batch: int, seq: int):
    """The seeded random token batch both frameworks train on, [batch, seq] int32."""
    import numpy as np

    return np.random.default_rng(SEED).integers(0, vocab_size, (batch, seq), dtype=np.int32)


def read_model_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------- workers


def worker_jaxtune(mode: str, args) -> dict:
    # jaxtune's runtime install has no torch (it is in this venv only for the references), but
    # transformers imports it whenever it is installed, which would add ~120 MB to jaxtune's RSS.
    # Hide it so the jaxtune process is what users run.
    sys.modules["torch"] = None  # type: ignore[assignment]
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune.objectives.sft import SFT
    from jaxtune.peft import lora
    from jaxtune.models.llama import LORA_TARGETS
    from jaxtune.step import make_train_step

    t0 = time.perf_counter()
    spec = lora.LoraSpec(r=LORA_R, alpha=LORA_ALPHA, targets=tuple(LORA_TARGETS)) if mode == "lora" else None
    graphdef, trainable, frozen, optimizer, schedule, opt_state = training_state(args.model, spec, args.steps + 1)
    jax.block_until_ready((trainable, frozen, opt_state))
    load_s = time.perf_counter() - t0
    trainable_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable)))

    ids = token_batch(read_model_config(args.model)["vocab_size"], args.batch, args.seq)
    batch = jax.device_put({  # [accumulation steps = 1, batch, seq]
        "input_ids": ids[None], "labels": ids[None],
        "segment_ids": np.ones_like(ids)[None],
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), ids.shape)[None].copy(),
    })
    step = make_train_step(graphdef, SFT(), optimizer, schedule, use_rng=False)
    rng = jax.random.key(SEED)

    def run(i):
        nonlocal trainable, opt_state
        trainable, opt_state, out = step(trainable, frozen, opt_state, batch, rng, jnp.int32(i))
        jax.block_until_ready((trainable, opt_state, out))
        return float(out["loss"])

    t0 = time.perf_counter()
    first_loss = run(0)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        last_loss = run(i)
    steady_s = (time.perf_counter() - t0) / args.steps
    assert step.traces == 1, f"the train step compiled {step.traces} times"
    return {"load_s": load_s, "first_step_s": first_s, "steady_step_s": steady_s,
            "tokens_per_s": args.batch * args.seq / steady_s, "peak_rss_mb": peak_rss_mb(),
            "trainable_params": trainable_params, "first_loss": first_loss, "last_loss": last_loss}


def worker_hf(mode: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(PROJECTIONS),
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    load_s = time.perf_counter() - t0
    trainable_params = sum(p.numel() for p in params)

    ids = torch.from_numpy(token_batch(model.config.vocab_size, args.batch, args.seq).astype("int64"))

    def run():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    first_loss = run()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        last_loss = run()
    steady_s = (time.perf_counter() - t0) / args.steps
    return {"load_s": load_s, "first_step_s": first_s, "steady_step_s": steady_s,
            "tokens_per_s": args.batch * args.seq / steady_s, "peak_rss_mb": peak_rss_mb(),
            "trainable_params": trainable_params, "first_loss": first_loss, "last_loss": last_loss}


def training_state(model_path: str, spec, steps: int):
    """A benchmark's fp32 model (LoRA adapters from `spec`, or None for full fine-tuning) split into
    (graphdef, trainable, frozen) with AdamW as the benchmarks configure it: + (optimizer, schedule,
    opt_state)."""
    import jax
    from flax import nnx

    from jaxtune.checkpoint.hf import load_model
    from jaxtune.config import build_config
    from jaxtune.optim import build_optimizer
    from jaxtune.peft import lora

    model = load_model(model_path, dtype="float32", param_dtype="float32", remat="none")
    if spec is not None:
        lora.add_lora(model, spec, jax.random.key(SEED))
    graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(model, spec), ...)
    del model
    cfg = build_config({"optimizer": "adamw_torch", "learning_rate": LR, "lr_scheduler": "constant",
                        "weight_decay": 0.0, "max_grad_norm": MAX_GRAD_NORM})
    optimizer, schedule = build_optimizer(cfg, steps)
    return graphdef, trainable, frozen, optimizer, schedule, optimizer.init(trainable)


def worker_matmul_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    n = args.matmul_size
    ka, kb = jax.random.split(jax.random.key(SEED))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()  # compile + warm-up
    times = []
    for _ in range(args.matmul_reps):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"flop_s": 2 * n**3 / min(times)}


def worker_matmul_torch(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(SEED)
    n = args.matmul_size
    a, b = torch.randn(n, n, dtype=torch.float32), torch.randn(n, n, dtype=torch.float32)
    for _ in range(2):  # warm-up
        torch.mm(a, b)
    times = []
    for _ in range(args.matmul_reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return {"flop_s": 2 * n**3 / min(times)}


def model_dims(config: dict) -> tuple[int, int, int, int, list[tuple[int, int]]]:
    """(hidden, layers, heads, head_dim, the (in, out) of q k v o gate up down) of an HF config."""
    d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or d // heads
    shapes = [(d, heads * head_dim), (d, kv_heads * head_dim), (d, kv_heads * head_dim), (heads * head_dim, d),
              (d, inter), (d, inter), (inter, d)]
    return d, layers, heads, head_dim, shapes


def lora_params(config: dict) -> int:
    """Adapter parameters of LoRA r=LORA_R on the seven projections of every layer."""
    _, layers, _, _, shapes = model_dims(config)
    return layers * sum(LORA_R * (i + o) for i, o in shapes)


def step_dots(config: dict, batch: int, seq: int, mode: str) -> list[tuple[str, tuple, tuple, int]]:
    """Every matmul of one training step as (einsum subscripts, lhs shape, rhs shape, how many), in
    the step's own shapes: per layer the forward, input-gradient (and for full fine-tuning the
    weight-gradient) product of each of the seven projections, the LoRA products (forward x A, (xA) B;
    backward dB, d(xA), dA, dx), attention's QK^T and PV with their four backward products (the full
    seq x seq square, as the `xla` backend computes it), and the LM head over all tokens (logits,
    their gradient to the hidden states, and for full fine-tuning to the tied embedding)."""
    d, layers, heads, head_dim, shapes = model_dims(config)
    t, r, bh, v = batch * seq, LORA_R, batch * heads, config["vocab_size"]
    dots = []
    for i, o in shapes:
        dots += [("ti,io->to", (t, i), (i, o), layers), ("to,io->ti", (t, o), (i, o), layers)]
        if mode == "full":
            dots.append(("ti,to->io", (t, i), (t, o), layers))
        else:
            dots += [("ti,ir->tr", (t, i), (i, r), layers), ("tr,ro->to", (t, r), (r, o), layers),
                     ("tr,to->ro", (t, r), (t, o), layers), ("to,ro->tr", (t, o), (r, o), layers),
                     ("ti,tr->ir", (t, i), (t, r), layers), ("tr,ir->ti", (t, r), (i, r), layers)]
    qk, pv = ((bh, seq, head_dim), (bh, seq, head_dim)), ((bh, seq, seq), (bh, seq, head_dim))
    dots += [("bqh,bkh->bqk", *qk, 2 * layers),  # scores; dP = dO V^T
             ("bqk,bkh->bqh", *pv, 2 * layers),  # P V; dQ = dS K
             ("bqk,bqh->bkh", *pv, 2 * layers)]  # dV = P^T dO; dK = dS^T Q
    dots += [("td,vd->tv", (t, d), (v, d), 1), ("tv,vd->td", (t, v), (v, d), 1)]
    if mode == "full":
        dots.append(("tv,td->vd", (t, v), (t, d), 1))
    return dots


def worker_dots_jax(mode: str, args) -> dict:
    return {"dots_s": dots_seconds(step_dots(read_model_config(args.model), args.batch, args.seq, mode),
                                   args.matmul_reps),
            "optimizer_s": optimizer_update_seconds(read_model_config(args.model), mode, args.matmul_reps)}


def dots_seconds(dots: list[tuple[str, tuple, tuple, int]], reps: int) -> float:
    """Seconds of one step's matmuls run alone: each distinct product jitted by itself (XLA's own
    kernel, both cores), best of `reps`, times how often the step runs it."""
    import jax
    import jax.numpy as jnp

    total, key = 0.0, jax.random.key(SEED)
    for subscripts, lhs, rhs, count in dots:
        ka, kb = jax.random.split(key)
        a, b = jax.random.normal(ka, lhs, jnp.float32), jax.random.normal(kb, rhs, jnp.float32)
        dot = jax.jit(lambda a, b, s=subscripts: jnp.einsum(s, a, b))
        dot(a, b).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dot(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
        total += count * min(times)
    return total


def optimizer_update_seconds(config: dict, mode: str, reps: int) -> float:
    """Best time of the step's AdamW update (gradient clipping included) over as many fp32
    parameters as the mode trains (one flat array: the update is elementwise)."""
    d, layers, _, _, shapes = model_dims(config)
    if mode == "full":
        count = layers * (sum(i * o for i, o in shapes) + 2 * d) + d * config["vocab_size"] + d
    else:
        count = lora_params(config)
    return adamw_seconds(count, reps)


def adamw_seconds(count: int, reps: int) -> float:
    """Best time of an AdamW update (gradient clipping included) of `count` fp32 parameters (one flat
    array: the update is elementwise)."""
    import jax
    import jax.numpy as jnp

    from jaxtune.config import build_config
    from jaxtune.optim import build_optimizer

    cfg = build_config({"optimizer": "adamw_torch", "learning_rate": LR, "lr_scheduler": "constant",
                        "weight_decay": 0.0, "max_grad_norm": MAX_GRAD_NORM})
    optimizer, _ = build_optimizer(cfg, 10)
    params = {"w": jnp.zeros((count,), jnp.float32)}
    grads = {"w": jnp.full((count,), 1e-3, jnp.float32)}
    state = optimizer.init(params)

    @jax.jit
    def update(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return jax.tree.map(jnp.add, params, updates), state

    params, state = update(params, state, grads)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        params, state = jax.block_until_ready(update(params, state, grads))
        times.append(time.perf_counter() - t0)
    return min(times)


WORKERS = {
    "dots-jax-lora": lambda a: worker_dots_jax("lora", a),
    "dots-jax-full": lambda a: worker_dots_jax("full", a),
    "matmul-jax": worker_matmul_jax,
    "matmul-torch": worker_matmul_torch,
    "jaxtune-lora": lambda a: worker_jaxtune("lora", a),
    "jaxtune-full": lambda a: worker_jaxtune("full", a),
    "hf-lora": lambda a: worker_hf("lora", a),
    "hf-full": lambda a: worker_hf("full", a),
}


# ------------------------------------------------------------------------------------------ parent


def train_flops(config: dict, batch: int, seq: int, mode: str) -> float:
    """Model FLOPs of one training step (the formula in the module docstring)."""
    d, layers, heads, head_dim, shapes = model_dims(config)
    n_lin = layers * sum(i * o for i, o in shapes)
    n_head = d * config["vocab_size"]
    tokens = batch * seq
    attn = 12 * layers * heads * head_dim * seq * tokens
    if mode == "full":
        return 6 * (n_lin + n_head) * tokens + attn
    return 4 * (n_lin + n_head) * tokens + 6 * lora_params(config) * tokens + attn


def run_worker(name: str, args) -> dict:
    return spawn_worker(__file__, name, ["--model", args.model, "--seq", str(args.seq), "--batch", str(args.batch),
                                         "--steps", str(args.steps), "--matmul-size", str(args.matmul_size),
                                         "--matmul-reps", str(args.matmul_reps)])


def spawn_worker(script: str, name: str, flags: list[str]) -> dict:
    """Run `script --worker NAME flags` in a fresh process; its last RESULT_TAG line, parsed."""
    print(f"[{os.path.basename(script).removesuffix('.py')}] running {name} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, os.path.abspath(script), "--worker", name, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    results = [line[len(RESULT_TAG):] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not results:
        sys.exit(f"{name} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}{proc.stdout[-1000:]}")
    return json.loads(results[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=SPEC_SHAPE[1], help="tokens per row (default 256)")
    parser.add_argument("--batch", type=int, default=SPEC_SHAPE[0], help="rows per step (default 4)")
    parser.add_argument("--steps", type=int, default=5, help="timed steady steps after the first (default 5)")
    parser.add_argument("--only", choices=["all", "lora", "full"], default="all")
    parser.add_argument("--model", help="HF model directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n peak matmul (default 2048)")
    parser.add_argument("--matmul-reps", type=int, default=10, help="timed matmul repetitions (default 10)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every measurement this many times and report medians (default 1)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")

    if args.worker:
        print(RESULT_TAG + json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    if args.model is None:
        from jaxtune import bundled

        args.model = str(bundled.prepare("smollm2"))
    config = read_model_config(args.model)
    modes = ["lora", "full"] if args.only == "all" else [args.only]

    # Each round runs every measurement once, jaxtune's right before HF's; the figures below are the
    # medians over rounds, so a slow spell of this (shared) machine moves both sides of a ratio.
    rounds = []
    for _ in range(args.rounds):
        one = {"matmul-jax": run_worker("matmul-jax", args), "matmul-torch": run_worker("matmul-torch", args)}
        for mode in modes:
            for name in (f"jaxtune-{mode}", f"hf-{mode}", f"dots-jax-{mode}"):
                one[name] = run_worker(name, args)
        rounds.append(one)

    def median(name: str) -> dict:
        first = rounds[0][name]  # counts and losses are the same every round
        return {key: statistics.median(r[name][key] for r in rounds) if isinstance(value, float) else value
                for key, value in first.items()}

    peak = {"jaxtune": median("matmul-jax")["flop_s"], "hf": median("matmul-torch")["flop_s"]}
    results = {(fw, mode): median(f"{fw}-{mode}") for mode in modes for fw in ("jaxtune", "hf")}
    dots = {mode: median(f"dots-jax-{mode}") for mode in modes}
    for (fw, mode), r in results.items():
        r["gflop_s"] = train_flops(config, args.batch, args.seq, mode) / r["steady_step_s"] / 1e9
        r["pct_peak"] = 100 * r["gflop_s"] * 1e9 / peak[fw]

    print(f"{os.path.basename(os.path.normpath(args.model))} fp32 AdamW, CPU x{os.cpu_count()}, batch {args.batch} x "
          f"{args.seq} tokens, {args.steps} steady step{'s' * (args.steps != 1)} after the first"
          + (f"; medians of {args.rounds} rounds" if args.rounds > 1 else ""))
    print(f"matmul peak ({args.matmul_size}x{args.matmul_size} fp32, best of {args.matmul_reps}): "
          f"JAX {peak['jaxtune'] / 1e9:.1f} GFLOP/s, torch {peak['hf'] / 1e9:.1f} GFLOP/s")
    cols = [("tokens/s", "tokens_per_s", ".1f"), ("first step s", "first_step_s", ".2f"),
            ("steady step s", "steady_step_s", ".3f"), ("peak RSS MB", "peak_rss_mb", ".0f"),
            ("GFLOP/s", "gflop_s", ".1f"), ("% peak", "pct_peak", ".1f")]
    print(f"{'':<22}" + "".join(f"{label:>15}" for label, _, _ in cols))
    names = {"lora": "LoRA r=16", "full": "full FT"}
    hf_names = {"lora": "HF+PEFT LoRA r=16", "full": "HF full FT"}
    for mode in modes:
        j, h = results["jaxtune", mode], results["hf", mode]
        print(f"{'jaxtune ' + names[mode]:<22}" + "".join(f"{j[key]:>15{fmt}}" for _, key, fmt in cols))
        print(f"{hf_names[mode]:<22}" + "".join(f"{h[key]:>15{fmt}}" for _, key, fmt in cols))
        print(f"{'  ratio jaxtune/HF':<22}" + "".join(f"{j[key] / h[key]:>14.2f}x" for _, key, _ in cols))
    for mode in modes:
        j, h = results["jaxtune", mode], results["hf", mode]
        print(f"{names[mode]}: trainable params jaxtune {j['trainable_params']:,} / HF {h['trainable_params']:,}; "
              f"loss first step {j['first_loss']:.4f} / {h['first_loss']:.4f}, last {j['last_loss']:.4f} / "
              f"{h['last_loss']:.4f}; load {j['load_s']:.1f}s / {h['load_s']:.1f}s")

    print("targets" + ("" if (args.batch, args.seq) == SPEC_SHAPE else
                       f" (defined at batch {SPEC_SHAPE[0]} x {SPEC_SHAPE[1]}; this run is not that shape)") + ":")
    for mode in modes:
        j, h = results["jaxtune", mode], results["hf", mode]
        ratio = j["tokens_per_s"] / h["tokens_per_s"]
        checks = [
            (f"{names[mode]} tokens/s >= {TARGETS[mode]}x HF", ratio >= TARGETS[mode], f"{ratio:.2f}x"),
            (f"{names[mode]} peak RSS <= HF's", j["peak_rss_mb"] <= h["peak_rss_mb"],
             f"{j['peak_rss_mb']:.0f} vs {h['peak_rss_mb']:.0f} MB"),
            (f"{names[mode]} first step < {FIRST_STEP_TARGET_S:g} s", j["first_step_s"] < FIRST_STEP_TARGET_S,
             f"{j['first_step_s']:.1f} s"),
        ]
        for label, ok, value in checks:
            print(f"  {'PASS' if ok else 'MISS'}  {label:<34} ({value})")
    print("ceiling (every model FLOP at the matmul peak measured above; norms, softmax, loss and the optimizer "
          "free):")
    for mode in modes:
        h = results["hf", mode]
        ceiling = peak["jaxtune"] / (train_flops(config, args.batch, args.seq, mode) / (args.batch * args.seq))
        print(f"  {names[mode]}: {ceiling:.1f} tokens/s = {ceiling / h['tokens_per_s']:.2f}x HF "
              f"(target {TARGETS[mode]}x)")
    print("ceiling (the step's own matmuls, each product run alone with XLA's kernel, plus the AdamW update "
          f"alone, best of {args.matmul_reps}; norms, softmax, loss and attention masking free):")
    for mode in modes:
        j, h = results["jaxtune", mode], results["hf", mode]
        floor_s = dots[mode]["dots_s"] + dots[mode]["optimizer_s"]
        ceiling = args.batch * args.seq / floor_s
        print(f"  {names[mode]}: matmuls {dots[mode]['dots_s']:.2f} s + AdamW {dots[mode]['optimizer_s']:.2f} s = "
              f"{floor_s:.2f} s/step ({100 * floor_s / j['steady_step_s']:.0f}% of jaxtune's {j['steady_step_s']:.2f} s)"
              f" = {ceiling:.1f} tokens/s = {ceiling / h['tokens_per_s']:.2f}x HF (target {TARGETS[mode]}x)")


if __name__ == "__main__":
    main()
