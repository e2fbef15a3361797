"""Layers shared by every model family: parameters with logical axes, Linear, RMSNorm, LayerNorm, Embed.

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
    """y = x @ kernel (+ bias), computed in `dtype`; kernel [in_features, out_features].

    It knows nothing of adapters or quantization: those come by model surgery (the peft package), which
    replaces a targeted Linear by a subclass holding the same kernel and bias variables (so parameter
    paths stay the same) and overriding `dense_kernel`, `merged_kernel` and `_forward`. A subclass whose
    kernel is not what a plain Linear would export sets KERNEL_AS_STORED = False; exports then write
    its `merged_kernel`.
    """

    KERNEL_AS_STORED = True

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

    def adopt(self, other: "Linear") -> None:
        """Take over `other`'s shape, dtype, kernel and bias (model surgery: the replacement of `other`)."""
        self.in_features, self.out_features, self.dtype = other.in_features, other.out_features, other.dtype
        self.kernel, self.bias = other.kernel, other.bias

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """One layer's kernel as the model computes with it (whatever its storage)."""
        return (self.in_features, self.out_features)

    def dense_kernel(self, dtype: Any = None) -> jax.Array:
        """The kernel as a dense array in `dtype` (default: the compute dtype)."""
        return self.kernel[...].astype(dtype or self.dtype)

    def merged_kernel(self, layer: int | None = None, dtype: Any = jnp.float32) -> jax.Array:
        """The kernel [in, out] of one layer of a stacked Linear (or the whole kernel when `layer` is
        None) as the model computes with it (a subclass folds in what it adds), cast to `dtype`."""
        value = self.kernel.get_value()
        return (value if layer is None else value[layer]).astype(dtype)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        # Matmuls run on [tokens, features]: with the batch and sequence axes flattened, XLA:CPU
        # lays out the weight-gradient contractions without transposing the activations (a 3-D
        # einsum here made the LoRA backward ~25% slower on CPU).
        lead = x.shape[:-1]
        y = self._forward(x.astype(self.dtype).reshape(-1, x.shape[-1]), rng)
        return y.reshape(*lead, y.shape[-1])

    def _forward(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        y = x @ self.dense_kernel()
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


# HF activation names -> jax (transformers' ACT2FN: gelu is the exact erf form, gelu_new the tanh one).
ACTIVATIONS = {"silu": jax.nn.silu,
               "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
               "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
               "relu": jax.nn.relu}


class RMSNorm(nnx.Module):
    """HF's RMSNorm: normalize in float32, cast back, multiply by the weight."""

    UNIT_SCALE = 1.0  # the weight at which the norm only normalizes (what a fresh model starts from)

    def __init__(self, dim: int, *, eps: float, axis: str, dtype: Any, param_dtype: Any):
        self.eps, self.dtype = eps, dtype
        self.scale = param(jnp.full((dim,), self.UNIT_SCALE, param_dtype), (axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        variance = jnp.mean(xf * xf, axis=-1, keepdims=True)
        normed = (xf * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * normed


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is an offset, x * (1 + w), all in float32, then cast (HF stores w)."""

    UNIT_SCALE = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding [vocab, embed]; `attend` gives logits against the same table (tied head).

    `padding_idx` is torch's: the lookup of that token passes no gradient to its row (transformers'
    embeddings take the config's pad_token_id so, and a full fine-tune never moves that row through
    the lookup; a tied head still trains it)."""

    def __init__(self, vocab_size: int, features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 padding_idx: int | None = None):
        self.dtype = dtype
        self.padding_idx = padding_idx
        self.embedding = param(_normal(rngs, (vocab_size, features), param_dtype), ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        if self.padding_idx is None:
            return x
        return jnp.where((ids == self.padding_idx)[..., None], jax.lax.stop_gradient(x), x)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


class LayerNorm(nnx.Module):
    """torch's LayerNorm with a bias: (x - mean) / sqrt(var + eps) * weight + bias, statistics in float32."""

    UNIT_SCALE = 1.0

    def __init__(self, dim: int, *, eps: float, axis: str, dtype: Any, param_dtype: Any):
        self.eps, self.dtype = eps, dtype
        self.scale = param(jnp.ones((dim,), param_dtype), (axis,))
        self.bias = param(jnp.zeros((dim,), param_dtype), (axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centered = xf - mean
        variance = jnp.mean(centered * centered, axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(variance + self.eps)
        return (normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)
