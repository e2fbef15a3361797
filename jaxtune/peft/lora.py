"""LoRA with PEFT's math: W' = W + s * B @ A, s = alpha / r (alpha / sqrt(r) with rsLoRA).

`merge_peft_adapter` folds a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors, as written by `peft` or by jaxtune) into a model's weights, used by
`jaxtune generate --adapter` and by exports of merged models.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file

from jaxtune.checkpoint.io import read_json_file
from jaxtune.errors import ModelLoadError
from jaxtune.models import family_for

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
    weights_path = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights_path.exists():
        raise ModelLoadError(f"no adapter_model.safetensors in {adapter_dir} (looked for {weights_path})")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{weights_path} is not a valid safetensors file ({e})") from None
    scale = lora_scale(config)
    cfg = model.cfg
    family = family_for(cfg.architecture)
    state = nnx.state(model, nnx.Param)
    flat = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(state)}
    by_hf_name = {}
    for ppath in flat:
        for layer in range(cfg.num_layers) if ppath[0] == "layers" else [None]:
            by_hf_name[family.hf_tensor_name(ppath, layer)] = (ppath, layer)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _LORA_KEY.match(name)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("kind")] = value.astype(np.float32)
            continue
        name = name.replace(".modules_to_save.default", "")
        if name not in by_hf_name:
            raise ModelLoadError(f"{weights_path}: tensor {key} matches no parameter of the model")
        _replace(flat, by_hf_name[name], value)
    for module, parts in pairs.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_key not in parts or b_key not in parts:
            raise ModelLoadError(f"{weights_path}: {module} has only one of {a_key}/{b_key}")
        a, b = parts[a_key], parts[b_key]
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
