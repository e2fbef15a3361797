"""HF checkpoint directories <-> jaxtune models.

Loading builds the model abstractly (`nnx.eval_shape`, no memory), then fills each parameter from
the safetensors files one parameter at a time: a stacked [layers, ...] parameter is assembled from
the per-layer HF tensors in one host buffer, moved to the device, and the buffer dropped. Peak host
memory is the final parameters plus one parameter.

Exporting walks the same name map backwards and writes shard by shard (`checkpoint.io`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxtune.checkpoint.io import (
    SafetensorsReader,
    TensorToWrite,
    aligned_empty,
    atomic_directory,
    read_json_file,
    write_safetensors,
)
from jaxtune.errors import ModelLoadError
from jaxtune.logging import warn_once
from jaxtune.models import family_for, tensor_parts
from jaxtune.parallel.mesh import to_host

_DTYPES = {
    "float32": np.dtype(np.float32), "fp32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "bf16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16), "fp16": np.dtype(np.float16),
}
# Buffers some checkpoints carry that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def as_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype from 'float32' / 'bf16' / jnp.bfloat16 / np.float32 ..."""
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16") from None
    return np.dtype(dtype)


def _dtype_name(dtype: np.dtype) -> str:
    return {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
            np.dtype(np.float16): "float16"}[np.dtype(dtype)]


def read_hf_config(path: str | os.PathLike) -> tuple[dict, str]:
    """(config.json as a dict, architecture name) with errors that say what is wrong."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {directory} does not exist")
    config_path = directory / "config.json"
    raw = read_json_file(config_path, "config.json")
    archs = raw.get("architectures") or []
    if not archs:
        raise ModelLoadError(f"{config_path} names no architectures")
    family_for(archs[0])  # raises with the supported list
    return raw, archs[0]


def check_remote_code(path: str | os.PathLike, trust: bool | None) -> None:
    """`trust_remote_code: true` asks transformers to run Python shipped with the checkpoint. jaxtune has
    its own implementation of each architecture and never executes repository code: where the
    checkpoint ships such code (config.json's `auto_map`), that is an error naming the file that would
    run; where it ships none, the key has no effect (one warning)."""
    if not trust:
        return
    config_path = Path(path) / "config.json"
    auto_map = read_json_file(config_path, "config.json").get("auto_map") or {} if config_path.exists() else {}
    refs = [ref for ref in auto_map.values() for ref in (ref if isinstance(ref, list) else [ref]) if ref]
    if refs:
        files = sorted({f"{ref.split('--')[-1].split('.')[0]}.py" for ref in refs})
        raise ModelLoadError(f"trust_remote_code: true would run {', '.join(files)} from {Path(path)} ({config_path} "
                             f"auto_map); jaxtune never executes repository code. Set trust_remote_code: false: the "
                             f"model loads with jaxtune's own implementation of its architecture when it has one")
    warn_once(f"trust_remote_code: true has no effect: {config_path} ships no code (no auto_map), and jaxtune "
              "never executes repository code")


def load_model_config(path: str | os.PathLike):
    """The ModelConfig of an HF directory (config.json parsed by transformers for its defaults)."""
    from transformers import AutoConfig

    raw, arch = read_hf_config(path)
    try:
        hf = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for bad configs
        raise ModelLoadError(f"transformers cannot read {Path(path) / 'config.json'}: {e}") from None
    cfg = family_for(arch).config_from_hf(hf, arch, json.dumps(raw))
    generation_path = Path(path) / "generation_config.json"
    if generation_path.exists():
        generation = read_json_file(generation_path, "generation_config.json")
        cfg = dataclasses.replace(cfg, source_generation_json=json.dumps(generation))
    return cfg


def load_tokenizer(path: str | os.PathLike):
    """The directory's tokenizer (transformers), or None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    if not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(path))


def _param_paths(state) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    return [(tuple(str(k) for k in path), var) for path, var in nnx.to_flat_state(state)]


def _checkpoint_dtype(reader: SafetensorsReader, raw: dict) -> np.dtype:
    for name in reader.names():
        if reader.dtype(name) in _DTYPES.values():
            return reader.dtype(name)
    return _DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), np.dtype(np.float32))


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = "float32",
    param_dtype: Any = None,
    attn_implementation: str = "xla",
    remat: str = "none",
    place: Callable[[tuple[str, ...], np.ndarray, tuple], jax.Array] | None = None,
):
    """Load an HF checkpoint directory: returns (model, tokenizer or None).

    `dtype` is the compute dtype; `param_dtype` the storage dtype (default: the checkpoint's own,
    so an export is bit-exact). `place(path, host_array, logical_axes)` puts each parameter on devices (default:
    `jax.device_put`, which adopts the host buffer without a copy on CPU; the parallel layer passes
    one that shards by the logical-axis rules).
    """
    model = load_model(path, dtype=dtype, param_dtype=param_dtype, attn_implementation=attn_implementation,
                       remat=remat, place=place)
    return model, load_tokenizer(path)


