"""From a config to the model that trains: precision, base weights (NF4 for QLoRA), adapters.

    model, spec, precision = build_model(cfg, tokenizer)

`spec` is the LoRA spec (None for full fine-tuning); what trains is `lora.trainable_filter(model,
spec)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxtune import bundled
from jaxtune.checkpoint.hf import check_remote_code, load_model, read_hf_config
from jaxtune.errors import JaxtuneError
from jaxtune.kernels.attention import IMPLEMENTATIONS, best_backend
from jaxtune.logging import info, warn_once
from jaxtune.peft import lora


@dataclasses.dataclass(frozen=True)
class Precision:
    compute: str  # dtype of activations and matmuls
    frozen: str  # storage dtype of frozen base weights
    trainable: str  # storage dtype of trained parameters (master weights)


def resolve_precision(cfg) -> Precision:
    platform = jax.default_backend()
    if cfg.fp16 or cfg.float16:
        warn_once("fp16/float16 are mapped to bf16: JAX trains in bfloat16 (same range as fp32, no loss scaling)")
    full = cfg.bf16 == "full" or bool(cfg.bfloat16) or bool(cfg.float16)
    if cfg.bf16 == "auto" and not (cfg.fp16 or full):
        use_bf16 = platform in ("gpu", "tpu", "cuda", "rocm")
        info(f"bf16: auto -> {'bf16' if use_bf16 else 'fp32'} on {platform}")
    else:
        use_bf16 = bool(cfg.bf16) or bool(cfg.fp16) or full
    if not use_bf16:
        return Precision("float32", "float32", "float32")
    return Precision("bfloat16", "bfloat16", "bfloat16" if full else "float32")


def resolve_attention(cfg) -> str:
    """jaxtune's backend for `attn_implementation`. `auto` and HF's fused-kernel names (sdpa,
    flash_attention_2/3, flex_attention, xformers) take the platform's best backend (`pallas` on
    GPUs and TPUs, `blockwise` elsewhere: memory linear in the sequence, masked tiles skipped; on CPU it is
    also the faster at 256 tokens); HF's `eager` is the plain reference, `xla`."""
    requested = cfg.attn_implementation
    if requested in IMPLEMENTATIONS:
        return requested
    chosen = "xla" if requested == "eager" else best_backend()
    if requested != "auto":
        info(f"attn_implementation: {requested} runs as jaxtune's {chosen!r} attention")
    return chosen


def resolve_remat(cfg) -> str:
    value = cfg.gradient_checkpointing
    if cfg.activation_offloading:
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
        if "pinned_host" in kinds:
            if cfg.activation_offloading == "disk":
                warn_once("activation_offloading: disk -> activations are offloaded to host memory, not to disk")
            if value not in (None, False, "none"):
                warn_once(f"activation_offloading replaces gradient_checkpointing: {value} (activations saved for "
                          "the backward go to host memory instead of being recomputed)")
            return "offload"
        warn_once(f"activation_offloading has no effect on {jax.default_backend()}: its devices have no pinned host "
                  f"memory; using gradient_checkpointing (full remat) for the same saving")
        return "full"
    if value is True:
        return "full"
    return value or "none"


def resolve_chunked_loss(cfg) -> bool:
    for value in (cfg.chunked_cross_entropy, cfg.use_cut_cross_entropy):
        if value is not None:
            return value
    return True


