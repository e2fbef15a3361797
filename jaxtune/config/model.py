"""The model keys: which checkpoint, precision, attention, remat, and the adapter (LoRA / QLoRA)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jaxtune.config.base import Section
from jaxtune.logging import warn_once

# HF attention names map onto jaxtune's backends (kernels/attention.py); `auto` picks the best.
ATTN_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "pallas", "cudnn", "eager", "sdpa", "flash_attention_2",
                        "flash_attention_3", "flex_attention", "xformers")
OTHER_ATTN_IMPLEMENTATIONS = ("flash_attention_4", "flash_attention_torch", "sage", "fp8", "fsa")


class ModelKeys(Section):
    base_model: str | None = Field(None, description="HF model directory, or `bundled:smollm2`.")
    tokenizer_config: str | None = Field(None, description="Directory of the tokenizer, when not base_model's.")
    trust_remote_code: bool | None = Field(None, description="jaxtune never runs code shipped with a checkpoint: "
                                           "true is an error naming the file that would run (config.json auto_map), "
                                           "or has no effect when the checkpoint ships none.")
    # precision
    bf16: bool | Literal["auto", "full"] = Field(
        "auto", description="bf16 compute with fp32 trainable parameters; `full` keeps every parameter in bf16; "
        "`auto` uses bf16 where the backend runs it fast (GPU, TPU) and fp32 on CPU.")
    fp16: bool | None = Field(None, description="Mapped to bf16 (JAX trains in bf16, no loss scaling needed).")
    bfloat16: bool | None = Field(None, description="Store every parameter in bf16 (same as bf16: full).")
    float16: bool | None = Field(None, description="Mapped to bfloat16.")
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] = Field(  # type: ignore[valid-type]
        "auto", description="Attention kernel: auto (pallas on GPUs and TPUs, blockwise elsewhere), xla (reference), "
        "blockwise, pallas, cudnn; HF names (eager, sdpa, flash_attention_2, ...) map to jaxtune's backends.")
    gradient_checkpointing: bool | Literal["full", "dots", "none"] = Field(
        False, description="Rematerialise activations in the backward pass: true/full recomputes each layer, "
        "`dots` keeps matmul outputs.")
    activation_offloading: bool | Literal["legacy", "disk", "hidden_states"] | None = Field(
        None, description="Keep the activations saved for the backward in pinned host memory instead of the "
        "device's (remat with offload; every Axolotl mode maps to this); where devices have no host memory, "
        "full gradient checkpointing with a warning.")
    chunked_cross_entropy: bool | None = Field(
        None, description="Compute the loss from the hidden states and the LM head in token chunks, never the "
        "whole [batch, seq, vocab] logits (default: on; same values, far less memory).")
    use_cut_cross_entropy: bool | None = Field(None, description="Axolotl's name for chunked_cross_entropy.")
    reinit_weights: bool | None = Field(None, description="Train from random weights (drawn as transformers "
                                        "initialises the architecture), not the checkpoint's.")
    unfrozen_parameters: list[str] | None = Field(
        None, description="Full fine-tuning of only the parameters whose HF names match one of these regexes "
        "(Axolotl's rules: matched from the start, dots literal, an optional [start:end] range of rows); the "
        "rest stays frozen, without optimizer state.")
    # adapters
    adapter: Literal["lora", "qlora"] | None = Field(None, description="Train a LoRA adapter (qlora: over NF4 "
                                                     "frozen weights) instead of every parameter.")
    lora_model_dir: str | None = Field(None, description="Start from this PEFT adapter directory.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA alpha: the update is scaled by alpha / r.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_parameters: list[str] | None = Field(
        None, description="Parameters adapted in place, by PEFT's target_parameters names: a mixture of experts' "
        "stacked experts (mlp.experts.gate_up_proj, mlp.experts.down_proj: one adapter per expert) and its "
        "router (mlp.gate.weight, frozen unless listed). Needs lora_dropout: 0, as in PEFT.")
    lora_target_modules: list[str] | str | None = Field(
        None, description="Projections that get adapters, by PEFT module name (the model family's: q_proj ... "
        "down_proj for Llama, query_key_value / dense / dense_h_to_4h / dense_4h_to_h for GPT-NeoX, qkv_proj / "
        "o_proj / gate_up_proj / down_proj for Phi-3); a string is a "
        "regular expression over module paths, as in PEFT.")
    lora_target_linear: bool | None = Field(None, description="Adapt every linear projection of the layers.")
    lora_modules_to_save: list[Literal["embed_tokens", "lm_head"]] | None = Field(
        None, description="Modules trained fully next to the adapter (saved whole in the adapter).")
    peft_use_rslora: bool = Field(False, description="rsLoRA scaling alpha / sqrt(r).")
    peft_layers_to_transform: list[int] | int | None = Field(None, description="Only these layer indices get "
                                                             "adapters.")
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: B matrices learn this many times "
                                            "faster than A.")
    loraplus_lr_embedding: float | None = Field(None, gt=0, description="LoRA+: learning rate of embedding "
                                                "adapters (jaxtune puts no adapters on embeddings, so unused).")
    # quantization
    load_in_4bit: bool | None = Field(None, description="Frozen kernels stored as NF4 (adapter: qlora).")
    load_in_8bit: bool | None = Field(None, description="int8 frozen kernels (not supported; use load_in_4bit).")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the NF4 block scales too.")
    quantize_moe_experts: bool = Field(False, description="QLoRA on a mixture of experts: its stacked experts as NF4 "
                                       "too (by default, as bitsandbytes, only the attention projections are; the "
                                       "experts and the router stay in float).")
    bnb_4bit_quant_type: Literal["nf4"] = Field("nf4", description="4-bit code book (nf4 only).")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Dtype the NF4 kernels are dequantized to (default: the compute dtype).")

    @field_validator("attn_implementation", mode="before")
    @classmethod
    def _attn(cls, value):
        """Axolotl's other attention backends (hub kernels such as kernels-community/vllm-flash-attn3, sage,
        fp8, FlashAttention 4, ...) are CUDA kernels: jaxtune picks its own (auto), saying so once."""
        if isinstance(value, str) and value not in ATTN_IMPLEMENTATIONS and (
                "/" in value or value in OTHER_ATTN_IMPLEMENTATIONS):
            warn_once(f"attn_implementation {value}: a CUDA kernel jaxtune does not use; attention runs on jaxtune's "
                      "own kernels (auto: pallas on GPUs and TPUs, blockwise elsewhere)")
            return "auto"
        return value

    @model_validator(mode="before")
    @classmethod
    def _lora_in_4bit(cls, data):
        if isinstance(data, dict) and data.get("adapter") == "lora" and data.get("load_in_4bit"):
            # Axolotl loads the base in 4 bits under a plain LoRA adapter too: that is QLoRA
            warn_once("adapter: lora with load_in_4bit: true is QLoRA: the frozen kernels are stored as NF4")
            data = {**data, "adapter": "qlora"}
        return data

    @model_validator(mode="after")
    def _check_model(self) -> ModelKeys:
        if None not in (self.chunked_cross_entropy, self.use_cut_cross_entropy) and \
                self.chunked_cross_entropy != self.use_cut_cross_entropy:
            raise ValueError("chunked_cross_entropy and use_cut_cross_entropy (its Axolotl name) disagree; set one")
        if self.load_in_8bit:
            raise ValueError("load_in_8bit is not supported: int8 frozen kernels are not implemented; use "
                             "adapter: qlora with load_in_4bit: true (NF4), or plain lora")
        if self.adapter == "qlora" and not self.load_in_4bit:
            raise ValueError("adapter: qlora needs load_in_4bit: true")
        if self.load_in_4bit and self.adapter != "qlora":
            raise ValueError("load_in_4bit: true needs adapter: qlora (4-bit weights cannot train)")
        lora_keys = ("lora_model_dir", "lora_target_modules", "lora_target_linear", "lora_modules_to_save",
                     "peft_layers_to_transform", "loraplus_lr_ratio", "lora_target_parameters")
        if self.adapter is None:
            if self.lora_model_dir:
                raise ValueError("lora_model_dir set without adapter: lora / qlora (to continue training that "
                                 "adapter, set adapter: lora)")
            given = [k for k in lora_keys if getattr(self, k) not in (None, False)]
            if given:  # as in Axolotl, which ignores them; said loudly, as a forgotten `adapter:` looks the same
                warn_once(f"{', '.join(given)} set without adapter: lora / qlora: they have no effect, and every "
                          "parameter trains (full fine-tuning)")
        elif (self.lora_model_dir is None and not self.lora_target_modules and not self.lora_target_linear
              and not self.lora_target_parameters):
            raise ValueError("an adapter needs lora_target_modules, lora_target_parameters or lora_target_linear: true")
        if self.quantize_moe_experts and self.adapter != "qlora":
            raise ValueError("quantize_moe_experts: true quantizes a mixture of experts' experts for QLoRA: it needs "
                             "adapter: qlora (load_in_4bit)")
        if self.reinit_weights and self.adapter:
            raise ValueError("reinit_weights trains from random weights: it needs full fine-tuning (no adapter)")
        if self.unfrozen_parameters and self.adapter:
            raise ValueError("unfrozen_parameters chooses what trains in full fine-tuning; with an adapter, train "
                             "embeddings or the head fully with lora_modules_to_save")
        if self.loraplus_lr_embedding is not None:
            warn_once("loraplus_lr_embedding has no effect: jaxtune puts no LoRA adapters on embeddings (train them "
                      "fully with lora_modules_to_save)")
        if isinstance(self.lora_target_modules, list):  # the family's names are checked against the model
            heads = [m for m in self.lora_target_modules if m in ("lm_head", "embed_tokens", "embed_in", "embed_out")]
            if heads:
                raise ValueError(f"lora_target_modules: {', '.join(heads)}: jaxtune puts adapters on the layers' "
                                 "projections; embeddings and the head train fully with lora_modules_to_save")
        return self
