"""Mixture-of-experts layers shared by the MoE families (Mixtral, Qwen3-MoE, Qwen2-MoE).

    probs = softmax(router(x))                          float32, [tokens, E]
    top-k experts per token, weights = their probs (renormalized to sum 1 where the family says)
    y = sum over the k chosen experts of weight * down(act(gate(x)) * up(x))

Experts are stored stacked, `gate_up_proj` [E, D, 2I] and `down_proj` [E, I, D] per layer (and
[layers, ...] under the layer stack), and computed as a grouped matmul over the token copies sorted by
expert: every token meets only its k experts, none is dropped (no capacity), so the logits equal
transformers'. Two grouped matmuls (`grouped_matmul`):
- `ragged`: `jax.lax.ragged_dot` (GPU and TPU lower it to grouped kernels);
- `batched` (CPUs: XLA:CPU lowers ragged_dot as a dense product of every row with every expert, E times
  the work): each expert's first C rows (C = the mean rows per expert, rounded up to 8) gathered into
  [E, C, D] blocks and multiplied by the stacked weights as one batched matmul, the rows past C in a
  loop of tiles, each against its expert's matrix (with balanced routing the loop is short or empty).
The router statistics of each layer (how many top-k slots each expert got, the summed router
probabilities, the real tokens) are returned for the load-balancing loss, which is transformers'
`load_balancing_loss_func`: E * sum_e (slots_e / tokens) * (probs_e / tokens), over all layers together.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtune.models.layers import ACTIVATIONS, Linear, _normal, param

GROUPED_MATMULS = ("ragged", "batched")
OVERFLOW_TILE = 64  # rows per overflow tile of the `batched` grouped matmul


def default_grouped_matmul(platform: str | None = None) -> str:
    return "batched" if (platform or jax.default_backend()) == "cpu" else "ragged"


def default_capacity(rows: int, groups: int) -> int:
    """Rows per group in the batched part: the mean group size (rows / groups), rounded up to 8."""
    return max(8, -(-(-(-rows // groups)) // 8) * 8)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, implementation: str,
                   capacity: int | None = None, tile: int | None = None, lora: tuple | None = None) -> jax.Array:
    """Rows of x [M, K], sorted by group (group g has group_sizes[g] consecutive rows), times their
    group's w [G, K, N] -> [M, N] (float32 accumulation, x's dtype out). Rows past sum(group_sizes)
    come out zero. `lora`: (a [G, K, r], b [G, r, N], scale) adds scale * (x @ a_g) @ b_g to each row
    in the same pass (a MoE's per-expert LoRA adapters; the scale, a constant or a layer's gate, takes
    no gradient). `batched` only: `capacity` rows per group in the batched product (default
    default_capacity(M, G): set it from the rows expected when many of the M rows are empty), `tile`
    rows per overflow tile (default min(OVERFLOW_TILE, capacity))."""
    sizes = group_sizes.astype(jnp.int32)
    adapters = None if lora is None else (lora[0].astype(x.dtype), lora[1].astype(x.dtype),
                                          jax.lax.stop_gradient(jnp.asarray(lora[2], jnp.float32)))
    if implementation == "ragged":
        def ragged(lhs, rhs):
            return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)

        y = ragged(x, w.astype(x.dtype))
        if adapters is not None:
            a, b, scale = adapters
            y = y + scale * ragged(ragged(x, a).astype(x.dtype), b)
        return y.astype(x.dtype)
    if implementation != "batched":
        raise ValueError(f"grouped matmul {implementation!r} unknown; choose one of {', '.join(GROUPED_MATMULS)}")
    m, g = x.shape[0], w.shape[0]
    capacity = int(capacity or default_capacity(m, g))
    tile = max(1, min(int(tile or min(OVERFLOW_TILE, capacity)), m))
    layout = _batched_layout(sizes, m, g, capacity, tile)
    return _batched(x, w.astype(x.dtype), adapters, layout, capacity, tile)


class _Layout(NamedTuple):
    source: jax.Array  # [G * C] the row in each group's slots (M: an empty slot)
    dest: jax.Array  # [M] each row's slot (G * C: an overflow row, or past the groups)
    over_group: jax.Array  # [tiles] the group of each overflow tile
    over_row: jax.Array  # [tiles] its first row
    over_rows: jax.Array  # [tiles] how many of its rows are the group's
    over_tiles: jax.Array  # [] overflow tiles in use


def _batched_layout(sizes: jax.Array, m: int, g: int, capacity: int, tile: int) -> _Layout:
    """Each group's first `capacity` rows go to its block of the batched product; the rows past that
    (the overflow) are read in place by tiles of `tile` rows, each one group's. Both directions are
    gathers (XLA:CPU runs scatters one element at a time)."""
    starts = jnp.cumsum(sizes) - sizes
    slot = jnp.arange(g * capacity, dtype=jnp.int32)
    slot_group, offset = slot // capacity, slot % capacity
    source = jnp.where(offset < sizes[slot_group], starts[slot_group] + offset, m)
    row = jnp.arange(m, dtype=jnp.int32)
    group = jnp.clip(jnp.searchsorted(jnp.cumsum(sizes), row, side="right"), 0, g - 1)
    offset = row - starts[group]
    dest = jnp.where((offset < capacity) & (row < jnp.sum(sizes)), group * capacity + offset, g * capacity)
    over = jnp.maximum(sizes - capacity, 0)
    tiles_of = -(-over // tile)
    first = jnp.cumsum(tiles_of) - tiles_of
    tiles = jnp.arange(-(-max(m - capacity, 0) // tile) + g, dtype=jnp.int32)
    tile_group = jnp.clip(jnp.searchsorted(jnp.cumsum(tiles_of), tiles, side="right"), 0, g - 1)
    done = (tiles - first[tile_group]) * tile
    return _Layout(source, dest, tile_group, starts[tile_group] + capacity + done,
                   jnp.clip(over[tile_group] - done, 0, tile), jnp.sum(tiles_of))


def _blocks(x: jax.Array, layout: _Layout, capacity: int) -> jax.Array:
    return x.at[layout.source].get(mode="fill", fill_value=0).reshape(-1, capacity, x.shape[-1])


def _overflow_tile(layout: _Layout, t: jax.Array, tile: int, m: int) -> tuple[jax.Array, jax.Array]:
    """Where overflow tile t's `tile` rows start (moved back to fit inside the M rows, as a dynamic
    slice would move it: no padded copy of x) and the mask of those that are its group's."""
    first = layout.over_row[t]
    start = jnp.clip(first, 0, m - tile)
    row = start + jnp.arange(tile)[:, None]
    return start, (row >= first) & (row < first + layout.over_rows[t])


