"""The Llama-family decoder: Llama, Mistral, Qwen2 and Qwen3 through config switches.

    x = embed(ids)
    for each layer (stacked, under lax.scan):
        x = x + o_proj(attention(rope(qk_norm?(q_proj(norm(x)))), rope(qk_norm?(k_proj(..))), v_proj(..)))
        x = x + down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))
    logits = lm_head(norm(x))            (lm_head tied to embed when the config says so)

Family differences (all read from the HF config):
- Llama:   `attention_bias` puts biases on q/k/v/o, `mlp_bias` on the MLP.
- Mistral: `sliding_window` applies to every layer.
- Qwen2:   biases on q/k/v (not o); sliding window on the layers `layer_types` marks.
- Qwen3:   RMSNorm on q and k over head_dim (before RoPE); `attention_bias` on q/k/v/o;
           sliding window per `layer_types`.

Module and parameter names mirror HF's (`self_attn.q_proj`, `mlp.down_proj`, `input_layernorm`),
so the HF name map is a rule (`hf_tensor_name`) rather than a table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtune.errors import ModelLoadError
from jaxtune.kernels.attention import OWN_VJP, TRACED_WINDOW, attention, cached_attention
from jaxtune.models import rope as rope_lib
from jaxtune.models.cache import KVCache
from jaxtune.models.config import ModelConfig, RopeConfig
from jaxtune.models.layers import Embed, Linear, RMSNorm

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# What the backward pass keeps of each layer's forward (see jax.checkpoint_policies):
# - "none" (gradient checkpointing off): every matmul output a layer's backward needs (the named
#   projections below, the attention output and the mid-layer residual); only elementwise work
#   (norms, RoPE, SiLU) and, with `xla` attention, the scores are recomputed (backends in OWN_VJP
#   run outside the remat region and keep their own residuals). Keeping those too, as
#   plain autodiff does, stores ~3x more per layer and is slower on CPU, where the step is bound by
#   memory traffic, and it buys no matmul.
# - "dots": every matmul output without batch dimensions (jax's policy of that name).
# - "full": nothing; each layer's forward runs again in the backward (least memory).
SAVED_ACTIVATIONS = ("q", "k", "v", "attention", "residual", "mlp_gate", "mlp_up", "lora_hidden")
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


def _rope_config(hf: Any) -> RopeConfig:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = getattr(hf, "rope_scaling", None)
    if not params and legacy:
        params = dict(legacy)
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise ModelLoadError("config.json has no rope_theta (neither in rope_parameters nor at top level)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in rope_lib.SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(rope_lib.SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("partial_rotary_factor != 1 is not supported by the Llama-family decoder")

    def opt_float(key: str) -> float | None:
        return None if params.get(key) is None else float(params[key])

    original = params.get("original_max_position_embeddings")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=opt_float("factor"),
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=opt_float("low_freq_factor"),
        high_freq_factor=opt_float("high_freq_factor"),
        attention_factor=opt_float("attention_factor"),
        beta_fast=opt_float("beta_fast"),
        beta_slow=opt_float("beta_slow"),
        mscale=opt_float("mscale"),
        mscale_all_dim=opt_float("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def config_from_hf(hf: Any, architecture: str, source_json: str) -> ModelConfig:
    """Build a ModelConfig from a transformers config object of one of ARCHITECTURES."""
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act {act!r} is not supported (the Llama-family decoder uses silu)")
    num_layers = hf.num_hidden_layers
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    windows: list[int | None] = [None] * num_layers
    if architecture == "MistralForCausalLM" and getattr(hf, "sliding_window", None):
        windows = [int(hf.sliding_window)] * num_layers
    elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and getattr(hf, "sliding_window", None):
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * num_layers
        windows = [int(hf.sliding_window) if t == "sliding_attention" else None for t in layer_types]
    attention_bias = bool(getattr(hf, "attention_bias", False))
    qkv_bias = {"Qwen2ForCausalLM": True, "MistralForCausalLM": False}.get(architecture, attention_bias)
    o_bias = {"Qwen2ForCausalLM": False, "MistralForCausalLM": False}.get(architecture, attention_bias)
    eos = getattr(hf, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return ModelConfig(
        architecture=architecture,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=num_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.rms_norm_eps),
        max_position_embeddings=int(hf.max_position_embeddings),
        rope=_rope_config(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)) if architecture == "LlamaForCausalLM" else False,
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_windows=tuple(windows),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=eos_ids,
        pad_token_id=getattr(hf, "pad_token_id", None),
        source_config_json=source_json,
    )


def hf_tensor_name(path: tuple[str, ...], layer: int | None) -> str:
    """HF tensor name of a parameter path (`layers` paths need the layer index)."""
    *modules, leaf = path
    hf_leaf = "bias" if leaf == "bias" else "weight"
    if modules[0] == "lm_head":
        return f"lm_head.{hf_leaf}"
    if modules[0] == "layers":
        return ".".join(["model", "layers", str(layer), *modules[1:], hf_leaf])
    return ".".join(["model", *modules, hf_leaf])


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, n * h, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear(d, k * h, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(d, k * h, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear(n * h, d, axes=("heads", "embed"), use_bias=cfg.o_bias, **kw)
        norm_kw = dict(eps=cfg.rms_norm_eps, axis="head_dim", dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(h, **norm_kw) if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, **norm_kw) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, rngs: tuple | None = None) -> jax.Array:
        r = rngs or (None,) * 3
        gate = checkpoint_name(self.gate_proj(x, r[0]), "mlp_gate")
        up = checkpoint_name(self.up_proj(x, r[1]), "mlp_up")
        return self.down_proj(jax.nn.silu(gate) * up, r[2])


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        norm_kw = dict(eps=cfg.rms_norm_eps, axis="embed", dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, cos, sin, positions, segment_ids, window, kv, attn_impl, rng=None):
        """One decoder layer. `rng` (a key, or None) drives LoRA dropout.

        `kv` is None (no cache) or this layer's cache as it was before these tokens: (k, v [B, K, S, H]
        (models/cache.py), kv_positions, kv_segment_ids [B, S]). The tokens attend the cache and
        themselves; their own keys and values are returned for the caller to write into the cache
        after the layer scan (x, k, v), so that the scan only reads the cache (writing the stacked
        cache inside the scan made XLA copy all of it at every layer: 10x slower decoding).
        """
        r = self.dropout_keys(rng)
        q, k, v = self.qkv(x, cos, sin, r)
        if kv is None:
            out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_positions=positions,
                            kv_positions=positions, sliding_window=window, implementation=attn_impl)
            return self.finish(x, out, r), None, None
        k_cache, v_cache, kv_positions, kv_segments = kv
        out = cached_attention(q, k.astype(q.dtype), v.astype(q.dtype), k_cache.astype(q.dtype),
                               v_cache.astype(q.dtype), q_segment_ids=segment_ids, kv_segment_ids=kv_segments,
                               q_positions=positions, kv_positions=kv_positions, sliding_window=window,
                               implementation=attn_impl)
        return self.finish(x, out, r), k, v

    @staticmethod
    def dropout_keys(rng) -> tuple:
        """One key per projection (q, k, v, o, gate, up, down), or Nones without dropout."""
        return (None,) * 7 if rng is None else tuple(jax.random.split(rng, 7))

    def qkv(self, x, cos, sin, r):
        """The layer up to attention: q [B, T, N, H], k and v [B, T, K, H] (normed, projected, RoPE)."""
        attn = self.self_attn
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = attn.q_proj(h, r[0]).reshape(b, t, attn.num_heads, attn.head_dim)
        k = attn.k_proj(h, r[1]).reshape(b, t, attn.num_kv_heads, attn.head_dim)
        v = attn.v_proj(h, r[2]).reshape(b, t, attn.num_kv_heads, attn.head_dim)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rope_lib.apply_rope(q, cos, sin), rope_lib.apply_rope(k, cos, sin)
        return checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v")

    def finish(self, x, out, r):
        """The layer after attention: output projection, residual, MLP. `out` [B, T, N, H]."""
        attn = self.self_attn
        b, t = out.shape[:2]
        out = checkpoint_name(out.reshape(b, t, attn.num_heads * attn.head_dim), "attention")
        x = checkpoint_name(x + attn.o_proj(out, r[3]), "residual")
        return x + self.mlp(self.post_attention_layernorm(x), r[4:])


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions restarting at 0 where the segment id changes: [1,1,1,2,2,0] -> [0,1,2,0,1,0]."""
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


