"""Experiment trackers as Axolotl configures them: Weights & Biases (`use_wandb`, `wandb_*`), Trackio
(`use_trackio`, `trackio_*`) and SwanLab (the `swanlab_*` keys of Axolotl's SwanLab plugin).

Axolotl's rules are kept:
- a tracker's project key alone turns it on, even over `use_<tracker>: false` (one warning says so);
- `use_wandb: true` alone logs to the project HF's Trainer picks ($WANDB_PROJECT, else 'huggingface');
  `use_trackio: true` alone to Trackio project 'huggingface'; `use_swanlab: true` needs swanlab_project;
- `wandb_run_id` without `wandb_name` names the run after its id.

Keys jaxtune cannot honour (model upload, RLHF completion tables) warn once when set; keys of a
tracker that is off warn once; `tracker_settings` gives `MetricsWriter` what to start.
"""

from __future__ import annotations

import os
from typing import Any

from jaxtune.logging import warn_once

# tracker -> (its name for people, the switch key, the project key)
TRACKERS = {"wandb": ("W&B", "use_wandb", "wandb_project"),
            "trackio": ("Trackio", "use_trackio", "trackio_project_name"),
            "swanlab": ("SwanLab", "use_swanlab", "swanlab_project")}

_TABLES = "completion tables are not logged (jaxtune logs the objective's scalars: rewards/..., kl)"
# Tracker keys that change nothing here, with the reason printed in their one warning.
NO_EFFECT = {
    "swanlab_log_model": "the model is written to output_dir, not uploaded",
    "swanlab_log_completions": _TABLES,
    "swanlab_completion_log_interval": _TABLES,
    "swanlab_completion_max_buffer": _TABLES,
}

# Keys never sent to a tracker with the run's config.
SECRET_KEYS = ("swanlab_api_key", "swanlab_lark_secret", "swanlab_lark_webhook_url")


def enabled(cfg: Any, tracker: str) -> bool:
    """Whether `tracker` logs (before its mode: `<tracker>_mode: disabled` still turns it off)."""
    _, switch, project = TRACKERS[tracker]
    return bool(getattr(cfg, project)) or getattr(cfg, switch) is True


def check_trackers(cfg: Any) -> None:
    """The config-time rules: errors for what Axolotl rejects, one warning for what does nothing."""
    if cfg.swanlab_project is not None and not cfg.swanlab_project.strip():
        raise ValueError("swanlab_project cannot be an empty string")
    if cfg.use_swanlab and not cfg.swanlab_project:
        raise ValueError("use_swanlab: true needs swanlab_project (the SwanLab project to log to)")
    fields = type(cfg).model_fields
    for tracker, (label, switch, project) in TRACKERS.items():
        if getattr(cfg, switch) is False and getattr(cfg, project):
            off = f"set {tracker}_mode: disabled" if f"{tracker}_mode" in fields else f"remove {project}"
            warn_once(f"{switch}: false does not turn {label} off while {project} is set (as in Axolotl); "
                      f"to turn it off, {off}")
        if not enabled(cfg, tracker):
            stray = [k for k in fields if k.startswith(f"{tracker}_") and k not in NO_EFFECT
                     and getattr(cfg, k) not in (None, False)]
            if stray:
                warn_once(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} set but {label} is off "
                          f"(set {project}, or {switch}: true): nothing is logged to {label}")
    for key, why in NO_EFFECT.items():
        if getattr(cfg, key) not in (None, False):
            warn_once(f"config key '{key}' has no effect in jaxtune: {why}")


def _given(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def tracker_settings(cfg: Any) -> dict[str, dict]:
    """tracker -> the settings `MetricsWriter` starts it with, for each tracker that logs."""
    out: dict[str, dict] = {}
    if enabled(cfg, "wandb") and cfg.wandb_mode != "disabled":
        out["wandb"] = _given(project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "huggingface",
                              entity=cfg.wandb_entity, name=cfg.wandb_name or cfg.wandb_run_id,
                              id=cfg.wandb_run_id, mode=cfg.wandb_mode)
    if enabled(cfg, "trackio"):
        out["trackio"] = _given(project=cfg.trackio_project_name or "huggingface", name=cfg.trackio_run_name,
                                space_id=cfg.trackio_space_id)
    if enabled(cfg, "swanlab") and cfg.swanlab_mode != "disabled":
        out["swanlab"] = _given(project=cfg.swanlab_project, experiment_name=cfg.swanlab_experiment_name,
                                description=cfg.swanlab_description, workspace=cfg.swanlab_workspace,
                                mode=cfg.swanlab_mode, api_key=cfg.swanlab_api_key, api_host=cfg.swanlab_api_host,
                                web_host=cfg.swanlab_web_host, lark_webhook_url=cfg.swanlab_lark_webhook_url,
                                lark_secret=cfg.swanlab_lark_secret)
    return out


def run_config(cfg: Any) -> dict:
    """The run's config as the trackers record it (secrets left out)."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in SECRET_KEYS}
