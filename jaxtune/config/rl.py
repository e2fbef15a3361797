"""The preference and RL keys: `rl:` and what each objective reads (TRL's defaults where unset).

    rl: dpo | ipo (deprecated: dpo with dpo_loss_type [ipo]) | orpo | simpo | kto
    rl_beta / trl.beta          beta of every objective (ORPO: also orpo_alpha), default 0.1
    dpo_loss_type, dpo_loss_weights, dpo_label_smoothing, dpo_use_weighting, precompute_ref_log_probs
    orpo_alpha; simpo_gamma (0.5), cpo_alpha (1.0); kto_desirable_weight, kto_undesirable_weight (1.0)
    prefix_sharing              lay each pair's prompt out once (default on)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jaxtune.config.base import Section
from jaxtune.logging import warn_once

RL_TYPES = ("dpo", "ipo", "orpo", "simpo", "kto", "grpo")
DEFAULT_BETA = 0.1  # TRL's default for DPO, ORPO, CPO/SimPO and KTO


# Axolotl's other `trl:` keys: known, and an error that says why (never an unknown-key error or silence).
TRL_GRPO_KEYS = (
    "max_completion_length", "use_vllm", "vllm_mode", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
    "vllm_guided_decoding_regex", "reward_funcs", "reward_weights", "generation_batch_size", "num_generations",
    "log_completions", "num_completions_to_print", "importance_sampling_level", "scale_rewards", "temperature",
    "top_p", "top_k", "min_p", "repetition_penalty", "generation_kwargs", "chat_template_kwargs", "num_iterations",
    "epsilon", "epsilon_high", "use_liger_loss", "loss_type", "mask_truncated_completions", "entropy_coef",
    "use_adaptive_entropy", "entropy_target", "entropy_coef_delta", "entropy_coef_min", "entropy_coef_max",
    "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max", "log_multimodal",
    "vllm_enable_sleep_mode", "rollout_func", "multi_objective_aggregation", "use_data_producer", "async_prefetch",
    "prefetch_depth", "vllm_sync_interval", "streaming_partial_batch", "streaming_min_groups",
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_cap",
    "off_policy_mask_threshold", "use_bias_correction_kl", "reward_num_workers", "replay_buffer_size",
    "replay_recompute_logps", "reroll_start_fraction", "reroll_max_groups", "skip_zero_advantage_batches",
    "vllm_lora_sync")
TRL_SYNC_KEYS = ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps")


class TRLKeys(Section):
    """Axolotl's `trl:` mapping (the keys of TRL's trainer configs it passes through)."""

    beta: float | None = Field(None, gt=0, description="Beta of the RL objective (same as rl_beta).")

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data):
        if not isinstance(data, dict):
            return data
        for key in data:
            if key in TRL_GRPO_KEYS:
                raise ValueError(f"trl.{key} is a GRPO setting; rl: grpo is not in this release")
            if key in TRL_SYNC_KEYS:
                raise ValueError(f"trl.{key}: syncing the reference model during training (TR-DPO) is not "
                                 "supported; the reference stays the starting model")
        return data


class RLKeys(Section):
    rl: Literal[RL_TYPES] | None = Field(  # type: ignore[valid-type]
        None, description="Preference objective: dpo, ipo (deprecated alias of dpo + dpo_loss_type [ipo]), orpo, "
        "simpo, kto; unset: supervised fine-tuning.")
    trl: TRLKeys | None = Field(None, description="TRL trainer settings (beta).")
    rl_beta: float | None = Field(None, gt=0, description="Beta of the objective (TRL's default 0.1).")
    dpo_loss_type: list[str] | None = Field(None, min_length=1, description="DPO loss types, summed (TRL's "
                                            "loss_type; default [sigmoid]).")
    dpo_loss_weights: list[float] | None = Field(None, min_length=1, description="Weight of each dpo_loss_type.")
    dpo_label_smoothing: float | None = Field(None, ge=0, lt=1, description="Label smoothing of the robust, "
                                              "exo_pair and aot losses (the noise rate of the labels).")
    dpo_use_weighting: bool | None = Field(None, description="WPO: weight each pair by its answers' "
                                           "probability under the policy.")
    precompute_ref_log_probs: bool | None = Field(None, description="Compute the reference model's log-probs "
                                                  "once before training (then no reference model in the step).")
    orpo_alpha: float | None = Field(None, gt=0, description="ORPO: weight of the odds-ratio term (TRL's beta).")
    simpo_gamma: float | None = Field(None, description="SimPO: target reward margin (default 0.5).")
    cpo_alpha: float | None = Field(None, ge=0, description="SimPO/CPO: weight of the chosen answers' NLL "
                                    "(default 1.0, TRL's CPOConfig).")
    kto_desirable_weight: float | None = Field(None, gt=0, description="KTO: weight of desirable completions.")
    kto_undesirable_weight: float | None = Field(None, gt=0, description="KTO: weight of undesirable completions.")
    kto_loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="KTO loss (TRL's KTOConfig "
                                                              "loss_type).")
    prefix_sharing: bool = Field(True, description="Preference rows: lay a pair's prompt out once with both "
                                 "answers after it (exact; fewer tokens). false: two whole sequences per pair.")

    @model_validator(mode="after")
    def _check_rl(self) -> RLKeys:
        from jaxtune.objectives.losses import DPO_LOSS_TYPES

        if self.rl == "grpo":
            raise ValueError("rl: grpo is not in this release (preference objectives: dpo, ipo, orpo, simpo, kto)")
        if self.rl == "ipo":
            warn_once("rl: ipo is deprecated (as in Axolotl); it trains as rl: dpo with dpo_loss_type: [ipo]")
            if self.dpo_loss_type not in (None, ["ipo"]):
                raise ValueError("rl: ipo sets dpo_loss_type [ipo]; use rl: dpo to choose other loss types")
        if self.trl is not None and self.trl.beta is not None and self.rl_beta is not None \
                and self.trl.beta != self.rl_beta:
            raise ValueError(f"rl_beta ({self.rl_beta}) and trl.beta ({self.trl.beta}) differ; set one")
        if self.rl != "dpo" and (self.dpo_loss_type is not None or self.dpo_loss_weights is not None):
            raise ValueError(f"dpo_loss_type / dpo_loss_weights are for rl: dpo (rl is {self.rl})")
        if self.dpo_loss_weights is not None:
            if self.dpo_loss_type is None:
                raise ValueError("dpo_loss_weights needs dpo_loss_type")
            if len(self.dpo_loss_weights) != len(self.dpo_loss_type):
                raise ValueError(f"dpo_loss_type has {len(self.dpo_loss_type)} entries but dpo_loss_weights "
                                 f"{len(self.dpo_loss_weights)}")
        unknown = [t for t in self.dpo_loss_type or [] if t not in DPO_LOSS_TYPES]
        if unknown:
            raise ValueError(f"dpo_loss_type {unknown[0]!r} is not supported; supported: {', '.join(DPO_LOSS_TYPES)}")
        types = self.loss_types
        smoothing = self.dpo_label_smoothing or 0.0
        if "robust" in types and not smoothing < 0.5:
            raise ValueError("dpo_loss_type robust needs 0 <= dpo_label_smoothing < 0.5")
        if "exo_pair" in types and smoothing == 0:
            raise ValueError("dpo_loss_type exo_pair needs dpo_label_smoothing > 0 (TRL suggests 1e-3)")
        if self.dpo_label_smoothing and not {"robust", "exo_pair", "aot", "aot_unpaired"} & set(types):
            warn_once(f"dpo_label_smoothing is read by the robust, exo_pair, aot and aot_unpaired loss types only "
                      f"(TRL 1.16); with {', '.join(types)} it changes nothing (cDPO is dpo_loss_type [robust])")
        if self.dpo_use_weighting and {"aot", "aot_unpaired", "sft"} & set(types):
            raise ValueError("dpo_use_weighting does not combine with the aot, aot_unpaired or sft loss types")
        if self.rl is None or self.rl == "dpo" or self.rl == "ipo":
            other = [k for k in ("orpo_alpha", "simpo_gamma", "cpo_alpha", "kto_desirable_weight",
                                 "kto_undesirable_weight") if getattr(self, k) is not None]
        else:
            readers = {"orpo": {"orpo_alpha"}, "simpo": {"simpo_gamma", "cpo_alpha"},
                       "kto": {"kto_desirable_weight", "kto_undesirable_weight"}}[self.rl]
            other = [k for k in ("orpo_alpha", "simpo_gamma", "cpo_alpha", "kto_desirable_weight",
                                 "kto_undesirable_weight") if getattr(self, k) is not None and k not in readers]
        if other:
            raise ValueError(f"{', '.join(other)} do(es) not apply to rl: {self.rl}")
        dpo_only = [k for k in ("dpo_label_smoothing", "dpo_use_weighting") if getattr(self, k)]
        if dpo_only and self.rl not in ("dpo", "ipo"):
            raise ValueError(f"{', '.join(dpo_only)} apply to rl: dpo only")
        if self.precompute_ref_log_probs and self.rl not in ("dpo", "ipo", "kto"):
            raise ValueError(f"precompute_ref_log_probs applies to objectives with a reference model (dpo, ipo, "
                             f"kto); rl: {self.rl} has none")
        if self.rl == "kto" and self.kto_loss_type == "kto" and getattr(self, "micro_batch_size", 2) <= 1:
            raise ValueError("rl: kto needs micro_batch_size > 1: its KL baseline comes from the other completions "
                             "of the batch (with one, it would be the completion's own reward; TRL refuses it too)")
        if self.rl is None and (self.rl_beta is not None or (self.trl and self.trl.beta is not None)):
            raise ValueError("rl_beta / trl.beta need an rl objective")
        return self

    @property
    def loss_types(self) -> list[str]:
        if self.rl == "ipo":
            return ["ipo"]
        return list(self.dpo_loss_type or ["sigmoid"])

    @property
    def beta(self) -> float:
        """Axolotl's precedence: trl.beta, then rl_beta, then (ORPO) orpo_alpha; TRL's default 0.1."""
        if self.trl is not None and self.trl.beta is not None:
            return self.trl.beta
        if self.rl_beta is not None:
            return self.rl_beta
        if self.rl == "orpo" and self.orpo_alpha is not None:
            return self.orpo_alpha
        return DEFAULT_BETA