class CausalLM(nnx.Module):
    """Decoder-only LM. `model(input_ids)` -> logits [B, T, vocab].

    Options that change how (not what) it computes are plain attributes: `attn_implementation`
    (see jaxtune.kernels.attention), `remat` (a key of REMAT_POLICIES) and `chunked_loss` (token
    log-probabilities through jaxtune.kernels.cross_entropy, without [B, T, vocab] logits).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        attn_implementation: str = "xla",
        remat: str = "none",
        chunked_loss: bool = True,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {remat!r} unknown; choose one of {sorted(REMAT_POLICIES)}")
        self.cfg = cfg
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.remat = remat
        self.chunked_loss = chunked_loss
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis="embed", dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )

    # -- public API ---------------------------------------------------------------------------
    def __call__(self, input_ids, segment_ids=None, positions=None, *, rng=None) -> jax.Array:
        """Logits [B, T, vocab] for token ids [B, T]; see `hidden_states` for the arguments."""
        return self.logits(self.hidden_states(input_ids, segment_ids, positions, rng=rng))

    def hidden_states(self, input_ids, segment_ids=None, positions=None, *, rng=None) -> jax.Array:
        """Final-normed hidden states [B, T, D].

        `segment_ids` [B, T] (int, 0 = padding) keep packed samples apart; default: one segment.
        `positions` [B, T] default to restarting at 0 for each segment. `rng` (training only)
        drives LoRA dropout; None means no dropout.
        """
        segment_ids = jnp.ones(input_ids.shape, jnp.int32) if segment_ids is None else segment_ids
        positions = positions_from_segments(segment_ids) if positions is None else positions
        x, _ = self._run(input_ids, segment_ids.astype(jnp.int32), positions.astype(jnp.int32), None, rng)
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def head_matrix(self) -> tuple[jax.Array, int]:
        """The LM head as (matrix, vocab axis): the tied embedding [V, D] (axis 0) or lm_head's kernel
        [D, V] (axis 1), for kernels that take the head itself."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...], 0
        return self.lm_head.dense_kernel(), 1

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
                                    vocab_axis=vocab_axis, with_entropy=with_entropy)
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
                                    weights.reshape(-1), vocab_axis=vocab_axis)

    def decode(self, input_ids, segment_ids, positions, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run `input_ids` [B, T] through the model writing K/V at `cache.index`.

        Returns the final-normed hidden states [B, T, D] and the advanced cache. Used for both the
        prefill (T = prompt length) and single-token steps (T = 1) of the sampler.
        """
        x, cache = self._run(input_ids, segment_ids.astype(jnp.int32), positions.astype(jnp.int32), cache)
        return self.norm(x), cache

    # -- internals ----------------------------------------------------------------------------
    def _run(self, input_ids, segment_ids, positions, cache: KVCache | None, rng=None):
        cfg = self.cfg
        x = self.embed_tokens(input_ids)
        cos, sin = rope_lib.cos_sin(positions, cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
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

        graphdef, layer_state = nnx.split(self.layers)
        common = dict(cos=cos, sin=sin, positions=positions, segment_ids=segment_ids, attn_impl=self.attn_implementation)

        if cache is None:
            keys = None if rng is None else jax.random.split(rng, cfg.num_layers)

            policy = REMAT_POLICIES[self.remat]

            def body(x, xs):
                state, window, key = xs
                block = nnx.merge(graphdef, state)
                x, _, _ = block(x, window=layer_window(window), kv=None, rng=key, **common)
                return x, None

            def split_body(x, xs):
                # The attention backend's own VJP keeps what its backward needs (q, k, v, output,
                # log-sum-exp); only the parts before and after it are under the remat policy.
                state, window, key = xs
                r = Block.dropout_keys(key)
                q, k, v = jax.checkpoint(lambda s, x: nnx.merge(graphdef, s).qkv(x, cos, sin, r),
                                         policy=policy, prevent_cse=False)(state, x)
                out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_positions=positions,
                                kv_positions=positions, sliding_window=layer_window(window),
                                implementation=self.attn_implementation)
                x = jax.checkpoint(lambda s, x, out: nnx.merge(graphdef, s).finish(x, out, r),
                                   policy=policy, prevent_cse=False)(state, x, out)
                return x, None

            if self.remat != "full" and self.attn_implementation in OWN_VJP:
                step = split_body
            else:
                step = jax.checkpoint(body, policy=policy, prevent_cse=False)
            x, _ = jax.lax.scan(step, x, (layer_state, windows, keys))
            return x, None

        index = cache.index

        def cached_body(x, xs):
            state, window, k_layer, v_layer = xs
            block = nnx.merge(graphdef, state)
            # this layer's cache, materialized: fused into the attention's reductions, the slice of
            # the stacked cache was indexed element by element
            k_layer, v_layer = jax.lax.optimization_barrier((k_layer, v_layer))
            kv = (k_layer, v_layer, cache.positions, cache.segment_ids)
            x, k, v = block(x, window=layer_window(window), kv=kv, **common)
            return x, (k, v)

        x, (k_new, v_new) = jax.lax.scan(cached_body, x, (layer_state, windows, cache.k, cache.v))

        def write(stacked, new):  # [L, B, T, K, H] -> the cache's [L, B, K, T, H] slots at index
            return jax.lax.dynamic_update_slice(stacked, jnp.swapaxes(new, 2, 3).astype(stacked.dtype),
                                                (0, 0, 0, index, 0))

        new_cache = KVCache(k=write(cache.k, k_new), v=write(cache.v, v_new),
                            positions=jax.lax.dynamic_update_slice(cache.positions, positions, (0, index)),
                            segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, index)),
                            index=index + input_ids.shape[1])
        return x, new_cache
