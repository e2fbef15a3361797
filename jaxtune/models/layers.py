"""Layers shared by every model family: parameters with logical axes, Linear, RMSNorm, Embed.

Model code knows no mesh. Each parameter carries logical axis names (`vocab`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, and `layers` added by the layer stack); `jaxtune.parallel` maps
them to mesh axes with one table of rules.

Linear kernels are stored as [in_features, out_features] (HF stores [out, in]). Projections onto
heads keep the flattened `heads * head_dim` axis and name it after the heads, so sharding that axis
splits at head boundaries.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(value: Any, axes: Axes) -> nnx.Param:
    """A parameter annotated with logical axis names (sharding is applied later, by rule)."""
    return nnx.Param(value, sharding_names=axes, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, stddev: float = 0.02) -> jax.Array:
    return (stddev * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), computed in `dtype`; kernel [in_features, out_features]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        use_bias: bool,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(_normal(rngs, (in_features, out_features), param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.einsum("...d,df->...f", x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """HF's RMSNorm: normalize in float32, cast back, multiply by the weight."""

    def __init__(self, dim: int, *, eps: float, axis: str, dtype: Any, param_dtype: Any):
        self.eps, self.dtype = eps, dtype
        self.scale = param(jnp.ones((dim,), param_dtype), (axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        variance = jnp.mean(xf * xf, axis=-1, keepdims=True)
        normed = (xf * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * normed


class Embed(nnx.Module):
    """Token embedding [vocab, embed]; `attend` gives logits against the same table (tied head)."""

    def __init__(self, vocab_size: int, features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(_normal(rngs, (vocab_size, features), param_dtype), ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))