def reinitialize(model, path, seed: int) -> None:
    """Axolotl's reinit_weights: random weights as transformers initialises a new model of this config
    (`_init_weights`: kernels and embeddings ~ N(0, initializer_range), norm scales 1, biases 0), keeping
    each parameter's dtype and placement."""
    from flax import nnx

    std = float(read_hf_config(path)[0].get("initializer_range", 0.02))
    key = jax.random.key(seed)
    # a norm's scale starts where it only normalizes: 1, or 0 for Gemma's 1 + w
    units = {tuple(str(getattr(p, "key", p)) for p in path): getattr(module, "UNIT_SCALE", 1.0)
             for path, module in model.iter_modules()}
    for i, (name, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        value = var.get_value()
        names = tuple(str(getattr(p, "key", p)) for p in name)
        leaf = names[-1]
        if leaf in ("kernel", "embedding"):
            fresh = std * jax.random.normal(jax.random.fold_in(key, i), value.shape, jnp.float32)
        elif leaf == "scale":
            fresh = jnp.full(value.shape, units.get(names[:-1], 1.0), jnp.float32)
        else:
            fresh = jnp.zeros(value.shape, jnp.float32)
        var.set_value(jax.device_put(fresh.astype(value.dtype), value.sharding))
    info(f"reinit_weights: every weight of {path} is drawn afresh (N(0, {std:g}) kernels, unit norms)")


def build_model(cfg, tokenizer=None, *, key: jax.Array | None = None, place=None):
    """(model, LoRA spec or None, Precision) for a config. `place(path, host_array, logical_axes)`
    puts each base weight on devices as it is read (jaxtune.parallel.mesh.loading_place: straight
    to its shards on a mesh); default: the default device."""
    if not cfg.base_model:
        raise JaxtuneError("base_model is not set")
    path = bundled.resolve(cfg.base_model)
    check_remote_code(path, cfg.trust_remote_code)
    precision = resolve_precision(cfg)
    if cfg.adapter == "qlora":
        from jaxtune.peft.qlora import quantizing_place

        place = quantizing_place(place, architecture=read_hf_config(path)[1],
                                 double_quant=cfg.bnb_4bit_use_double_quant, experts=cfg.quantize_moe_experts)
    # Frozen weights are stored in the compute dtype; trained ones in the trainable dtype.
    param_dtype = precision.frozen if cfg.adapter else precision.trainable
    compute = cfg.bnb_4bit_compute_dtype if cfg.adapter == "qlora" and cfg.bnb_4bit_compute_dtype else precision.compute
    model = load_model(path, dtype=compute, param_dtype=param_dtype, attn_implementation=resolve_attention(cfg),
                       remat=resolve_remat(cfg), place=place)
    model.chunked_loss = resolve_chunked_loss(cfg)
    if cfg.reinit_weights:
        reinitialize(model, path, cfg.seed)
    if cfg.adapter == "qlora":
        from jaxtune.peft.qlora import mark_quantized

        mark_quantized(model)
    if tokenizer is not None and len(tokenizer) > model.cfg.vocab_size:
        raise JaxtuneError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                           f"{model.cfg.vocab_size}: growing the embeddings (tokens / special_tokens that are new) "
                           "is not supported in this release")
    spec = None
    if cfg.adapter:
        key = jax.random.key(cfg.seed) if key is None else key
        if cfg.lora_model_dir:
            from jaxtune.peft.adapter import load_adapter

            spec = load_adapter(model, bundled.resolve(cfg.lora_model_dir), dropout=cfg.lora_dropout)
            info(f"continuing the adapter in {cfg.lora_model_dir} (r={spec.r}, alpha={spec.alpha:g})")
            _warn_adapter_overrides(cfg, spec, tuple(lora.lora_targets(model)))
        else:
            spec = lora.LoraSpec.from_config(cfg, tuple(lora.lora_targets(model)))
            lora.add_lora(model, spec, key)
        if spec.modules_to_save:
            _float_modules(model, spec, precision)
    return model, spec, precision


def _warn_adapter_overrides(cfg, spec, linear: tuple[str, ...]) -> None:
    """With lora_model_dir the adapter's own r/alpha/targets/... apply; name config keys that differ."""
    given = lora.LoraSpec.from_config(cfg, linear)
    fields = {"lora_r": "r", "lora_alpha": "alpha", "peft_use_rslora": "use_rslora",
              "peft_layers_to_transform": "layers", "lora_modules_to_save": "modules_to_save",
              "lora_target_parameters": "parameters"}
    differ = [key for key, f in fields.items() if key in cfg.model_fields_set and getattr(given, f) != getattr(spec, f)]
    def names(targets):
        return targets if isinstance(targets, str) else sorted(targets)

    if (cfg.lora_target_modules or cfg.lora_target_linear) and names(given.targets) != names(spec.targets):
        differ.append("lora_target_modules/lora_target_linear")
    if differ:
        warn_once(f"{', '.join(differ)} not used: lora_model_dir's adapter_config.json sets them for the adapter "
                  "being continued")


def _float_modules(model, spec, precision: Precision) -> None:
    """modules_to_save train: store them in the trainable dtype."""
    for name in lora.modules_to_save_names(model, spec):
        var = model.embedder.embedding if name == "embed_tokens" else model.head.kernel
        var.set_value(var.get_value().astype(jnp.dtype(precision.trainable)))
