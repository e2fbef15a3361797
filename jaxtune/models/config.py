"""The architecture description every model module is built from.

`ModelConfig` is frozen and hashable so it can be a static argument of jitted functions. It holds
only what the computation needs; the original HF `config.json` travels alongside (not hashed) so
that exports write back what was read.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters in HF's vocabulary (`rope_parameters` / `rope_scaling`).

    `rope_type` is one of `default`, `linear`, `dynamic`, `llama3`, `yarn`, `longrope`. The other fields are
    used by the types that need them; see `jaxtune.models.rope`.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None  # longrope: per-frequency factors up to the original length
    long_factor: tuple[float, ...] | None = None  # and beyond it


def special_token_ids(hf: Any) -> dict:
    """bos_token_id / eos_token_ids (a tuple: HF allows a list) / pad_token_id of a transformers config."""
    eos = getattr(hf, "eos_token_id", None)
    return {"bos_token_id": getattr(hf, "bos_token_id", None), "pad_token_id": getattr(hf, "pad_token_id", None),
            "eos_token_ids": tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))}


def decoder_fields(hf: Any, source_json: str, **overrides) -> dict:
    """The ModelConfig fields most transformers decoder configs give alike (sizes, heads, head_dim, the
    RMSNorm epsilon, context length, special tokens, the source JSON); a family adds its own, and
    `overrides` replace any of these."""
    heads = hf.num_attention_heads
    return {"vocab_size": hf.vocab_size, "hidden_size": hf.hidden_size, "intermediate_size": hf.intermediate_size,
            "num_layers": hf.num_hidden_layers, "num_heads": heads,
            "num_kv_heads": getattr(hf, "num_key_value_heads", None) or heads,
            "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            "rms_norm_eps": float(hf.rms_norm_eps), "max_position_embeddings": int(hf.max_position_embeddings),
            **special_token_ids(hf), "source_config_json": source_json, **overrides}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float  # the norms' epsilon (RMSNorm, or LayerNorm in families that use it)
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Rotary embedding on the first `rotary_dim` features of each head (None: all of head_dim).
    rotary_dim: int | None = None
    # GPT-NeoX: attention and MLP read the same input and add to the residual together.
    parallel_residual: bool = False
    hidden_act: str = "silu"
    # One entry per layer: the sliding-window size, or None for full attention.
    sliding_windows: tuple[int | None, ...] = ()
    # One RoPE per layer where layers differ (Gemma 3: local and global bases); empty: `rope` everywhere.
    layer_ropes: tuple[RopeConfig, ...] = ()
    # The attention's score scale (None: head_dim ** -0.5; Gemma: query_pre_attn_scalar ** -0.5).
    attn_scale: float | None = None
    # Soft caps, cap * tanh(x / cap), on the attention scores and on the final logits (Gemma 2).
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Mixture of experts (0 experts: a dense MLP): top-k of `num_experts` experts of `moe_intermediate_size`,
    # the k weights renormalized with `norm_topk_prob`; the load-balancing loss weighs `router_aux_loss_coef`
    # (0 unless the config sets output_router_logits, as transformers adds it only then).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    # A mixture of experts' layers whose MLP is dense (of `intermediate_size`; Qwen3-MoE's mlp_only_layers /
    # decoder_sparse_step): stacked apart, as `dense_layers` (see stack_layers).
    dense_layers: tuple[int, ...] = ()
    # Qwen2-MoE's shared expert (a SwiGLU MLP every token goes through, gated by a sigmoid): its size, 0 for none
    shared_expert_intermediate_size: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # The HF config.json this was read from, as JSON text (not part of equality or hashing).
    source_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)
    # Its generation_config.json, when it had one (written back unchanged on export).
    source_generation_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    @property
    def ropes(self) -> tuple[tuple[RopeConfig, ...], tuple[int, ...]]:
        """(the distinct RoPE configurations, each layer's index into them)."""
        per_layer = self.layer_ropes or (self.rope,) * self.num_layers
        distinct = tuple(dict.fromkeys(per_layer))
        return distinct, tuple(distinct.index(r) for r in per_layer)

    def stack_layers(self, stack: str) -> tuple[int, ...] | None:
        """The layer (HF's index) of each entry of a layer stack's parameters: `layers` holds every layer,
        or, where some layers are dense (`dense_layers`), the routed ones; `dense_layers` the dense ones.
        None for a parameter outside the stacks (embedding, final norm, head)."""
        if stack == "dense_layers":
            return self.dense_layers
        if stack != "layers":
            return None
        dense = set(self.dense_layers)
        return tuple(layer for layer in range(self.num_layers) if layer not in dense)

    @property
    def source_config(self) -> dict[str, Any]:
        return json.loads(self.source_config_json)
