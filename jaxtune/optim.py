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

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxtune.logging import warn_once

Schedule = Callable[[jax.Array], jax.Array]

# Optimizers whose 8-bit / paged state has no JAX counterpart here: trained as their 32-bit kind.
_EIGHT_BIT = {"adamw_8bit": "adamw", "adamw_bnb_8bit": "adamw", "paged_adamw_8bit": "adamw",
              "paged_adamw_32bit": "adamw", "lion_8bit": "lion", "paged_lion_8bit": "lion"}
_KIND = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adam": "adamw",
         "adafactor": "adafactor", "lion": "lion", "sgd": "sgd", **_EIGHT_BIT}


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


def build_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
    """(optax transformation over the trainable parameters, schedule) from the config's keys."""
    name = cfg.optimizer
    kind = _KIND[name]
    if name in _EIGHT_BIT:
        warn_once(f"optimizer {name}: bitsandbytes' 8-bit/paged states have no JAX counterpart; training with "
                  f"32-bit {kind} state (same update rule, more optimizer memory)")
    schedule = build_schedule(cfg, total_steps)

    def make(lr) -> optax.GradientTransformation:
        decay_mask = lambda params: param_labels(params, decays)  # noqa: E731
        if kind == "adamw":
            return optax.adamw(lr, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                               weight_decay=cfg.weight_decay, mask=decay_mask)
        if kind == "lion":
            return optax.lion(lr, b1=cfg.adam_beta1, b2=cfg.adam_beta2, weight_decay=cfg.weight_decay,
                              mask=decay_mask)
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
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), inner), schedule
    return inner, schedule
