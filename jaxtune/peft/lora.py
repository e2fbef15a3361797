"""LoRA with PEFT's math: W' = W + s * B @ A, s = alpha / r (alpha / sqrt(r) with rsLoRA).

Adapters come by model surgery: a targeted projection (a `Linear` of the layers) is replaced by a
`LoraLinear` holding the same kernel and bias (an `NF4LoraLinear` for QLoRA's NF4Linear), so parameter
paths do not change. Adapters are a parameter type (`nnx.LoRAParam`), stacked over
layers like the kernels they adapt: `lora_a` [layers, in, r] and `lora_b` [layers, r, out] (PEFT
stores A as [r, in] and B as [out, r]; the export transposes). A is initialised as PEFT does
(kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B as zeros. Which layers are
adapted (`peft_layers_to_transform`, or a regex `target_modules`) is a 0/1 `lora_gate` per layer:
an ungated layer's adapter contributes nothing, gets zero gradients and is not exported.

What trains is chosen by type: `trainable_filter(spec)` is `nnx.LoRAParam` (plus the embedding /
LM head for `modules_to_save`).

`add_lora(model, spec, key)` puts fresh adapters on the model (in place); PEFT's adapter files are
read and written by jaxtune.peft.adapter.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import JaxtuneError
from jax.ad_checkpoint import checkpoint_name

from jaxtune.models import family_for
from jaxtune.models.layers import Linear
from jaxtune.models.moe import ExpertLinear, grouped_matmul
from jaxtune.peft.qlora import NF4ExpertLinear, NF4Linear

def stack_targets(model) -> dict[str, dict[str, str]]:
    """Each layer stack's projections that take adapters (PEFT module name -> where it lives in a layer):
    the family's LORA_TARGETS in `layers`; a mixture of experts' dense layers (`dense_layers`) have the
    family's DENSE_LORA_TARGETS (Qwen2/Qwen3-MoE: the attention's, see models/qwen3_moe.py)."""
    family = family_for(model.cfg.architecture)
    targets = {"layers": family.LORA_TARGETS}
    if model.cfg.dense_layers:
        targets["dense_layers"] = family.DENSE_LORA_TARGETS
    return targets


def lora_targets(model) -> dict[str, str]:
    """The projections that take adapters in any of the model's layers (PEFT module name -> where it lives)."""
    return {name: parent for targets in stack_targets(model).values() for name, parent in targets.items()}


def site_name(stack: str, name: str) -> str:
    """An adapter site: a projection or target parameter of a layer stack (`q_proj` in `layers`,
    `dense_layers/q_proj` in a mixture of experts' dense layers)."""
    return name if stack == "layers" else f"{stack}/{name}"


def split_site(site: str) -> tuple[str, str]:
    stack, _, name = site.rpartition("/")
    return stack or "layers", name


def stack_of(model, layer: int) -> str:
    return "dense_layers" if layer in model.cfg.dense_layers else "layers"


