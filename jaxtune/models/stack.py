"""What every decoder family shares: the layer stack (scan over stacked layers, remat policy, KV
cache, per-layer windows), the embedding / head plumbing and the losses (`DecoderLM`). A family
(jaxtune/models/<family>.py) gives its config parsing, its block and its HF names; see DecoderLM.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.kernels.attention import OWN_VJP, TRACED_WINDOW, attention, cached_attention
from jaxtune.models import rope as rope_lib
from jaxtune.models.cache import KVCache, cache_widths
from jaxtune.models.config import ModelConfig
from jaxtune.models.layers import Embed, Linear

# What the backward pass keeps of each layer's forward (see jax.checkpoint_policies):
# - "none" (gradient checkpointing off): every matmul output a layer's backward needs (the named
#   projections below, the attention output, the mid-layer residual and a MoE's expert outputs);
#   only elementwise work (norms, RoPE, SiLU) and, with `xla` attention, the scores are recomputed
#   (backends in OWN_VJP run outside the remat region and keep their own residuals). Keeping those too, as
#   plain autodiff does, stores ~3x more per layer and is slower on CPU, where the step is bound by
#   memory traffic, and it buys no matmul.
# - "dots": every matmul output without batch dimensions (jax's policy of that name).
# - "full": nothing; each layer's forward runs again in the backward (least memory).
SAVED_ACTIVATIONS = ("q", "k", "v", "attention", "residual", "mlp_gate", "mlp_up", "mlp_down", "lora_hidden")
REMAT_POLICIES = {
    "none": jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS),
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # "none"'s activations, moved to pinned host memory after the forward and back for the backward
    # (Axolotl's activation_offloading; jaxtune.build picks it only where devices have host memory).
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=SAVED_ACTIVATIONS, offload_src="device",
        offload_dst="pinned_host"),
}


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions restarting at 0 where the segment id changes: [1,1,1,2,2,0] -> [0,1,2,0,1,0]."""
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)



def hf_names(base: str, head: str):
    """The HF name rule of a family whose modules mirror HF's: a parameter path's modules joined under
    `base` (`model.layers.3.self_attn.q_proj.weight`: `layers` paths need the layer index), the untied
    head `<head>.weight` at the top, every leaf `weight` but biases."""

    def hf_tensor_name(path: tuple[str, ...], layer: int | None) -> str:
        *modules, leaf = path
        hf_leaf = "bias" if leaf == "bias" else "weight"
        if modules[0] == head:
            return f"{head}.{hf_leaf}"
        if modules[0] in STACKS:  # `dense_layers` too: HF numbers every layer alike
            return ".".join([base, "layers", str(layer), *modules[1:], hf_leaf])
        return ".".join([base, *modules, hf_leaf])

    return hf_tensor_name


# The layer stacks a model may have: `layers`, and a mixture of experts' dense layers apart
# (ModelConfig.dense_layers / stack_layers say which layer each entry is).
STACKS = ("layers", "dense_layers")


def layer_runs(cfg: ModelConfig) -> list[tuple[str, int, int, int]]:
    """The layers in order as runs of consecutive layers of one stack: (stack, first layer, its entry in
    the stack, how many). One run of every layer when the model has one stack."""
    dense = set(cfg.dense_layers)
    runs: list[list] = []
    taken = dict.fromkeys(STACKS, 0)
    for layer in range(cfg.num_layers):
        stack = "dense_layers" if layer in dense else "layers"
        if runs and runs[-1][0] == stack:
            runs[-1][3] += 1
        else:
            runs.append([stack, layer, taken[stack], 1])
        taken[stack] += 1
    return [tuple(run) for run in runs]


