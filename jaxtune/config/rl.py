"""The preference and RL keys: `rl:` and what each objective reads (TRL's defaults where unset).

    rl: dpo | ipo (deprecated: dpo with dpo_loss_type [ipo]) | orpo | simpo | kto | grpo | gdpo
    rl_beta / trl.beta          beta of every objective (ORPO: also orpo_alpha), default 0.1 (GRPO: 0)
    trl.*                       GRPO: num_generations, max_completion_length, reward_funcs, loss_type, ...
    dpo_loss_type, dpo_loss_weights, dpo_label_smoothing, dpo_use_weighting, precompute_ref_log_probs
    orpo_alpha; simpo_gamma (0.5), cpo_alpha (1.0); kto_desirable_weight, kto_undesirable_weight (1.0)
    prefix_sharing              lay each pair's prompt out once (default on)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jaxtune.config.base import Section, warn_no_effect
from jaxtune.logging import warn_once

RL_TYPES = ("dpo", "ipo", "orpo", "simpo", "kto", "grpo", "gdpo")
DEFAULT_BETA = 0.1  # TRL's default for DPO, ORPO, CPO/SimPO and KTO (GRPO's is 0.0)
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")



class TRLKeys(Section):
    """Axolotl's `trl:` mapping (the keys of TRL's trainer configs it passes through); GRPO's keys with
    TRL 1.16's defaults."""

    beta: float | None = Field(None, ge=0, description="Beta of the objective (same as rl_beta); GRPO: the KL "
                               "coefficient (default 0: no reference model).")
    num_generations: int | None = Field(None, ge=2, description="GRPO: completions per prompt (default 8).")
    max_completion_length: int | None = Field(None, ge=1, description="GRPO: longest completion (default 512).")
    generation_batch_size: int | None = Field(None, ge=1, description="GRPO: completions per rollout (default: "
                                              "one optimizer step's, micro_batch_size x ranks x accumulation).")
    num_iterations: int = Field(1, ge=1, description="GRPO: optimizer passes over each rollout (μ).")
    epsilon: float = Field(0.2, gt=0, description="GRPO: lower clipping range of the ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="GRPO: upper clipping range (default: epsilon).")
    delta: float | None = Field(None, gt=1, description="GRPO: upper bound of the unclipped ratio (two-sided "
                                "clipping).")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="GRPO's loss aggregation (TRL's default dapo).")
    importance_sampling_level: Literal["token", "sequence"] = Field("token", description="GRPO: token ratios, or "
                                                                    "sequence ratios (GSPO).")
    scale_rewards: bool | Literal["group", "batch", "none"] = Field(
        "group", description="GRPO: divide advantages by the reward std of the group, the batch, or none "
        "(Axolotl's true / false: group / none).")
    mask_truncated_completions: bool = Field(False, description="GRPO: completions cut at max_completion_length "
                                             "train nothing.")
    reward_funcs: list[str] | None = Field(None, description="GRPO: reward functions as dotted paths importable "
                                           "from the working directory.")
    reward_weights: list[float] | None = Field(None, description="GRPO: weight of each reward function.")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize", description="GRPO: weight then normalize the rewards, or normalize each then sum (GDPO).")
    use_bias_correction_kl: bool = Field(True, description="GRPO: multiply the KL by the importance ratio (its "
                                         "gradient becomes the unbiased reverse-KL gradient; TRL's default).")
    skip_zero_advantage_batches: bool = Field(False, description="GRPO: skip the optimizer steps of a rollout whose "
                                              "advantages are all zero.")
    sync_ref_model: bool = Field(False, description="Move the reference towards the policy every "
                                 "ref_model_sync_steps (TR-DPO); needs a frozen reference copy (full fine-tuning).")
    ref_model_mixup_alpha: float = Field(0.6, ge=0, le=1, description="Reference sync: ref = alpha * policy + "
                                         "(1 - alpha) * ref.")
    ref_model_sync_steps: int = Field(512, ge=1, description="Reference sync: every this many steps.")
    log_completions: bool = Field(False, description="GRPO: write sampled completions to completions.jsonl.")
    num_completions_to_print: int | None = Field(None, ge=0, description="GRPO: completions printed per log step.")
    temperature: float = Field(1.0, ge=0, description="GRPO rollouts: sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="GRPO rollouts: nucleus sampling.")
    top_k: int = Field(0, ge=0, description="GRPO rollouts: top-k (0: off).")
    min_p: float | None = Field(None, ge=0, le=1, description="GRPO rollouts: min-p (off when unset).")
    repetition_penalty: float = Field(1.0, gt=0, description="GRPO rollouts: repetition penalty (1: off).")
    use_liger_loss: bool | None = Field(None, description="No effect: Liger's fused GRPO loss is a Triton kernel; "
                                        "jaxtune's loss runs on chunked log-probs without logits.")

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data):
        if not isinstance(data, dict):
            return data
        data = warn_no_effect(data, "trl")
        if data.get("use_liger_loss"):
            warn_once("trl.use_liger_loss has no effect: jaxtune's GRPO loss runs on chunked log-probs without logits")
        return data

    @model_validator(mode="after")
    def _check_trl(self) -> TRLKeys:
        if self.loss_type in ("sapo", "luspo", "vespo"):
            raise ValueError(f"trl.loss_type {self.loss_type} is not supported; GRPO loss types: "
                             f"{', '.join(GRPO_LOSS_TYPES)}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs or []):
            raise ValueError(f"trl.reward_weights has {len(self.reward_weights)} entries for "
                             f"{len(self.reward_funcs or [])} reward functions")
        return self

    @property
    def scale(self) -> str:
        return {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)


class RLKeys(Section):
    rl: Literal[RL_TYPES] | None = Field(  # type: ignore[valid-type]
        None, description="Objective: dpo, ipo (deprecated alias of dpo + dpo_loss_type [ipo]), orpo, simpo, kto, "
        "grpo, gdpo (grpo with trl.multi_objective_aggregation normalize_then_sum); unset: supervised fine-tuning.")
    trl: TRLKeys | None = Field(None, description="TRL trainer settings: beta, and GRPO's keys.")
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
    rollout_merge_adapters: bool = Field(False, description="GRPO with LoRA (jaxtune): sample each rollout from a "
                                         "copy of the weights with the adapters merged in (W + scale A B, made once "
                                         "per rollout, freed after it) instead of live adapters: fewer products per "
                                         "decode step, at the memory of one more copy of the adapted kernels. Falls "
                                         "back to live adapters, with a warning, when that copy does not fit in free "
                                         "memory; QLoRA's NF4 and experts' adapters always stay live.")

    @model_validator(mode="after")
    def _check_rl(self) -> RLKeys:
        from jaxtune.objectives.losses import DPO_LOSS_TYPES

        self._check_trl_keys()
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
                       "kto": {"kto_desirable_weight", "kto_undesirable_weight"}}.get(self.rl, set())
            other = [k for k in ("orpo_alpha", "simpo_gamma", "cpo_alpha", "kto_desirable_weight",
                                 "kto_undesirable_weight") if getattr(self, k) is not None and k not in readers]
        if other:
            raise ValueError(f"{', '.join(other)} do(es) not apply to rl: {self.rl}")
        dpo_only = [k for k in ("dpo_label_smoothing", "dpo_use_weighting") if getattr(self, k)]
        if dpo_only and self.rl not in ("dpo", "ipo"):
            raise ValueError(f"{', '.join(dpo_only)} apply to rl: dpo only")
        if self.precompute_ref_log_probs and self.rl not in ("dpo", "ipo", "kto"):
            raise ValueError(f"precompute_ref_log_probs applies to objectives with a reference model computed "
                             f"once (dpo, ipo, kto); rl: {self.rl} has {'fresh rollouts' if self.grpo else 'none'}")
        if self.rl == "kto" and self.kto_loss_type == "kto" and getattr(self, "micro_batch_size", 2) <= 1:
            raise ValueError("rl: kto needs micro_batch_size > 1: its KL baseline comes from the other completions "
                             "of the batch (with one, it would be the completion's own reward; TRL refuses it too)")
        if self.rollout_merge_adapters and (not self.grpo or not getattr(self, "adapter", None)):
            raise ValueError("rollout_merge_adapters applies to rl: grpo with a LoRA adapter "
                             f"(rl is {self.rl}, adapter is {getattr(self, 'adapter', None)})")
        if self.rl is None and (self.rl_beta is not None or (self.trl and self.trl.beta is not None)):
            raise ValueError("rl_beta / trl.beta need an rl objective")
        return self

    def _check_trl_keys(self) -> None:
        trl = self.trl or TRLKeys()
        grpo_keys = sorted(k for k in trl.model_fields_set
                           if k not in ("beta", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"))
        if grpo_keys and not self.grpo:
            raise ValueError(f"trl.{grpo_keys[0]} applies to rl: grpo (rl is {self.rl})")
        if self.grpo and not trl.reward_funcs:
            raise ValueError(f"rl: {self.rl} needs trl.reward_funcs: dotted paths of reward functions importable "
                             "from the working directory (e.g. rewards.accuracy)")
        if self.rl == "gdpo" and "multi_objective_aggregation" in trl.model_fields_set \
                and trl.multi_objective_aggregation != "normalize_then_sum":
            raise ValueError("rl: gdpo is GRPO with trl.multi_objective_aggregation normalize_then_sum")
        if trl.sync_ref_model:
            if self.rl not in ("dpo", "ipo", "kto", "grpo", "gdpo"):
                raise ValueError(f"trl.sync_ref_model needs an objective with a reference model (rl is {self.rl})")
            if getattr(self, "adapter", None):
                raise ValueError("trl.sync_ref_model needs a frozen reference copy (full fine-tuning): with LoRA the "
                                 "reference is the policy with its adapters off (TRL does not sync it under PEFT either)")
            if self.precompute_ref_log_probs:
                raise ValueError("trl.sync_ref_model and precompute_ref_log_probs exclude each other")
            if self.grpo and not self.beta:
                raise ValueError("trl.sync_ref_model with GRPO needs beta > 0 (beta 0 loads no reference model)")

    @property
    def grpo(self) -> bool:
        return self.rl in ("grpo", "gdpo")

    @property
    def grpo_settings(self) -> TRLKeys:
        """The `trl:` keys with GDPO's aggregation applied."""
        trl = self.trl or TRLKeys()
        if self.rl == "gdpo":
            trl = trl.model_copy(update={"multi_objective_aggregation": "normalize_then_sum"})
        return trl

    @property
    def loss_types(self) -> list[str]:
        if self.rl == "ipo":
            return ["ipo"]
        return list(self.dpo_loss_type or ["sigmoid"])

    @property
    def beta(self) -> float:
        """Axolotl's precedence: trl.beta, then rl_beta, then (ORPO) orpo_alpha; TRL's default (0.1, GRPO 0)."""
        if self.trl is not None and self.trl.beta is not None:
            return self.trl.beta
        if self.rl_beta is not None:
            return self.rl_beta
        if self.rl == "orpo" and self.orpo_alpha is not None:
            return self.orpo_alpha
        return 0.0 if self.grpo else DEFAULT_BETA
