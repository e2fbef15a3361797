"""The preference losses, as TRL 1.16 defines them, on per-example sequence log-probabilities.

Each function takes arrays over the examples of a micro-batch (pairs for DPO, ORPO and SimPO;
completions for KTO) and returns the per-example loss; the objectives (objectives/preference.py)
sum them over the valid examples and the trainer divides by the count of the whole accumulated
batch, so the loss of a step is TRL's mean over its examples. Names follow TRL's `_compute_loss`
(trl/trainer/dpo_trainer.py), `odds_ratio_loss` (trl/experimental/orpo), `cpo_loss`
(trl/experimental/cpo) and KTO's `_compute_loss` (trl/trainer/kto_trainer.py); the tests compare
every one of them, value and gradient, against TRL's own code on the same arrays.

    chosen_logratios = chosen_logps - ref_chosen_logps        (policy vs reference, summed over tokens)
    sigmoid:  -log sigmoid(beta * (chosen_logratios - rejected_logratios))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Every TRL 1.16 DPO loss type that is a function of policy and reference sequence log-probs.
DPO_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Per-pair arrays [P]: summed completion log-probs of the policy and the reference, completion
    lengths (tokens), and which entries are real pairs (the rest is padding)."""

    chosen: jax.Array
    rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    chosen_len: jax.Array
    rejected_len: jax.Array
    valid: jax.Array


