"""PEFT adapter files: write a model's adapters as a PEFT adapter directory, read one onto a model (to
continue training it) or fold one into the weights (`jaxtune generate --adapter`). The adapters
themselves, and the model surgery that carries them, are jaxtune.peft.lora.
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
from jaxtune.errors import ModelLoadError
from jaxtune.models import family_for
from jaxtune.parallel.mesh import to_host
from jaxtune.models.moe import ExpertLinear
from jaxtune.peft.lora import (
    LoraExpertLinear,
    LoraLinear,
    LoraSpec,
    _attach,
    layer_linears,
    layer_parameters,
    lora_parameters,
    module_path,
    modules_to_save_names,
    site_name,
    split_site,
    stack_of,
    stack_targets,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _whole_module(model, role: str) -> tuple[str, nnx.Variable, bool]:
    """A modules_to_save role (embed_tokens / lm_head) as (HF module name, parameter, HF-transposed)."""
    family = family_for(model.cfg.architecture)
    if role == "embed_tokens":
        return (family.hf_tensor_name((model.EMBED, "embedding"), None).removesuffix(".weight"),
                model.embedder.embedding, False)
    return family.hf_tensor_name((model.HEAD, "kernel"), None).removesuffix(".weight"), model.head.kernel, True


def site_keys(model, spec: LoraSpec, layer: int) -> dict[str, str]:
    """PEFT's module key (without `base_model.model.`) of every adapter site of `layer`: the family's
    projections (`model.layers.3.self_attn.q_proj`) and the target parameters `spec` adapts. Parameters
    of one module nest as PEFT nests its wrappers: the first in the module's order innermost
    (`model.layers.3.mlp.experts.base_layer` for gate_up_proj when down_proj is adapted too)."""
    stack = stack_of(model, layer)
    keys = {site_name(stack, name): module_path(model, name, layer) for name in stack_targets(model)[stack]}
    family = family_for(model.cfg.architecture)
    by_module: dict[str, list[str]] = {}
    for name in (spec.adapted_parameters(model) if spec.parameters and stack == "layers" else ()):
        path = ("layers", *lora_parameters(model)[name].split("."), "kernel")
        by_module.setdefault(family.hf_tensor_name(path, layer).rpartition(".")[0], []).append(name)
    for module, names in by_module.items():
        names.sort(key=list(lora_parameters(model)).index)
        for i, name in enumerate(names):
            keys[name] = module + ".base_layer" * (len(names) - 1 - i)
    return keys


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's adapter as PEFT stores it. A projection: a [in, r], b [r, out] -> A [r, in], B [out, r].
    Stacked experts (PEFT's 3-D ParamWrapper): a [E, in, r], b [E, r, out] -> A [E*r, in] (row e*r + j),
    B [out, r*E] (column j*E + e)."""
    if a.ndim == 2:
        return a.T, b.T
    e, n_in, r = a.shape
    return a.transpose(0, 2, 1).reshape(e * r, n_in), b.transpose(2, 1, 0).reshape(b.shape[2], r * e)


