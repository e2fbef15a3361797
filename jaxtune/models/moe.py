"""Mixture-of-experts layers shared by the MoE families (Mixtral, Qwen3-MoE).

    probs = softmax(router(x))                          float32, [tokens, E]
    top-k experts per token, weights = their probs (renormalized to sum 1 where the family says)
    y = sum over the k chosen experts of weight * down(act(gate(x)) * up(x))

Experts are stored stacked, `gate_up_proj` [E, D, 2I] and `down_proj` [E, I, D] per layer (and
[layers, ...] under the layer stack), and computed as a grouped matmul over the token copies sorted by
expert: every token meets only its k experts, none is dropped (no capacity), so the logits equal
transformers'. Two grouped matmuls (`grouped_matmul`):
- `ragged`: `jax.lax.ragged_dot` (GPU and TPU lower it to grouped kernels);
- `tiled`: rows padded per expert to whole tiles, each tile one matmul with its expert's weights in a
  scan (XLA:CPU lowers ragged_dot as a dense product of every row with every expert: E times the work).
The router statistics of each layer (how many top-k slots each expert got, the summed router
probabilities, the real tokens) are returned for the load-balancing loss, which is transformers'
`load_balancing_loss_func`: E * sum_e (slots_e / tokens) * (probs_e / tokens), over all layers together.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models.layers import ACTIVATIONS, Linear, _normal, param

GROUPED_MATMULS = ("ragged", "tiled")
TILE = 128  # rows per tile of the `tiled` grouped matmul


def default_grouped_matmul(platform: str | None = None) -> str:
    return "tiled" if (platform or jax.default_backend()) == "cpu" else "ragged"


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, implementation: str,
                   tile: int | None = None) -> jax.Array:
    """Rows of x [M, K], sorted by group (group g has group_sizes[g] consecutive rows), times their
    group's w [G, K, N] -> [M, N] (float32 accumulation, x's dtype out). Rows past sum(group_sizes)
    come out zero. `tile` (tiled only): rows per tile, default the power of two nearest the mean group
    size, between 8 and TILE."""
    if implementation == "ragged":
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32),
                                  preferred_element_type=jnp.float32).astype(x.dtype)
    if implementation != "tiled":
        raise ValueError(f"grouped matmul {implementation!r} unknown; choose one of {', '.join(GROUPED_MATMULS)}")
    m, g = x.shape[0], w.shape[0]
    if tile is None:
        tile = 2 ** round(math.log2(max(1.0, m / g)))
    tile = int(max(8, min(tile, TILE, -(-m // 8) * 8)))
    layout = _tile_layout(group_sizes.astype(jnp.int32), m, g, tile)
    return _tiled(x, w.astype(x.dtype), layout, tile)


class _Layout(NamedTuple):
    dest: jax.Array  # [M] each row's slot among the tiles (past the end for rows past the groups)
    real: jax.Array  # [M] rows inside the groups
    source: jax.Array  # [tiles * tile] the row in each slot (M: an empty slot)
    tile_group: jax.Array  # [tiles] the group whose rows fill each tile


def _tile_layout(sizes: jax.Array, m: int, g: int, tile: int) -> _Layout:
    """Each group's rows padded to whole tiles: at most M / tile + G tiles, each one group's. Both
    directions are gathers (XLA:CPU runs scatters one element at a time)."""
    starts = jnp.cumsum(sizes) - sizes
    padded = -(-sizes // tile) * tile
    padded_starts = jnp.cumsum(padded) - padded
    tiles = -(-m // tile) + g
    row = jnp.arange(m, dtype=jnp.int32)
    group = jnp.clip(jnp.searchsorted(jnp.cumsum(sizes), row, side="right"), 0, g - 1)
    real = row < jnp.sum(sizes)
    dest = jnp.where(real, padded_starts[group] + row - starts[group], tiles * tile)
    tile_group = jnp.clip(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(tiles) * tile, side="right"), 0, g - 1)
    slot = jnp.arange(tiles * tile, dtype=jnp.int32)
    slot_group = jnp.repeat(tile_group, tile)
    offset = slot - padded_starts[slot_group]
    source = jnp.where((offset < sizes[slot_group]) & (slot < jnp.sum(padded)), starts[slot_group] + offset, m)
    return _Layout(dest, real, source, tile_group)


def _to_tiles(x: jax.Array, layout: _Layout, tile: int) -> jax.Array:
    tiles = layout.tile_group.shape[0]
    return x.at[layout.source].get(mode="fill", fill_value=0).reshape(tiles, tile, -1)


def _from_tiles(y: jax.Array, layout: _Layout) -> jax.Array:
    flat = y.reshape(-1, y.shape[-1])
    return jnp.where(layout.real[:, None], flat.at[layout.dest].get(mode="fill", fill_value=0), 0)


def _per_tile(xt: jax.Array, w: jax.Array, tile_group: jax.Array, transpose: bool = False) -> jax.Array:
    """Each tile [tiles, tile, K] times its group's matrix (transposed: [N, K] -> K), as one batched
    product over the tiles with each tile's matrix gathered (a loop of per-tile products was 3-5x
    slower on CPUs: small dots, one after another; the gathered copy is tiles x K x N)."""
    spec = "tin,tkn->tik" if transpose else "tik,tkn->tin"
    return jnp.einsum(spec, xt, w[tile_group], preferred_element_type=jnp.float32).astype(xt.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled(x, w, layout, tile):
    return _from_tiles(_per_tile(_to_tiles(x, layout, tile), w, layout.tile_group), layout)


def _tiled_fwd(x, w, layout, tile):
    xt = _to_tiles(x, layout, tile)
    return _from_tiles(_per_tile(xt, w, layout.tile_group), layout), (xt, w, layout)


def _tiled_bwd(tile, res, dy):
    """dX tile by tile through each tile's group matrix; dW as one batched product over the tiles
    ([tiles, K, N]) summed into the groups (autodiff of the tile loop instead adds every tile's dW
    into a whole [G, K, N] buffer: G times the traffic)."""
    xt, w, layout = res
    dyt = _to_tiles(dy, layout, tile)
    dx = _from_tiles(_per_tile(dyt, w, layout.tile_group, transpose=True), layout)
    per_tile = jnp.einsum("tik,tin->tkn", xt, dyt, preferred_element_type=jnp.float32)
    dw = jax.ops.segment_sum(per_tile, layout.tile_group, num_segments=w.shape[0], indices_are_sorted=True).astype(w.dtype)
    return dx, dw, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


# The experts' computation when the mesh in context splits them (`expert` axis > 1): jaxtune.parallel
# registers its all-to-all dispatch here (models know no mesh), as kernels.attention takes ring attention.
_EXPERT_PARALLEL: list = []


def register_expert_parallel(fn) -> None:
    """`fn(layer, x [B, T, D], experts [B, T, k], weights [B, T, k], implementation)` -> [B, T, D] float32."""
    _EXPERT_PARALLEL[:] = [fn]


def _expert_ways() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or "expert" not in mesh.axis_names else mesh.shape["expert"]


class RouterStats(NamedTuple):
    """One layer's (or the sum of several layers') routing counts for the load-balancing loss."""

    slots: jax.Array  # [E] top-k assignments per expert, real tokens only
    probs: jax.Array  # [E] summed router probabilities, real tokens only
    tokens: jax.Array  # [] real tokens


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """transformers' load_balancing_loss_func from the statistics summed over the layers."""
    rows = jnp.maximum(stats.tokens, 1.0)
    return stats.slots.shape[-1] * jnp.sum((stats.slots / rows) * (stats.probs / rows))


