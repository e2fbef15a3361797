"""Mixtral: `MixtralForCausalLM`, the Llama decoder (Mistral's attention) with a sparse MoE MLP.

    x = x + o_proj(attention(...))                          as Mistral (sliding window where set)
    x = x + moe(norm(x))                                    top-k of E experts (softmax router,
                                                            weights renormalized), SwiGLU experts

Parameter and PEFT module names follow transformers' modules (`mlp.gate`, `mlp.experts.gate_up_proj`
[E, D, 2I] and `mlp.experts.down_proj` [E, I, D], stacked over layers); checkpoints store one tensor per
expert and part (`block_sparse_moe.experts.{e}.w1` / `w3` / `w2`, `block_sparse_moe.gate`), which
`hf_tensor_parts` maps into those arrays and back.
"""

from __future__ import annotations

from typing import Any

from jax.ad_checkpoint import checkpoint_name

from jaxtune.errors import ModelLoadError
from jaxtune.models import llama
from jaxtune.models import rope as rope_lib
from jaxtune.models.config import ModelConfig, decoder_fields
from jaxtune.models.layers import ACTIVATIONS, RMSNorm
from jaxtune.models.moe import SparseMoE
from jaxtune.models.stack import DecoderLM, hf_names

ARCHITECTURES = ("MixtralForCausalLM",)
LORA_TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
# The stacked experts' modules in a layer (NF4 with quantize_moe_experts), and PEFT's target_parameters
# (lora_target_parameters) -> the module holding each, in the order PEFT nests its wrappers: the experts'
# parameters as transformers defines them, then the router.
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LORA_PARAMETERS = {**{path: path for path in EXPERTS}, "mlp.gate.weight": "mlp.gate"}
_names = hf_names(base="model", head="lm_head")


def hf_tensor_name(ppath: tuple[str, ...], layer: int | None) -> str:
    """transformers' (and PEFT's) name of a parameter: `model.layers.3.mlp.experts.gate_up_proj` for the
    stacked experts (a parameter of its module, no `.weight`), the Llama rule otherwise."""
    name = _names(ppath, layer)
    return name.removesuffix(".weight") if "experts" in ppath else name


def expert_parts(ppath: tuple[str, ...], layer: int, cfg: ModelConfig, base: str, names: tuple[str, str, str]):
    """The checkpoint tensors of a stacked MoE parameter, each with its index into the layer's array:
    the router is one tensor; gate_up_proj [E, D, 2I] is (gate, up) per expert, down_proj one per expert.
    `base` is the layer's MoE module in the checkpoint, `names` the expert's gate / up / down names."""
    if ppath[2] == "gate":
        return [(f"{base}.gate.weight", ())]
    i = cfg.moe_intermediate_size
    gate, up, down = names
    if ppath[3] == "gate_up_proj":
        return [part for e in range(cfg.num_experts) for part in
                ((f"{base}.experts.{e}.{gate}.weight", (e, slice(None), slice(0, i))),
                 (f"{base}.experts.{e}.{up}.weight", (e, slice(None), slice(i, 2 * i))))]
    return [(f"{base}.experts.{e}.{down}.weight", (e,)) for e in range(cfg.num_experts)]


def hf_tensor_parts(cfg: ModelConfig, ppath: tuple[str, ...], layer: int | None):
    if ppath[:2] == ("layers", "mlp"):
        return expert_parts(ppath, layer, cfg, f"model.layers.{layer}.block_sparse_moe", ("w1", "w3", "w2"))
    return [(_names(ppath, layer), ())]


def moe_fields(hf: Any, num_experts: int, intermediate: int) -> dict:
    """The ModelConfig fields of a transformers MoE config (the aux loss only when it asks for it)."""
    top_k = int(hf.num_experts_per_tok)
    if not 0 < top_k <= num_experts:
        raise ModelLoadError(f"num_experts_per_tok={top_k} must be between 1 and the {num_experts} experts")
    coef = float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0) if getattr(hf, "output_router_logits", False) else 0.0
    return dict(num_experts=num_experts, experts_per_token=top_k, moe_intermediate_size=int(intermediate),
                router_aux_loss_coef=coef)


def config_from_hf(hf: Any, architecture: str, source_json: str) -> ModelConfig:
    act = getattr(hf, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if getattr(hf, "router_jitter_noise", 0.0):
        raise ModelLoadError(f"router_jitter_noise={hf.router_jitter_noise} is not supported (it is training-time "
                             "noise on the router's input; set it to 0)")
    n = hf.num_hidden_layers
    window = getattr(hf, "sliding_window", None)
    return ModelConfig(
        architecture=architecture, **decoder_fields(hf, source_json), rope=rope_lib.config_from_hf(hf), tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        hidden_act=act, sliding_windows=(int(window) if window else None,) * n, norm_topk_prob=True,
        **moe_fields(hf, int(hf.num_local_experts), hf.intermediate_size))


class Block(llama.Block):
    """A pre-norm decoder layer whose MLP is a routed mixture of experts."""

    MLP = SparseMoE
    ROUTED = True  # finish takes the real-token mask and returns the router statistics too

    def finish(self, x, out, r, valid=None):
        attn = self.self_attn
        b, t = out.shape[:2]
        out = checkpoint_name(out.reshape(b, t, attn.num_heads * attn.head_dim), "attention")
        x = checkpoint_name(x + attn.o_proj(out, r[self.O_KEY]), "residual")
        y, stats = self.mlp(self.post_attention_layernorm(x), valid)
        return x + y, stats


class CausalLM(DecoderLM):
    """Mixtral: `model(input_ids)` -> logits [B, T, vocab] (see DecoderLM)."""

    BLOCK, NORM = Block, RMSNorm
