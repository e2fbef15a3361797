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
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtune.errors import ModelLoadError
from jaxtune.models import rope as rope_lib
from jaxtune.models.config import ModelConfig, decoder_fields
from jaxtune.models.layers import ACTIVATIONS, Linear, RMSNorm
from jaxtune.models.stack import DecoderLM, hf_names

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# The layers' projections that take LoRA adapters, by PEFT module name, and where they live in a layer.
LORA_TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

def config_from_hf(hf: Any, architecture: str, source_json: str) -> ModelConfig:
    """Build a ModelConfig from a transformers config object of one of ARCHITECTURES."""
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act {act!r} is not supported (the Llama-family decoder uses silu)")
    if (getattr(hf, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("partial_rotary_factor != 1 is not supported by the Llama-family decoder")
    num_layers = hf.num_hidden_layers
    windows: list[int | None] = [None] * num_layers
    if architecture == "MistralForCausalLM" and getattr(hf, "sliding_window", None):
        windows = [int(hf.sliding_window)] * num_layers
    elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and getattr(hf, "sliding_window", None):
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * num_layers
        windows = [int(hf.sliding_window) if t == "sliding_attention" else None for t in layer_types]
    attention_bias = bool(getattr(hf, "attention_bias", False))
    qkv_bias = {"Qwen2ForCausalLM": True, "MistralForCausalLM": False}.get(architecture, attention_bias)
    o_bias = {"Qwen2ForCausalLM": False, "MistralForCausalLM": False}.get(architecture, attention_bias)
    return ModelConfig(
        architecture=architecture,
        **decoder_fields(hf, source_json),
        rope=rope_lib.config_from_hf(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)) if architecture == "LlamaForCausalLM" else False,
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_windows=tuple(windows),
    )


hf_tensor_name = hf_names(base="model", head="lm_head")  # model.layers.3.self_attn.q_proj.weight


class Attention(nnx.Module):
    NORM = RMSNorm  # q_norm / k_norm (Qwen3; Gemma 3 swaps in its own)

    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, n * h, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear(d, k * h, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(d, k * h, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear(n * h, d, axes=("heads", "embed"), use_bias=cfg.o_bias, **kw)
        norm_kw = dict(eps=cfg.rms_norm_eps, axis="head_dim", dtype=dtype, param_dtype=param_dtype)
        self.q_norm = self.NORM(h, **norm_kw) if cfg.qk_norm else None
        self.k_norm = self.NORM(h, **norm_kw) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)
        self.act = ACTIVATIONS[cfg.hidden_act]  # silu (SwiGLU); Gemma's tanh GELU (GeGLU)

    def __call__(self, x: jax.Array, rngs: tuple | None = None) -> jax.Array:
        r = rngs or (None,) * 3
        gate = checkpoint_name(self.gate_proj(x, r[0]), "mlp_gate")
        up = checkpoint_name(self.up_proj(x, r[1]), "mlp_up")
        return self.down_proj(self.act(gate) * up, r[2])


class Block(nnx.Module):
    """A pre-norm decoder layer: x += o_proj(attention(...)); x += mlp(norm(x)). Subclasses with fused
    projections (Phi-3) swap ATTENTION / MLP and `qkv`, and say how many projections take a dropout key
    (PROJECTIONS) and which is the output projection's (O_KEY; the MLP's follow it)."""

    ATTENTION, MLP, PROJECTIONS, O_KEY = Attention, MLP, 7, 3

    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        norm_kw = dict(eps=cfg.rms_norm_eps, axis="embed", dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.self_attn = self.ATTENTION(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.mlp = self.MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @classmethod
    def dropout_keys(cls, rng) -> tuple:
        """One key per projection (q, k, v, o, gate, up, down), or Nones without dropout."""
        return (None,) * cls.PROJECTIONS if rng is None else tuple(jax.random.split(rng, cls.PROJECTIONS))

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
        x = checkpoint_name(x + attn.o_proj(out, r[self.O_KEY]), "residual")
        return x + self.mlp(self.post_attention_layernorm(x), r[self.O_KEY + 1:])


class CausalLM(DecoderLM):
    """Llama / Mistral / Qwen2 / Qwen3: `model(input_ids)` -> logits [B, T, vocab] (see DecoderLM)."""

    BLOCK, NORM = Block, RMSNorm
