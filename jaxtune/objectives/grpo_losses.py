"""GRPO's advantages and policy losses, as TRL 1.16's GRPOTrainer defines them.

Advantages (host side, numpy: rewards come from Python functions), one group = the G completions of a
prompt, rows prompt-major:

    sum_then_normalize:  r = sum_f w_f * r_f;  A = r - mean_group(r)  [/ (std + 1e-4), std per group
                         (scale_rewards: group), over the batch (batch), or none]
    normalize_then_sum:  each r_f normalized in its group, weighted sum, then normalized over the batch
A completion every reward function skipped (None) gets no advantage (0) and counts in no mean.

Per-token loss (device side), `logps` under the policy, `old` at rollout time, `ref` the reference:

    ratio = exp(logps - old)   (sequence level, GSPO: exp(mean over the completion of logps - old))
    grpo / bnpo / dr_grpo / dapo:  -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
                                   (ratio first capped at `delta` when set)
    cispo:                         -min(ratio, eps_high) * A * logps  (the cap without gradient)
    + beta * (exp(ref - logps) - (ref - logps) - 1)      (k3 KL estimator; times the ratio with
                                                          use_bias_correction_kl, TRL's default)

Aggregation (the denominators the trainer divides the summed terms by): grpo: each completion's mean
over its tokens, averaged over completions; bnpo and dapo: over all completion tokens of the batch;
dr_grpo: over completions x max_completion_length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
UNSUPPORTED_LOSS_TYPES = {"sapo": "SAPO's soft gate", "luspo": "LUSPO", "vespo": "VESPO's gamma weights"}


def nanstd(x: np.ndarray, axis=None, keepdims=False) -> np.ndarray:
    """TRL's nanstd: the unbiased (n - 1) standard deviation over the non-NaN entries."""
    count = np.sum(~np.isnan(x), axis=axis, keepdims=keepdims)
    mean = np.nanmean(x, axis=axis, keepdims=True)
    var = np.nansum((x - mean) ** 2, axis=axis, keepdims=keepdims) / np.maximum(count - 1, 1)
    return np.sqrt(var)


def advantages(rewards_per_func: np.ndarray, weights: np.ndarray, num_generations: int, *,
               scale_rewards: str = "group", aggregation: str = "sum_then_normalize"):
    """(advantages [N], rewards [N] (the weighted sum, NaN when unscorable), is_std_zero [N]) from the
    rewards [N, F] of N = prompts x num_generations completions (NaN: a function skipped the row)."""
    rewards_per_func = np.asarray(rewards_per_func, np.float64)
    weights = np.asarray(weights, np.float64)
    unscorable = np.isnan(rewards_per_func).all(axis=1)
    g = num_generations
    with np.errstate(invalid="ignore", divide="ignore"):
        if aggregation == "sum_then_normalize":
            rewards = np.nansum(rewards_per_func * weights[None], axis=1)
            rewards[unscorable] = np.nan
            grouped = rewards.reshape(-1, g)
            mean = np.repeat(np.nanmean(grouped, axis=1), g)
            if scale_rewards in ("group", "none"):
                std = np.repeat(nanstd(grouped, axis=1), g) if g > 1 else np.zeros_like(rewards)
            elif scale_rewards == "batch":
                std = np.full_like(rewards, nanstd(rewards)) if rewards.size > 1 else np.zeros_like(rewards)
            else:
                raise ValueError(f"scale_rewards must be group, batch or none (got {scale_rewards!r})")
            adv = rewards - mean
            if scale_rewards != "none":
                adv = adv / (std + 1e-4)
        elif aggregation == "normalize_then_sum":
            grouped = rewards_per_func.reshape(-1, g, rewards_per_func.shape[1])
            mean_k = np.nanmean(grouped, axis=1, keepdims=True)
            std_k = nanstd(grouped, axis=1, keepdims=True) if g > 1 else np.zeros_like(mean_k)
            reward_k = ((grouped - mean_k) / (std_k + 1e-4)).reshape(-1, rewards_per_func.shape[1])
            rewards = np.nansum(reward_k * weights[None], axis=1)
            rewards[unscorable] = np.nan
            std = np.full_like(rewards, nanstd(rewards)) if rewards.size > 1 else np.zeros_like(rewards)
            adv = (rewards - np.nanmean(rewards)) / (std + 1e-4)
        else:
            raise ValueError(f"multi_objective_aggregation must be sum_then_normalize or normalize_then_sum "
                             f"(got {aggregation!r})")
    is_std_zero = np.isclose(std, 0.0)
    return np.nan_to_num(adv, nan=0.0).astype(np.float32), rewards, is_std_zero


def per_token_loss(kind: str, logps: jax.Array, old: jax.Array, advantage: jax.Array, mask: jax.Array, *,
                   epsilon_low: float, epsilon_high: float, delta: float | None = None,
                   sequence_ratio: jax.Array | None = None, beta: float = 0.0, ref: jax.Array | None = None,
                   bias_correction: bool = True):
    """Per-token loss [..., T] (before masking and aggregation) and the per-token KL (or None).
    `sequence_ratio` (GSPO): the log importance weight per token's sequence, broadcast to its tokens.
    `bias_correction` (TRL's use_bias_correction_kl, on by default): the KL is multiplied by the ratio,
    which leaves its value on-policy but makes its gradient the unbiased reverse-KL gradient."""
    log_ratio = logps - old
    coef_1 = jnp.exp(log_ratio if sequence_ratio is None else sequence_ratio)
    kl = None
    if beta != 0.0:
        diff = ref - logps
        kl = jnp.exp(diff) - diff - 1
        if bias_correction:
            kl = kl * coef_1
    if kind == "cispo":
        loss = -jax.lax.stop_gradient(jnp.minimum(coef_1, epsilon_high)) * advantage * logps
    elif kind in ("grpo", "bnpo", "dr_grpo", "dapo"):
        coef_2 = jnp.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = jnp.minimum(coef_1, delta)
        loss = -jnp.minimum(coef_1 * advantage, coef_2 * advantage)
    else:
        raise ValueError(f"unknown GRPO loss type {kind!r}")
    if kl is not None:
        loss = loss + beta * kl
    return jnp.where(mask > 0, loss, 0.0), kl
