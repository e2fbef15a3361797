"""Optimizers and learning-rate schedules by Axolotl's (HF's) names, built from optax.

The schedules are HF's `get_scheduler` formulas evaluated at the optimizer step (0-based, before
the update), so a run's learning rates match HF Trainer's step for step:

    warmup (w steps):  lr * s / w              (lr_quadratic_warmup: lr * (s / w)^2)
    linear:            lr * (T - s) / (T - w)
    cosine:            lr * (m + (1 - m) * 0.5 * (1 + cos(pi * p))),  p = (s - w) / (T - w)
    cosine_with_restarts (c cycles): as cosine with p -> (c * p) mod 1, and 0 once p >= 1
    constant / constant_with_warmup

where m is `cosine_min_lr_ratio` (or `cosine_eta_min / learning_rate`), 0 by default.

Weight decay follows HF Trainer: biases and norm scales are not decayed. With `loraplus_lr_ratio`
the LoRA B matrices learn `ratio` times faster than A (LoRA+). Gradients are clipped to
`max_grad_norm` (global norm) first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.logging import warn_once

Schedule = Callable[[jax.Array], jax.Array]

# name -> (update rule, moments stored 8-bit blockwise). bitsandbytes' `paged_*` page its state to host
# memory under pressure (a CUDA unified-memory feature); here the state stays in device memory, and
# `jaxtune plan` says beforehand whether it fits. torchao's AdamW8bit (`adamw_torch_8bit`) stores its
# moments in the same scheme (blocks of 256, bitsandbytes' dynamic code books).
_KIND = {"adamw_torch": ("adamw", False), "adamw_torch_fused": ("adamw", False), "adamw_hf": ("adamw", False),
         "adam": ("adamw", False), "paged_adamw_32bit": ("adamw", False),
         "adamw_8bit": ("adamw", True), "adamw_bnb_8bit": ("adamw", True), "paged_adamw_8bit": ("adamw", True),
         "adamw_torch_8bit": ("adamw", True),
         "lion": ("lion", False), "lion_8bit": ("lion", True), "paged_lion_8bit": ("lion", True),
         "adafactor": ("adafactor", False), "sgd": ("sgd", False), "muon": ("muon", False)}


def full_precision_counterpart(name: str) -> str | None:
    """The 32-bit optimizer with the same update rule as an 8-bit one (None: `name` is not 8-bit)."""
    kind, eight_bit = _KIND[name]
    return ("adamw_torch" if kind == "adamw" else kind) if eight_bit else None


def warmup_steps_for(cfg, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return 0


def build_schedule(cfg, total_steps: int) -> Schedule:
    """The learning rate at optimizer step s (HF's formulas; see the module docstring)."""
    peak, total = cfg.learning_rate, max(total_steps, 1)
    warmup = warmup_steps_for(cfg, total_steps)
    min_ratio = cfg.cosine_min_lr_ratio if cfg.cosine_min_lr_ratio is not None else (
        (cfg.cosine_eta_min or 0.0) / peak)
    kind = cfg.lr_scheduler
    cycles = cfg.cosine_restarts or 1

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        ramp = s / max(warmup, 1)
        warm = ramp * ramp if cfg.lr_quadratic_warmup else ramp
        progress = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if kind == "linear":
            after = jnp.maximum(0.0, (total - s) / max(total - warmup, 1))
        elif kind == "cosine":
            after = min_ratio + (1 - min_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        elif kind == "cosine_with_restarts":
            raw = (s - warmup) / max(total - warmup, 1)
            after = jnp.where(raw >= 1.0, 0.0, 0.5 * (1 + jnp.cos(jnp.pi * jnp.mod(cycles * raw, 1.0))))
        elif kind in ("constant", "constant_with_warmup"):
            after = jnp.ones_like(s)
        else:
            raise ValueError(f"unknown lr_scheduler {kind!r}")
        if kind == "constant":
            return peak * jnp.ones_like(s)
        return peak * jnp.where(s < warmup, warm, after)

    return schedule


# ---- 8-bit optimizer state: bitsandbytes' blockwise dynamic quantization ----------------------------
# Each moment tensor is cut into blocks of 256 consecutive elements (row-major, as bitsandbytes
# flattens it); a block stores its absolute maximum (float32) and one byte per element: the index of
# the nearest entry of a 256-entry code book after dividing by the block's absmax. First moments use
# the signed dynamic code book, second moments the unsigned one (`dynamic_code`). Tensors under 4096
# elements keep 32-bit moments (bitsandbytes' min_8bit_size). Each step dequantizes, runs the 32-bit
# update rule, and quantizes the new moments again -- bitsandbytes' blockwise 8-bit optimizer step.
# The codes keep their parameter's shape (and so its sharding); the absmax per block is replicated.
BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096


def dynamic_code(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic quantization map (`create_dynamic_map(signed, max_exponent_bits=7,
    total_bits=8)`): per decimal exponent 10^-6..10^0, linearly spaced fractions in [0.1, 1] whose count
    doubles with each exponent; plus 0 and 1; sorted. 256 float32 values in [-1, 1] ([0, 1] unsigned)."""
    exponent_bits, non_sign = 7, 7
    data: list[float] = []
    for i in range(exponent_bits):
        items = 2 ** (i + non_sign - exponent_bits) + 1 if signed else 2 ** (i + non_sign - exponent_bits + 1) + 1
        bounds = _linspace32(0.1, 1.0, items)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2)).astype(np.float32)
        scaled = (np.float32(10.0 ** (-(exponent_bits - 1) + i)) * means).astype(np.float32)
        data += scaled.tolist() + ((-scaled).tolist() if signed else [])
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.sort(np.asarray(data, dtype=np.float32))


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace in float32, to the bit: a float32 step, each point start + i * step (the first half)
    or end - (n - 1 - i) * step (the second) rounded once from double."""
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(n - 1))
    i = np.arange(n)
    return np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i)).astype(np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Blockwise:
    """A tensor stored 8-bit blockwise: `codes` (uint8, the tensor's shape), `absmax` (float32 per block)."""

    codes: jax.Array
    absmax: jax.Array


def quantize_blockwise(x: jax.Array, code: jax.Array) -> Blockwise:
    flat = x.reshape(-1).astype(jnp.float32)
    blocks = -(-flat.size // BLOCK_SIZE)
    tiles = jnp.pad(flat, (0, blocks * BLOCK_SIZE - flat.size)).reshape(blocks, BLOCK_SIZE)
    absmax = jnp.max(jnp.abs(tiles), axis=1)
    scaled = jnp.clip(tiles * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0)
    bounds = (code[:-1] + code[1:]) / 2  # nearest code: the midpoints between neighbours decide
    codes = jnp.searchsorted(bounds, scaled.reshape(-1), side="left").astype(jnp.uint8)
    return Blockwise(codes[: flat.size].reshape(x.shape), absmax)


def dequantize_blockwise(q: Blockwise, code: jax.Array) -> jax.Array:
    flat = code[q.codes.reshape(-1).astype(jnp.int32)]
    blocks = q.absmax.shape[0]
    tiles = jnp.pad(flat, (0, blocks * BLOCK_SIZE - flat.size)).reshape(blocks, BLOCK_SIZE) * q.absmax[:, None]
    return tiles.reshape(-1)[: flat.size].reshape(q.codes.shape)


def _store(x: jax.Array, code: jax.Array):
    if x.size < MIN_8BIT_SIZE:
        return x
    q = quantize_blockwise(x, code)
    if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding):  # eager init: codes shard as x
        q = Blockwise(jax.device_put(q.codes, x.sharding), q.absmax)
    return q


def blockwise_moments(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` (optax.scale_by_adam / scale_by_lion) with its moments `mu` (signed code book) and `nu`
    (unsigned) kept 8-bit blockwise between steps; the update itself runs in float32."""
    signed, unsigned = jnp.asarray(dynamic_code(True)), jnp.asarray(dynamic_code(False))
    codes = {"mu": signed, "nu": unsigned}

    def convert(state, fn):
        return state._replace(**{f: fn(getattr(state, f), codes[f]) for f in codes if hasattr(state, f)})

    def pack(tree, code):
        return jax.tree.map(lambda x: _store(x, code), tree)

    def unpack(tree, code):
        return jax.tree.map(lambda x: dequantize_blockwise(x, code) if isinstance(x, Blockwise) else x, tree,
                            is_leaf=lambda x: isinstance(x, Blockwise))

    def init(params):
        return convert(inner.init(params), pack)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, convert(state, unpack), params)
        return updates, convert(state, pack)

    return optax.GradientTransformation(init, update)


# ---- Muon with Axolotl's parameter split ----------------------------------------------------------------
def _muon_leaf(path: str, ndim: int) -> bool:
    """Axolotl's split: Muon for the layers' weight matrices; AdamW for embeddings, the head and vectors
    (norms, biases). The only matrices outside the (stacked) layers are the embedding and the head, in
    every family; a stacked layer's matrix has a leading layer axis (3 dims)."""
    return path.startswith("layers/") and ndim - 1 >= 2


def muon(cfg, lr) -> optax.GradientTransformation:
    """Axolotl's `optimizer: muon`: Muon (momentum 0.95, Nesterov, Newton-Schulz orthogonalized, update
    scaled by sqrt(max(1, fan_out / fan_in))) on the weight matrices, with decoupled weight decay on those
    HF Trainer decays; AdamW (adam_beta1/2, adam_epsilon) on the rest, embeddings and head undecayed."""
    from optax.contrib import MuonDimensionNumbers

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: "muon" if _muon_leaf(_path_str(p), x.ndim) else "adam", params)

    def dims(params):  # the last two axes are (input, output): Flax kernels are [..., in, out]
        return jax.tree.map(lambda x: MuonDimensionNumbers(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1), params)

    adam_decay = lambda params: param_labels(params, lambda p: decays(p) and p.startswith("layers/"))  # noqa: E731
    muon_decay = lambda params: param_labels(params, decays)  # noqa: E731
    return optax.multi_transform({
        "muon": optax.contrib.muon(lr, beta=0.95, nesterov=True, weight_decay=cfg.weight_decay,
                                   weight_decay_mask=muon_decay, muon_weight_dimension_numbers=dims),
        "adam": optax.adamw(lr, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                            weight_decay=cfg.weight_decay, mask=adam_decay),
    }, labels)


def _path_str(path) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        if name != "value":
            parts.append(str(name))
    return "/".join(parts)


def param_labels(params, label: Callable[[str], str]):
    """A tree like `params` holding label(path) for each leaf (paths like 'layers/self_attn/q_proj/kernel')."""
    return jax.tree_util.tree_map_with_path(lambda p, _: label(_path_str(p)), params)


def decays(path: str) -> bool:
    """HF Trainer decays every weight except biases and norm scales."""
    leaf = path.rsplit("/", 1)[-1]
    return leaf not in ("bias", "scale")


def masked_updates(masks: dict[str, np.ndarray]) -> optax.GradientTransformation:
    """Multiply the updates of the parameters named in `masks` ('layers/mlp/up_proj/kernel' -> a 0/1
    array broadcasting to the parameter) by their mask: what lies outside does not change."""
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, u: u * masks[_path_str(p)].astype(u.dtype) if _path_str(p) in masks else u, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg, total_steps: int, masks: dict[str, np.ndarray] | None = None
                    ) -> tuple[optax.GradientTransformation, Schedule]:
    """(optax transformation over the trainable parameters, schedule) from the config's keys. `masks`
    (jaxtune.peft.unfrozen): parameters that train only in part, their gradients and updates zeroed
    outside the mask."""
    name = cfg.optimizer
    kind, eight_bit = _KIND[name]
    if name.startswith("paged_"):
        warn_once(f"optimizer {name}: the state is not paged to host memory (a CUDA unified-memory feature); it "
                  f"stays on the device, as `jaxtune plan` counts it")
    schedule = build_schedule(cfg, total_steps)

    def make(lr) -> optax.GradientTransformation:
        decay_mask = lambda params: param_labels(params, decays)  # noqa: E731
        if kind == "adamw":
            scale = optax.scale_by_adam(b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon)
            return optax.chain(blockwise_moments(scale) if eight_bit else scale,
                               optax.add_decayed_weights(cfg.weight_decay, decay_mask), optax.scale_by_learning_rate(lr))
        if kind == "lion":
            scale = optax.scale_by_lion(b1=cfg.adam_beta1, b2=cfg.adam_beta2)
            return optax.chain(blockwise_moments(scale) if eight_bit else scale,
                               optax.add_decayed_weights(cfg.weight_decay, decay_mask), optax.scale_by_learning_rate(lr))
        if kind == "muon":
            return muon(cfg, lr)
        if kind == "adafactor":
            # HF's Adafactor as Axolotl builds it with an explicit lr: no relative step, no parameter scale.
            return optax.adafactor(lr, multiply_by_parameter_scale=False, clipping_threshold=1.0,
                                   weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask)
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask), optax.sgd(lr))

    if cfg.loraplus_lr_ratio:
        ratio = cfg.loraplus_lr_ratio
        inner = optax.multi_transform(
            {"a": make(schedule), "b": make(lambda s: ratio * schedule(s))},
            lambda params: param_labels(params, lambda p: "b" if p.endswith("lora_b") else "a"),
        )
    else:
        inner = make(schedule)
    if cfg.max_grad_norm:
        inner = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), inner)
    if masks:
        inner = optax.chain(masked_updates(masks), inner, masked_updates(masks))
    return inner, schedule