def _times(x: jax.Array, w: jax.Array, adapters: tuple | None, transpose: bool) -> jax.Array:
    """Rows x [..., C, K] times w [..., K, N] plus the LoRA term, float32 ([..., ] a group axis or none);
    transposed (the backward's dX): x [..., C, N] times w^T and the adapters' transposes."""
    def mm(spec, lhs, rhs):
        return jnp.einsum(spec, lhs, rhs, preferred_element_type=jnp.float32)

    if not transpose:
        y = mm("...ck,...kn->...cn", x, w)
        if adapters is not None:
            a, b, scale = adapters
            y = y + scale * mm("...cr,...rn->...cn", mm("...ck,...kr->...cr", x, a).astype(x.dtype), b)
        return y
    y = mm("...cn,...kn->...ck", x, w)
    if adapters is not None:
        a, b, scale = adapters
        y = y + mm("...cr,...kr->...ck", (scale * mm("...cn,...rn->...cr", x, b)).astype(x.dtype), a)
    return y


def _group_of(adapters: tuple | None, group: jax.Array) -> tuple | None:
    if adapters is None:
        return None
    a, b, scale = adapters
    return (jax.lax.dynamic_index_in_dim(a, group, keepdims=False),
            jax.lax.dynamic_index_in_dim(b, group, keepdims=False), scale)


def _product(x, w, adapters, layout: _Layout, capacity: int, tile: int, transpose: bool) -> jax.Array:
    """Each row times its group's matrix (and adapters; transposed: w [G, K, N] applied as w^T): the
    groups' blocks as one batched product against w as stored (no per-tile copy of the weights), then
    the overflow tiles one by one (a loop that runs as many times as there are overflow tiles: none when
    no group exceeds the capacity)."""
    m = x.shape[0]
    blocks = _times(_blocks(x, layout, capacity), w, adapters, transpose)
    out = blocks.reshape(-1, blocks.shape[-1]).astype(x.dtype).at[layout.dest].get(mode="fill", fill_value=0)

    def overflow(t, out):
        start, mine = _overflow_tile(layout, t, tile, m)
        group = layout.over_group[t]
        y = _times(jax.lax.dynamic_slice_in_dim(x, start, tile), jax.lax.dynamic_index_in_dim(w, group, keepdims=False),
                   _group_of(adapters, group), transpose).astype(out.dtype)
        old = jax.lax.dynamic_slice_in_dim(out, start, tile)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, old), start, 0)

    return jax.lax.fori_loop(0, layout.over_tiles, overflow, out)


