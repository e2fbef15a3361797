"""Early stopping and load_best_model_at_end (Axolotl's early_stopping_patience, load_best_model_at_end,
metric_for_best_model, greater_is_better), by HF Trainer's rules as Axolotl sets them up."""

from __future__ import annotations

import dataclasses

from jaxtune.errors import JaxtuneError
from jaxtune.logging import info


@dataclasses.dataclass
class BestModel:
    """Early stopping and load_best_model_at_end, by HF Trainer's rules as Axolotl sets them up: after
    each evaluation, `metric` either improves on the best so far or counts one more evaluation without
    improvement (`patience` of them stop training); a checkpoint saved right after an evaluation is the
    best checkpoint when that evaluation beats the best saved one, and rotation keeps it."""

    metric: str
    greater: bool
    patience: int | None
    export_best: bool
    best: float | None = None
    bad: int = 0  # evaluations in a row without improvement
    saved: list | None = None  # [metric, step] of the best checkpoint
    last: list | None = None  # [metric, step] of the latest evaluation

    @classmethod
    def from_config(cls, cfg, plan) -> BestModel | None:
        name = cfg.metric_for_best_model or "loss"
        metric = name if name.startswith("eval_") else f"eval_{name}"
        greater = cfg.greater_is_better if cfg.greater_is_better is not None else not metric.endswith("loss")
        if cfg.early_stopping_patience and not plan.eval_every:
            raise JaxtuneError("early_stopping_patience needs evaluations: an eval set (val_set_size or "
                               "test_datasets) and eval_steps / evals_per_epoch")
        if cfg.load_best_model_at_end is None:  # Axolotl's default: on when saves line up with evaluations
            export = bool(plan.eval_every and cfg.save_steps and cfg.eval_steps and plan.save_every
                          and plan.save_every % plan.eval_every == 0)
            if export:
                info(f"load_best_model_at_end (Axolotl's default when save_steps is a multiple of eval_steps): the "
                     f"export is the checkpoint with the best {metric}; set it to false to export the last step")
        else:
            export = bool(cfg.load_best_model_at_end)
            if export and not (plan.eval_every and plan.save_every):
                raise JaxtuneError("load_best_model_at_end needs evaluations and checkpoints (an eval set, "
                                   "eval_steps / evals_per_epoch and save_steps / saves_per_epoch)")
        if not export and not cfg.early_stopping_patience:
            return None
        return cls(metric, greater, cfg.early_stopping_patience, export)

    def _better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.greater else value < than)

    def observe(self, evaluated: dict, step: int) -> bool:
        """Record an evaluation; True when early stopping's patience is spent."""
        if self.metric not in evaluated:
            raise JaxtuneError(f"metric_for_best_model: the evaluation has no {self.metric} (it has: "
                               f"{', '.join(sorted(evaluated))})")
        value = float(evaluated[self.metric])
        self.last = [value, step]
        if self._better(value, self.best):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    def on_save(self, step: int) -> None:
        if self.last is not None and self.last[1] == step and (self.saved is None or
                                                               self._better(self.last[0], self.saved[0])):
            self.saved = list(self.last)
