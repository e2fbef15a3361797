"""Qwen3-MoE: `Qwen3MoeForCausalLM`, Qwen3's attention (q/k RMSNorm) with a sparse MoE MLP.

As Mixtral (models/mixtral.py) but: the top-k weights are renormalized only with `norm_topk_prob`
and rounded to the activations' dtype, the experts' intermediate size is `moe_intermediate_size`, and
checkpoints name the experts' parts `mlp.experts.{e}.gate_proj` / `up_proj` / `down_proj`. Layers
made dense by `mlp_only_layers` / `decoder_sparse_step` (a Qwen3 MLP of `intermediate_size`, the dense
layer transformers builds) are stacked apart as `dense_layers` (see models.stack.layer_runs); the
released Qwen3-MoE checkpoints route every layer.
"""

from __future__ import annotations

from typing import Any

from jaxtune.errors import ModelLoadError
from jaxtune.models import llama, mixtral
from jaxtune.models import rope as rope_lib
from jaxtune.models.config import ModelConfig, decoder_fields
from jaxtune.models.layers import ACTIVATIONS, RMSNorm
from jaxtune.models.moe import SparseMoE
from jaxtune.models.stack import DecoderLM

ARCHITECTURES = ("Qwen3MoeForCausalLM",)
LORA_TARGETS, LORA_PARAMETERS, EXPERTS = mixtral.LORA_TARGETS, mixtral.LORA_PARAMETERS, mixtral.EXPERTS
# The dense layers (mlp_only_layers / decoder_sparse_step): their projections (what QLoRA quantizes, as
# bitsandbytes does every nn.Linear), and those that take adapters: the attention's only, as PEFT with
# transformers 5 reads gate_proj / up_proj / down_proj in a Qwen3-MoE's target_modules as the experts'
# (v4) names and adapts the experts instead, so a dense MLP adapter could not be loaded back in PEFT.
DENSE_LINEARS, DENSE_LORA_TARGETS = llama.LORA_TARGETS, LORA_TARGETS
hf_tensor_name = mixtral.hf_tensor_name


def hf_tensor_parts(cfg: ModelConfig, ppath: tuple[str, ...], layer: int | None):
    if ppath[:3] in (("layers", "mlp", "experts"), ("layers", "mlp", "gate")):
        return mixtral.expert_parts(ppath, layer, cfg, f"model.layers.{layer}.mlp", ("gate_proj", "up_proj", "down_proj"))
    return [(hf_tensor_name(ppath, layer), ())]


def dense_layers(hf: Any, dense_architecture: str) -> tuple[int, ...]:
    """The layers transformers' Qwen2-MoE / Qwen3-MoE decoder layer builds dense: those listed in
    mlp_only_layers and those off the sparse step (routed where (i + 1) % decoder_sparse_step == 0)."""
    n = hf.num_hidden_layers
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    listed = {i for i in getattr(hf, "mlp_only_layers", None) or [] if 0 <= i < n}  # others name no layer
    dense = tuple(sorted(listed | {i for i in range(n) if (i + 1) % step}))
    if len(dense) == n:
        raise ModelLoadError(f"every layer is dense (mlp_only_layers / decoder_sparse_step={step}): no expert is "
                             f"ever used; load it as a {dense_architecture}")
    return dense


def config_from_hf(hf: Any, architecture: str, source_json: str) -> ModelConfig:
    act = getattr(hf, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    n = hf.num_hidden_layers
    dense = dense_layers(hf, "Qwen3ForCausalLM")
    window = getattr(hf, "sliding_window", None)
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        architecture=architecture, **decoder_fields(hf, source_json), rope=rope_lib.config_from_hf(hf), tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bias, o_bias=bias, qk_norm=True, hidden_act=act,
        sliding_windows=(int(window) if window else None,) * n, norm_topk_prob=bool(hf.norm_topk_prob), dense_layers=dense,
        **mixtral.moe_fields(hf, int(hf.num_experts), hf.moe_intermediate_size))


class MoE(SparseMoE):
    WEIGHTS_IN_DTYPE = True


class Block(mixtral.Block):
    MLP = MoE


class CausalLM(DecoderLM):
    """Qwen3-MoE: `model(input_ids)` -> logits [B, T, vocab] (see DecoderLM)."""

    BLOCK, NORM, DENSE_BLOCK = Block, RMSNorm, llama.Block
