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

- `add_lora(model, spec, key)`: put fresh adapters on the model (in place).
- `load_adapter(model, adapter_dir)`: put a PEFT adapter's weights on the model as trainable
  adapters (`lora_model_dir`: continue training it).
- `save_adapter(model, spec, out_dir)`: write a PEFT adapter directory.
- `merge_peft_adapter(model, adapter_dir)`: fold a PEFT adapter into the weights (used by
  `jaxtune generate --adapter`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file

from jaxtune.checkpoint.io import TensorToWrite, atomic_directory, read_json_file
from jaxtune.errors import JaxtuneError, ModelLoadError
from jax.ad_checkpoint import checkpoint_name

from jaxtune.models import family_for
from jaxtune.models.layers import Linear
from jaxtune.parallel.mesh import to_host
from jaxtune.peft.qlora import NF4Linear

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_targets(model) -> dict[str, str]:
    """The family's projections that take adapters (PEFT module name -> where it lives in a layer)."""
    return family_for(model.cfg.architecture).LORA_TARGETS


def module_path(model, name: str, layer: int) -> str:
    """PEFT's (HF's) module path of a layer's projection, e.g. `model.layers.3.self_attn.q_proj`."""
    parent = lora_targets(model)[name]
    ppath = ("layers", *parent.split("."), name, "kernel")
    return family_for(model.cfg.architecture).hf_tensor_name(ppath, layer).removesuffix(".weight")


def _whole_module(model, role: str) -> tuple[str, nnx.Variable, bool]:
    """A modules_to_save role (embed_tokens / lm_head) as (HF module name, parameter, HF-transposed)."""
    family = family_for(model.cfg.architecture)
    if role == "embed_tokens":
        return (family.hf_tensor_name((model.EMBED, "embedding"), None).removesuffix(".weight"),
                model.embedder.embedding, False)
    return family.hf_tensor_name((model.HEAD, "kernel"), None).removesuffix(".weight"), model.head.kernel, True


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
                   modules_to_save=tuple(cfg.lora_modules_to_save or ()))

    @classmethod
    def from_adapter_config(cls, config: dict, dropout: float | None = None) -> LoraSpec:
        targets = config.get("target_modules") or ()
        layers = config.get("layers_to_transform")
        return cls(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                   targets=targets if isinstance(targets, str) else tuple(targets),
                   dropout=float(config.get("lora_dropout") or 0.0) if dropout is None else dropout,
                   use_rslora=bool(config.get("use_rslora")),
                   layers=(layers,) if isinstance(layers, int) else (tuple(layers) if layers else None),
                   modules_to_save=tuple(config.get("modules_to_save") or ()))

    def layer_gates(self, model, name: str) -> np.ndarray:
        """1.0 for the layers whose `name` projection is adapted, else 0.0."""
        num_layers = model.cfg.num_layers
        gates = np.zeros(num_layers, np.float32)
        for i in range(num_layers):
            if self.layers is not None and i not in self.layers:
                continue
            if isinstance(self.targets, str):
                hit = re.fullmatch(self.targets, module_path(model, name, i)) is not None
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
            "alpha_pattern": {},
        }


def layer_linears(model) -> dict[str, Linear]:
    """The stacked layers' projections by PEFT name (the family's LORA_TARGETS)."""
    return {name: getattr(_holder(model, name), name) for name in lora_targets(model)}


