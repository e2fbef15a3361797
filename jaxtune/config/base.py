"""What every config section shares: the strict base model and the tables of renamed, ineffective
and unsupported keys (one place for each, so the rules are read in one file).

- `DEPRECATED_KEYS`: an old Axolotl name -> its current name (and how the value maps); the value is
  moved and one warning is printed.
- `NO_EFFECT_KEYS`: keys that change nothing on JAX; accepted with one warning naming the reason.
- `NOT_SUPPORTED_KEYS`: keys whose feature jaxtune does not have (yet); setting them to anything
  but their off value is an error that says so, never a silent no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from jaxtune.errors import JaxtuneError
from jaxtune.logging import warn_once


class ConfigError(JaxtuneError):
    """The config file or an override is invalid; the message says which key and why."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


def _attn(value: Any, name: str) -> str | None:
    return name if value else None


# section -> old name -> new name, or (new name, value mapping; None from the mapping drops the key).
DEPRECATED_KEYS: dict[str, dict[str, str | tuple[str, Callable[[Any], Any]]]] = {
    "top": {
        "flash_attention": ("attn_implementation", lambda v: _attn(v, "flash_attention_2")),
        "sdp_attention": ("attn_implementation", lambda v: _attn(v, "sdpa")),
        "xformers_attention": ("attn_implementation", lambda v: _attn(v, "xformers")),
        "flex_attention": ("attn_implementation", lambda v: _attn(v, "flex_attention")),
        "eager_attention": ("attn_implementation", lambda v: _attn(v, "eager")),
        "sequence_parallel_degree": "context_parallel_size",
        "dpo_beta": "rl_beta",
    },
    "dataset": {
        "train_on_split": "split",
        "conversation": "chat_template",
        "message_field_role": "message_property_mappings.role",
        "message_field_content": "message_property_mappings.content",
    },
}

_ATTN = "jaxtune chooses the attention kernel with attn_implementation"
# Keys Axolotl has that change nothing here, with the reason printed in their one warning.
NO_EFFECT_KEYS: dict[str, str] = {
    "sample_packing_group_size": "jaxtune packs the whole dataset at once with first-fit-decreasing",
    "sample_packing_bin_size": "jaxtune packs the whole dataset at once with first-fit-decreasing",
    "sample_packing_eff_est": "packing efficiency is measured at preprocessing and printed",
    "total_num_tokens": "token counts are measured at preprocessing",
    "tokenizer_type": "tokenizers are always loaded with transformers' AutoTokenizer",
    "tokenizer_use_fast": "jaxtune always uses the fast (Rust) tokenizer",
    "tokenizer_legacy": "jaxtune always uses the tokenizer as saved",
    "is_llama_derived_model": "the architecture is read from config.json",
    "is_mistral_derived_model": "the architecture is read from config.json",
    "is_qwen_derived_model": "the architecture is read from config.json",
    "is_falcon_derived_model": "the architecture is read from config.json",
    "model_type": "the model class is read from config.json",
    "tf32": "TF32 is a CUDA matmul mode; XLA chooses matmul precision itself",
    "vllm": "GRPO rollouts use jaxtune's own sampler on the training mesh, with the parameters being trained (no "
            "vLLM server, no weight sync)",
    "torch_compile": "JAX always compiles the step with XLA",
    "torch_compile_backend": "JAX always compiles the step with XLA",
    "dataloader_num_workers": "the grain loader reads prepared rows in-process",
    "dataloader_pin_memory": "the grain loader reads prepared rows in-process",
    "dataloader_prefetch_factor": "the grain loader reads prepared rows in-process",
    "dataloader_drop_last": "jaxtune never drops rows: the last batch is filled with padding rows",
    "device_map": "placement follows the device mesh",
    "max_memory": "placement follows the device mesh (`jaxtune plan` tells what fits)",
    "gpu_memory_limit": "placement follows the device mesh",
    "lora_on_cpu": "placement follows the device mesh",
    "bnb_config_kwargs": "jaxtune's NF4 is configured by bnb_4bit_use_double_quant / bnb_4bit_compute_dtype",
    "llm_int8_has_fp16_weight": "bitsandbytes tuning; jaxtune's quantization is its own",
    "gradient_checkpointing_kwargs": "gradient_checkpointing picks the remat policy",
    "ddp_timeout": "torch.distributed setting",
    "ddp_bucket_cap_mb": "torch.distributed setting",
    "ddp_broadcast_buffers": "torch.distributed setting",
    "ddp_find_unused_parameters": "torch.distributed setting",
    "strict": "jaxtune's configs are always strict (unknown keys are errors)",
    "flash_attn_cross_entropy": _ATTN,
    "flash_attn_rms_norm": "XLA fuses RMSNorm itself",
    "flash_attn_fuse_qkv": "XLA fuses the projections itself",
    "flash_attn_fuse_mlp": "XLA fuses the projections itself",
    "lora_mlp_kernel": "XLA fuses the LoRA matmuls itself",
    "lora_qkv_kernel": "XLA fuses the LoRA matmuls itself",
    "lora_o_kernel": "XLA fuses the LoRA matmuls itself",
    "use_liger_kernel": "Liger is a set of Triton kernels; XLA fuses these operations itself, and the fused linear "
                        "cross-entropy is jaxtune's chunked_cross_entropy (on by default)",
    "wandb_watch": "gradient histograms are not logged",
    "wandb_log_model": "the model is written to output_dir, not uploaded",
    "do_eval": "evaluation runs whenever there is an eval set (val_set_size / test_datasets)",
    "save_safetensors": "exports are always safetensors",
    "eval_table_size": "prediction tables are not logged",
    "eval_max_new_tokens": "prediction tables are not logged",
    "dpo_use_liger_kernel": "Liger's DPO loss is a Triton kernel; jaxtune computes the preference losses from "
                            "chunked log-probs without logits (as fused as Liger's)",
    "dpo_padding_free": "preference rows are already laid out without padding inside a row (packed pairs, "
                        "shared prompts)",
}