def load_model(path, *, dtype="float32", param_dtype=None, attn_implementation="xla", remat="none", place=None):
    """The model of an HF directory (see `load_pretrained`)."""
    cfg = load_model_config(path)
    arch = cfg.architecture
    family = family_for(arch)
    reader = SafetensorsReader(path)
    pdtype = as_dtype(param_dtype) if param_dtype is not None else _checkpoint_dtype(reader, cfg.source_config)
    cdtype = as_dtype(dtype)
    abstract = nnx.eval_shape(
        lambda: family.CausalLM(cfg, dtype=jnp.dtype(cdtype), param_dtype=jnp.dtype(pdtype), rngs=nnx.Rngs(0),
                                attn_implementation=attn_implementation, remat=remat)
    )
    graphdef, state = nnx.split(abstract)
    used: set[str] = set()
    place = place or (lambda _path, host, _axes: jax.device_put(host))
    for ppath, var in _param_paths(state):
        host = _assemble(reader, family, cfg, ppath, var.get_value(), pdtype, used)
        var.set_value(place(ppath, host, var.get_metadata()["out_sharding"]))
        del host
    unknown = sorted(n for n in set(reader.names()) - used if not n.endswith(_IGNORED_SUFFIXES)
                     and not (cfg.tie_word_embeddings and n == family.hf_tensor_name((abstract.HEAD, "kernel"), None)))
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ModelLoadError(
            f"{path}: tensors not used by {arch}: {', '.join(unknown[:5])}{more}; the checkpoint does not match "
            "its config.json"
        )
    return nnx.merge(graphdef, state)


def _assemble(reader, family, cfg, ppath, abstract, pdtype, used) -> np.ndarray:
    layers = cfg.stack_layers(ppath[0])
    transpose = ppath[-1] == "kernel"
    out = aligned_empty(abstract.shape, pdtype)
    for entry, layer in enumerate(layers) if layers is not None else [(None, None)]:
        for name, index in tensor_parts(family, cfg, ppath, layer):
            if name not in reader:
                raise ModelLoadError(f"tensor {name} is missing from {reader.directory}")
            target = (out if entry is None else out[entry])[index]
            expected = target.shape[::-1] if transpose else target.shape
            actual = reader.shape(name)
            if tuple(actual) != tuple(expected):
                raise ModelLoadError(
                    f"tensor {name} in {reader.file_of(name)} has shape {tuple(actual)}, but config.json implies "
                    f"{tuple(expected)}"
                )
            if not transpose and reader.dtype(name) == pdtype and target.flags.c_contiguous:
                reader.read_into(name, target)  # straight into the parameter buffer
            else:
                tensor = reader.get(name)
                target[...] = (tensor.T if transpose else tensor).astype(pdtype, copy=False)
            used.add(name)
    return out


def _owner(model, ppath: tuple[str, ...]):
    obj = model
    for key in ppath[:-1]:
        obj = getattr(obj, key)
    return obj


def hf_tensors(model, dtype: Any = None) -> list[TensorToWrite]:
    """The model's weights as HF tensors (names, shapes, producers), in HF's order.

    Projections that surgery changed (KERNEL_AS_STORED false: LoRA adapters, NF4 kernels) are written
    as their merged kernels (in the dtype the checkpoint had), so what is written is a plain model.
    """
    cfg = model.cfg
    family = family_for(cfg.architecture)
    # every parameter but the adapters, and every kernel (an NF4 one is a frozen variable, not a Param)
    state = nnx.state(model, nnx.Any(nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)),
                                     lambda path, _: str(getattr(path[-1], "key", path[-1])) == "kernel"))
    entries: list[tuple[int, int, TensorToWrite]] = []
    for ppath, var in _param_paths(state):
        value = var.get_value()
        transpose = ppath[-1] == "kernel"
        owner = _owner(model, ppath) if transpose else None
        merge = owner is not None and not owner.KERNEL_AS_STORED
        source_dtype = as_dtype(value.dtype)
        out_dtype = as_dtype(dtype) if dtype is not None else source_dtype
        layers = cfg.stack_layers(ppath[0])
        for entry, layer in enumerate(layers) if layers is not None else [(None, None)]:
            whole = owner.kernel_shape if merge else (value.shape if entry is None else value.shape[1:])  # one layer's
            for name, index in tensor_parts(family, cfg, ppath, layer):
                shape = np.empty(whole, dtype=np.bool_)[index].shape
                shape = tuple(shape[::-1]) if transpose else tuple(shape)

                def produce(value=value, entry=entry, index=index, transpose=transpose, out_dtype=out_dtype,
                            owner=owner, merge=merge):
                    if merge:
                        arr = to_host(owner.merged_kernel(entry, jnp.float32))[index]
                    else:
                        arr = to_host(value if entry is None else value[entry])[index]
                    return (arr.T if transpose else arr).astype(out_dtype)

                order = 0 if ppath[0] == model.EMBED else (2 if layers is None else 1)
                entries.append((order, -1 if layer is None else layer,
                                TensorToWrite(name, tuple(shape), out_dtype, produce)))
    entries.sort(key=lambda e: (e[0], e[1], e[2].name))
    return [e[2] for e in entries]


def save_pretrained(
    model,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    dtype: Any = None,
) -> Path:
    """Write the model as an HF directory (safetensors shards + index, config.json,
    generation_config.json, tokenizer files) atomically. `dtype` defaults to the parameters' dtype.
    Sharded parameters are gathered one tensor at a time; in a multi-host run every process takes
    part in the gathers and process 0 alone writes.
    """
    cfg = model.cfg
    tensors = hf_tensors(model, dtype)
    out_dtype = tensors[0].dtype
    config = cfg.source_config
    config.pop("torch_dtype", None)
    config.update(
        architectures=[cfg.architecture],
        dtype=_dtype_name(out_dtype),
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    if jax.process_index() != 0:  # gather with process 0, which writes
        for t in tensors:
            t.produce()
        return Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_safetensors(tmp, tensors, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(cfg), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def _generation_config(cfg) -> dict:
    """The source's generation_config.json if it had one, else one derived from the token ids."""
    source = json.loads(cfg.source_generation_json)
    if source:
        return source
    gen = {"_from_model_config": True}
    if cfg.bos_token_id is not None:
        gen["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        gen["eos_token_id"] = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids)
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    return gen
