"""The training keys: batch and length of training, optimizer and schedule, eval, checkpoints,
logging, output_dir."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import Field, field_validator, model_validator

from jaxtune.config.base import Section
from jaxtune.config.trackers import check_trackers
from jaxtune.logging import warn_once

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
              "adamw_torch_8bit", "paged_adamw_32bit", "adam", "adafactor", "lion", "lion_8bit", "paged_lion_8bit", "sgd",
              "muon")
# Other names of the same optimizers (HF's and Axolotl's), rewritten with one warning.
OPTIMIZER_ALIASES = {"adamw": "adamw_torch", "ao_adamw_8bit": "adamw_torch_8bit", "adamw_torch_npu_fused": "adamw_torch_fused",
                     "adamw_apex_fused": "adamw_torch_fused", "optimi_adamw": "adamw_torch",
                     "adamw_anyprecision": "adamw_torch", "paged_adamw": "paged_adamw_32bit",
                     "paged_lion": "lion", "paged_lion_32bit": "lion", "adafactor_hf": "adafactor"}
# Optimizers Axolotl/HF know that jaxtune has not got, with what to use instead.
OPTIMIZERS_MISSING = {
    "adamw_torch_4bit": "4-bit optimizer states are not implemented; adamw_8bit keeps AdamW's moments in 8 bits "
                        "(a quarter of 32-bit AdamW's state)",
    "ao_adamw_4bit": "4-bit optimizer states are not implemented; adamw_8bit keeps AdamW's moments in 8 bits",
    "ao_adamw_fp8": "FP8 optimizer states are not implemented; adamw_8bit keeps AdamW's moments in 8 bits",
    "galore_adamw": "GaLore is not implemented", "galore_adamw_8bit": "GaLore is not implemented",
    "galore_adafactor": "GaLore is not implemented", "q_galore_adamw8bit": "Q-GaLore is not implemented",
    "dion": "Dion is not implemented; muon is", "sinkgd": "SinkGD is not implemented", "polora": "PoLoRA is not "
    "implemented", "adopt_adamw": "ADOPT is not implemented", "adamc": "AdamC is not implemented",
    "came_pytorch": "CAME is not implemented", "schedule_free_adamw": "schedule-free optimizers are not implemented",
    "schedule_free_sgd": "schedule-free optimizers are not implemented", "lomo": "LOMO is not implemented",
    "adalomo": "LOMO is not implemented", "grokadamw": "GrokAdamW is not implemented",
    "rmsprop": "RMSprop is not implemented", "adagrad": "Adagrad is not implemented",
    "ademamix": "AdEMAMix is not implemented", "apollo_adamw": "APOLLO is not implemented",
    "stable_adamw": "StableAdamW is not implemented",
}
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts")


class TrainKeys(Section):
    output_dir: str = Field("./outputs", description="Where checkpoints, metrics and exports are written.")
    micro_batch_size: int = Field(1, ge=1, description="Rows per step per data-parallel rank.")
    eval_batch_size: int | None = Field(None, ge=1, description="Rows per eval step (default: micro_batch_size).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step; the loss is "
                                             "normalized by the trained tokens of all of them together.")
    num_epochs: float = Field(1, gt=0, description="Passes over the training set (a fraction trains that share of "
                              "an epoch's steps, rounded up).")
    curriculum_sampling: bool | None = Field(None, description="Read the rows in their prepared order every epoch "
                                             "instead of shuffling them (Axolotl's sequential sampler).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    optimizer: str = Field("adamw_torch_fused", description="Optimizer by Axolotl/HF name: "
                           + ", ".join(OPTIMIZERS) + ". The *_8bit ones keep their moments 8-bit blockwise as "
                           "bitsandbytes does; muon uses Axolotl's split (Muon on weight matrices, AdamW on the "
                           "rest).")
    lr_scheduler: Literal[SCHEDULERS] = Field("cosine", description="Learning-rate schedule after warmup.")  # type: ignore[valid-type]
    cosine_min_lr_ratio: float | None = Field(None, ge=0, le=1, description="Cosine decays to this fraction of "
                                              "the peak learning rate.")
    cosine_eta_min: float | None = Field(None, ge=0, description="Cosine decays to this learning rate.")
    cosine_restarts: int | None = Field(None, ge=1, description="cosine_with_restarts: number of cycles.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a fraction of all steps.")
    lr_quadratic_warmup: bool = Field(False, description="Warm up quadratically instead of linearly.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW).")
    max_grad_norm: float | None = Field(1.0, ge=0, description="Clip gradients to this global norm (0: off).")
    loss_watchdog_threshold: float | None = Field(None, description="Stop training (as at its last step: eval, "
                                                  "checkpoint, export) once the loss stays above this for "
                                                  "loss_watchdog_patience steps in a row (Axolotl: about twice the "
                                                  "loss at the start).")
    loss_watchdog_patience: int | None = Field(None, ge=1, description="Steps in a row above "
                                               "loss_watchdog_threshold before stopping (default 3).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam epsilon.")
    # eval
    eval_steps: float | None = Field(None, gt=0, description="Evaluate every N steps (< 1: a fraction of all "
                                     "steps).")
    evals_per_epoch: int | None = Field(None, ge=0, description="Evaluate this many times per epoch (0: no "
                                        "evaluation during or after training, as in Axolotl).")
    eval_strategy: Literal["steps", "epoch", "no"] | None = Field(None, description="When to evaluate (default: "
                                                                  "steps when eval_steps is set, else epoch).")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop once metric_for_best_model has not "
                                                "improved for this many evaluations in a row (HF's "
                                                "EarlyStoppingCallback); the run ends as at its last step.")
    load_best_model_at_end: bool | None = Field(
        None, description="Export the checkpoint with the best metric_for_best_model instead of the last step's. "
        "Unset: on when (as in Axolotl) there is an eval set and save_steps is a multiple of eval_steps.")
    metric_for_best_model: str | None = Field(None, description="The eval metric early stopping and "
                                              "load_best_model_at_end compare (default eval_loss).")
    greater_is_better: bool | None = Field(None, description="Whether a larger metric_for_best_model is better "
                                           "(default: false for names ending in loss, true otherwise).")
    # checkpoints
    save_strategy: Literal["steps", "epoch", "no"] | None = Field(None, description="When to save a checkpoint "
                                                                  "(default: steps when save_steps/saves_per_epoch "
                                                                  "is set, else epoch).")
    save_steps: float | None = Field(None, gt=0, description="Save every N steps (< 1: a fraction of all steps).")
    saves_per_epoch: int | None = Field(None, ge=1, description="Save this many times per epoch.")
    save_total_limit: int | None = Field(None, ge=1, description="Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | bool | None = Field(
        None, description="A checkpoint directory, or true for the newest in output_dir. Default: resume from "
        "output_dir's newest checkpoint when there is one; false: start over (output_dir must have none).")
    # logging
    logging_steps: int = Field(1, ge=1, description="Write metrics every N steps.")
    use_tensorboard: bool = Field(False, description="Also write TensorBoard events to output_dir/events.")
    wandb_project: str | None = Field(None, description="Log to Weights & Biases (when wandb is installed).")
    wandb_entity: str | None = Field(None, description="W&B entity.")
    wandb_name: str | None = Field(None, description="W&B run name.")
    wandb_run_id: str | None = Field(None, description="W&B run id (to continue a run).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(None, description="W&B mode.")
    # other trackers (rules in config/trackers.py: a project key alone turns its tracker on, as in Axolotl)
    use_wandb: bool | None = Field(None, description="Log to W&B; without wandb_project the project is "
                                   "$WANDB_PROJECT or 'huggingface' (as HF's Trainer). wandb_project alone "
                                   "turns W&B on.")
    use_trackio: bool | None = Field(None, description="Log to Trackio (when trackio is installed); "
                                     "trackio_project_name alone turns it on.")
    trackio_project_name: str | None = Field(None, description="Trackio project (default 'huggingface').")
    trackio_run_name: str | None = Field(None, description="Trackio run name (default: generated).")
    trackio_space_id: str | None = Field(None, description="Hugging Face Space to sync the Trackio dashboard "
                                         "to (default: a local dashboard only).")
    use_swanlab: bool | None = Field(None, description="Log to SwanLab (when swanlab is installed); needs "
                                     "swanlab_project, which alone turns it on (Axolotl's SwanLab plugin keys).")
    swanlab_project: str | None = Field(None, description="SwanLab project.")
    swanlab_experiment_name: str | None = Field(None, description="SwanLab experiment name (default: generated).")
    swanlab_description: str | None = Field(None, description="SwanLab experiment description.")
    swanlab_mode: Literal["cloud", "local", "offline", "disabled"] | None = Field(
        None, description="SwanLab mode: cloud (sync, the default), local, offline (save to sync later), disabled.")
    swanlab_workspace: str | None = Field(None, description="SwanLab workspace (organization or user).")
    swanlab_api_key: str | None = Field(None, description="SwanLab API key (better: SWANLAB_API_KEY or "
                                        "`swanlab login`); never logged with the run's config.")
    swanlab_web_host: str | None = Field(None, description="SwanLab web address (private deployment).")
    swanlab_api_host: str | None = Field(None, description="SwanLab API address (private deployment).")
    swanlab_lark_webhook_url: str | None = Field(None, description="Lark (Feishu) webhook SwanLab notifies of "
                                                 "the run's start and end.")
    swanlab_lark_secret: str | None = Field(None, description="Secret signing the Lark webhook's messages.")
    swanlab_log_model: bool | None = Field(None, description="No effect (one warning): the model is written to "
                                           "output_dir, not uploaded.")
    swanlab_log_completions: bool | None = Field(None, description="No effect when true (one warning): RLHF "
                                                 "completion tables are not logged.")
    swanlab_completion_log_interval: int | None = Field(None, description="No effect (one warning): completion "
                                                        "tables are not logged.")
    swanlab_completion_max_buffer: int | None = Field(None, description="No effect (one warning): completion "
                                                      "tables are not logged.")

    @model_validator(mode="after")
    def _check_trackers(self) -> TrainKeys:
        check_trackers(self)
        return self

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        if value in OPTIMIZER_ALIASES:
            warn_once(f"optimizer {value} is trained as {OPTIMIZER_ALIASES[value]} (the same update rule and state)")
            return OPTIMIZER_ALIASES[value]
        if value in OPTIMIZERS_MISSING:
            raise ValueError(f"optimizer {value}: {OPTIMIZERS_MISSING[value]}")
        if value not in OPTIMIZERS:
            close = difflib.get_close_matches(value, OPTIMIZERS, n=1, cutoff=0.6)
            raise ValueError(f"unknown optimizer {value!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" (jaxtune has: {', '.join(OPTIMIZERS)})")
        return value

    @field_validator("save_strategy", "eval_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @model_validator(mode="after")
    def _check_train(self) -> TrainKeys:
        exclusive = [("warmup_steps", "warmup_ratio"), ("save_steps", "saves_per_epoch"),
                     ("eval_steps", "evals_per_epoch"), ("cosine_min_lr_ratio", "cosine_eta_min")]
        for a, b in exclusive:
            if getattr(self, a) is not None and getattr(self, b) not in (None, 0):
                raise ValueError(f"{a} and {b} cannot both be set")
        if self.cosine_restarts is not None and self.lr_scheduler != "cosine_with_restarts":
            raise ValueError("cosine_restarts needs lr_scheduler: cosine_with_restarts")
        for kind in ("save", "eval"):
            strategy = getattr(self, f"{kind}_strategy")
            every = f"{kind}_steps" if getattr(self, f"{kind}_steps") else f"{kind}s_per_epoch"
            if strategy in ("epoch", "no") and getattr(self, every):
                warn_once(f"{every} is not used with {kind}_strategy: {strategy} (as in HF's Trainer)")
        for key in ("eval_steps", "save_steps"):
            value = getattr(self, key)
            if value is not None and value >= 1 and value != int(value):
                raise ValueError(f"{key} must be a whole number of steps or a fraction < 1 (got {value})")
        return self