# Keys for features jaxtune does not have: an error when set to anything but their off value.
NOT_SUPPORTED_KEYS: dict[str, str] = {
    "rpo_alpha": "RPO's NLL term was removed from TRL 0.29; use rl: dpo with dpo_loss_type [sigmoid, sft] and "
                 "dpo_loss_weights [1, alpha]",
    "dpo_norm_loss": "no longer supported by Axolotl/TRL; use dpo_loss_type [sigmoid_norm]",
    "dpo_use_logits_to_keep": "no longer supported by Axolotl/TRL (log-probs are computed only for the completions)",
    "dpo_generate_during_eval": "no longer supported by Axolotl/TRL",
    "reward_model": "reward-model training is not supported",
    "process_reward_model": "reward-model training is not supported",
    "gptq": "GPTQ checkpoints are not supported; use adapter: qlora with load_in_4bit",
    "peft_use_dora": "DoRA is not supported",
    "lora_fan_in_fan_out": "fan_in_fan_out models (GPT-2 Conv1D) are not supported",
    "loftq_config": "LoftQ initialisation is not supported",
    "relora_steps": "ReLoRA is not supported",
    "group_by_length": "length grouping is not supported; use sample_packing for the same saving",
    "push_to_hub": "this tool does not upload; copy output_dir/hf yourself",
    "hub_model_id": "this tool does not upload; copy output_dir/hf yourself",
    "base_model_config": "config.json is read from base_model",
    "revision_of_model": "base_model must be a local directory (no hub downloads at run time)",
    "unfrozen_parameters": "partial full fine-tuning by parameter name is not supported; use adapter: lora with "
                           "lora_modules_to_save",
    "neftune_noise_alpha": "NEFTune is not supported",
}


def warn_no_effect(data: dict) -> dict:
    """Drop NO_EFFECT_KEYS from `data` with one warning each; raise for NOT_SUPPORTED_KEYS that are on."""
    for key in [k for k in data if k in NO_EFFECT_KEYS]:
        if data[key] not in (None, False):
            warn_once(f"config key '{key}' has no effect in jaxtune: {NO_EFFECT_KEYS[key]}")
        data = {k: v for k, v in data.items() if k != key}
    for key in [k for k in data if k in NOT_SUPPORTED_KEYS]:
        if data[key] not in (None, False, [], {}, 0):
            raise ValueError(f"'{key}' is not supported: {NOT_SUPPORTED_KEYS[key]}")
        data = {k: v for k, v in data.items() if k != key}
    return data


def rewrite_deprecated(data: dict, section: str) -> dict:
    data = dict(data)
    for old, target in DEPRECATED_KEYS[section].items():
        if old not in data:
            continue
        value = data.pop(old)
        new, convert = (target, None) if isinstance(target, str) else target
        if convert is not None:
            value = convert(value)
            if value is None:
                continue
        warn_once(f"config key '{old}' is deprecated; use '{new}'" + (f": {value}" if convert else ""))
        if "." in new:
            parent, child = new.split(".")
            data[parent] = {**(data.get(parent) or {}), child: value}
        elif new in data and data[new] != value:
            raise ValueError(f"both '{old}' (deprecated) and '{new}' are set")
        else:
            data[new] = value
    return data