def module_path(model, name: str, layer: int) -> str:
    """PEFT's (HF's) module path of a layer's projection, e.g. `model.layers.3.self_attn.q_proj`."""
    stack = stack_of(model, layer)
    ppath = (stack, *stack_targets(model)[stack][name].split("."), name, "kernel")
    return family_for(model.cfg.architecture).hf_tensor_name(ppath, layer).removesuffix(".weight")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What adapters a model carries. `targets` is a list of module names or one regex (PEFT's rule:
    the regex must match the full module path, e.g. `model.layers.3.self_attn.q_proj`)."""

    r: int
    alpha: float
    targets: tuple[str, ...] | str
    dropout: float = 0.0
    use_rslora: bool = False
    layers: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] = ()
    # PEFT's target_parameters (Axolotl's lora_target_parameters): parameters adapted in place, a MoE's
    # stacked experts (`mlp.experts.gate_up_proj`: one adapter per expert) or its router (`mlp.gate.weight`)
    parameters: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @classmethod
    def from_config(cls, cfg, linear: tuple[str, ...]) -> LoraSpec:
        """The spec a config asks for; `linear`: the family's projections (lora_target_linear adapts all)."""
        if cfg.lora_target_linear:
            targets: tuple[str, ...] | str = tuple(linear)
            if cfg.lora_target_modules:
                extra = [cfg.lora_target_modules] if isinstance(cfg.lora_target_modules, str) else cfg.lora_target_modules
                targets = tuple(dict.fromkeys(list(targets) + [m for m in extra if m in linear]))
        elif isinstance(cfg.lora_target_modules, str):
            targets = cfg.lora_target_modules
        else:
            targets = tuple(cfg.lora_target_modules or ())
        layers = cfg.peft_layers_to_transform
        layers = (layers,) if isinstance(layers, int) else (tuple(layers) if layers is not None else None)
        return cls(r=cfg.lora_r, alpha=float(cfg.lora_alpha), targets=targets, dropout=cfg.lora_dropout,
                   use_rslora=cfg.peft_use_rslora, layers=layers,
                   modules_to_save=tuple(cfg.lora_modules_to_save or ()),
                   parameters=tuple(cfg.lora_target_parameters or ()))

    @classmethod
    def from_adapter_config(cls, config: dict, dropout: float | None = None) -> LoraSpec:
        targets = config.get("target_modules") or ()
        layers = config.get("layers_to_transform")
        return cls(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                   targets=targets if isinstance(targets, str) else tuple(targets),
                   dropout=float(config.get("lora_dropout") or 0.0) if dropout is None else dropout,
                   use_rslora=bool(config.get("use_rslora")),
                   layers=(layers,) if isinstance(layers, int) else (tuple(layers) if layers else None),
                   modules_to_save=tuple(config.get("modules_to_save") or ()),
                   parameters=tuple(config.get("target_parameters") or ()))

    def layer_gates(self, model, site: str) -> np.ndarray:
        """1.0 for the entries of the site's layer stack whose projection (or target parameter) is
        adapted, else 0.0 (`layers` selects by the layer's HF index)."""
        stack, name = split_site(site)
        layers = model.cfg.stack_layers(stack)
        gates = np.zeros(len(layers), np.float32)
        for i, layer in enumerate(layers):
            if self.layers is not None and layer not in self.layers:
                continue
            if name in lora_parameters(model):
                hit = name in self.adapted_parameters(model)
            elif isinstance(self.targets, str):
                hit = re.fullmatch(self.targets, module_path(model, name, layer)) is not None
            else:
                hit = name in self.targets
            gates[i] = float(hit)
        return gates

    def adapter_config(self, base_model: str | None) -> dict:
        """PEFT's adapter_config.json for this spec."""
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "use_rslora": self.use_rslora,
            "target_modules": self.targets if isinstance(self.targets, str) else sorted(self.targets),
            "layers_to_transform": list(self.layers) if self.layers is not None else None,
            "modules_to_save": list(self.modules_to_save) or None, "bias": "none", "fan_in_fan_out": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
            "alpha_pattern": {}, "target_parameters": sorted(self.parameters) or None,
        }

    def adapted_parameters(self, model) -> list[str]:
        """The family's LORA_PARAMETERS this spec adapts (PEFT's rule: a listed name equals the
        parameter's name or ends it after a dot); a listed name matching none is an error."""
        known = lora_parameters(model)
        hits = [p for p in known if any(p == t or p.endswith("." + t) for t in self.parameters)]
        unknown = [t for t in self.parameters if not any(p == t or p.endswith("." + t) for p in known)]
        if unknown:
            raise JaxtuneError(f"lora_target_parameters {', '.join(unknown)} name no parameter of "
                               f"{model.cfg.architecture}'s layers; it has {', '.join(known) or 'none'}")
        return hits


def lora_parameters(model) -> dict[str, str]:
    """The family's parameters that take adapters in place (PEFT target_parameters name -> the module
    holding it in a layer), in the order PEFT nests their wrappers (a module's parameter order)."""
    return getattr(family_for(model.cfg.architecture), "LORA_PARAMETERS", {})


