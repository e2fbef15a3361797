"""NF4 storage for the frozen kernels of QLoRA.

NF4 ("4-bit NormalFloat", QLoRA: Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) stores
each weight as a 4-bit index into a 16-value code book: quantiles of N(0, 1) normalized to [-1, 1],
with an exact zero. Weights are split into blocks of `block_size` (default 64) consecutive values
of the row-major flattened tensor; each block keeps its absmax in float32 and each value the code
nearest to `x / absmax`. Two codes are packed per uint8 byte, bitsandbytes' layout: element 2k
in the HIGH nibble, element 2k+1 in the LOW nibble. Dequantization is `code[idx] * absmax`.

Double quantization (bitsandbytes' `bnb_4bit_use_double_quant`) also compresses the absmax
scales: as bitsandbytes does, their mean (`absmax_offset`) is subtracted and the centred values
are quantized in blocks of 256. Where bitsandbytes uses its dynamic 8-bit map, we use symmetric
linear int8: `q = round(127 * c / s)` with `s` the block's max |c|, stored as `q + 128` in a uint8.
The reconstructed absmax is within `s / 254` of the true one (half a step, plus float rounding),
i.e. every dequantized weight moves by at most `s / 254` more than with single quantization.
Storage: 4 + 32/64 = 4.5 bits per parameter single, 4 + 8/64 + 32/(64 * 256) ~ 4.127 double.

A leading `batch_dims` axes (stacked layers, `[layers, out, in]`) are quantized slice by slice,
and every child array keeps those axes, so an `NF4Tensor` can be sliced by `jax.lax.scan` or by
`jax.tree.map(lambda a: a[i], t)`; `shape` is the per-slice (trailing) shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

# Verbatim from bitsandbytes `functional.get_4bit_type("nf4")` (bitsandbytes-foundation/bitsandbytes,
# bitsandbytes/functional.py), which are `create_normal_map(offset=0.9677083)` rounded to float32.
NF4_CODEBOOK = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
# Decision thresholds between adjacent codes; a value exactly on one takes the lower code, as the
# bitsandbytes kernels do (`x > threshold` selects the upper code).
_NF4_MIDPOINTS = ((NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2).astype(np.float32)
DQ_BLOCK_SIZE = 256  # absmax values per second-level block (bitsandbytes' choice)


@dataclasses.dataclass(frozen=True)
class NF4Tensor:
    """An NF4-quantized array; see the module docstring. Children carry the leading batch axes.

    Exactly one of `absmax` (single quantization) or the `absmax_codes` / `absmax_scale` /
    `absmax_offset` triple (double quantization) is set; the others are None.
    """

    codes: jax.Array  # uint8 [*batch, n_pad // 2], two codes per byte, first one high
    absmax: jax.Array | None  # float32 [*batch, n_blocks]
    absmax_codes: jax.Array | None  # uint8 [*batch, n_dq_blocks * 256], int8 code + 128
    absmax_scale: jax.Array | None  # float32 [*batch, n_dq_blocks]
    absmax_offset: jax.Array | None  # float32 [*batch]
    shape: tuple[int, ...]  # per-slice shape, without the batch axes
    dtype: str  # dtype name of the original array
    block_size: int
    double_quant: bool

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-1])

    @property
    def n_blocks(self) -> int:
        return -(-math.prod(self.shape) // self.block_size)


jax.tree_util.register_dataclass(
    NF4Tensor,
    data_fields=["codes", "absmax", "absmax_codes", "absmax_scale", "absmax_offset"],
    meta_fields=["shape", "dtype", "block_size", "double_quant"],
)


def _pad_last(x: jax.Array, multiple: int) -> jax.Array:
    pad = -x.shape[-1] % multiple
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def _safe(scale: jax.Array) -> jax.Array:
    """Divisor that is 1 where `scale` is 0, so all-zero blocks quantize to code 0.0, not NaN."""
    return jnp.where(scale > 0, scale, 1.0)


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant", "batch_dims"))
def nf4_quantize(
    w: jax.Array | np.ndarray, block_size: int = 64, double_quant: bool = False, batch_dims: int = 0
) -> NF4Tensor:
    """Quantize `w` (any float dtype, jax or numpy) to NF4, each slice over the leading `batch_dims`
    axes independently. Compiled once per shape; inlined when called under an outer `jit`."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}")
    w = jnp.asarray(w)
    if not 0 <= batch_dims <= w.ndim:
        raise ValueError(f"batch_dims={batch_dims} out of range for an array of rank {w.ndim}")
    batch, shape = w.shape[:batch_dims], w.shape[batch_dims:]
    n_blocks = -(-math.prod(shape) // block_size)
    x = _pad_last(w.astype(jnp.float32).reshape(*batch, -1), block_size).reshape(*batch, n_blocks, block_size)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    xn = x / _safe(absmax)[..., None]
    # Nearest code = number of thresholds strictly below; a comparison-sum that XLA fuses into a
    # reduction (no [..., 16] distance tensor is materialized).
    idx = jnp.sum(xn[..., None] > jnp.asarray(_NF4_MIDPOINTS), axis=-1, dtype=jnp.uint8)
    idx = idx.reshape(*batch, -1)
    codes = (idx[..., 0::2] << 4) | idx[..., 1::2]
    meta = dict(shape=tuple(shape), dtype=jnp.dtype(w.dtype).name, block_size=block_size, double_quant=double_quant)
    if not double_quant:
        return NF4Tensor(codes, absmax, None, None, None, **meta)  # type: ignore[arg-type]
    offset = jnp.mean(absmax, axis=-1)
    centred = _pad_last(absmax - offset[..., None], DQ_BLOCK_SIZE).reshape(*batch, -1, DQ_BLOCK_SIZE)
    scale = jnp.max(jnp.abs(centred), axis=-1)
    q = jnp.round(centred / _safe(scale)[..., None] * 127.0)  # in [-127, 127]
    absmax_codes = (q + 128.0).astype(jnp.uint8).reshape(*batch, -1)
    return NF4Tensor(codes, None, absmax_codes, scale, offset, **meta)  # type: ignore[arg-type]


def nf4_absmax(t: NF4Tensor) -> jax.Array:
    """The per-block absmax scales, float32 [*batch, n_blocks] (reconstructed under double quant)."""
    if not t.double_quant:
        assert t.absmax is not None
        return t.absmax
    assert t.absmax_codes is not None and t.absmax_scale is not None and t.absmax_offset is not None
    q = t.absmax_codes.astype(jnp.float32).reshape(*t.batch_shape, -1, DQ_BLOCK_SIZE) - 128.0
    centred = (q * (t.absmax_scale[..., None] / 127.0)).reshape(*t.batch_shape, -1)[..., : t.n_blocks]
    # An absmax is never negative: clamping only moves a reconstruction closer to the true value.
    return jnp.maximum(centred + t.absmax_offset[..., None], 0.0)


@functools.partial(jax.jit, static_argnames=("dtype",))
def nf4_dequantize(t: NF4Tensor, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Rebuild the array, shape `batch_shape + t.shape`, in `dtype`. Jitted, fully vectorized."""
    batch = t.batch_shape
    idx = jnp.stack([t.codes >> 4, t.codes & 0xF], axis=-1).reshape(*batch, t.n_blocks, t.block_size)
    values = jnp.asarray(NF4_CODEBOOK)[idx] * nf4_absmax(t)[..., None]
    n = math.prod(t.shape)
    return values.reshape(*batch, -1)[..., :n].reshape(*batch, *t.shape).astype(dtype)


def nf4_nbytes(t: NF4Tensor) -> int:
    """Bytes of storage of all children (works on concrete arrays and on `jax.eval_shape` output)."""
    return sum(int(math.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(t))
