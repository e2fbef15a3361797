"""Training objectives: SFT (objectives/sft.py), the preference family (objectives/preference.py:
DPO with every TRL loss type, ORPO, SimPO/CPO, KTO) and GRPO over rollouts (objectives/grpo.py). What an objective declares is in
objectives/base.py; `objective_for` builds the one a config asks for, checked against the kind of
rows its data was prepared into.
"""

from __future__ import annotations

from jaxtune.errors import JaxtuneError
from jaxtune.objectives.base import Objective

# rl: value -> the kind of prepared rows it trains on
DATA_KINDS = {None: "sft", "dpo": "preference", "ipo": "preference", "orpo": "preference", "simpo": "preference",
              "kto": "unpaired", "grpo": "prompt", "gdpo": "prompt"}
_KIND_NAMES = {"sft": "SFT rows (chat_template, alpaca, completion, ...)", "preference": "preference pairs",
               "unpaired": "KTO rows (prompt, completion, label)", "prompt": "prompt rows (GRPO)"}


def objective_for(cfg, data, ranks: int = 1) -> Objective:
    """The objective of `cfg` (its `rl:` value and keys) over prepared `data` (jaxtune.data.prepare);
    `ranks`: data-parallel ranks (GRPO's batch arithmetic)."""
    from jaxtune.logging import warn_once
    from jaxtune.objectives import preference
    from jaxtune.objectives.sft import SFT

    want = DATA_KINDS[cfg.rl]
    if data.kind != want:
        hint = "set rl: dpo (or orpo, simpo) for preference pairs, rl: kto for labelled completions" \
            if cfg.rl is None else f"rl: {cfg.rl} trains on {_KIND_NAMES[want]}"
        raise JaxtuneError(f"the datasets hold {_KIND_NAMES.get(data.kind, data.kind)}: {hint}")
    pad_id = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0
    if cfg.rl is None:
        return SFT(pad_id)
    if cfg.lora_dropout and cfg.adapter:
        warn_once(f"lora_dropout={cfg.lora_dropout} is not applied with rl: {cfg.rl}: as in TRL (disable_dropout), "
                  "the policy runs without dropout so that it starts equal to the reference")
    if cfg.grpo:
        return _grpo(cfg, pad_id, ranks)
    common = dict(pad_id=pad_id, examples_per_row=data.examples_per_row)
    if cfg.rl in ("dpo", "ipo"):
        return preference.DPO(loss_types=cfg.loss_types, loss_weights=cfg.dpo_loss_weights, beta=cfg.beta,
                              label_smoothing=cfg.dpo_label_smoothing or 0.0, use_weighting=bool(cfg.dpo_use_weighting),
                              **common)
    if cfg.rl == "orpo":
        return preference.ORPO(beta=cfg.beta, **common)
    if cfg.rl == "simpo":
        return preference.CPO(loss_type="simpo", beta=cfg.beta,
                              simpo_gamma=0.5 if cfg.simpo_gamma is None else cfg.simpo_gamma,
                              cpo_alpha=1.0 if cfg.cpo_alpha is None else cfg.cpo_alpha, **common)
    return preference.KTO(loss_type=cfg.kto_loss_type, beta=cfg.beta,
                          desirable_weight=cfg.kto_desirable_weight or 1.0,
                          undesirable_weight=cfg.kto_undesirable_weight or 1.0, **common)


def _grpo(cfg, pad_id: int, ranks: int) -> Objective:
    from jaxtune.objectives.grpo import GRPO, GroupShape

    s = cfg.grpo_settings
    shape = GroupShape.of(cfg, ranks)
    return GRPO(loss_type=s.loss_type, epsilon_low=s.epsilon, epsilon_high=s.epsilon_high or s.epsilon, delta=s.delta,
                beta=cfg.beta, importance_sampling_level=s.importance_sampling_level, temperature=s.temperature,
                max_completion_length=s.max_completion_length or 512, shape=shape,
                old_from_policy=shape.optimizer_steps == 1, bias_correction_kl=s.use_bias_correction_kl,
                pad_id=pad_id, prompt_length=cfg.sequence_len)


__all__ = ["DATA_KINDS", "Objective", "objective_for"]