def layer_linears(model) -> dict[str, Linear]:
    """The stacked layers' projections by adapter site (see site_name; the family's LORA_TARGETS)."""
    return {site_name(stack, name): getattr(*_holder(model, site_name(stack, name)))
            for stack, targets in stack_targets(model).items() for name in targets}


def layer_parameters(model) -> dict[str, Linear]:
    """The stacked layers' modules holding the family's LORA_PARAMETERS, by PEFT parameter name."""
    return {name: getattr(*_holder(model, name)) for name in lora_parameters(model)}


def add_lora(model, spec: LoraSpec, key: jax.Array):
    """Give each targeted projection fresh adapters (A as PEFT initialises it, B = 0), in place."""
    if not isinstance(spec.targets, str):
        unknown = [t for t in spec.targets if t not in lora_targets(model)]
        if unknown:
            dense = [t for t in unknown if t in getattr(family_for(model.cfg.architecture), "DENSE_LINEARS", {})]
            why = (f" (PEFT reads {', '.join(dense)} in this family's target_modules as the experts' names and adapts "
                   "the experts instead, so no dense MLP takes an adapter: adapt the experts with "
                   "lora_target_parameters)") if dense else ""
            raise JaxtuneError(f"lora target modules {', '.join(unknown)} are not projections of "
                               f"{model.cfg.architecture}'s layers; it has {', '.join(lora_targets(model))}{why}")
    adapted = 0
    for i, (site, linear) in enumerate(layer_linears(model).items()):
        gates = spec.layer_gates(model, site)
        if not gates.any():
            continue
        adapted += 1
        bound = 1.0 / math.sqrt(linear.in_features)
        a = jax.random.uniform(jax.random.fold_in(key, i), (len(gates), linear.in_features, spec.r), jnp.float32,
                               -bound, bound)
        b = jnp.zeros((len(gates), spec.r, linear.out_features), jnp.float32)
        _attach(model, site, spec, a, b, gates)
    if spec.parameters and spec.dropout > 0:
        raise JaxtuneError(f"lora_dropout={spec.dropout} cannot apply to lora_target_parameters (PEFT refuses it: "
                           "dropout cannot be factored out of an adapted parameter); set lora_dropout: 0")
    for i, name in enumerate(spec.adapted_parameters(model) if spec.parameters else ()):
        gates = spec.layer_gates(model, name)
        if not gates.any():
            continue
        adapted += 1
        module = layer_parameters(model)[name]
        lead = (len(gates), *module.kernel_shape[:-2])  # [layers] or [layers, experts]
        bound = 1.0 / math.sqrt(module.in_features)
        a = jax.random.uniform(jax.random.fold_in(key, 1000 + i), (*lead, module.in_features, spec.r), jnp.float32,
                               -bound, bound)
        b = jnp.zeros((*lead, spec.r, module.out_features), jnp.float32)
        _attach(model, name, spec, a, b, gates)
    if not adapted:
        raise JaxtuneError(f"lora target modules {spec.targets!r} match none of the model's projections "
                           f"({', '.join(lora_targets(model))})")
    return model


