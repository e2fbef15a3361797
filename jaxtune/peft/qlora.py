"""QLoRA: the layers' projection kernels stored as NF4 while the model loads.

`quantizing_place` wraps the loader's placement callback: each stacked projection kernel is
quantized (HF's [out, in] orientation, so the blocks run along `in` as in bitsandbytes) the moment
it is read, so the float copy of the whole model never exists at once: peak host memory is the
quantized model plus one float parameter. `mark_quantized` then does the model surgery: each
projection holding an NF4Tensor is replaced by an `NF4Linear` (same parameter path) whose frozen
`QuantizedKernel` is dequantized inside the matmul. Embeddings, norms, biases and the LM head stay
in float (bitsandbytes also keeps `lm_head` unquantized). LoRA on an NF4Linear is
`jaxtune.peft.lora.NF4LoraLinear`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.kernels.nf4 import NF4Tensor, nf4_dequantize, nf4_quantize
from jaxtune.models import family_for
from jaxtune.models.layers import Linear
from jaxtune.models.moe import ExpertLinear


class QuantizedKernel(nnx.Variable):
    """A frozen kernel stored quantized (its value is a `jaxtune.kernels.nf4.NF4Tensor`)."""


class NF4Linear(Linear):
    """A Linear whose frozen kernel is NF4, stored as HF's [out, in] (the blocks run along `in`, as in
    bitsandbytes) and dequantized to the compute dtype inside the matmul."""

    KERNEL_AS_STORED = False

    def __init__(self, base: Linear):
        self.adopt(base)
        if not isinstance(self.kernel, QuantizedKernel):
            self.kernel = QuantizedKernel(self.kernel.get_value())

    def dense_kernel(self, dtype: Any = None) -> jax.Array:
        return jnp.swapaxes(nf4_dequantize(self.kernel.get_value(), dtype or self.dtype), -1, -2)

    def merged_kernel(self, layer: int | None = None, dtype: Any = jnp.float32) -> jax.Array:
        value = self.kernel.get_value()
        if layer is not None:
            value = jax.tree.map(lambda a: a[layer], value)
        return jnp.swapaxes(nf4_dequantize(value, jnp.float32), -1, -2).astype(dtype)


def projection_paths(architecture: str, experts: bool = False) -> set[tuple[str, ...]]:
    """The parameter paths of a family's projections (its LORA_TARGETS, a MoE's dense layers'
    DENSE_LINEARS and its routed layers' OTHER_LINEARS, such as Qwen2-MoE's shared expert): what
    bitsandbytes quantizes, the nn.Linear modules of the layers. A mixture of experts' router and stacked experts are not
    nn.Linear in transformers, so they stay in float as bitsandbytes leaves them; with `experts`
    (Axolotl's quantize_moe_experts) the stacked experts are NF4 too."""
    family = family_for(architecture)
    paths = {("layers", *parent.split("."), name, "kernel") for name, parent in family.LORA_TARGETS.items()}
    # a mixture of experts' dense layers (stacked apart when the model has them)
    paths |= {("dense_layers", *parent.split("."), name, "kernel")
              for name, parent in getattr(family, "DENSE_LINEARS", {}).items()}
    paths |= {("layers", *path.split("."), "kernel") for path in getattr(family, "OTHER_LINEARS", ())}
    if experts:
        paths |= {("layers", *path.split("."), "kernel") for path in getattr(family, "EXPERTS", ())}
    return paths


def quantizing_place(place, *, architecture: str, double_quant: bool, block_size: int = 64, experts: bool = False):
    place = place or (lambda _path, host, _axes: jax.device_put(host))
    projections = projection_paths(architecture, experts)

    def put(path: tuple[str, ...], host: np.ndarray, axes):
        if tuple(path) in projections:  # every projection of the layers (as bitsandbytes)
            return nf4_quantize(np.swapaxes(host, -1, -2), block_size=block_size, double_quant=double_quant,
                                batch_dims=1)
        return place(path, host, axes)

    return put


class NF4ExpertLinear(NF4Linear, ExpertLinear):
    """A MoE's stacked experts with NF4 kernels (quantize_moe_experts): stored as HF's [E, out, in] per
    layer, dequantized to [E, in, out] for the grouped matmul."""

    def __init__(self, base: ExpertLinear):
        super().__init__(base)
        self.num_experts = base.num_experts


def mark_quantized(model):
    """Model surgery: each projection of the layers whose kernel holds an NF4Tensor becomes an
    NF4Linear, stacked experts an NF4ExpertLinear (in place); returns the model."""
    kinds = {Linear: NF4Linear, ExpertLinear: NF4ExpertLinear}
    stacks = [model.layers] + ([model.dense_layers] if model.cfg.dense_layers else [])
    swaps = [(module, name, child) for stack in stacks for _, module in nnx.iter_graph(stack)
             if isinstance(module, nnx.Module) for name, child in vars(module).items()
             if type(child) in kinds and isinstance(child.kernel.get_value(), NF4Tensor)]
    for module, name, child in swaps:
        setattr(module, name, kinds[type(child)](child))
    return model
