"""`jaxtune plan CONFIG [--device-memory 80GiB] [--devices N]`: the memory a config needs per device,
before loading a single weight.

Exact parts, from the model's shapes (an abstract model: `nnx.eval_shape`, LoRA added, NF4 sizes for
QLoRA) and the mesh (`jaxtune.parallel.mesh.plan_for`; each array divided by the mesh axes its
logical axes shard over):
- parameters (frozen and trained), gradients (the trained parameters' shapes, sharded like the
  optimizer state), optimizer state (`jax.eval_shape` of the configured optax optimizer's init);
- the reference model of DPO/KTO and of GRPO with beta != 0 (objectives/reference.py): nothing for
  fresh LoRA adapters (their reference is the policy with adapters off), a frozen copy of the trained
  weights under full fine-tuning (of modules_to_save, or of a continued adapter, with LoRA), nothing
  with `precompute_ref_log_probs`. Preference rows hold two answers: 2 x sequence_len tokens; GRPO's
  rows a prompt and per_row completions (objectives/grpo.py);
- GRPO's rollouts: the sampler's KV cache (prompts once, every completion's slots), exact, and its
  per-row vocabulary-wide state; a rollout runs between steps, so the total counts the larger of it
  and the step's activations.

Estimated parts:
- activations of one micro-batch for the remat policy, per device (tokens split over the sequence
  axis, heads over tensor): what the layer scan keeps for the backward pass, one layer's working
  set while it runs, the attention's scores (xla: [T, T] per head; blockwise/pallas: tiles) and
  the loss (chunked: one chunk of logits; plain: all of them);
- the runtime: on CPU the process itself (Python, JAX, XLA's compiled step, the tokenizer:
  `CPU_RUNTIME_BYTES`, measured on the project's machine with scripts/bench_plan.py); on GPUs and
  TPUs `ACCELERATOR_RESERVE` of the device memory, which XLA's allocator and its workspace hold.

scripts/bench_plan.py compares this estimate with the measured peak resident memory of SmolLM2
training runs on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np

from jaxtune.errors import JaxtuneError

CPU_RUNTIME_BYTES = 840 * 2**20  # a jaxtune training process with its compiled step, weights aside
ACCELERATOR_RESERVE = 0.05  # XLA's allocator and workspace share of a GPU / TPU's memory
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '24 GB', '512MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise JaxtuneError(f"cannot read {text!r} as a memory size (write e.g. 80GiB, 24GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _gib(n: float) -> str:
    return f"{n / 2**30:8.3f} GiB"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    mesh: object  # jaxtune.parallel.mesh.MeshPlan
    platform: str
    params: int  # every parameter, frozen and trained, per device
    trainable: int  # of which trained
    gradients: int
    optimizer: int
    reference: int  # the reference model's frozen copy (DPO/KTO, GRPO with beta), per device
    activations: int  # for the configured micro_batch_size
    runtime: int
    micro_batch_size: int
    device_memory: int | None
    max_micro_batch: int | None  # the largest that fits device_memory (None: unknown / none asked)
    optimizer_note: str = ""  # what the optimizer's state holds, when it is not plain 32-bit
    rollout: int = 0  # GRPO's sampler while a rollout runs (not at the same time as the step's activations)

    @property
    def total(self) -> int:
        return (self.params + self.gradients + self.optimizer + self.reference + max(self.activations, self.rollout)
                + self.runtime)

    def report(self) -> str:
        lines = [f"{self.mesh.describe()} ({self.mesh.devices} devices, {self.platform}); per device:",
                 f"  parameters      {_gib(self.params)}   (trained: {_gib(self.trainable).strip()})",
                 f"  gradients       {_gib(self.gradients)}",
                 f"  optimizer state {_gib(self.optimizer)}" + (f"   ({self.optimizer_note})" if self.optimizer_note
                                                                 else ""),
                 *([f"  reference model {_gib(self.reference)}   (frozen copy of the starting weights)"]
                   if self.reference else []),
                 f"  activations     {_gib(self.activations)}   (micro_batch_size {self.micro_batch_size})",
                 *([f"  rollouts        {_gib(self.rollout)}   (KV cache and sampling state; between steps, so the "
                    "larger of this and the activations counts)"] if self.rollout else []),
                 f"  runtime         {_gib(self.runtime)}",
                 f"  total           {_gib(self.total)}"]
        if self.device_memory:
            fits = "fits" if self.total <= self.device_memory else "DOES NOT FIT"
            lines.append(f"  device memory   {_gib(self.device_memory)}   -> {fits}; largest micro_batch_size "
                         f"that fits: {self.max_micro_batch if self.max_micro_batch else 'none'}")
        return "\n".join(lines)


def _abstract_state(cfg):
    """(frozen, trainable) abstract nnx States of the config's model, LoRA attached; the model's
    config; and the bytes per element of NF4 kernels (None without QLoRA)."""
    from flax import nnx

    from jaxtune import bundled
    from jaxtune.build import resolve_attention, resolve_precision, resolve_remat
    from jaxtune.checkpoint.hf import load_model_config
    from jaxtune.models import family_for
    from jaxtune.peft import lora
    from jaxtune.peft.unfrozen import trained_parameters

    path = bundled.resolve(cfg.base_model)
    mcfg = load_model_config(path)
    precision = resolve_precision(cfg)
    param_dtype = precision.frozen if cfg.adapter else precision.trainable
    family = family_for(mcfg.architecture)
    spec = lora.LoraSpec.from_config(cfg, tuple(family.LORA_TARGETS)) if cfg.adapter else None

    def build():
        model = family.CausalLM(
            mcfg, dtype=np.dtype(precision.compute), param_dtype=np.dtype(param_dtype), rngs=nnx.Rngs(0),
            attn_implementation=resolve_attention(cfg), remat=resolve_remat(cfg))
        if spec is not None:
            lora.add_lora(model, spec, jax.random.key(0))
        return model

    model = nnx.eval_shape(build)
    _, trainable, frozen = nnx.split(model, trained_parameters(cfg, model, spec)[0], ...)
    return frozen, trainable, mcfg, precision


def _shard_factor(variable, mesh, exclude) -> int:
    from jaxtune.parallel.mesh import _logical, spec

    value = variable.get_value()
    parts = spec(_logical(variable), value.shape, mesh, exclude)
    factor = 1
    for entry in parts:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis is not None:
                factor *= mesh.shape[axis]
    return factor


def _state_bytes(state, mesh, exclude=(), nf4: frozenset = frozenset()) -> int:
    """Per-device bytes of an abstract nnx State on `mesh`; the kernels at the paths in `nf4` as NF4
    (QLoRA's projections: 4 bits, plus a float32 absmax per 64 values, double-quantized or not alike)."""
    from flax import nnx

    total = 0
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        per_element = np.dtype(value.dtype).itemsize
        if tuple(str(p) for p in path) in nf4:
            per_element = 0.5 + 4 / 64
            factor = mesh.shape["fsdp"] if "fsdp" not in exclude and mesh.shape["fsdp"] > 1 else 1
        else:
            factor = _shard_factor(variable, mesh, exclude)
        total += math.ceil(math.prod(value.shape) * per_element / factor)
    return total


def grpo_rows(cfg, mesh_plan) -> tuple[int, int]:
    """GRPO's training rows: (completions per row, the longest row's padded length)."""
    from jaxtune.objectives.grpo import GroupShape
    from jaxtune.rollout import training_row_buckets

    per_row = GroupShape.of(cfg, mesh_plan.batch_ranks).per_row
    return per_row, training_row_buckets(cfg, per_row)[-1]


def _rollout_shape(cfg, mesh_plan):
    """(GroupShape, prompt width: sequence_len rounded up to the sampler's prompt bucket, max_completion_length)."""
    from jaxtune.objectives.grpo import GroupShape
    from jaxtune.rollout import PROMPT_BUCKET

    width = -(-cfg.sequence_len // PROMPT_BUCKET) * PROMPT_BUCKET
    return GroupShape.of(cfg, mesh_plan.batch_ranks), width, cfg.grpo_settings.max_completion_length or 512


def rollout_cache_bytes(cfg, mcfg, mesh_plan, compute_bytes: int) -> int:
    """GRPO's KV cache while a rollout runs, per device (jaxtune/generate.py `sample`): the prompts'
    (once per prompt) and the completions' (max_completion_length slots per row), over every layer,
    split over the batch ranks and the tensor axis."""
    shape, width, max_new = _rollout_shape(cfg, mesh_plan)
    tensor = mesh_plan.tensor
    kv = mcfg.num_kv_heads * mcfg.head_dim / (tensor if mcfg.num_kv_heads % tensor == 0 else 1)
    slots = (shape.prompts * width + shape.completions * max_new) / (mesh_plan.data * mesh_plan.fsdp)
    return int(mcfg.num_layers * 2 * kv * slots * compute_bytes)


def rollout_bytes(cfg, mcfg, mesh_plan, compute_bytes: int) -> int:
    """GRPO's sampler, per device, while a rollout runs: its KV cache (`rollout_cache_bytes`), per row
    the float32 logits, the scores drawn from and the seen-token flags, and the prefill's layer working
    set over the prompts."""
    shape, width, _ = _rollout_shape(cfg, mesh_plan)
    batch_ranks = mesh_plan.data * mesh_plan.fsdp
    vocab = shape.completions / batch_ranks * mcfg.vocab_size * (4 + 4 + 1)
    prefill = shape.prompts / batch_ranks * width * (4 * mcfg.hidden_size + 3 * mcfg.intermediate_size) * compute_bytes
    return int(rollout_cache_bytes(cfg, mcfg, mesh_plan, compute_bytes) + vocab + prefill)


def activation_bytes(cfg, mcfg, mesh_plan, compute_bytes: int, micro_batch: int) -> int:
    """Estimated activation memory of one micro-batch's forward and backward, per device.

    Per token and layer the backward keeps (models/stack.py's remat policies): with `none` the
    named projections (q, k, v, the attention output, the mid-layer residual, the MLP's gate and
    up, a MoE's expert outputs: `SAVED_ACTIVATIONS`), with `dots` also the o/down projections, with
    `full` nothing; every policy keeps the layer's input (the scan's carry), and attention backends
    with their own VJP (blockwise, pallas, cudnn) keep their RoPE'd q and k. While a layer runs its
    backward, its tensors and their gradients are live once more."""
    from jaxtune.build import resolve_attention, resolve_chunked_loss, resolve_remat
    from jaxtune.kernels.attention import OWN_VJP
    from jaxtune.kernels.cross_entropy import chunk_elements

    from jaxtune.objectives import DATA_KINDS

    kind = DATA_KINDS.get(cfg.rl, "sft")
    if kind == "prompt":  # GRPO: rows of one prompt and per_row of its completions (objectives/grpo.py)
        per_row, seq = grpo_rows(cfg, mesh_plan)
        micro_batch = max(1, micro_batch // per_row)
    else:
        seq = cfg.sequence_len * (2 if kind != "sft" else 1)  # rows of two answers
    tokens = micro_batch * seq / mesh_plan.sequence
    tensor = mesh_plan.tensor
    d, inter, layers, vocab = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_layers, mcfg.vocab_size
    heads, kv_heads, hd = mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim
    split_heads = tensor if heads % tensor == 0 and kv_heads % tensor == 0 else 1
    q_dim, kv_dim = heads * hd / split_heads, kv_heads * hd / split_heads
    mlp = inter / (tensor if inter % tensor == 0 else 1)
    attention = resolve_attention(cfg)
    remat = resolve_remat(cfg)
    moe = mcfg.num_experts > 0
    routed = len(mcfg.stack_layers("layers")) if moe else 0  # the others have a dense MLP
    named = 2 * q_dim + 2 * kv_dim + d
    own_vjp = (q_dim + kv_dim) if attention in OWN_VJP else 0
    # a routed layer's named expert outputs (mlp_up, mlp_down) are its token copies'; `dots` keeps no
    # expert output (the grouped products have batch dimensions). Qwen2-MoE's shared expert, a dense
    # MLP every token takes, keeps its gate and up as a dense MLP does.
    shared = mcfg.shared_expert_intermediate_size
    copies_named = mcfg.experts_per_token * (2 * mcfg.moe_intermediate_size + d) + 2 * shared
    kept = {"none": layers * named + (layers - routed) * 2 * mlp + routed * copies_named,
            "dots": layers * (named + 2 * d) + (layers - routed) * 2 * mlp + routed * 2 * shared, "full": 0}[remat]
    layer_tensors = 4 * d + 2 * q_dim + 2 * kv_dim + max(3 * mlp if routed < layers else 0, 3 * shared)
    saved = tokens * (layers * (d + own_vjp) + kept) * compute_bytes
    working = tokens * layer_tensors * compute_bytes * 2
    if moe:  # the running layer's token copies (top-k per token) through its experts, and their gradients
        copies = tokens * mcfg.experts_per_token
        working += copies * (2 * d + 3 * mcfg.moe_intermediate_size) * compute_bytes * 2
        if mesh_plan.expert > 1:  # dispatch: a slot block per expert device for every copy, out and back
            working += 2 * mesh_plan.expert * copies * d * compute_bytes * 2
    local_heads = heads / split_heads
    if attention == "xla":  # float32 scores and probabilities of the layer that runs
        attn = micro_batch * local_heads * (seq / mesh_plan.sequence) * seq * 4 * 2
    else:  # the float32 log-sum-exp per query and layer
        attn = micro_batch * local_heads * (seq / mesh_plan.sequence) * 4 * layers
    if resolve_chunked_loss(cfg):
        loss = min(tokens * vocab, chunk_elements()) * 4 * 3
    else:
        loss = tokens * vocab * 4 * 3  # logits, softmax and their gradient in float32
    return int(saved + working + attn + loss)


def plan_memory(cfg, *, devices: int | None = None, device_memory: int | None = None,
                platform: str | None = None, abstract=None) -> MemoryPlan:
    """The per-device memory plan of a config on `devices` devices (default: those present).
    `abstract`: `_abstract_state(cfg)` when the caller has it (it does not depend on the mesh)."""
    from jax.sharding import AbstractMesh

    from jaxtune.optim import build_optimizer, full_precision_counterpart
    from jaxtune.parallel.mesh import AXES, plan_for

    platform = platform or jax.default_backend()
    mesh_plan = plan_for(cfg, devices)
    mesh = AbstractMesh((mesh_plan.data, mesh_plan.fsdp, mesh_plan.expert, mesh_plan.sequence, mesh_plan.tensor), AXES)
    frozen, trainable, mcfg, precision = abstract or _abstract_state(cfg)
    exclude = () if mesh_plan.stage == 3 else ("fsdp",)
    from jaxtune.peft.qlora import projection_paths

    nf4 = frozenset(projection_paths(mcfg.architecture, cfg.quantize_moe_experts)) if cfg.adapter == "qlora" \
        else frozenset()
    params_frozen = _state_bytes(frozen, mesh, exclude, nf4=nf4)
    params_trained = _state_bytes(trainable, mesh, exclude)
    gradients = _state_bytes(trainable, mesh)  # sharded like the optimizer state at every stage
    trained_total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(trainable))

    def state_bytes(config) -> int:
        if mesh_plan.offload_optimizer or not trained_total:
            return 0  # in host memory / nothing trained
        optimizer, _ = build_optimizer(config, 1000)
        opt_state = jax.eval_shape(optimizer.init, trainable)
        moments = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(opt_state))
        return int(moments * gradients / trained_total)  # the state shards as the trained parameters do

    opt_bytes = state_bytes(cfg)
    wide = full_precision_counterpart(cfg.optimizer)
    note = ""
    if wide and opt_bytes:
        wide_bytes = state_bytes(cfg.model_copy(update={"optimizer": wide}))
        note = (f"8-bit blockwise moments; {wide}'s 32-bit ones would take {_gib(wide_bytes).strip()}: "
                f"{_gib(wide_bytes - opt_bytes).strip()} saved")
    compute_bytes = np.dtype(precision.compute).itemsize

    def activations(mb):
        return activation_bytes(cfg, mcfg, mesh_plan, compute_bytes, mb)

    reference = _reference_bytes(cfg, trainable, mesh, exclude)
    fixed = params_frozen + params_trained + gradients + opt_bytes + reference
    runtime = CPU_RUNTIME_BYTES if platform == "cpu" else int(ACCELERATOR_RESERVE * (device_memory or 0))
    from jaxtune.objectives import DATA_KINDS

    rollout = rollout_bytes(cfg, mcfg, mesh_plan, compute_bytes) if DATA_KINDS.get(cfg.rl) == "prompt" else 0
    best = None
    if device_memory:
        budget = device_memory - fixed - runtime
        mb = 0
        while max(activations(mb + 1), rollout) <= budget and mb < 4096:
            mb += 1
        best = mb or None
    return MemoryPlan(mesh_plan, platform, params_frozen + params_trained, params_trained, gradients, opt_bytes,
                      reference, activations(cfg.micro_batch_size), runtime, cfg.micro_batch_size, device_memory,
                      best, note, rollout)


def _reference_bytes(cfg, trainable, mesh, exclude) -> int:
    """Per-device bytes of the reference's frozen copy (objectives/reference.initial_copy)."""
    from jaxtune.objectives.reference import initial_copy

    with_reference = cfg.rl in ("dpo", "ipo", "kto") or (cfg.rl in ("grpo", "gdpo") and cfg.beta)
    if not with_reference or cfg.precompute_ref_log_probs:  # the objectives with a reference (GRPO: beta != 0)
        return 0
    kept = initial_copy(trainable, fresh_adapters=bool(cfg.adapter) and not cfg.lora_model_dir, abstract=True)
    return 0 if kept is None else _state_bytes(kept, mesh, exclude)


def _meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes (Linux), None when unreadable."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None


def host_memory(platform: str) -> int | None:
    """This machine's memory for one device of `platform`: the RAM on CPU, the allocator's limit on
    an accelerator present here; None when unknown."""
    if platform == "cpu":
        return _meminfo("MemTotal")
    if jax.default_backend() == platform:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("bytes_limit")
    return None


def free_memory() -> int | None:
    """Memory free now for one device of the default backend: the RAM available on CPU
    (MemAvailable), the allocator's limit less what is in use on an accelerator; None when unknown."""
    if jax.default_backend() == "cpu":
        return _meminfo("MemAvailable")
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def suggest_meshes(cfg, devices: int, device_memory: int, platform: str) -> list[tuple[str, int]]:
    """Meshes (as config keys) that fit, smallest total memory first: FSDP degrees over the
    devices, tensor parallelism where the heads divide, context parallelism for long sequences."""
    out = []
    abstract = _abstract_state(cfg)  # the same model on every mesh: built once
    for tensor in (1, 2, 4, 8):
        for sequence in (1, 2, 4, 8):
            if devices % (tensor * sequence):
                continue
            for fsdp in sorted({1, devices // (tensor * sequence)}):
                keys = {"tensor_parallel_size": tensor, "context_parallel_size": sequence, "dp_shard_size": fsdp}
                trial = cfg.model_copy(update=keys)
                try:
                    p = plan_memory(trial, devices=devices, device_memory=device_memory, platform=platform,
                                    abstract=abstract)
                except JaxtuneError:
                    continue
                if p.total <= device_memory:
                    out.append((", ".join(f"{k}: {v}" for k, v in keys.items()), p.total))
    return sorted(out, key=lambda e: e[1])[:3]
