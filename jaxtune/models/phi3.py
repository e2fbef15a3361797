"""Phi-3 (Phi-3, Phi-3.5, Phi-4 text): `Phi3ForCausalLM`.

The Llama decoder with fused projections, as HF stores them and as PEFT names its LoRA targets:

    q | k | v = qkv_proj(norm(x))            (concatenated: num_heads, then num_kv_heads, then num_kv_heads heads)
    x = x + o_proj(attention(rope(q), rope(k), v))
    gate | up = gate_up_proj(norm(x))        (concatenated halves)
    x = x + down_proj(silu(gate) * up)

RoPE may be partial (`partial_rotary_factor`, Phi-4-mini) and `longrope` (short factors up to
original_max_position_embeddings, long ones beyond, chosen from each call's positions as transformers
does); `sliding_window`, where set, applies to every layer.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtune.errors import ModelLoadError
from jaxtune.models import llama
from jaxtune.models import rope as rope_lib
from jaxtune.models.config import ModelConfig, decoder_fields
from jaxtune.models.layers import Linear, RMSNorm
from jaxtune.models.stack import DecoderLM, hf_names

ARCHITECTURES = ("Phi3ForCausalLM",)
LORA_TARGETS = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
hf_tensor_name = hf_names(base="model", head="lm_head")  # model.layers.3.self_attn.qkv_proj.weight


def config_from_hf(hf: Any, architecture: str, source_json: str) -> ModelConfig:
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act {act!r} is not supported for Phi-3 (its MLP is SwiGLU: silu)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    params = dict(getattr(hf, "rope_parameters", None) or {})
    rotary_dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
    if rotary_dim % 2:
        raise ModelLoadError(f"partial_rotary_factor gives an odd rotary dimension {rotary_dim} (head_dim {head_dim})")
    window = getattr(hf, "sliding_window", None)
    return ModelConfig(
        architecture=architecture, **decoder_fields(hf, source_json, head_dim=head_dim), rope=rope_lib.config_from_hf(hf), tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        rotary_dim=rotary_dim, sliding_windows=(int(window) if window else None,) * hf.num_hidden_layers)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv_proj = Linear(d, (n + 2 * k) * h, axes=("embed", "heads"), **kw)
        self.o_proj = Linear(n * h, d, axes=("heads", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_up_proj = Linear(d, 2 * f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, rngs: tuple) -> jax.Array:
        fused = checkpoint_name(self.gate_up_proj(x, rngs[0]), "mlp_up")
        gate, up = fused[..., : fused.shape[-1] // 2], fused[..., fused.shape[-1] // 2:]
        return self.down_proj(jax.nn.silu(gate) * up, rngs[1])


class Block(llama.Block):
    ATTENTION, MLP, PROJECTIONS, O_KEY = Attention, MLP, 4, 1  # qkv_proj, o_proj, gate_up_proj, down_proj

    def qkv(self, x, cos, sin, r):
        attn = self.self_attn
        b, t, _ = x.shape
        n, k, h = attn.num_heads, attn.num_kv_heads, attn.head_dim
        fused = attn.qkv_proj(self.input_layernorm(x), r[0])
        q = fused[..., : n * h].reshape(b, t, n, h)
        key = fused[..., n * h: (n + k) * h].reshape(b, t, k, h)
        v = fused[..., (n + k) * h:].reshape(b, t, k, h)
        q, key = rope_lib.apply_partial_rope(q, cos, sin), rope_lib.apply_partial_rope(key, cos, sin)
        return checkpoint_name(q, "q"), checkpoint_name(key, "k"), checkpoint_name(v, "v")


class CausalLM(DecoderLM):
    """Phi-3: `model(input_ids)` -> logits [B, T, vocab] (see DecoderLM)."""

    BLOCK, NORM = Block, RMSNorm