class ExpertLinear(Linear):
    """E stacked projections: kernel [E, in, out] (a Linear's kernel per expert; no bias). Used through
    `dense_kernel` by the grouped matmul, never called on its own."""

    def __init__(self, experts: int, in_features: int, out_features: int, *, axes: tuple[str, str], dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        self.in_features, self.out_features, self.dtype, self.num_experts = in_features, out_features, dtype, experts
        self.kernel = param(_normal(rngs, (experts, in_features, out_features), param_dtype), ("experts", *axes))
        self.bias = None

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return (self.num_experts, self.in_features, self.out_features)

    def grouped(self, x: jax.Array, sizes: jax.Array, implementation: str) -> jax.Array:
        """Rows x [M, in] sorted by expert (sizes [E] rows each) through their experts -> [M, out]."""
        return grouped_matmul(x, self.dense_kernel(), sizes, implementation)


class Experts(nnx.Module):
    """The experts of one layer, as transformers holds them (`experts.gate_up_proj`, `experts.down_proj`)."""

    def __init__(self, experts: int, hidden: int, intermediate: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_up_proj = ExpertLinear(experts, hidden, 2 * intermediate, axes=("embed", "mlp"), **kw)
        self.down_proj = ExpertLinear(experts, intermediate, hidden, axes=("mlp", "embed"), **kw)


class SparseMoE(nnx.Module):
    """Router (`gate`, a plain projection [D, E]) and experts; `__call__(x, valid)` -> (y, RouterStats)."""

    GROUPED_MATMUL = None  # None: default_grouped_matmul(); tests and benchmarks set it
    WEIGHTS_IN_DTYPE = False  # the top-k weights rounded to the activations' dtype (Qwen3-MoE) or float32

    def __init__(self, cfg, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        e, d = cfg.num_experts, cfg.hidden_size
        self.top_k, self.num_experts, self.normalize = cfg.experts_per_token, e, cfg.norm_topk_prob
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.dtype = dtype
        self.gate = Linear(d, e, axes=("embed", None), use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(e, d, cfg.moe_intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(probs [N, E] float32, top-k weights [N, k] float32, top-k experts [N, k]) of tokens x [N, D]."""
        logits = self.gate(x).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        weights, experts = jax.lax.top_k(probs, self.top_k)
        if self.normalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        if self.WEIGHTS_IN_DTYPE:
            weights = weights.astype(self.dtype).astype(jnp.float32)
        return probs, weights, experts

    def __call__(self, x: jax.Array, valid: jax.Array, rngs: tuple | None = None) -> tuple[jax.Array, RouterStats]:
        lead, d = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, d).astype(self.dtype)
        probs, weights, experts = self.route(tokens)
        n, k = experts.shape
        mask = valid.reshape(-1).astype(jnp.float32)
        slots = jax.ops.segment_sum(jnp.repeat(mask, k), experts.reshape(-1), num_segments=self.num_experts)
        stats = RouterStats(slots=slots, probs=jnp.sum(probs * mask[:, None], axis=0), tokens=jnp.sum(mask))
        impl = self.GROUPED_MATMUL or default_grouped_matmul()
        if _expert_ways() > 1:
            if not _EXPERT_PARALLEL:
                raise RuntimeError("the mesh splits the experts, but no expert-parallel dispatch is registered: "
                                   "import jaxtune.parallel")
            y = _EXPERT_PARALLEL[0](self, x.astype(self.dtype), experts.reshape(*lead, k), weights.reshape(*lead, k),
                                    impl)
            return y.astype(self.dtype), stats
        # token copies sorted by expert (stable: a token's copies keep their order)
        flat_expert = experts.reshape(-1)
        order = jnp.argsort(flat_expert, stable=True)
        token_of = order // k
        sizes = jnp.bincount(flat_expert, length=self.num_experts)
        rows = tokens[token_of]
        fused = self.experts.gate_up_proj.grouped(rows, sizes, impl)
        gate, up = jnp.split(fused, 2, axis=-1)
        out = self.experts.down_proj.grouped(self.act(gate) * up, sizes, impl)
        # back to token-major order by a gather (the inverse permutation), then each token's k copies
        # weighed and added (no scatter: XLA:CPU runs those one element at a time)
        copies = out[jnp.argsort(order)].reshape(n, k, d).astype(jnp.float32)
        y = jnp.einsum("nkd,nk->nd", copies, weights.astype(jnp.float32))
        return y.astype(self.dtype).reshape(*lead, d), stats


def router_terms(model) -> tuple[jax.Array, jax.Array] | None:
    """(load-balancing loss, each layer's expert load [L, E]) of the first forward pass `model` made
    since it was built (the policy's pass of a training step; see DecoderLM.collect_router_stats), or
    None for a dense model. The load is each expert's share of the top-k slots times E: 1 everywhere
    when the router balances perfectly."""
    sown = nnx.pop(model, nnx.Intermediate)
    flat = [value for _, value in nnx.to_flat_state(sown)]
    if not flat:
        return None
    stats = flat[0].get_value() if hasattr(flat[0], "get_value") else flat[0]
    stats = stats[0] if isinstance(stats, tuple) else stats  # sow keeps a tuple of every call's value
    total = RouterStats(*(jnp.sum(a, axis=0) for a in stats))
    slots = stats.slots  # [L, E]
    load = slots / jnp.maximum(jnp.sum(slots, axis=-1, keepdims=True), 1.0) * slots.shape[-1]
    return load_balancing_loss(total), load
