"""Rotary position embeddings with the HF rope types.

Frequencies follow `transformers.modeling_rope_utils` operation for operation in float32, so the
angles match HF's to the last bit where the arithmetic allows:

- `default`: inv_freq = 1 / theta^(2i/d)
- `linear`: inv_freq / factor
- `dynamic`: NTK-aware; theta grows with the current length L = max(position) + 1 once L exceeds
  max_position_embeddings: theta * ((factor * L / max_pos) - (factor - 1))^(d / (d - 2)).
  Computed from the positions of each call (traced), as HF does per forward.
- `llama3`: wavelength-dependent smoothing between inv_freq and inv_freq / factor.
- `yarn`: ramp between interpolated and extrapolated frequencies, plus an attention factor that
  scales cos and sin.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxtune.errors import ModelLoadError
from jaxtune.models.config import RopeConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def config_from_hf(hf: Any, params: dict | None = None) -> RopeConfig:
    """The RopeConfig of a transformers config (`rope_parameters`, or the legacy `rope_scaling`), or of
    `params`, one entry of a per-layer-type `rope_parameters` (Gemma 3's `full_attention` /
    `sliding_attention`)."""
    if params is None:
        params = dict(getattr(hf, "rope_parameters", None) or {})
        legacy = getattr(hf, "rope_scaling", None)
        if not params and legacy:
            params = dict(legacy)
    params = dict(params)
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise ModelLoadError("config.json has no rope_theta (neither in rope_parameters nor at top level)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "su":  # Phi-3's older name
        rope_type = "longrope"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )

    def opt_float(key: str) -> float | None:
        return None if params.get(key) is None else float(params[key])

    original = params.get("original_max_position_embeddings", getattr(hf, "original_max_position_embeddings", None))
    if rope_type == "longrope" and (original is None or not params.get("short_factor") or not params.get("long_factor")):
        raise ModelLoadError("longrope needs short_factor, long_factor and original_max_position_embeddings")

    def factors(key: str) -> tuple[float, ...] | None:
        return None if params.get(key) is None else tuple(float(f) for f in params[key])

    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=opt_float("factor"),
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=opt_float("low_freq_factor"),
        high_freq_factor=opt_float("high_freq_factor"),
        attention_factor=opt_float("attention_factor"),
        beta_fast=opt_float("beta_fast"),
        beta_slow=opt_float("beta_slow"),
        mscale=opt_float("mscale"),
        mscale_all_dim=opt_float("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        short_factor=factors("short_factor"),
        long_factor=factors("long_factor"),
    )


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def static_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim // 2], attention_scaling) for the rope types that do not depend on length."""
    t = rope.rope_type
    if t not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"rope type {t!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    inv_freq = _base_inv_freq(rope.theta, head_dim)
    if t in ("default", "dynamic"):
        return inv_freq, 1.0
    if t == "longrope":  # the short factors' frequencies; cos_sin switches to the long ones past the original
        return _longrope_inv_freq(rope, head_dim, rope.short_factor), _longrope_scaling(rope, max_position_embeddings)
    if t == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32), 1.0
    if t == "llama3":
        factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
        old_len = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        inv_llama = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * inv_llama / np.float32(factor) + smooth * inv_llama).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, inv_llama).astype(np.float32), 1.0
    # yarn
    factor = rope.factor
    original = rope.original_max_position_embeddings or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1
    dim, base = head_dim, rope.theta

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def _longrope_inv_freq(rope: RopeConfig, dim: int, factors) -> np.ndarray:
    """1 / (factor_i * theta^(2i/d)), as transformers' longrope."""
    if len(factors) != dim // 2:
        raise ModelLoadError(f"longrope has {len(factors)} factors for a rotary dimension of {dim} (needs {dim // 2})")
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.asarray(factors, np.float32) * np.float32(rope.theta) ** exponent)).astype(np.float32)


def _longrope_scaling(rope: RopeConfig, max_position_embeddings: int) -> float:
    """transformers' default attention factor: sqrt(1 + ln(factor) / ln(original)), factor = max / original."""
    if rope.attention_factor is not None:
        return rope.attention_factor
    original = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def cos_sin(positions: jnp.ndarray, rope: RopeConfig, head_dim: int, max_position_embeddings: int):
    """cos, sin of shape [batch, seq, head_dim] (float32) for integer `positions` [batch, seq]."""
    inv_freq, scaling = static_inv_freq(rope, head_dim, max_position_embeddings)
    inv = jnp.asarray(inv_freq)
    if rope.rope_type == "dynamic":
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_position_embeddings).astype(jnp.float32)
        base = rope.theta * ((rope.factor * seq_len / max_position_embeddings) - (rope.factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
        inv = 1.0 / (base**exponent)
    elif rope.rope_type == "longrope":  # the long factors once this call reaches past the original length
        long = jnp.asarray(_longrope_inv_freq(rope, head_dim, rope.long_factor))
        inv = jnp.where(jnp.max(positions) + 1 > rope.original_max_position_embeddings, long, inv)
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_partial_rope(x_bsnh: jnp.ndarray, cos_bsh: jnp.ndarray, sin_bsh: jnp.ndarray) -> jnp.ndarray:
    """RoPE on the first cos.shape[-1] features of each head (partial_rotary_factor), the rest as is."""
    rotary = cos_bsh.shape[-1]
    if rotary == x_bsnh.shape[-1]:
        return apply_rope(x_bsnh, cos_bsh, sin_bsh)
    return jnp.concatenate([apply_rope(x_bsnh[..., :rotary], cos_bsh, sin_bsh), x_bsnh[..., rotary:]], axis=-1)


def apply_rope(x_bsnh: jnp.ndarray, cos_bsh: jnp.ndarray, sin_bsh: jnp.ndarray) -> jnp.ndarray:
    """HF's rotate-half convention: x * cos + rotate_half(x) * sin, in x's dtype."""
    cos = cos_bsh[:, :, None, :].astype(x_bsnh.dtype)
    sin = sin_bsh[:, :, None, :].astype(x_bsnh.dtype)
    half = x_bsnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_bsnh[..., half:], x_bsnh[..., :half]], axis=-1)
    return x_bsnh * cos + rotated * sin
