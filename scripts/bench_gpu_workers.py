"""The measurements of scripts/bench_gpu.py, each run in a fresh process by its driver:

    python scripts/bench_gpu_workers.py NAME SPEC_JSON   ->   prints "BENCH_RESULT {json}"

(kept apart from the driver so that each file stays readable; see bench_gpu.py for what is measured).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULT_TAG = "BENCH_RESULT "
LORA_R, LORA_ALPHA, LR, SEED = 16, 32, 1e-4, 0


def packed_rows(vocab: int, batch: int, seq: int, sample_range: tuple[int, int]):
    """Seeded [batch, seq] token ids, segment ids and positions: each row filled with samples of random
    lengths in sample_range (the last one cut at the row's end)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
    segments, positions = np.zeros((batch, seq), np.int32), np.zeros((batch, seq), np.int32)
    for row in range(batch):
        start, sample = 0, 1
        while start < seq:
            end = min(seq, start + int(rng.integers(*sample_range, endpoint=True)))
            segments[row, start:end], positions[row, start:end] = sample, np.arange(end - start)
            start, sample = end, sample + 1
    return ids, segments, positions


def device_peak_memory_gb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def timed_steps(run, steps: int) -> tuple[float, float]:
    """(first call's seconds, mean seconds of `steps` calls after one more warm-up call)."""
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    run()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    return first, (time.perf_counter() - t0) / steps


# ------------------------------------------------------------------------------------------ workers


def jaxtune_model(config: dict, *, lora: bool, attention: str = "auto"):
    """A jaxtune CausalLM of an HF config dict with random weights, stored as `bf16: true` stores them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from transformers import LlamaConfig

    from jaxtune.kernels.attention import best_backend
    from jaxtune.models import family_for
    from jaxtune.peft import lora as peft_lora
    from jaxtune.models.llama import LORA_TARGETS

    family = family_for("LlamaForCausalLM")
    mcfg = family.config_from_hf(LlamaConfig(**config), "LlamaForCausalLM", json.dumps(config))
    model = family.CausalLM(mcfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16 if lora else jnp.float32,
                            rngs=nnx.Rngs(SEED),
                            attn_implementation=best_backend() if attention == "auto" else attention)
    spec = None
    if lora:
        spec = peft_lora.LoraSpec(r=LORA_R, alpha=LORA_ALPHA, targets=tuple(LORA_TARGETS))
        peft_lora.add_lora(model, spec, jax.random.key(SEED))
    return model, spec


def worker_train_jaxtune(spec: dict) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # a jaxtune install has no torch
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxtune.config import build_config
    from jaxtune.objectives.sft import SFT
    from jaxtune.optim import build_optimizer
    from jaxtune.peft import lora
    from jaxtune.step import make_train_step

    model, lora_spec = jaxtune_model(spec["config"], lora=spec["mode"] == "lora")
    backend = model.attn_implementation
    graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(model, lora_spec), ...)
    del model
    cfg = build_config({"optimizer": "adamw_torch", "learning_rate": LR, "lr_scheduler": "constant",
                        "weight_decay": 0.0, "max_grad_norm": 1.0})
    optimizer, schedule = build_optimizer(cfg, spec["steps"] + 2)
    opt_state = optimizer.init(trainable)
    ids, segments, positions = packed_rows(spec["config"]["vocab_size"], spec["batch"], spec["seq"],
                                           tuple(spec["sample_range"]))
    batch = jax.device_put({"input_ids": ids[None], "labels": ids[None], "segment_ids": segments[None],
                            "positions": positions[None]})  # [accumulation steps = 1, batch, seq]
    step = make_train_step(graphdef, SFT(), optimizer, schedule, use_rng=False)
    rng, state, losses = jax.random.key(SEED), {"i": 0}, []

    def run():
        nonlocal trainable, opt_state
        trainable, opt_state, out = step(trainable, frozen, opt_state, batch, rng, jnp.int32(state["i"]))
        losses.append(float(jax.block_until_ready(out)["loss"]))
        state["i"] += 1

    first, steady = timed_steps(run, spec["steps"])
    assert step.traces == 1, f"the train step compiled {step.traces} times"
    return {"first_step_s": first, "step_s": steady, "peak_gb": device_peak_memory_gb(), "loss": losses[-1],
            "attention": backend, "platform": jax.default_backend()}


def worker_train_hf(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(SEED)
    lora = spec["mode"] == "lora"
    config = LlamaConfig(**spec["config"], attn_implementation=spec["attention"])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if lora else torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=cuda)
    ids, _, positions = packed_rows(spec["config"]["vocab_size"], spec["batch"], spec["seq"],
                                    tuple(spec["sample_range"]))
    ids, positions = (torch.from_numpy(x.astype("int64")).to(device) for x in (ids, positions))
    losses = []

    def run():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, position_ids=positions, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # synchronizes

    first, steady = timed_steps(run, spec["steps"])
    return {"first_step_s": first, "step_s": steady, "loss": losses[-1],
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def worker_matmul(spec: dict) -> dict:
    """The attainable bf16 matmul rate: median of 10 products of n x n random matrices."""
    import statistics

    import jax
    import jax.numpy as jnp

    n = spec["n"]
    ka, kb = jax.random.split(jax.random.key(SEED))
    a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(jnp.bfloat16) for k in (ka, kb))
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"flop_s": 2 * n**3 / statistics.median(times), "device": jax.devices()[0].device_kind,
            "platform": jax.default_backend()}


def worker_attention(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    import bench_attention
    from jaxtune.kernels.attention import _PLATFORMS, IMPLEMENTATIONS

    platform = jax.default_backend()
    backends = [b for b in IMPLEMENTATIONS if platform in _PLATFORMS.get(b, (platform,))]
    backends += ["cudnn-packed"] if platform == "gpu" else []
    heads, kv_heads, head_dim = spec["heads"]
    rows = []
    for seq in spec["lengths"]:
        for layout, samples in (("1 sample", 1), (f"{spec['sample']}-token samples", seq // spec["sample"])):
            data = bench_attention.inputs(seq, samples, jnp.bfloat16, heads=heads, kv_heads=kv_heads,
                                          head_dim=head_dim)
            row = {"seq": seq, "layout": layout}
            for impl in backends:
                if impl == "cudnn" and samples > 1:
                    continue  # jaxtune's cudnn backend hands packed rows to Pallas: cudnn-packed is the reference
                try:
                    t, gb = bench_attention.measure(impl, data, spec["reps"], spec["limit_gb"])
                    row[impl] = {"ms": None if t is None else t * 1e3, "gb": gb,
                                 **({} if t is not None else {"error": f"needs {gb:.0f} GB"})}
                except Exception as e:  # a backend that cannot run this shape: say why, go on
                    row[impl] = {"ms": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            rows.append(row)
    return {"backends": backends, "rows": rows}


def rollout_prompts(spec: dict):
    import numpy as np

    rng = np.random.default_rng(SEED)
    return rng.integers(1, spec["config"]["vocab_size"], (spec["prompts"], spec["prompt_len"]), dtype=np.int32)


def worker_rollout_jaxtune(spec: dict) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxtune.generate import SamplingConfig, make_rollout
    from jaxtune.peft import lora

    model, lora_spec = jaxtune_model(spec["config"], lora=True)
    graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(model, lora_spec), ...)
    vocab = spec["config"]["vocab_size"]
    rollout = make_rollout(graphdef, max_new_tokens=spec["new_tokens"], eos_ids=[vocab + 1], pad_id=0,
                           num_generations=spec["generations"])  # an EOS no token can be: every row runs to the end
    ids = jnp.asarray(rollout_prompts(spec))
    segments = jnp.ones_like(ids)
    settings = SamplingConfig(max_new_tokens=spec["new_tokens"], temperature=1.0).traced()
    calls = {"n": 0}

    def run():
        calls["n"] += 1
        out = rollout(trainable, frozen, ids, segments, jax.random.key(calls["n"]), settings)
        return int(np.asarray(out.lengths).sum())

    first, steady = timed_steps(run, 2)
    tokens = ids.shape[0] * spec["generations"] * spec["new_tokens"]
    return {"tokens_per_s": tokens / steady, "first_s": first, "tokens": tokens, "sampled": run()}


def worker_rollout_hf(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**spec["config"], attn_implementation="sdpa")).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.eval()
    ids = torch.from_numpy(rollout_prompts(spec).astype("int64")).to(device)
    ids = ids.repeat_interleave(spec["generations"], dim=0)  # TRL repeats each prompt G times
    new = spec["new_tokens"]

    def run():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        return out.shape[1] - ids.shape[1]

    first, steady = timed_steps(run, 2)
    return {"tokens_per_s": ids.shape[0] * new / steady, "first_s": first, "tokens": ids.shape[0] * new}


def median_seconds(fn, *args, calls: int = 1, reps: int = 5) -> float:
    """Median seconds of `calls` back-to-back calls (dispatched without waiting, so the host's
    per-call latency hides behind the device's work as it does inside a step)."""
    import statistics

    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(calls)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker_breakdown(spec: dict) -> dict:
    """What one training step is made of, each piece jitted and timed alone in the step's own shapes
    and dtypes (bf16 operands): the projections' matmuls (bench_train.step_dots less attention and
    the LM head), the LM head with its chunked cross-entropy forward + backward, attention forward +
    backward over the packed rows (every layer), and the AdamW update. The step less their sum is
    everything else (norms, activations, RoPE, casts, the LoRA glue, launch gaps)."""
    import jax
    import jax.numpy as jnp

    import bench_train
    from jaxtune.kernels.attention import attention, best_backend
    from jaxtune.kernels.cross_entropy import linear_cross_entropy

    config, mode, batch, seq = spec["config"], spec["mode"], spec["batch"], spec["seq"]
    d, layers, heads, head_dim, _ = bench_train.model_dims(config)
    kv_heads, vocab, tokens = config["num_key_value_heads"], config["vocab_size"], batch * seq
    drawn = iter(range(1 << 30))

    def next_key():
        return jax.random.fold_in(jax.random.key(SEED), next(drawn))

    def normal(shape):
        return jax.random.normal(next_key(), shape, jnp.float32).astype(jnp.bfloat16)

    dots_s, dots_flops = 0.0, 0.0
    for subscripts, lhs, rhs, count in bench_train.step_dots(config, batch, seq, mode):
        if subscripts.startswith("bq") or "v" in subscripts:  # attention's and the head's products: timed below
            continue
        a, b = normal(lhs), normal(rhs)
        dots_s += median_seconds(jax.jit(lambda a, b, s=subscripts: jnp.einsum(s, a, b)), a, b, calls=count)
        operands = subscripts.split("->")[0].split(",")
        sizes = {**dict(zip(operands[0], lhs)), **dict(zip(operands[1], rhs))}
        dots_flops += count * 2 * math.prod(sizes.values())
    hidden, head = normal((tokens, d)), normal((vocab, d))
    targets = jax.random.randint(next_key(), (tokens,), 0, vocab)
    weights = jnp.ones((tokens,), jnp.float32)
    argnums = (0, 1) if mode == "full" else (0,)
    ce = jax.jit(jax.grad(lambda h, w: linear_cross_entropy(h, w, targets, weights), argnums=argnums))
    head_s = median_seconds(ce, hidden, head)
    _, segments, positions = packed_rows(vocab, batch, seq, tuple(spec["sample_range"]))
    segments, positions = jnp.asarray(segments), jnp.asarray(positions)
    q, k, v = normal((batch, seq, heads, head_dim)), normal((batch, seq, kv_heads, head_dim)), normal(
        (batch, seq, kv_heads, head_dim))

    def attn_loss(q, k, v):
        out = attention(q, k, v, q_segment_ids=segments, kv_segment_ids=segments, q_positions=positions,
                        kv_positions=positions, implementation=best_backend())
        return jnp.sum(out.astype(jnp.float32))

    attention_s = median_seconds(jax.jit(jax.grad(attn_loss, argnums=(0, 1, 2))), q, k, v, calls=layers)
    adamw_s = bench_train.optimizer_update_seconds(config, mode, 5)
    return {"matmuls_s": dots_s, "matmul_flop_s": dots_flops / dots_s, "head_s": head_s, "attention_s": attention_s,
            "adamw_s": adamw_s}


WORKERS = {"breakdown": worker_breakdown, "train-jaxtune": worker_train_jaxtune, "train-hf": worker_train_hf,
           "matmul": worker_matmul,
           "attention": worker_attention, "rollout-jaxtune": worker_rollout_jaxtune, "rollout-hf": worker_rollout_hf}


if __name__ == "__main__":
    print(RESULT_TAG + json.dumps(WORKERS[sys.argv[1]](json.loads(sys.argv[2]))), flush=True)
