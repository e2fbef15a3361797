"""QLoRA: the layers' projection kernels stored as NF4 while the model loads.

`quantizing_place` wraps the loader's placement callback: each stacked projection kernel is
quantized (HF's [out, in] orientation, so the blocks run along `in` as in bitsandbytes) the moment
it is read, so the float copy of the whole model never exists at once: peak host memory is the
quantized model plus one float parameter. `mark_quantized` then turns those parameters into
frozen `QuantizedKernel` variables that `Linear` dequantizes inside its matmul. Embeddings, norms,
biases and the LM head stay in float (bitsandbytes also keeps `lm_head` unquantized).
"""

from __future__ import annotations

import jax
import numpy as np

from flax import nnx

from jaxtune.kernels.nf4 import NF4Tensor, nf4_quantize
from jaxtune.models.layers import Linear, QuantizedKernel


def quantizing_place(place, *, double_quant: bool, block_size: int = 64):
    place = place or (lambda _path, host, _axes: jax.device_put(host))

    def put(path: tuple[str, ...], host: np.ndarray, axes):
        if path[0] == "layers" and path[-1] == "kernel":  # every projection of the layers (as bitsandbytes)
            return nf4_quantize(np.swapaxes(host, -1, -2), block_size=block_size, double_quant=double_quant,
                                batch_dims=1)
        return place(path, host, axes)

    return put


def mark_quantized(model):
    """Replace kernels holding an NF4Tensor by frozen QuantizedKernel variables (in place)."""
    for _, linear in nnx.iter_graph(model.layers):
        if not isinstance(linear, Linear):
            continue
        value = linear.kernel.get_value()
        if isinstance(value, NF4Tensor):
            linear.kernel = QuantizedKernel(value)
    return model
