"""NF4 quantization (jaxtune.kernels.nf4): code book, error bounds, packing, double quant, layout."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels.nf4 import (
    DQ_BLOCK_SIZE,
    NF4_CODEBOOK,
    NF4Tensor,
    nf4_absmax,
    nf4_dequantize,
    nf4_nbytes,
    nf4_quantize,
)

# bitsandbytes functional.get_4bit_type("nf4")
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
MAX_HALF_GAP = float(np.max(np.diff(NF4_CODEBOOK.astype(np.float64)))) / 2


def _blocks(x: np.ndarray, bs: int) -> np.ndarray:
    flat = np.asarray(x, np.float32).reshape(-1)
    return np.pad(flat, (0, -flat.size % bs)).reshape(-1, bs)


def _normal(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_codebook():
    assert NF4_CODEBOOK.dtype == np.float32 and NF4_CODEBOOK.shape == (16,)
    np.testing.assert_array_equal(NF4_CODEBOOK, np.asarray(PUBLISHED_NF4, np.float32))
    assert np.all(np.diff(NF4_CODEBOOK) > 0)
    assert NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[-1] == 1.0 and 0.0 in NF4_CODEBOOK


def test_roundtrip_values_are_codes_and_error_bounded():
    w = _normal((96, 200))  # 19200 values = 300 blocks of 64
    t = nf4_quantize(w)
    assert t.codes.dtype == jnp.uint8 and t.codes.shape == (9600,)
    assert t.absmax.dtype == jnp.float32 and t.absmax.shape == (300,)
    assert (t.shape, t.dtype, t.block_size, t.double_quant) == ((96, 200), "float32", 64, False)
    out = np.asarray(nf4_dequantize(t))
    assert out.shape == w.shape and out.dtype == np.float32

    blocks, out_blocks = _blocks(w, 64), _blocks(out, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(t.absmax), absmax[:, 0])
    # Every value is absmax * (some code), and the nearest one: the error is the smallest possible.
    candidates = absmax[..., None] * NF4_CODEBOOK  # [blocks, 64, 16]
    assert np.all(np.min(np.abs(out_blocks[..., None] - candidates), axis=-1) <= 1e-6 * absmax)
    best = np.min(np.abs(blocks[..., None] - candidates), axis=-1)
    err = np.abs(out_blocks - blocks)
    np.testing.assert_allclose(err, best, atol=2e-6)
    assert np.all(err <= MAX_HALF_GAP * absmax * (1 + 1e-6))
    # N(0, 1) data: mean |error| ~0.073 (measured), RMS ~0.092.
    assert 0.04 < err.mean() < 0.1
    assert np.sqrt(np.mean(err**2)) < 0.12


def test_exact_code_values_roundtrip_exactly():
    rng = np.random.default_rng(1)
    scales = np.array([1.0, 0.5, 2.0, 0.03125], np.float32)[:, None]
    idx = rng.integers(0, 16, size=(4, 64))
    idx[:, 0] = 15  # absmax of each block is exactly the scale
    w = NF4_CODEBOOK[idx] * scales
    t = nf4_quantize(w)
    np.testing.assert_array_equal(np.asarray(nf4_dequantize(t)), w)
    np.testing.assert_array_equal(np.asarray(t.absmax), scales[:, 0])


def test_packing_nibble_order():
    # Element 2k goes to the high nibble, 2k+1 to the low one (bitsandbytes' layout).
    want_idx = np.array([15, 0, 7, 8, 1, 14, 3, 12])
    w = NF4_CODEBOOK[want_idx][None]  # one block of 8, absmax 1.0
    t = nf4_quantize(w, block_size=8)
    np.testing.assert_array_equal(np.asarray(t.codes), np.array([0xF0, 0x78, 0x1E, 0x3C], np.uint8))
    # Hand-built codes decode the same way.
    hand = NF4Tensor(jnp.array([0x0F, 0x87], jnp.uint8), jnp.array([2.0]), None, None, None, (4,), "float32", 4, False)
    np.testing.assert_array_equal(np.asarray(nf4_dequantize(hand)), 2.0 * NF4_CODEBOOK[[0, 15, 8, 7]])


def test_double_quant():
    w = _normal((256, 256), seed=2)  # 1024 blocks -> 4 second-level blocks
    single, double = nf4_quantize(w), nf4_quantize(w, double_quant=True)
    assert double.absmax is None and single.absmax_codes is None
    assert double.absmax_codes.dtype == jnp.uint8 and double.absmax_codes.shape == (1024,)
    assert double.absmax_scale.shape == (4,) and double.absmax_offset.shape == ()
    np.testing.assert_array_equal(np.asarray(double.codes), np.asarray(single.codes))

    true_absmax = np.asarray(single.absmax)
    got = np.asarray(nf4_absmax(double))
    offset = float(double.absmax_offset)
    np.testing.assert_allclose(offset, true_absmax.mean(), rtol=1e-6)
    scale = np.repeat(np.asarray(double.absmax_scale), DQ_BLOCK_SIZE)
    np.testing.assert_allclose(scale, np.abs(true_absmax - offset).reshape(4, -1).max(-1).repeat(256), rtol=1e-6)
    # Documented bound: half a linear int8 step of the block's range, plus float rounding.
    assert np.all(np.abs(got - true_absmax) <= scale / 254 + 1e-6 * true_absmax)
    assert np.max(np.abs(got - true_absmax) / true_absmax) < 0.01  # measured ~0.4%

    err_single = np.abs(np.asarray(nf4_dequantize(single)) - w)
    err_double = np.abs(np.asarray(nf4_dequantize(double)) - w)
    assert err_double.mean() < 1.01 * err_single.mean()  # measured +0.1%
    assert np.all(err_double <= err_single + (scale / 254 + 1e-6)[: w.size // 64].repeat(64).reshape(w.shape))

    assert nf4_nbytes(single) == 65536 // 2 + 1024 * 4
    assert nf4_nbytes(double) == 65536 // 2 + 1024 + 4 * 4 + 4
    assert nf4_nbytes(single) * 8 / w.size == 4.5
    assert nf4_nbytes(double) * 8 / w.size == pytest.approx(4.127, abs=1e-3)


@pytest.mark.parametrize("double_quant", [False, True])
def test_non_multiple_sizes(double_quant):
    for shape, bs in [((7, 9), 64), ((3, 5, 11), 16), ((1,), 64), ((300, 70), 64)]:
        w = _normal(shape, seed=3)
        t = nf4_quantize(w, block_size=bs, double_quant=double_quant)
        n_blocks = -(-w.size // bs)
        assert t.codes.shape == (n_blocks * bs // 2,)
        out = np.asarray(nf4_dequantize(t))
        assert out.shape == shape
        absmax = np.repeat(np.abs(_blocks(w, bs)).max(1), bs)[: w.size].reshape(shape)
        assert np.all(np.abs(out - w) <= MAX_HALF_GAP * absmax * 1.01 + 1e-6)


@pytest.mark.parametrize("double_quant", [False, True])
def test_stacked_equals_per_slice_and_slicing(double_quant):
    w = _normal((3, 40, 24), seed=4)
    t = nf4_quantize(w, double_quant=double_quant, batch_dims=1)
    assert t.shape == (40, 24) and t.batch_shape == (3,)
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(t))
    out = np.asarray(nf4_dequantize(t))
    assert out.shape == w.shape
    for i in range(3):
        alone = nf4_quantize(w[i], double_quant=double_quant)
        sliced = jax.tree.map(lambda a, i=i: a[i], t)
        assert isinstance(sliced, NF4Tensor) and sliced.batch_shape == ()
        for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(alone), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(nf4_dequantize(sliced)), out[i])
        np.testing.assert_array_equal(np.asarray(nf4_dequantize(alone)), out[i])

    # A scan over the stacked axis sees per-layer NF4Tensors: each step's sum is that layer's.
    def body(carry, layer: NF4Tensor):
        return carry, jnp.sum(nf4_dequantize(layer))

    _, sums = jax.lax.scan(body, None, t)
    # An fp32 sum of n terms is within (n - 1) * eps * sum|x| of the exact one, however the backend
    # orders it (Higham's bound); the values themselves are exact (checked above). A wrong layer or
    # block changes a layer's sum by a few % of sum|x|, ~100x this bound.
    exact = out.astype(np.float64).reshape(3, -1)
    bound = (exact.shape[1] - 1) * np.finfo(np.float32).eps * np.abs(exact).sum(1)
    np.testing.assert_allclose(np.asarray(sums, np.float64), exact.sum(1), rtol=0, atol=bound.max())


@pytest.mark.parametrize("double_quant", [False, True])
def test_zero_blocks(double_quant):
    w = _normal((4, 64), seed=5)
    w[1] = 0.0
    w[3, :] = 0.0
    t = nf4_quantize(w, double_quant=double_quant)
    out = np.asarray(nf4_dequantize(t))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[[1, 3]], 0.0)
    assert np.all(np.asarray(t.codes).reshape(4, 32)[[1, 3]] == 0x77)  # code 7 is 0.0
    np.testing.assert_array_equal(np.asarray(nf4_dequantize(nf4_quantize(np.zeros((5, 3), np.float32)))), 0.0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_under_outer_jit(double_quant):
    w = jnp.asarray(_normal((2, 33, 17), seed=6))
    t = nf4_quantize(w, double_quant=double_quant, batch_dims=1)

    @jax.jit
    def f(x):  # quantize + dequantize inlined into a larger traced computation
        q = nf4_quantize(x * 2.0, double_quant=double_quant, batch_dims=1)
        return q, nf4_dequantize(q, jnp.bfloat16) / 2

    t2, out = f(w)
    assert jax.tree.structure(t2) == jax.tree.structure(t)
    np.testing.assert_array_equal(np.asarray(t2.codes), np.asarray(t.codes))  # scale-invariant
    assert out.dtype == jnp.bfloat16 and out.shape == w.shape
    want = np.asarray(nf4_dequantize(t), np.float32)
    # bf16 dequantization rounds three times (code value, scale, product), each by at most half an ulp
    # (2^-9 relative), on any machine: 3 * 2^-9 = 5.9e-3 < 1e-2. A wrong scale or code is off by >10%.
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2, atol=1e-6)
    eval_t = jax.eval_shape(lambda x: nf4_quantize(x, double_quant=double_quant, batch_dims=1), w)
    assert nf4_nbytes(eval_t) == nf4_nbytes(t)


def test_bf16_input():
    w = jnp.asarray(_normal((64, 48), seed=7), jnp.bfloat16)
    t = nf4_quantize(w)
    assert t.dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(t.codes), np.asarray(nf4_quantize(w.astype(jnp.float32)).codes))
    out = nf4_dequantize(t, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == w.shape
    err = np.abs(np.asarray(out, np.float32) - np.asarray(w, np.float32))
    assert err.mean() < 0.1


def test_bad_arguments():
    with pytest.raises(ValueError):
        nf4_quantize(np.zeros(8, np.float32), block_size=7)
    with pytest.raises(ValueError):
        nf4_quantize(np.zeros(8, np.float32), batch_dims=2)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_matches_bitsandbytes_cpu():
    import bitsandbytes.functional as bnbf
    import torch

    w = _normal((128, 96), seed=8)
    packed, state = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    t = nf4_quantize(w)
    np.testing.assert_array_equal(np.asarray(t.absmax), state.absmax.float().numpy())
    ours, theirs = np.asarray(t.codes), packed.reshape(-1).numpy()
    assert np.mean(ours == theirs) > 0.999  # identical but for float ties at the thresholds
