"""Qwen2-MoE: `Qwen2MoeForCausalLM` (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B), Qwen2's attention (biased q, k,
v) with a sparse MoE MLP that has a shared expert:

    y = moe(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)

`moe` routes as Qwen3-MoE's (softmax top-k, renormalized only with `norm_topk_prob`, the weights rounded
to the activations' dtype); `shared_expert` is a SwiGLU MLP of `shared_expert_intermediate_size` that
every token goes through; `shared_expert_gate` a [D, 1] projection. Dense layers (`mlp_only_layers` /
`decoder_sparse_step`: a Qwen2 MLP of `intermediate_size`) are stacked apart, as Qwen3-MoE's.
Checkpoints hold one tensor per expert and part (`mlp.experts.{e}.gate_proj` / `up_proj` / `down_proj`),
the router `mlp.gate`, the shared expert `mlp.shared_expert.*` and its gate `mlp.shared_expert_gate`.
Adapters: the attention (LORA_TARGETS), the experts and router (LORA_PARAMETERS); PEFT with transformers
5 reads gate_proj / up_proj / down_proj in a Qwen2-MoE's target_modules as the experts' names, so the
shared expert's projections take none (they are in float or NF4 like every other projection).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from jaxtune.errors import ModelLoadError
from jaxtune.models import llama, mixtral, qwen3_moe
from jaxtune.models import rope as rope_lib
from jaxtune.models.config import ModelConfig, decoder_fields
from jaxtune.models.layers import ACTIVATIONS, Linear, RMSNorm
from jaxtune.models.stack import DecoderLM

ARCHITECTURES = ("Qwen2MoeForCausalLM",)
LORA_TARGETS, LORA_PARAMETERS, EXPERTS = qwen3_moe.LORA_TARGETS, qwen3_moe.LORA_PARAMETERS, qwen3_moe.EXPERTS
DENSE_LINEARS, DENSE_LORA_TARGETS = qwen3_moe.DENSE_LINEARS, qwen3_moe.DENSE_LORA_TARGETS
# A routed layer's other projections (no adapter): what QLoRA quantizes besides LORA_TARGETS, as
# bitsandbytes quantizes every nn.Linear.
OTHER_LINEARS = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                 "mlp.shared_expert_gate")
hf_tensor_name, hf_tensor_parts = mixtral.hf_tensor_name, qwen3_moe.hf_tensor_parts


def config_from_hf(hf: Any, architecture: str, source_json: str) -> ModelConfig:
    act = getattr(hf, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    n = hf.num_hidden_layers
    layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * n
    window = getattr(hf, "sliding_window", None)
    windows = tuple(int(window) if window and kind == "sliding_attention" else None for kind in layer_types)
    return ModelConfig(
        architecture=architecture, **decoder_fields(hf, source_json), rope=rope_lib.config_from_hf(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(hf, "qkv_bias", True)), o_bias=False, hidden_act=act, sliding_windows=windows,
        norm_topk_prob=bool(hf.norm_topk_prob), dense_layers=qwen3_moe.dense_layers(hf, "Qwen2ForCausalLM"),
        shared_expert_intermediate_size=int(hf.shared_expert_intermediate_size),
        **mixtral.moe_fields(hf, int(hf.num_experts), hf.moe_intermediate_size))


class MoE(qwen3_moe.MoE):
    """Qwen3-MoE's routing and experts plus the gated shared expert."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        shared = dataclasses.replace(cfg, intermediate_size=cfg.shared_expert_intermediate_size)
        self.shared_expert = llama.MLP(shared, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, axes=("embed", None), use_bias=False, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, valid: jax.Array, rngs: tuple | None = None):
        y, stats = super().__call__(x, valid, rngs)
        x = x.astype(self.dtype)
        return y + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x), stats


class Block(mixtral.Block):
    MLP = MoE


class CausalLM(DecoderLM):
    """Qwen2-MoE: `model(input_ids)` -> logits [B, T, vocab] (see DecoderLM)."""

    BLOCK, NORM, DENSE_BLOCK = Block, RMSNorm, llama.Block