def from_peft(big_a: np.ndarray, big_b: np.ndarray, experts: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`to_peft`'s inverse (`experts`: None for a projection)."""
    if experts is None:
        return big_a.T, big_b.T
    r = big_a.shape[0] // experts
    return (big_a.reshape(experts, r, big_a.shape[1]).transpose(0, 2, 1),
            big_b.reshape(big_b.shape[0], r, experts).transpose(2, 1, 0))


def adapted_modules(model) -> dict[str, object]:
    """Every adapter site's module (projections, then target parameters' modules) by site name."""
    return {**layer_linears(model), **layer_parameters(model)}


def adapter_tensors(model, spec: LoraSpec) -> list[TensorToWrite]:
    """The adapter as PEFT names it: lora_A / lora_B per adapted layer and site (see to_peft), and whole
    modules_to_save weights."""
    prefix = "base_model.model."
    tensors = []
    for site, module in adapted_modules(model).items():
        if not isinstance(module, (LoraLinear, LoraExpertLinear)):
            continue
        layers = model.cfg.stack_layers(split_site(site)[0])
        gates = np.ones(len(layers)) if module.lora_gate is None else to_host(module.lora_gate[...])
        for entry in np.flatnonzero(gates):
            base = f"{prefix}{site_keys(model, spec, layers[entry])[site]}"
            a_shape, b_shape = (x.shape for x in to_peft(np.empty(module.lora_a.get_value().shape[1:], np.bool_),
                                                          np.empty(module.lora_b.get_value().shape[1:], np.bool_)))

            def produce(i, entry=int(entry), module=module):
                pair = to_peft(to_host(module.lora_a.get_value()[entry]).astype(np.float32),
                               to_host(module.lora_b.get_value()[entry]).astype(np.float32))
                return np.ascontiguousarray(pair[i])

            tensors.append(TensorToWrite(f"{base}.lora_A.weight", a_shape, np.dtype(np.float32),
                                         lambda p=produce: p(0)))
            tensors.append(TensorToWrite(f"{base}.lora_B.weight", b_shape, np.dtype(np.float32),
                                         lambda p=produce: p(1)))
    for role in modules_to_save_names(model, spec):
        module, var, transpose = _whole_module(model, role)
        value = var.get_value()
        shape = value.shape[::-1] if transpose else value.shape
        tensors.append(TensorToWrite(f"{prefix}{module}.weight", tuple(shape), np.dtype(value.dtype),
                                     lambda v=value, t=transpose: to_host(v).T if t else to_host(v)))
    return tensors


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
    pairs, whole = _split_adapter_weights(weights)
    keys = [site_keys(model, spec, layer) for layer in range(model.cfg.num_layers)]
    for site, module in adapted_modules(model).items():
        stack, name = split_site(site)
        layers = model.cfg.stack_layers(stack)
        if site not in keys[layers[0]]:
            continue
        experts = module.num_experts if isinstance(module, ExpertLinear) else None
        lead = () if experts is None else (experts,)
        gates = np.zeros(len(layers), np.float32)
        a = np.zeros((len(layers), *lead, module.in_features, spec.r), np.float32)
        b = np.zeros((len(layers), *lead, spec.r, module.out_features), np.float32)
        want = to_peft(a[0], b[0])
        for entry, layer in enumerate(layers):
            parts = pairs.pop(keys[layer][site], None)
            if parts is None:
                continue
            if set(parts) != {"lora_A", "lora_B"}:
                raise ModelLoadError(f"{adapter_dir}: layer {layer} {name} has only {', '.join(parts)}")
            if parts["lora_A"].shape != want[0].shape or parts["lora_B"].shape != want[1].shape:
                raise ModelLoadError(f"{adapter_dir}: layer {layer} {name} adapter shapes {parts['lora_A'].shape} "
                                     f"/ {parts['lora_B'].shape} do not fit r={spec.r} and the model "
                                     f"({want[0].shape} / {want[1].shape})")
            a[entry], b[entry] = from_peft(parts["lora_A"], parts["lora_B"], experts)
            gates[entry] = 1.0
        if gates.any():
            _attach(model, site, spec, jnp.asarray(a), jnp.asarray(b), gates)
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
    for ppath in flat:  # HF name -> (parameter path, its entry in the layer stack or None)
        layers = cfg.stack_layers(ppath[0])
        for entry, layer in enumerate(layers) if layers is not None else [(None, None)]:
            by_hf_name[family.hf_tensor_name(ppath, layer)] = (ppath, entry)

    pairs, whole = _split_adapter_weights(_read_adapter_weights(adapter_dir))
    for name, value in whole.items():
        if name not in by_hf_name:
            raise ModelLoadError(f"{weights_path}: tensor {name} matches no parameter of the model")
        _replace(flat, by_hf_name[name], value)
    # target parameters (a MoE's experts and router) by their PEFT keys
    spec = LoraSpec.from_adapter_config(config)
    modules = adapted_modules(model)
    by_site = {}
    for entry, layer in enumerate(cfg.stack_layers("layers")):
        for name, key in site_keys(model, spec, layer).items():
            if name in lora_parameters(model):
                by_site[key] = (("layers", *lora_parameters(model)[name].split("."), "kernel"), entry, modules[name])
    for module, parts in pairs.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise ModelLoadError(f"{weights_path}: {module} has only one of lora_A/lora_B")
        a, b = parts["lora_A"], parts["lora_B"]
        target = f"{module}.weight"
        if module in by_site:
            ppath, layer, owner = by_site[module]
            experts = owner.num_experts if isinstance(owner, ExpertLinear) else None
            ours_a, ours_b = from_peft(a, b, experts)
            delta = scale * np.einsum("...ir,...ro->...io", ours_a, ours_b)  # our layout [(E,) in, out]
        elif target in by_hf_name:
            ppath, layer = by_hf_name[target]
            delta = (scale * (b @ a)).T  # HF's [out, in] -> our kernel [in, out]; embedding [vocab, dim]
        else:
            raise ModelLoadError(f"{weights_path}: LoRA module {module} matches no parameter of the model")
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