def _weight_grads(x: jax.Array, dy: jax.Array, adapters: tuple | None) -> tuple:
    """dW (and dA, dB) of rows x [..., C, K] with output gradients dy [..., C, N], float32."""
    def mm(spec, lhs, rhs):
        return jnp.einsum(spec, lhs, rhs, preferred_element_type=jnp.float32)

    dw = mm("...ck,...cn->...kn", x, dy)
    if adapters is None:
        return (dw,)
    a, b, scale = adapters
    dh = (scale * mm("...cn,...rn->...cr", dy, b)).astype(x.dtype)  # the gradient of h = x @ a
    h = mm("...ck,...kr->...cr", x, a).astype(x.dtype)
    return dw, mm("...ck,...cr->...kr", x, dh), scale * mm("...cr,...cn->...rn", h, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _batched(x, w, adapters, layout, capacity, tile):
    return _product(x, w, adapters, layout, capacity, tile, transpose=False)


def _batched_fwd(x, w, adapters, layout, capacity, tile):
    return _product(x, w, adapters, layout, capacity, tile, transpose=False), (x, w, adapters, layout)


def _batched_bwd(capacity, tile, res, dy):
    """dX by the same product through the transposed matrices; dW (dA, dB) as one batched product over
    the groups' blocks ([G, K, N], no per-tile partial sums) plus each overflow tile's added to its
    group (a frozen W's gradient is dead code that XLA drops)."""
    x, w, adapters, layout = res
    dx = _product(dy, w, adapters, layout, capacity, tile, transpose=True)
    grads = _weight_grads(_blocks(x, layout, capacity), _blocks(dy, layout, capacity), adapters)

    def overflow(t, grads):
        start, mine = _overflow_tile(layout, t, tile, x.shape[0])
        group = layout.over_group[t]
        rows = jnp.where(mine, jax.lax.dynamic_slice_in_dim(x, start, tile), 0)
        parts = _weight_grads(rows, jax.lax.dynamic_slice_in_dim(dy, start, tile), _group_of(adapters, group))
        return tuple(jax.lax.dynamic_update_index_in_dim(acc, jax.lax.dynamic_index_in_dim(acc, group) + part[None],
                                                         group, 0) for acc, part in zip(grads, parts))

    grads = jax.lax.fori_loop(0, layout.over_tiles, overflow, grads)
    dw = grads[0].astype(w.dtype)
    if adapters is None:
        return dx, dw, None, None
    a, b, scale = adapters
    return dx, dw, (grads[1].astype(a.dtype), grads[2].astype(b.dtype), jnp.zeros_like(scale)), None


_batched.defvjp(_batched_fwd, _batched_bwd)


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

    def grouped(self, x: jax.Array, sizes: jax.Array, implementation: str, capacity: int | None = None) -> jax.Array:
        """Rows x [M, in] sorted by expert (sizes [E] rows each) through their experts -> [M, out]
        (`capacity`: see grouped_matmul)."""
        return grouped_matmul(x, self.dense_kernel(), sizes, implementation, capacity)


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

    def expert_rows(self, rows: jax.Array, sizes: jax.Array, implementation: str, capacity: int | None = None,
                    experts: Experts | None = None):
        """Rows [M, D] sorted by expert (sizes [E]) through their experts' SwiGLU -> [M, D] (`experts`:
        this layer's, or a shard of them under expert parallelism). The two
        matmul outputs are kept for the backward pass (named as the dense MLP's: see
        stack.SAVED_ACTIVATIONS), so it recomputes only the activation."""
        experts = self.experts if experts is None else experts
        fused = checkpoint_name(experts.gate_up_proj.grouped(rows, sizes, implementation, capacity), "mlp_up")
        gate, up = jnp.split(fused, 2, axis=-1)
        out = experts.down_proj.grouped(self.act(gate) * up, sizes, implementation, capacity)
        return checkpoint_name(out, "mlp_down")

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
        out = self.expert_rows(rows, sizes, impl)
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