def add_lora(model, spec: LoraSpec, key: jax.Array):
    """Give each targeted projection fresh adapters (A as PEFT initialises it, B = 0), in place."""
    num_layers = model.cfg.num_layers
    if not isinstance(spec.targets, str):
        unknown = [t for t in spec.targets if t not in lora_targets(model)]
        if unknown:
            raise JaxtuneError(f"lora target modules {', '.join(unknown)} are not projections of "
                               f"{model.cfg.architecture}'s layers; it has {', '.join(lora_targets(model))}")
    adapted = 0
    for i, (name, linear) in enumerate(layer_linears(model).items()):
        gates = spec.layer_gates(model, name)
        if not gates.any():
            continue
        adapted += 1
        bound = 1.0 / math.sqrt(linear.in_features)
        a = jax.random.uniform(jax.random.fold_in(key, i), (num_layers, linear.in_features, spec.r), jnp.float32,
                               -bound, bound)
        b = jnp.zeros((num_layers, spec.r, linear.out_features), jnp.float32)
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

    def merged_kernel(self, layer: int | None = None, dtype=jnp.float32) -> jax.Array:
        pick = (lambda a: a) if layer is None else (lambda a: a[layer])  # noqa: E731
        gate = 1.0 if self.lora_gate is None else pick(self.lora_gate.get_value())
        delta = pick(self.lora_a.get_value()).astype(jnp.float32) @ pick(self.lora_b.get_value()).astype(jnp.float32)
        return (super().merged_kernel(layer, jnp.float32) + (self.lora_scale * gate) * delta).astype(dtype)

    def _forward(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        y = super()._forward(x, rng)
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


class NF4LoraLinear(LoraLinear, NF4Linear):
    """QLoRA: a LoRA adapter on an NF4Linear (its kernel dequantized inside the matmul)."""


def _holder(model, name: str):
    """The module of the layers that holds projection `name` (e.g. model.layers.self_attn)."""
    holder = model.layers
    for part in lora_targets(model)[name].split("."):
        holder = getattr(holder, part)
    return holder


def _attach(model, name: str, spec: LoraSpec, a, b, gates: np.ndarray) -> None:
    """Model surgery: projection `name` becomes a LoRA projection with adapters a, b [layers, ...]."""
    holder = _holder(model, name)
    linear = getattr(holder, name)
    axes = linear.kernel.get_metadata().get("out_sharding") or ("layers", None, None)
    lora_a = nnx.LoRAParam(a, sharding_names=(axes[0], axes[1], None), eager_sharding=False)
    lora_b = nnx.LoRAParam(b, sharding_names=(axes[0], None, axes[2]), eager_sharding=False)
    gate = None if gates.all() else nnx.Variable(jnp.asarray(gates))
    cls = NF4LoraLinear if isinstance(linear, NF4Linear) else LoraLinear  # (new adapters replace old ones)
    setattr(holder, name, cls(linear, lora_a, lora_b, gate, spec.scale, spec.dropout))


def trainable_filter(model, spec: LoraSpec | None):
    """What trains: every parameter (full fine-tuning) or the adapters and modules_to_save."""
    if spec is None:
        return nnx.Param
    return nnx.Any(nnx.LoRAParam, *[nnx.All(nnx.Param, nnx.PathContains(n)) for n in modules_to_save_names(model, spec)])


def adapter_tensors(model, spec: LoraSpec) -> list[TensorToWrite]:
    """The adapter as PEFT names it: lora_A [r, in], lora_B [out, r] per adapted layer, and whole
    modules_to_save weights."""
    prefix = "base_model.model."
    tensors = []
    for name, linear in layer_linears(model).items():
        if not isinstance(linear, LoraLinear):
            continue
        gates = np.ones(model.cfg.num_layers) if linear.lora_gate is None else to_host(linear.lora_gate[...])
        for layer in np.flatnonzero(gates):
            base = f"{prefix}{module_path(model, name, int(layer))}"
            for kind, var in (("lora_A", linear.lora_a), ("lora_B", linear.lora_b)):
                value = var.get_value()
                shape = value.shape[1:][::-1]
                tensors.append(TensorToWrite(f"{base}.{kind}.weight", tuple(shape), np.dtype(np.float32),
                                             lambda v=value, i=int(layer): to_host(v[i]).astype(np.float32).T))
    for role in modules_to_save_names(model, spec):
        module, var, transpose = _whole_module(model, role)
        value = var.get_value()
        shape = value.shape[::-1] if transpose else value.shape
        tensors.append(TensorToWrite(f"{prefix}{module}.weight", tuple(shape), np.dtype(value.dtype),
                                     lambda v=value, t=transpose: to_host(v).T if t else to_host(v)))
    return tensors


def modules_to_save_names(model, spec: LoraSpec) -> list[str]:
    """The fully trained modules; on a tied model embed_tokens and lm_head are one tensor."""
    names = sorted(set(spec.modules_to_save))
    return ["embed_tokens"] if model.head is None and names else names


def save_adapter(model, spec: LoraSpec, out_dir: str | os.PathLike, *, base_model: str | None = None) -> Path:
    """Write `out_dir` as a PEFT adapter directory (atomically)."""
    config = spec.adapter_config(base_model)
    if spec.modules_to_save:
        config["modules_to_save"] = [_whole_module(model, role)[0].rsplit(".", 1)[-1]
                                     for role in modules_to_save_names(model, spec)]
        config["ensure_weight_tying"] = model.head is None
    tensors = adapter_tensors(model, spec)
    if jax.process_index() != 0:  # gather with process 0, which writes
        for t in tensors:
            t.produce()
        return Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        arrays = {t.name: np.ascontiguousarray(t.produce()) for t in tensors}
        from safetensors.numpy import save_file

        save_file(arrays, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def load_adapter(model, adapter_dir: str | os.PathLike, dropout: float | None = None) -> LoraSpec:
    """Attach a PEFT adapter's weights to `model` as trainable adapters; returns its spec."""
    config = read_adapter_config(adapter_dir)
    spec = LoraSpec.from_adapter_config(config, dropout)
    # modules_to_save by the family's module names (embed_in, lm_head, ...) -> the two roles
    names = {_whole_module(model, role)[0].rsplit(".", 1)[-1]: role
             for role in ["embed_tokens"] + (["lm_head"] if model.head is not None else [])}
    unknown = [m for m in spec.modules_to_save if m not in names]
    if unknown:
        raise ModelLoadError(f"{adapter_dir}: modules_to_save {unknown} are not the model's embedding or head "
                             f"({', '.join(names)})")
    spec = dataclasses.replace(spec, modules_to_save=tuple(names[m] for m in spec.modules_to_save))
    weights = _read_adapter_weights(adapter_dir)
    num_layers = model.cfg.num_layers
    pairs, whole = _split_adapter_weights(weights)
    for name, linear in layer_linears(model).items():
        gates = np.zeros(num_layers, np.float32)
        a = np.zeros((num_layers, linear.in_features, spec.r), np.float32)
        b = np.zeros((num_layers, spec.r, linear.out_features), np.float32)
        for layer in range(num_layers):
            parts = pairs.pop(module_path(model, name, layer), None)
            if parts is None:
                continue
            if set(parts) != {"lora_A", "lora_B"}:
                raise ModelLoadError(f"{adapter_dir}: layer {layer} {name} has only {', '.join(parts)}")
            if parts["lora_A"].shape != (spec.r, linear.in_features) or parts["lora_B"].shape != (
                    linear.out_features, spec.r):
                raise ModelLoadError(f"{adapter_dir}: layer {layer} {name} adapter shapes {parts['lora_A'].shape} "
                                     f"/ {parts['lora_B'].shape} do not fit r={spec.r} and the model")
            a[layer], b[layer], gates[layer] = parts["lora_A"].T, parts["lora_B"].T, 1.0
        if gates.any():
            _attach(model, name, spec, jnp.asarray(a), jnp.asarray(b), gates)
    if pairs:
        raise ModelLoadError(f"{adapter_dir}: adapter modules {', '.join(sorted(pairs)[:3])} match no projection "
                             "of the layers")
    roles = {f"{module}.weight": (var, transpose) for module, var, transpose in
             (_whole_module(model, role) for role in (["embed_tokens"] + (["lm_head"] if model.head is not None else [])))}
    for name, value in whole.items():
        if name not in roles:
            raise ModelLoadError(f"{adapter_dir}: tensor {name} matches no module of the model")
        var, transpose = roles[name]
        new = value.T if transpose else value
        if new.shape != var.get_value().shape:
            raise ModelLoadError(f"{adapter_dir}: {name} has shape {value.shape}, the model's differs")
        var.set_value(jnp.asarray(new, var.get_value().dtype))
    return spec


def _read_adapter_weights(adapter_dir) -> dict[str, np.ndarray]:
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights_path.exists():
        raise ModelLoadError(f"no {ADAPTER_WEIGHTS} in {adapter_dir} (looked for {weights_path})")
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{weights_path} is not a valid safetensors file ({e})") from None


def _split_adapter_weights(weights: dict[str, np.ndarray]):
    """({module: {lora_A/lora_B: array}}, {whole tensor name: array}) with PEFT's prefixes removed."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    whole: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _LORA_KEY.match(name)
        if m:
            kind = m.group("kind").replace("lora_embedding_", "lora_")
            pairs.setdefault(m.group("module"), {})[kind] = value.astype(np.float32)
        else:
            whole[name.replace(".modules_to_save.default", "").replace(".modules_to_save", "")] = value
    return pairs, whole

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.weight)?$")


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    config = read_json_file(path, "adapter_config.json")
    unsupported = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": config.get("bias", "none") != "none",
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ModelLoadError(f"{path}: adapter settings not supported: " + ", ".join(f"{k}={config.get(k)!r}" for k in bad))
    return config


def lora_scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def merge_peft_adapter(model, adapter_dir: str | os.PathLike):
    """Add the adapter's B @ A (scaled) to the matching kernels of `model`, in place; returns model."""
    config = read_adapter_config(adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    scale = lora_scale(config)
    cfg = model.cfg
    family = family_for(cfg.architecture)
    state = nnx.state(model, nnx.Param)
    flat = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(state)}
    by_hf_name = {}
    for ppath in flat:
        for layer in range(cfg.num_layers) if ppath[0] == "layers" else [None]:
            by_hf_name[family.hf_tensor_name(ppath, layer)] = (ppath, layer)

    pairs, whole = _split_adapter_weights(_read_adapter_weights(adapter_dir))
    for name, value in whole.items():
        if name not in by_hf_name:
            raise ModelLoadError(f"{weights_path}: tensor {name} matches no parameter of the model")
        _replace(flat, by_hf_name[name], value)
    for module, parts in pairs.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise ModelLoadError(f"{weights_path}: {module} has only one of lora_A/lora_B")
        a, b = parts["lora_A"], parts["lora_B"]
        target = f"{module}.weight"
        if target not in by_hf_name:
            raise ModelLoadError(f"{weights_path}: LoRA module {module} matches no parameter of the model")
        delta_out_in = scale * (b @ a)  # [out, in] as HF stores the weight; for embeddings [dim, vocab]
        ppath, layer = by_hf_name[target]
        delta = delta_out_in.T  # our layout: kernel [in, out]; embedding [vocab, dim]
        var = flat[ppath]
        value = var.get_value()
        current = value[layer] if layer is not None else value
        if current.shape != delta.shape:
            raise ModelLoadError(f"{weights_path}: LoRA delta for {module} has shape {delta.shape[::-1]}, "
                                 f"the weight has {current.shape[::-1]}")
        updated = (current.astype(jnp.float32) + delta).astype(value.dtype)
        var.set_value(value.at[layer].set(updated) if layer is not None else updated)
    nnx.update(model, state)
    return model


def _replace(flat, target, value: np.ndarray) -> None:
    ppath, layer = target
    var = flat[ppath]
    current = var.get_value()
    new = value.T if ppath[-1] == "kernel" else value
    slot = current[layer] if layer is not None else current
    if slot.shape != new.shape:
        raise ModelLoadError(f"adapter tensor for {ppath} has shape {value.shape}, expected {slot.shape}")
    new = jnp.asarray(new, current.dtype)
    var.set_value(current.at[layer].set(new) if layer is not None else new)
