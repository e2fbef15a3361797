"""Expert parallelism: a mixture of experts' experts split over the mesh's `expert` axis.

With expert_parallel_size = P, device p of the `expert` axis holds experts [p * E/P, (p + 1) * E/P) of
every MoE layer (their parameters, LoRA adapters and optimizer state: logical axis `experts`), and the
axis is also a data-parallel axis for everything else (rows are split over data x fsdp x expert). A MoE
layer routes its tokens where they are (the router is replicated), then inside `shard_map`:

    dispatch   each device packs a copy of every (token, chosen expert) into the slot block of the
               device holding that expert, and one all-to-all over `expert` delivers them;
    compute    each device runs its experts on what it received, a grouped matmul over the rows
               sorted by local expert (models.moe.grouped_matmul, LoRA included);
    combine    a second all-to-all returns each row to the device it came from, which weighs the
               copies of each token by its routing weights and adds them up.

No token is dropped: each device's slot block to each other device is as large as everything it could
send (its tokens x top-k), so the dispatch buffers are P x that per device (`jaxtune plan` counts them).
The backward pass is the same exchange in reverse (all-to-all is its own transpose), and the expert
gradients stay on their devices. `moe_ffn` is registered with models.moe when jaxtune.parallel is
imported; model code knows no mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxtune.errors import JaxtuneError
from jaxtune.models import moe
from jaxtune.parallel.mesh import axes_dividing

AXIS = "expert"
BATCH_AXES = ("data", "fsdp", "expert")


def check_expert_parallel(ways: int, cfg, quantized_experts: bool = False) -> None:
    """expert_parallel_size against the model (a ModelConfig): it needs experts, and must divide them."""
    if ways == 1:
        return
    if quantized_experts:
        raise JaxtuneError("quantize_moe_experts with expert_parallel_size > 1 is not supported: NF4 experts are "
                           "sharded by their flat blocks, not by expert; split float experts instead")
    if not cfg.num_experts:
        raise JaxtuneError(f"expert_parallel_size={ways} needs a mixture-of-experts model; {cfg.architecture} is dense "
                           "(use dp_shard_size / dp_replicate_size for more data parallelism)")
    if cfg.num_experts % ways:
        raise JaxtuneError(f"expert_parallel_size={ways} does not divide the model's {cfg.num_experts} experts")


def _expert_spec(variable, ndim: int) -> PartitionSpec:
    """A per-layer experts' leaf split on its `experts` axis (the metadata names include the stacked
    `layers` axis, which the layer scan has taken off); anything without one replicated."""
    names = tuple(variable.get_metadata().get("out_sharding") or ())
    if "experts" not in names:
        return PartitionSpec()
    index = names.index("experts") - (len(names) - ndim)
    return PartitionSpec(*[AXIS if i == index else None for i in range(ndim)])


def moe_ffn(layer: moe.SparseMoE, x: jax.Array, experts: jax.Array, weights: jax.Array, implementation: str):
    """The experts' output for tokens x [B, T, D] routed to `experts` [B, T, k] with `weights` [B, T, k]
    (float32), computed where the experts live; [B, T, D] float32."""
    mesh = jax.sharding.get_abstract_mesh()
    ways = mesh.shape[AXIS]
    num_experts = layer.num_experts
    if num_experts % ways:
        raise JaxtuneError(f"expert_parallel_size={ways} does not divide the model's {num_experts} experts")
    local_experts = num_experts // ways
    batch = axes_dividing(x.shape[0], BATCH_AXES, mesh)
    length = "sequence" if axes_dividing(x.shape[1], ("sequence",), mesh) else None
    rows = PartitionSpec(batch, length, None)
    graphdef, state = nnx.split(layer.experts)
    state_specs = jax.tree.map(lambda v: v.replace(_expert_spec(v, jnp.ndim(v.get_value()))), state,
                               is_leaf=lambda v: isinstance(v, nnx.Variable))

    def local(x, experts, weights, state):
        b, t, d = x.shape
        k = experts.shape[-1]
        tokens = x.reshape(b * t, d)
        flat = experts.reshape(-1)  # [A] = tokens x k, token-major
        count = flat.shape[0]
        dest = flat // local_experts
        order = jnp.argsort(dest, stable=True)
        sizes = jnp.bincount(dest, length=ways)
        starts = jnp.cumsum(sizes) - sizes
        slot = jnp.zeros(count, jnp.int32).at[order].set(jnp.arange(count, dtype=jnp.int32) - starts[dest[order]])
        send = jnp.zeros((ways, count, d), tokens.dtype).at[dest, slot].set(tokens[jnp.arange(count) // k])
        send_expert = jnp.full((ways, count), local_experts, jnp.int32).at[dest, slot].set(flat % local_experts)
        recv = jax.lax.all_to_all(send, AXIS, 0, 0, tiled=False).reshape(ways * count, d)
        recv_expert = jax.lax.all_to_all(send_expert, AXIS, 0, 0, tiled=False).reshape(-1)  # E/P: empty slot
        by_expert = jnp.argsort(recv_expert, stable=True)
        group_sizes = jnp.bincount(recv_expert, length=local_experts + 1)[:local_experts]
        experts_here = nnx.merge(graphdef, state)
        # ways x count slots, about count of them used: the batched product sized for those
        capacity = moe.default_capacity(count, local_experts)
        out_sorted = layer.expert_rows(recv[by_expert], group_sizes, implementation, capacity, experts_here)
        out = jnp.zeros_like(out_sorted).at[by_expert].set(out_sorted).reshape(ways, count, d)
        back = jax.lax.all_to_all(out, AXIS, 0, 0, tiled=False)  # each row home, in its send slot
        mine = back[dest, slot].astype(jnp.float32) * weights.reshape(-1, 1)
        y = jax.ops.segment_sum(mine, jnp.arange(count) // k, num_segments=b * t)
        return y.reshape(b, t, d)

    return jax.shard_map(local, in_specs=(rows, rows, rows, state_specs), out_specs=rows, check_vma=False)(
        x, experts, weights.astype(jnp.float32), state)


moe.register_expert_parallel(moe_ffn)
