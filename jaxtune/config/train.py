"""The training keys: batch and length of training, optimizer and schedule, eval, checkpoints,
logging, output_dir."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jaxtune.config.base import Section
from jaxtune.logging import warn_once

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "adam", "adafactor", "lion", "lion_8bit", "paged_lion_8bit", "sgd")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts")


class TrainKeys(Section):
    output_dir: str = Field("./outputs", description="Where checkpoints, metrics and exports are written.")
    micro_batch_size: int = Field(1, ge=1, description="Rows per step per data-parallel rank.")
    eval_batch_size: int | None = Field(None, ge=1, description="Rows per eval step (default: micro_batch_size).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step; the loss is "
                                             "normalized by the trained tokens of all of them together.")
    num_epochs: int = Field(1, ge=1, description="Passes over the training set.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    optimizer: Literal[OPTIMIZERS] = Field("adamw_torch_fused",  # type: ignore[valid-type]
                                           description="Optimizer by Axolotl/HF name.")
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
    evals_per_epoch: int | None = Field(None, ge=1, description="Evaluate this many times per epoch.")
    eval_strategy: Literal["steps", "epoch", "no"] | None = Field(None, description="When to evaluate (default: "
                                                                  "steps when eval_steps is set, else epoch).")
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

    @field_validator("save_strategy", "eval_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @model_validator(mode="after")
    def _check_train(self) -> TrainKeys:
        exclusive = [("warmup_steps", "warmup_ratio"), ("save_steps", "saves_per_epoch"),
                     ("eval_steps", "evals_per_epoch"), ("cosine_min_lr_ratio", "cosine_eta_min")]
        for a, b in exclusive:
            if getattr(self, a) is not None and getattr(self, b) is not None:
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
