"""Gemma 2 and Gemma 3 (text): `Gemma2ForCausalLM`, `Gemma3ForCausalLM`.

The Llama decoder with Gemma's changes, as transformers implements them:

    x = embed(ids) * sqrt(hidden_size)                      (the factor rounded to the activations' dtype)
    for each layer:
        h = attention(rope(qk_norm?(q_proj(norm(x)))), ...)    scores * query_pre_attn_scalar ** -0.5,
                                                                soft-capped (Gemma 2), windowed per layer
        x = x + post_attention_norm(o_proj(h))
        x = x + post_feedforward_norm(down_proj(gelu_tanh(gate_proj(n)) * up_proj(n)))   n = pre_feedforward_norm(x)
    logits = soft_cap(head(norm(x)))                        (head tied to the embedding by default)

Every norm is Gemma's RMSNorm, x * (1 + w) in float32. `layer_types` marks the sliding-window layers
(Gemma 2 alternates them, Gemma 3 has five local layers per global one). Gemma 3 adds q/k RMSNorm over
head_dim and a RoPE per layer type (`rope_parameters` keyed by `sliding_attention` / `full_attention`:
a 10k base locally, 1M with optional scaling globally). `final_logit_softcapping` applies in both where
set; `attn_logit_softcapping` in Gemma 2 only: transformers' Gemma 3 reads it and never applies it
(a warning says so when a Gemma 3 config sets it).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtune.errors import ModelLoadError
from jaxtune.logging import warn_once
from jaxtune.models import llama
from jaxtune.models import rope as rope_lib
from jaxtune.models.config import ModelConfig, decoder_fields
from jaxtune.models.layers import ACTIVATIONS, GemmaRMSNorm
from jaxtune.models.stack import DecoderLM, hf_names

ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
LORA_TARGETS = llama.LORA_TARGETS
hf_tensor_name = hf_names(base="model", head="lm_head")  # model.layers.3.pre_feedforward_layernorm.weight
LAYER_TYPES = ("sliding_attention", "full_attention")


def cap(hf: Any, key: str) -> float | None:
    """A soft cap of the config (None or 0: none)."""
    value = getattr(hf, key, None)
    return None if value in (None, 0) else float(value)


def config_from_hf(hf: Any, architecture: str, source_json: str) -> ModelConfig:
    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None) or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"hidden_activation {act!r} is not supported for Gemma (supported: {', '.join(ACTIVATIONS)})")
    if getattr(hf, "use_bidirectional_attention", False):
        raise ModelLoadError("use_bidirectional_attention: true (an encoder-style Gemma 3) is not supported: "
                             "jaxtune trains causal language models")
    n = hf.num_hidden_layers
    layer_types = list(getattr(hf, "layer_types", None) or ["full_attention"] * n)
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown or len(layer_types) != n:
        raise ModelLoadError(f"layer_types must list {n} of {', '.join(LAYER_TYPES)}; got {layer_types}")
    window = getattr(hf, "sliding_window", None)
    windows = tuple(int(window) if t == "sliding_attention" and window else None for t in layer_types)
    params = getattr(hf, "rope_parameters", None) or {}
    if set(params) <= set(LAYER_TYPES) and params:  # Gemma 3: one RoPE per layer type
        missing = sorted(set(layer_types) - set(params))
        if missing:
            raise ModelLoadError(f"rope_parameters has no entry for layer type(s) {', '.join(missing)}")
        per_type = {t: rope_lib.config_from_hf(hf, params[t]) for t in params}
        rope, layer_ropes = per_type.get("full_attention", per_type[layer_types[0]]), \
            tuple(per_type[t] for t in layer_types)
    else:
        rope, layer_ropes = rope_lib.config_from_hf(hf), ()
    bias = bool(getattr(hf, "attention_bias", False))
    attn_cap = cap(hf, "attn_logit_softcapping")
    if architecture == "Gemma3ForCausalLM" and attn_cap is not None:
        # transformers' Gemma3Attention stores the value and never applies it (nor does vLLM): the
        # checkpoint was trained and is served without it, so it is not applied here either
        warn_once(f"attn_logit_softcapping={attn_cap:g} is ignored for Gemma 3, as transformers and vLLM ignore it")
        attn_cap = None

    return ModelConfig(
        architecture=architecture, **decoder_fields(hf, source_json), rope=rope, layer_ropes=layer_ropes, tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=bias, o_bias=bias, qk_norm=architecture == "Gemma3ForCausalLM", hidden_act=act,
        sliding_windows=windows, attn_scale=float(getattr(hf, "query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=attn_cap, final_softcap=cap(hf, "final_logit_softcapping"))


class Attention(llama.Attention):
    NORM = GemmaRMSNorm


class Block(llama.Block):
    """Gemma's sandwich: each sub-layer's output is normed before it joins the residual."""

    ATTENTION = Attention

    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        norm_kw = dict(eps=cfg.rms_norm_eps, axis="embed", dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm_kw)
        self.self_attn = self.ATTENTION(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm_kw)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm_kw)
        self.mlp = self.MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm_kw)

    def finish(self, x, out, r):
        attn = self.self_attn
        b, t = out.shape[:2]
        out = checkpoint_name(out.reshape(b, t, attn.num_heads * attn.head_dim), "attention")
        x = checkpoint_name(x + self.post_attention_layernorm(attn.o_proj(out, r[self.O_KEY])), "residual")
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), r[self.O_KEY + 1:]))


class CausalLM(DecoderLM):
    """Gemma 2 / Gemma 3 (text): `model(input_ids)` -> logits [B, T, vocab] (see DecoderLM)."""

    BLOCK, NORM = Block, GemmaRMSNorm

    def embed(self, input_ids):
        x = self.embedder(input_ids)
        return x * jnp.asarray(self.cfg.hidden_size ** 0.5, x.dtype)
