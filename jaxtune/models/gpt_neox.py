"""GPT-NeoX (Pythia): `GPTNeoXForCausalLM`.

    x = embed_in(ids)
    for each layer (stacked, under lax.scan):
        q, k, v = split_per_head(query_key_value(layernorm(x)))    (HF's interleaved [heads, 3, head_dim])
        q, k = rope on the first rotary_dim features (partial_rotary_factor / rotary_pct)
        a = dense(attention(q, k, v))
        use_parallel_residual:  x = x + a + mlp(layernorm2(x))
        otherwise:              x = x + a;  x = x + mlp(layernorm2(x))
        mlp(h) = dense_4h_to_h(gelu(dense_h_to_4h(h)))
    logits = embed_out(final_layer_norm(x))

LayerNorms have biases; `attention_bias` puts biases on query_key_value and dense, the MLP always has
them. Module and parameter names mirror HF's (`gpt_neox.layers.3.attention.query_key_value`), so the
HF name map is a rule (`hf_tensor_name`), and PEFT's target names are the projections' own.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtune.errors import ModelLoadError
from jaxtune.models import rope as rope_lib
from jaxtune.models.config import ModelConfig, special_token_ids
from jaxtune.models.layers import ACTIVATIONS, LayerNorm, Linear
from jaxtune.models.stack import DecoderLM, hf_names

ARCHITECTURES = ("GPTNeoXForCausalLM",)
LORA_TARGETS = {"query_key_value": "attention", "dense": "attention", "dense_h_to_4h": "mlp",
                "dense_4h_to_h": "mlp"}

def config_from_hf(hf: Any, architecture: str, source_json: str) -> ModelConfig:
    act = getattr(hf, "hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"hidden_act {act!r} is not supported for GPT-NeoX (supported: {', '.join(ACTIVATIONS)})")
    head_dim = hf.hidden_size // hf.num_attention_heads
    params = dict(getattr(hf, "rope_parameters", None) or {})
    rotary_dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
    if rotary_dim % 2:
        raise ModelLoadError(f"partial_rotary_factor gives an odd rotary dimension {rotary_dim} (head_dim {head_dim})")
    bias = bool(getattr(hf, "attention_bias", True))
    return ModelConfig(
        architecture=architecture, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_attention_heads, head_dim=head_dim, rms_norm_eps=float(hf.layer_norm_eps),
        max_position_embeddings=int(hf.max_position_embeddings), rope=rope_lib.config_from_hf(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), qkv_bias=bias, o_bias=bias,
        mlp_bias=True, rotary_dim=rotary_dim, parallel_residual=bool(getattr(hf, "use_parallel_residual", True)),
        hidden_act=act, sliding_windows=(None,) * hf.num_hidden_layers,
        **special_token_ids(hf), source_config_json=source_json)


hf_tensor_name = hf_names(base="gpt_neox", head="embed_out")  # gpt_neox.layers.3.attention.dense.weight


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # [heads, 3, head_dim] flattened: a split at head boundaries keeps each head's q, k and v together
        self.query_key_value = Linear(d, 3 * n * h, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.dense = Linear(n * h, d, axes=("heads", "embed"), use_bias=cfg.o_bias, **kw)
        self.num_heads, self.head_dim = n, h


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense_h_to_4h = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.dense_4h_to_h = Linear(f, d, axes=("mlp", "embed"), **kw)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array, rngs: tuple) -> jax.Array:
        up = checkpoint_name(self.dense_h_to_4h(x, rngs[0]), "mlp_up")
        return self.dense_4h_to_h(self.act(up), rngs[1])


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        norm_kw = dict(eps=cfg.rms_norm_eps, axis="embed", dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = LayerNorm(cfg.hidden_size, **norm_kw)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, **norm_kw)
        self.attention = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.parallel_residual = cfg.parallel_residual

    @staticmethod
    def dropout_keys(rng) -> tuple:
        """One key per projection (query_key_value, dense, dense_h_to_4h, dense_4h_to_h), or Nones."""
        return (None,) * 4 if rng is None else tuple(jax.random.split(rng, 4))

    def qkv(self, x, cos, sin, r):
        attn = self.attention
        b, t, _ = x.shape
        fused = attn.query_key_value(self.input_layernorm(x), r[0]).reshape(b, t, attn.num_heads, 3 * attn.head_dim)
        q, k, v = jnp.split(fused, 3, axis=-1)
        q, k = rope_lib.apply_partial_rope(q, cos, sin), rope_lib.apply_partial_rope(k, cos, sin)
        return checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v")

    def finish(self, x, out, r):
        attn = self.attention
        b, t = out.shape[:2]
        out = checkpoint_name(out.reshape(b, t, attn.num_heads * attn.head_dim), "attention")
        attended = attn.dense(out, r[1])
        if self.parallel_residual:
            return x + attended + self.mlp(self.post_attention_layernorm(x), r[2:])
        x = checkpoint_name(x + attended, "residual")
        return x + self.mlp(self.post_attention_layernorm(x), r[2:])


class CausalLM(DecoderLM):
    """GPT-NeoX: `model(input_ids)` -> logits [B, T, vocab] (see DecoderLM)."""

    EMBED, FINAL_NORM, HEAD = "embed_in", "final_layer_norm", "embed_out"
    BLOCK, NORM = Block, LayerNorm
    PADDING_IDX = False  # transformers' GPT-NeoX embedding has no padding_idx