def _sorted_valid(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x's valid entries sorted ascending first (padding entries, pushed to the end, come after), and
    the original index of each sorted entry."""
    order = jnp.argsort(jnp.where(valid, x, jnp.finfo(jnp.float32).max))
    return x[order], order


def dpo_loss(kind: str, p: PairLogps, *, beta: float, label_smoothing: float = 0.0,
             discopop_tau: float = 0.05) -> jax.Array:
    """Per-pair DPO loss of one TRL loss type [P] (TRL's `f_divergence_type: reverse_kl`). `sft`
    is not per pair (a mean over the chosen tokens) and is computed by the objective."""
    chosen_lr = p.chosen - p.ref_chosen
    rejected_lr = p.rejected - p.ref_rejected
    delta = chosen_lr - rejected_lr
    log_sigmoid = jax.nn.log_sigmoid
    if kind == "sigmoid":
        return -log_sigmoid(beta * delta)
    if kind == "hinge":
        return jax.nn.relu(1 - beta * delta)
    if kind in ("ipo", "sigmoid_norm"):
        # Length-normalized scores (TRL: per completion token, lengths clamped at 1).
        norm = chosen_lr / jnp.maximum(p.chosen_len, 1.0) - rejected_lr / jnp.maximum(p.rejected_len, 1.0)
        return (norm - 1 / (2 * beta)) ** 2 if kind == "ipo" else -log_sigmoid(beta * norm)
    if kind == "exo_pair":
        eps = jnp.float32(label_smoothing)
        qw, log_qw = jax.nn.sigmoid(beta * delta), log_sigmoid(beta * delta)
        ql, log_ql = jax.nn.sigmoid(-beta * delta), log_sigmoid(-beta * delta)
        return qw * (log_qw - jnp.log1p(-eps)) + ql * (log_ql - jnp.log(eps))
    if kind == "nca_pair":
        c, r = beta * chosen_lr, beta * rejected_lr
        return -log_sigmoid(c) - 0.5 * log_sigmoid(-c) - 0.5 * log_sigmoid(-r)
    if kind == "robust":
        clean = -(1 - label_smoothing) * log_sigmoid(beta * delta)
        flipped = -label_smoothing * log_sigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if kind == "bco_pair":
        return -log_sigmoid(beta * chosen_lr) - log_sigmoid(-beta * rejected_lr)
    if kind == "sppo_hard":
        return (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
    if kind in ("aot", "aot_unpaired"):
        # Sorted over the micro-batch's pairs (TRL sorts its per-device batch): the i-th smallest of one
        # side against the i-th smallest of the other. The i-th loss is put back at the slot of the i-th
        # smallest first side, so the losses sit on the valid slots, as every other type's do.
        if kind == "aot":
            (a, slots), (b, _) = _sorted_valid(p.chosen - p.rejected, p.valid), \
                _sorted_valid(p.ref_chosen - p.ref_rejected, p.valid)
        else:
            (a, slots), (b, _) = _sorted_valid(chosen_lr, p.valid), _sorted_valid(rejected_lr, p.valid)
        d = jnp.where(jnp.arange(a.shape[0]) < p.valid.sum(), a - b, 0.0)
        sorted_loss = -log_sigmoid(beta * d) * (1 - label_smoothing) - log_sigmoid(-beta * d) * label_smoothing
        return jnp.zeros_like(sorted_loss).at[slots].set(sorted_loss)
    if kind == "apo_zero":
        return 1 - jax.nn.sigmoid(beta * chosen_lr) + jax.nn.sigmoid(beta * rejected_lr)
    if kind == "apo_down":
        return jax.nn.sigmoid(beta * chosen_lr) + 1 - jax.nn.sigmoid(beta * delta)
    if kind == "discopop":
        logits = beta * delta
        modulation = jax.nn.sigmoid(logits / discopop_tau)
        return -log_sigmoid(logits) * (1 - modulation) + jnp.exp(-logits) * modulation
    raise ValueError(f"unknown DPO loss type {kind!r}")


def wpo_weights(aligned: jax.Array, lengths: jax.Array) -> jax.Array:
    """WPO (TRL's `use_weighting`): each answer weighted by exp(mean over its completion tokens of
    log p - log sum_v p_v^2), a pair by the product of its two answers' weights. `aligned` and
    `lengths` are [P, 2] (chosen, rejected) sums and token counts; no gradient flows through."""
    w = jnp.exp(aligned / jnp.maximum(lengths, 1.0))
    return jax.lax.stop_gradient(w[:, 0] * w[:, 1])


def dpo_terms(p: PairLogps, chosen_nll: jax.Array, *, loss_types, loss_weights, beta: float,
              label_smoothing: float = 0.0, discopop_tau: float = 0.05, weights: jax.Array | None = None) -> dict:
    """The sums a DPO loss is made of: `pairs` (the weighted per-pair losses summed over the valid
    pairs; divided by the pair count) and, with the `sft` type, `sft` (its weight times the chosen
    answers' summed NLL `chosen_nll`; divided by the chosen answers' token count): TRL's
    sum over types of weight * mean, with WPO `weights` (per pair) multiplying every type."""
    per_pair = jnp.zeros_like(p.chosen)
    sft = jnp.zeros((), jnp.float32)
    for kind, w in zip(loss_types, loss_weights, strict=True):
        if kind == "sft":
            sft = sft + w * chosen_nll
            continue
        term = dpo_loss(kind, p, beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau)
        per_pair = per_pair + w * (term if weights is None else term * weights)
    return {"pairs": jnp.sum(jnp.where(p.valid, per_pair, 0.0)), "sft": sft}


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 as TRL's ORPO does."""
    t = -0.6931471805599453
    return jnp.where(x < t, jnp.log1p(-jnp.exp(jnp.minimum(x, t))), jnp.log(-jnp.expm1(jnp.maximum(x, t))))


def orpo_log_odds(chosen_mean_logps: jax.Array, rejected_mean_logps: jax.Array) -> jax.Array:
    """ORPO's log odds ratio from length-averaged log-probs; the loss is -beta * log sigmoid of it."""
    return (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps))


def cpo_loss(kind: str, chosen: jax.Array, rejected: jax.Array, *, beta: float, label_smoothing: float = 0.0,
             simpo_gamma: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """TRL's CPO family (SimPO is `kind='simpo'` on length-averaged log-probs): per-pair loss and the
    chosen and rejected rewards (TRL's AlphaPO transformation, alpha != 0, has no Axolotl key)."""
    chosen_r, rejected_r = chosen, rejected
    logits = chosen_r - rejected_r
    if kind in ("simpo", "sigmoid"):
        if kind == "simpo":
            logits = logits - simpo_gamma / beta
        losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
                  - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    elif kind == "hinge":
        losses = jax.nn.relu(1 - beta * logits)
    elif kind == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown CPO loss type {kind!r}")
    return losses, beta * chosen_r, beta * rejected_r


def kto_loss(kind: str, logps: jax.Array, ref_logps: jax.Array, desirable: jax.Array, kl: jax.Array, *,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> jax.Array:
    """Per-completion KTO loss [N] (`desirable` 1.0 / 0.0; `kl` the batch's clamped KL estimate,
    no gradient). `apo_zero_unpaired` ignores `kl`."""
    logratios = logps - ref_logps
    if kind == "kto":
        chosen = 1 - jax.nn.sigmoid(beta * (logratios - kl))
        rejected = 1 - jax.nn.sigmoid(beta * (kl - logratios))
    elif kind == "apo_zero_unpaired":
        chosen = 1 - jax.nn.sigmoid(beta * logratios)
        rejected = jax.nn.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown KTO loss type {kind!r}")
    return jnp.where(desirable > 0, desirable_weight * chosen, undesirable_weight * rejected)