class LoraLinear(Linear):
    """A projection with a LoRA adapter, PEFT's formula:

        y = x @ W (+ bias) + scale * gate * (dropout(x) @ lora_a) @ lora_b     lora_a [in, r], lora_b [r, out]

    `gate` is 1 (or 0 for layers outside `peft_layers_to_transform`; `lora_gate` is None when every
    layer is adapted). Built from the Linear it replaces, whose kernel and bias it keeps."""

    KERNEL_AS_STORED = False

    def __init__(self, base: Linear, a: nnx.LoRAParam, b: nnx.LoRAParam, gate: nnx.Variable | None, scale: float,
                 dropout: float):
        self.adopt(base)
        self.lora_a, self.lora_b, self.lora_gate = a, b, gate
        self.lora_scale, self.lora_dropout = scale, dropout

    lora_merged = False  # the kernel holds the adapter (merge_for_sampling)

    def merged_kernel(self, layer: int | None = None, dtype=jnp.float32) -> jax.Array:
        pick = (lambda a: a) if layer is None else (lambda a: a[layer])  # noqa: E731
        gate = 1.0 if self.lora_gate is None else pick(self.lora_gate.get_value())
        delta = pick(self.lora_a.get_value()).astype(jnp.float32) @ pick(self.lora_b.get_value()).astype(jnp.float32)
        if layer is None and self.lora_gate is not None:  # the whole stack: one gate per layer
            gate = gate[:, None, None]
        return (super().merged_kernel(layer, jnp.float32) + (self.lora_scale * gate) * delta).astype(dtype)

    def _forward(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        y = super()._forward(x, rng)
        if self.lora_merged:
            return y
        h = x
        if rng is not None and self.lora_dropout > 0:
            keep = jax.random.bernoulli(rng, 1.0 - self.lora_dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0).astype(self.dtype)
        a = self.lora_a[...].astype(self.dtype)
        b = self.lora_b[...].astype(self.dtype)
        # The [tokens, r] hidden is saved for the backward pass (tiny); everything else of the
        # adapter is recomputed or follows from the named projection outputs.
        delta = checkpoint_name(h @ a, "lora_hidden") @ b
        scale = self.lora_scale if self.lora_gate is None else self.lora_scale * self.lora_gate[...]
        return y + delta * jnp.asarray(scale, self.dtype)


def merge_for_sampling(model) -> int:
    """Fold each LoRA adapter of a plain (unquantized) projection into its kernel, in place: its
    `merged_kernel` for the whole stack (kernel + scale * gate * A @ B, float32, cast back). The
    projection then runs one product instead of three. For a sampler's own copy of the parameters
    (GRPO's `rollout_merge_adapters`: traced inside the jitted rollout, the merged kernels live only
    while it runs); a model merged here no longer trains its adapters. Returns how many projections
    were merged (QLoRA's NF4 kernels and experts' adapters stay live: `unmerged_adapters`)."""
    merged = 0
    for _, module in model.iter_modules():
        if type(module) is not LoraLinear or module.lora_merged:
            continue
        module.kernel.set_value(module.merged_kernel(None, module.kernel.get_value().dtype))
        module.lora_merged = True
        merged += 1
    return merged


def unmerged_adapters(model) -> list[str]:
    """The adapted modules `merge_for_sampling` leaves live (their paths): QLoRA's NF4 projections and
    the adapters of stacked experts or other target parameters."""
    live = []
    for path, module in model.iter_modules():
        if isinstance(module, (LoraLinear, LoraExpertLinear)) and type(module) is not LoraLinear:
            live.append("/".join(str(p) for p in path))
    return live


def merged_kernel_bytes(model) -> int:
    """The bytes `merge_for_sampling` adds on the device that holds the most of them: a new copy of
    each merged kernel (sharded as the kernel is)."""
    per_device: dict = {}
    for _, module in model.iter_modules():
        if type(module) is not LoraLinear:
            continue
        value = module.kernel.get_value()
        shards = getattr(value, "addressable_shards", None)
        if not shards:
            per_device[None] = per_device.get(None, 0) + value.size * value.dtype.itemsize
            continue
        for shard in shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


class NF4LoraLinear(LoraLinear, NF4Linear):
    """QLoRA: a LoRA adapter on an NF4Linear (its kernel dequantized inside the matmul)."""


class LoraExpertLinear(ExpertLinear):
    """A MoE's stacked experts with one adapter per expert, as PEFT's target_parameters adapts them:
    expert e computes x @ (W_e + scale * gate * A_e @ B_e), A [E, in, r], B [E, r, out], run as grouped
    matmuls over the rows routed to each expert (no merged weights). No dropout (PEFT has none here)."""

    KERNEL_AS_STORED = False

    def __init__(self, base: ExpertLinear, a: nnx.LoRAParam, b: nnx.LoRAParam, gate: nnx.Variable | None,
                 scale: float, dropout: float = 0.0):
        self.adopt(base)
        self.num_experts = base.num_experts
        self.lora_a, self.lora_b, self.lora_gate, self.lora_scale = a, b, gate, scale

    def grouped(self, x, sizes, implementation, capacity=None):
        """The experts' products and their adapters' in one grouped pass (see moe.grouped_matmul)."""
        scale = self.lora_scale if self.lora_gate is None else self.lora_scale * self.lora_gate[...]
        return grouped_matmul(x, self.dense_kernel(), sizes, implementation, capacity,
                              lora=(self.lora_a[...], self.lora_b[...], scale))

    def merged_kernel(self, layer: int | None = None, dtype=jnp.float32) -> jax.Array:
        pick = (lambda a: a) if layer is None else (lambda a: a[layer])  # noqa: E731
        gate = 1.0 if self.lora_gate is None else pick(self.lora_gate.get_value())
        delta = jnp.einsum("...ir,...ro->...io", pick(self.lora_a.get_value()).astype(jnp.float32),
                           pick(self.lora_b.get_value()).astype(jnp.float32))
        if layer is None and self.lora_gate is not None:
            gate = gate[:, None, None, None]
        return (super().merged_kernel(layer, jnp.float32) + (self.lora_scale * gate) * delta).astype(dtype)


class NF4LoraExpertLinear(LoraExpertLinear, NF4ExpertLinear):
    """QLoRA on NF4 experts (quantize_moe_experts): per-expert adapters over dequantized kernels."""


def _holder(model, site: str):
    """(the module of a layer stack holding adapter site `site`, its attribute): a projection of
    LORA_TARGETS (`q_proj` -> model.layers.self_attn, "q_proj") or a module of LORA_PARAMETERS."""
    stack, name = split_site(site)
    targets = stack_targets(model)[stack]
    path = (f"{targets[name]}.{name}" if name in targets else lora_parameters(model)[name]).split(".")
    holder = getattr(model, stack)
    for part in path[:-1]:
        holder = getattr(holder, part)
    return holder, path[-1]


def _attach(model, site: str, spec: LoraSpec, a, b, gates: np.ndarray) -> None:
    """Model surgery: the projection at `site` becomes a LoRA projection with adapters a, b [layers, ...]."""
    holder, attr = _holder(model, site)
    linear = getattr(holder, attr)
    axes = linear.kernel.get_metadata().get("out_sharding") or ("layers",) + (None,) * (a.ndim - 1)
    lora_a = nnx.LoRAParam(a, sharding_names=(*axes[:-1], None), eager_sharding=False)
    lora_b = nnx.LoRAParam(b, sharding_names=(*axes[:-2], None, axes[-1]), eager_sharding=False)
    gate = None if gates.all() else nnx.Variable(jnp.asarray(gates))
    if isinstance(linear, ExpertLinear):
        cls = NF4LoraExpertLinear if isinstance(linear, NF4ExpertLinear) else LoraExpertLinear
    else:
        cls = NF4LoraLinear if isinstance(linear, NF4Linear) else LoraLinear  # (new adapters replace old ones)
    setattr(holder, attr, cls(linear, lora_a, lora_b, gate, spec.scale, spec.dropout))


def trainable_filter(model, spec: LoraSpec | None):
    """What trains: every parameter (full fine-tuning) or the adapters and modules_to_save."""
    if spec is None:
        return nnx.Param
    return nnx.Any(nnx.LoRAParam, *[nnx.All(nnx.Param, nnx.PathContains(n)) for n in modules_to_save_names(model, spec)])


def modules_to_save_names(model, spec: LoraSpec) -> list[str]:
    """The fully trained modules; on a tied model embed_tokens and lm_head are one tensor."""
    names = sorted(set(spec.modules_to_save))
    return ["embed_tokens"] if model.head is None and names else names
