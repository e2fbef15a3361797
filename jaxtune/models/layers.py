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
from jax.ad_checkpoint import checkpoint_name

from jaxtune.kernels.nf4 import nf4_dequantize

Axes = tuple[str | None, ...]


def param(value: Any, axes: Axes) -> nnx.Param:
    """A parameter annotated with logical axis names (sharding is applied later, by rule)."""
    return nnx.Param(value, sharding_names=axes, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, stddev: float = 0.02) -> jax.Array:
    return (stddev * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class QuantizedKernel(nnx.Variable):
    """A frozen kernel stored quantized (its value is a `jaxtune.kernels.nf4.NF4Tensor`)."""


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ LoRA), computed in `dtype`; kernel [in_features, out_features].

    With a LoRA adapter (`jaxtune.peft.lora.add_lora`), PEFT's formula:

        y = x @ W + scale * gate * (dropout(x) @ lora_a) @ lora_b      lora_a [in, r], lora_b [r, out]

    `gate` is 1 (or 0 for layers outside `peft_layers_to_transform`). The kernel may be a
    `QuantizedKernel` (QLoRA): it is dequantized to `dtype` inside the matmul.
    """

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
        # Adapter slots (filled by jaxtune.peft.lora.add_lora); declared as data so they can hold variables.
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_gate: nnx.Variable | None = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0

    def dense_kernel(self, dtype: Any = None) -> jax.Array:
        """The frozen kernel as a dense array (dequantized when stored quantized)."""
        dtype = dtype or self.dtype
        if isinstance(self.kernel, QuantizedKernel):
            # Stored as HF's [out, in] (the blocks run along `in`, as in bitsandbytes).
            return jnp.swapaxes(nf4_dequantize(self.kernel.get_value(), dtype), -1, -2)
        return self.kernel[...].astype(dtype)

    def merged_kernel(self, layer: int | None = None, dtype: Any = jnp.float32) -> jax.Array:
        """The kernel [in, out] of one layer of a stacked Linear (or the whole kernel when `layer` is
        None), dequantized and with the LoRA update folded in (computed in float32, cast to `dtype`)."""
        pick = (lambda a: a) if layer is None else (lambda a: a[layer])  # noqa: E731
        if isinstance(self.kernel, QuantizedKernel):
            w = jnp.swapaxes(nf4_dequantize(jax.tree.map(pick, self.kernel.get_value()), jnp.float32), -1, -2)
        else:
            w = pick(self.kernel.get_value()).astype(jnp.float32)
        if self.lora_a is not None:
            gate = 1.0 if self.lora_gate is None else pick(self.lora_gate.get_value())
            delta = pick(self.lora_a.get_value()).astype(jnp.float32) @ pick(self.lora_b.get_value()).astype(jnp.float32)
            w = w + (self.lora_scale * gate) * delta
        return w.astype(dtype)

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
        if self.lora_a is not None:
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
            y = y + delta * jnp.asarray(scale, self.dtype)
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


class LayerNorm(nnx.Module):
    """torch's LayerNorm with a bias: (x - mean) / sqrt(var + eps) * weight + bias, statistics in float32."""

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