def layer_period(cfg: ModelConfig) -> int:
    """The period of a model's pattern of routed and dense layers (2 for decoder_sparse_step=2: dense,
    routed, dense, routed, ...), or 0 where it has one stack or the pattern does not repeat."""
    if not cfg.dense_layers:
        return 0
    dense = set(cfg.dense_layers)
    kinds = [layer in dense for layer in range(cfg.num_layers)]
    for period in range(2, cfg.num_layers // 2 + 1):
        if cfg.num_layers % period == 0 and all(kinds[i] == kinds[i % period] for i in range(cfg.num_layers)):
            return period
    return 0


def stacked_layers(block: type, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                   count: int | None = None):
    """`count` (default cfg.num_layers) blocks with their parameters stacked on a leading `layers` axis
    (for lax.scan)."""

    @nnx.split_rngs(splits=count or cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs):
        return block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    return make(rngs)


def finish_layer(block, x, out, r, segment_ids):
    """`block.finish`, and the router statistics of a routed (MoE) block, which also takes the
    real-token mask (segment id != 0): (x, stats or None)."""
    if getattr(block, "ROUTED", False):
        return block.finish(x, out, r, segment_ids != 0)
    return block.finish(x, out, r), None


def layer_attention(block, x, attend, *, cos, sin, segment_ids, rng=None):
    """One decoder layer of any family: `block.qkv`, `attend(q, k, v)` (the layer's attention, built by
    `DecoderLM._run`: over the tokens themselves, or over this layer's cache as it was before them and
    over themselves), `block.finish`: (x, k, v, router statistics or None). With a cache, the caller
    writes the returned keys and values into it after the layer scan, so that the scan only reads the
    cache (writing the stacked cache inside the scan made XLA copy all of it at every layer: 10x
    slower decoding)."""
    r = block.dropout_keys(rng)
    q, k, v = block.qkv(x, cos, sin, r)
    x, stats = finish_layer(block, x, attend(q, k, v), r, segment_ids)
    return x, k, v, stats


class DecoderLM(nnx.Module):
    """A decoder-only LM over a stack of a family's blocks. `model(input_ids)` -> logits [B, T, vocab].

    A family subclasses it with class attributes: `EMBED`, `FINAL_NORM` and `HEAD` (its HF module
    names; the head is None when tied to the embedding), `NORM` (the final norm's class) and `BLOCK`,
    the family's layer, stacked as `layers`: `qkv(x, cos, sin, keys)` (the layer up to attention: q [B, T, N, H], k, v
    [B, T, K, H]), `finish(x, out, keys)` (after it) and `dropout_keys(rng)`; everything else (the
    layer scan, remat, the KV cache, per-layer windows and RoPE, the losses) is shared here.

    Options that change how (not what) it computes are plain attributes: `attn_implementation`
    (see jaxtune.kernels.attention), `remat` (a key of REMAT_POLICIES) and `chunked_loss` (token
    log-probabilities through jaxtune.kernels.cross_entropy, without [B, T, vocab] logits).
    """

    EMBED, FINAL_NORM, HEAD = "embed_tokens", "norm", "lm_head"
    BLOCK: type
    NORM: type
    # A mixture of experts with dense layers (cfg.dense_layers) stacks those apart as `dense_layers`,
    # blocks of this class (the family's dense layer).
    DENSE_BLOCK: type | None = None
    # A routed (MoE) block sets ROUTED: its `finish(x, out, keys, valid)` takes the real-token mask and
    # returns (x, models.moe.RouterStats). With `collect_router_stats` set (the trainer sets it on the
    # model of its step), `hidden_states` sows each layer's statistics as nnx.Intermediate
    # `router_stats` (models.moe.router_terms reads them).
    collect_router_stats = False
    PADDING_IDX = True  # the embedding's pad_token_id row gets no gradient from the lookup (as transformers')

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs, attn_implementation: str = "xla", remat: str = "none", chunked_loss: bool = True):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {remat!r} unknown; choose one of {sorted(REMAT_POLICIES)}")
        self.cfg = cfg
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.remat = remat
        self.chunked_loss = chunked_loss
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        setattr(self, self.EMBED, Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                                        padding_idx=cfg.pad_token_id if self.PADDING_IDX else None, **kw))
        self.layers = stacked_layers(self.BLOCK, cfg, rngs=rngs, count=len(cfg.stack_layers("layers")), **kw)
        if cfg.dense_layers:
            self.dense_layers = stacked_layers(self.DENSE_BLOCK, cfg, rngs=rngs, count=len(cfg.dense_layers), **kw)
        setattr(self, self.FINAL_NORM, self.NORM(cfg.hidden_size, eps=cfg.rms_norm_eps, axis="embed", **kw))
        setattr(self, self.HEAD, None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False, rngs=rngs, **kw))

    @property
    def embedder(self) -> Embed:
        return getattr(self, self.EMBED)

    @property
    def head(self) -> Linear | None:
        """The untied LM head (None when tied to the embedding)."""
        return getattr(self, self.HEAD)

    @property
    def final_norm(self):
        return getattr(self, self.FINAL_NORM)

    # -- public API ---------------------------------------------------------------------------
    def __call__(self, input_ids, segment_ids=None, positions=None, *, rng=None) -> jax.Array:
        """Logits [B, T, vocab] for token ids [B, T]; see `hidden_states` for the arguments."""
        return self.logits(self.hidden_states(input_ids, segment_ids, positions, rng=rng))

    def hidden_states(self, input_ids, segment_ids=None, positions=None, *, rng=None,
                      band: tuple[int, int] | None = None) -> jax.Array:
        """Final-normed hidden states [B, T, D].

        `segment_ids` [B, T] (int, 0 = padding) keep packed samples apart; default: one segment.
        `positions` [B, T] default to restarting at 0 for each segment. `rng` (training only)
        drives LoRA dropout; None means no dropout. `band`: the rows' layout promise that lets
        attention read fewer keys (jaxtune.kernels.attention.attention's `band`).
        """
        segment_ids = jnp.ones(input_ids.shape, jnp.int32) if segment_ids is None else segment_ids
        positions = positions_from_segments(segment_ids) if positions is None else positions
        x, _, stats = self._run(input_ids, segment_ids.astype(jnp.int32), positions.astype(jnp.int32), None, rng,
                                band=band)
        if stats is not None and self.collect_router_stats:  # MoE: each layer's router statistics (trainer)
            self.sow(nnx.Intermediate, "router_stats", stats)
        return self.final_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The head's logits, soft-capped where the family caps them (Gemma 2's final_logit_softcapping)."""
        logits = self.embedder.attend(hidden) if self.head is None else self.head(hidden)
        cap = self.cfg.final_softcap
        if cap is None:
            return logits
        return (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)

    def head_matrix(self) -> tuple[jax.Array, int]:
        """The LM head as (matrix, vocab axis): the tied embedding [V, D] (axis 0) or lm_head's kernel
        [D, V] (axis 1), for kernels that take the head itself."""
        if self.head is None:
            return self.embedder.embedding[...], 0
        return self.head.dense_kernel(), 1

    def target_logprobs(self, hidden: jax.Array, targets: jax.Array, *, with_entropy: bool = False):
        """log p(targets[b, t] | position t) from final hidden states [B, T, D]: [B, T] float32.
        `with_entropy`: (log-probs, each position's entropy [B, T]), the entropy without gradient."""
        if not self.chunked_loss:
            logits = self.logits(hidden).astype(jnp.float32)
            lse = jax.nn.logsumexp(logits, axis=-1)
            logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse
            if not with_entropy:
                return logp
            probs = jax.lax.stop_gradient(jnp.exp(logits - lse[..., None]))
            return logp, jax.lax.stop_gradient(lse - jnp.sum(probs * logits, axis=-1))
        from jaxtune.kernels.cross_entropy import linear_token_logprobs

        head, vocab_axis = self.head_matrix()
        out = linear_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), head, targets.reshape(-1),
                                    vocab_axis=vocab_axis, with_entropy=with_entropy, softcap=self.cfg.final_softcap)
        if with_entropy:
            return out[0].reshape(targets.shape), out[1].reshape(targets.shape)
        return out.reshape(targets.shape)

    def target_nll_sum(self, hidden: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
        """sum over [B, T] of weights * -log p(targets | position): the cross-entropy of the
        weighted tokens, float32 (with `chunked_loss`, computed without the full logits)."""
        if not self.chunked_loss:
            return -jnp.sum(jnp.where(weights != 0, weights * self.target_logprobs(hidden, targets), 0.0))
        from jaxtune.kernels.cross_entropy import linear_cross_entropy

        head, vocab_axis = self.head_matrix()
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, targets.reshape(-1),
                                    weights.reshape(-1), vocab_axis=vocab_axis, softcap=self.cfg.final_softcap)

    def decode(self, input_ids, segment_ids, positions, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run `input_ids` [B, T] through the model writing K/V at `cache.index`.

        Returns the final-normed hidden states [B, T, D] and the advanced cache. Used for both the
        prefill (T = prompt length) and single-token steps (T = 1) of the sampler.
        """
        x, cache, _ = self._run(input_ids, segment_ids.astype(jnp.int32), positions.astype(jnp.int32), cache)
        return self.final_norm(x), cache

    # -- internals ----------------------------------------------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        """The layer stack's input (families that scale or normalize the embedding override this)."""
        return self.embedder(input_ids)

    def _run(self, input_ids, segment_ids, positions, cache: KVCache | None, rng=None, band=None):
        cfg = self.cfg
        x = self.embed(input_ids)
        # Each distinct RoPE's cos / sin once; a layer picks its own by index (Gemma 3's local / global bases).
        ropes, rope_index = cfg.ropes
        tables = [rope_lib.cos_sin(positions, rope, cfg.rotary_dim or cfg.head_dim, cfg.max_position_embeddings)
                  for rope in ropes]
        rope_ids = jnp.asarray(rope_index, jnp.int32)
        stacked = tuple(jnp.stack(parts) for parts in zip(*tables)) if len(tables) > 1 else None  # [R, B, T, rotary]

        def layer_rope(rope_id):
            return tables[0] if len(tables) == 1 else (stacked[0][rope_id], stacked[1][rope_id])
        # Each layer's window (0 = none) is always passed as a traced scan input, even when no layer
        # has one: masks that depended only on loop-invariant segment ids and positions were hoisted
        # out of the layer scan by XLA and stacked over every attention tile, O(T^2) memory
        # (26.7 GB at 8k tokens with blockwise attention).
        windows = jnp.asarray([w or 0 for w in cfg.sliding_windows], jnp.int32)
        # Backends that mask inside their kernel take a static window where every layer has the
        # same one (cuDNN and splash attention can express only a static window).
        static = len(set(cfg.sliding_windows)) == 1 and self.attn_implementation not in TRACED_WINDOW

        def layer_window(traced):
            return cfg.sliding_windows[0] if static else traced

        def self_attention(window):
            """A layer's attention over the tokens themselves (no cache)."""
            return functools.partial(attention, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                     q_positions=positions, kv_positions=positions, sliding_window=layer_window(window),
                                     scale=cfg.attn_scale, softcap=cfg.attn_softcap,
                                     implementation=self.attn_implementation, band=band)
        stacks = {name: nnx.split(getattr(self, name)) for name in STACKS if hasattr(self, name)}

        def over_layers(make_step, per_layer):
            """Every layer in order, `make_step(graphdef, block_class)` giving a layer's
            `step(x, (its parameters, its per_layer slices))` -> (x, ys): one lax.scan over the layers
            (one stack), over the repeats of a periodic pattern of routed and dense layers (a scan step
            runs one period, e.g. a dense then a routed layer), or over each run of one stack's
            consecutive layers. Returns the ys of the layers that have them (not None), in layer order."""
            nonlocal x
            steps = {name: make_step(graphdef, type(getattr(self, name))) for name, (graphdef, _) in stacks.items()}
            period = layer_period(cfg)
            if period:
                kinds = ["dense_layers" if layer in cfg.dense_layers else "layers" for layer in range(period)]
                repeats = cfg.num_layers // period
                states = {name: jax.tree.map(lambda a: a.reshape(repeats, -1, *a.shape[1:]), state)
                          for name, (_, state) in stacks.items()}

                def body(x, xs):
                    states, per = xs
                    taken, outs = dict.fromkeys(states, 0), []
                    for j, stack in enumerate(kinds):
                        own = jax.tree.map(lambda a: a[taken[stack]], states[stack])
                        x, ys = steps[stack](x, (own, jax.tree.map(lambda a: a[j], per)))
                        taken[stack] += 1
                        outs.append(ys)
                    present = [ys for ys in outs if ys is not None]
                    return x, (jax.tree.map(lambda *parts: jnp.stack(parts), *present) if present else None)

                per = jax.tree.map(lambda a: a.reshape(repeats, period, *a.shape[1:]), per_layer)
                x, ys = jax.lax.scan(body, x, (states, per))
                return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), ys)
            outs = []
            for stack, first, entry, count in layer_runs(cfg):
                _, state = stacks[stack]
                if count < len(cfg.stack_layers(stack)):
                    state = jax.tree.map(lambda a: a[entry:entry + count], state)
                run = per_layer if count == cfg.num_layers else jax.tree.map(lambda a: a[first:first + count], per_layer)
                x, ys = jax.lax.scan(steps[stack], x, (state, run))
                outs.append(ys)
            present = [ys for ys in outs if ys is not None]
            if len(present) <= 1:
                return present[0] if present else None
            return jax.tree.map(lambda *parts: jnp.concatenate(parts), *present)

        if cache is None:
            keys = None if rng is None else jax.random.split(rng, cfg.num_layers)

            policy = REMAT_POLICIES[self.remat]

            def make_step(graphdef, block_class):
                def body(x, xs):
                    state, (window, rope_id, key) = xs
                    block = nnx.merge(graphdef, state)
                    cos, sin = layer_rope(rope_id)
                    x, _, _, stats = layer_attention(block, x, self_attention(window), cos=cos, sin=sin,
                                                     segment_ids=segment_ids, rng=key)
                    return x, stats

                def split_body(x, xs):
                    # The attention backend's own VJP keeps what its backward needs (q, k, v, output,
                    # log-sum-exp); only the parts before and after it are under the remat policy.
                    state, (window, rope_id, key) = xs
                    r = block_class.dropout_keys(key)
                    cos, sin = layer_rope(rope_id)
                    q, k, v = jax.checkpoint(lambda s, x: nnx.merge(graphdef, s).qkv(x, cos, sin, r),
                                             policy=policy, prevent_cse=False)(state, x)
                    out = self_attention(window)(q, k, v)
                    return jax.checkpoint(lambda s, x, out: finish_layer(nnx.merge(graphdef, s), x, out, r, segment_ids),
                                          policy=policy, prevent_cse=False)(state, x, out)

                if self.remat != "full" and self.attn_implementation in OWN_VJP:
                    return split_body
                return jax.checkpoint(body, policy=policy, prevent_cse=False)

            stats = over_layers(make_step, (windows, rope_ids, keys))
            return x, None, stats

        index = cache.index

        # A decode step reads only the filled part of the cache, rounded up to one of a few widths (one
        # branch each): its keys and values are most of a decode step's memory traffic.
        widths = cache_widths(cache.length) if input_ids.shape[1] == 1 else [cache.length]
        part = jnp.minimum(index // widths[0], len(widths) - 1)

        def make_cached_step(graphdef, block_class):
            def cached_body(x, xs):
                state, (window, rope_id, layer, shared) = xs
                block = nnx.merge(graphdef, state)
                cos, sin = layer_rope(rope_id)
                if shared is not None:
                    shared = (*shared, prefix.positions, prefix.segment_ids)

                def attend(q, k, v):
                    k, v = k.astype(q.dtype), v.astype(q.dtype)

                    def over(width, q, k, v):
                        def read(stacked):
                            return jax.lax.dynamic_slice(stacked, (layer, 0, 0, 0, 0), (1, *stacked.shape[1:3], width,
                                                                                         stacked.shape[4]))[0]
                        # this layer's cache, materialized: fused into the attention's reductions, the
                        # slice of the stacked cache was indexed element by element
                        k_layer, v_layer = jax.lax.optimization_barrier((read(cache.k), read(cache.v)))
                        return cached_attention(q, k, v, k_layer.astype(q.dtype), v_layer.astype(q.dtype),
                                                q_segment_ids=segment_ids, kv_segment_ids=cache.segment_ids[:, :width],
                                                q_positions=positions, kv_positions=cache.positions[:, :width],
                                                sliding_window=layer_window(window), scale=cfg.attn_scale,
                                                softcap=cfg.attn_softcap, implementation=self.attn_implementation,
                                                prefix=shared)
                    if len(widths) == 1:
                        return over(widths[0], q, k, v)
                    return jax.lax.switch(part, [functools.partial(over, w) for w in widths], q, k, v)

                x, k, v, _ = layer_attention(block, x, attend, cos=cos, sin=sin, segment_ids=segment_ids)
                return x, (k, v)

            return cached_body

        prefix = cache.prefix
        shared = None if prefix is None else (prefix.k, prefix.v)
        k_new, v_new = over_layers(make_cached_step, (windows, rope_ids, jnp.arange(cfg.num_layers), shared))

        def write(stacked, new):  # [L, B, T, K, H] -> the cache's [L, B, K, T, H] slots at index
            return jax.lax.dynamic_update_slice(stacked, jnp.swapaxes(new, 2, 3).astype(stacked.dtype),
                                                (0, 0, 0, index, 0))

        new_cache = KVCache(k=write(cache.k, k_new), v=write(cache.v, v_new),
                            positions=jax.lax.dynamic_update_slice(cache.positions, positions, (0, index)),
                            segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, index)),
                            index=index + input_ids.shape[1], prefix=prefix)
        return x, new_cache, None
