"""GRPO: the policy-gradient objective over rollouts (jaxtune/rollout.py makes the batches).

A rollout's completions are laid out like preference pairs (jaxtune.batch): each row holds one prompt
once and `per_row` of its completions as branches after it, each starting with a copy of the prompt's
last token. Per token, the batch carries what the loss needs at the position that predicts it:
`old_logps` (the sampling policy's log-prob of the next token) and `advantages` (its completion's).

    row:        p0 p1 p2 | p3 c0 c1 c2 | p3 d0 d1        (prompt p, completions c and d)
    labels:     -  -  -  | -  c0 c1 c2 | -  d0 d1
    old_logps:  0  0  0  | lc0 lc1 lc2 0 | ld0 ld1 0     (at the position predicting each token)

Log-probs are of logits / temperature (TRL's convention for the policy, the reference and the
sampler alike). The loss and its aggregation are TRL 1.16's (jaxtune/objectives/grpo_losses.py):
`grpo` averages each completion over its tokens and then over completions; `bnpo` averages over the
tokens of each micro-batch, then over micro-batches; `dr_grpo` divides by completions x
max_completion_length; `dapo` and `cispo` by the tokens of the whole accumulated batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.batch import BRANCH, EXAMPLES, IGNORE, TOKENS, Key, Layout, next_token_labels
from jaxtune.errors import JaxtuneError
from jaxtune.objectives import grpo_losses as G
from jaxtune.objectives.base import Objective, per_example


@dataclasses.dataclass(frozen=True)
class GroupShape:
    """How a rollout maps onto optimizer steps (TRL's batch arithmetic, in completions).

    micro_batch_size counts completions per data-parallel rank (TRL's per_device_train_batch_size);
    one optimizer step trains micro_batch_size x ranks x accumulation of them. A rollout samples
    `generation_batch_size` completions (default: one step's), `num_generations` per prompt, and
    trains `steps_per_rollout` optimizer steps on them, `num_iterations` times over. A row holds one
    prompt and `per_row` = gcd(num_generations, micro_batch_size) of its completions."""

    generations: int
    per_row: int
    prompts: int  # per rollout
    completions: int  # per rollout
    steps_per_rollout: int  # optimizer steps per pass over the rollout
    iterations: int

    @property
    def optimizer_steps(self) -> int:
        return self.steps_per_rollout * self.iterations

    @classmethod
    def of(cls, cfg, ranks: int) -> GroupShape:
        s = cfg.grpo_settings
        g = s.num_generations or 8
        micro, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
        per_step = micro * ranks * accum
        gen = s.generation_batch_size or per_step
        if gen % per_step:
            raise JaxtuneError(f"trl.generation_batch_size={gen} must be a multiple of the completions one optimizer "
                               f"step trains: micro_batch_size {micro} x {ranks} data-parallel rank(s) x "
                               f"gradient_accumulation_steps {accum} = {per_step}")
        if gen % g:
            raise JaxtuneError(f"the completions of a rollout ({gen}: trl.generation_batch_size, default micro_batch_size"
                               f" x ranks x accumulation) must be a multiple of trl.num_generations={g}")
        return cls(g, math.gcd(g, micro), gen // g, gen, gen // per_step, s.num_iterations)


class GRPO(Objective):
    name = "grpo"
    data_kind = "prompt"
    unit = "completions"
    uses_dropout = False
    # TRL logs each metric as a mean over its micro-batch, averaged over the micro-batches of the step: the
    # loss returns those means, summed over micro-batches by the trainer and divided by their number
    metric_denominators = {k: "micro_batches" for k in (
        "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
        "clip_ratio/high_max", "cispo_clip_ratio")}

    def __init__(self, *, loss_type: str, epsilon_low: float, epsilon_high: float, delta: float | None, beta: float,
                 importance_sampling_level: str, temperature: float, max_completion_length: int, shape: GroupShape,
                 old_from_policy: bool, bias_correction_kl: bool = True, pad_id: int = 0,
                 prompt_length: int | None = None):
        self.loss_type, self.epsilon_low, self.epsilon_high, self.delta = loss_type, epsilon_low, epsilon_high, delta
        self.beta, self.sequence_level = beta, importance_sampling_level == "sequence"
        self.bias_correction_kl = bias_correction_kl
        self.temperature = temperature if temperature > 0 else 1.0
        self.max_completion_length, self.shape, self.pad_id = max_completion_length, shape, pad_id
        self.per_row = shape.per_row
        # the rows' layout (`lay_out_group`): the prompt but its last token first, then branches of at most
        # max_completion_length + 1 tokens, so attention reads only the prompt's keys and the branch's own
        # (jaxtune.kernels.attention.attention's `band`); the prompts are at most `prompt_length` tokens
        self.band = None if prompt_length is None else (max_completion_length + 1, prompt_length - 1)
        self.old_from_policy = old_from_policy  # one pass per rollout: old == policy (ratio 1), as TRL
        self.needs_reference = beta != 0.0
        self.layout = Layout({"input_ids": Key(TOKENS, fill=pad_id), "labels": Key(TOKENS, fill=IGNORE),
                              "segment_ids": Key(TOKENS), "positions": Key(TOKENS),
                              "next_labels": Key(TOKENS, fill=IGNORE), "old_logps": Key(TOKENS, "float32"),
                              "advantages": Key(TOKENS, "float32"), "completions": Key(EXAMPLES, "float32")})
        # the loss is one term named after its type, divided by this total of the accumulated batch
        self.loss_terms = {loss_type: {"grpo": "weight", "bnpo": "micro_batches", "dr_grpo": "weight",
                                       "dapo": "tokens", "cispo": "tokens"}[loss_type]}

    # -- host --------------------------------------------------------------------------------
    def collate(self, rows, length):
        raise NotImplementedError("GRPO's batches come from rollouts (jaxtune/rollout.py), not from a loader")

    def finalize(self, batch):
        if "next_labels" in batch:
            return batch
        return {**batch, "next_labels": np.asarray(next_token_labels(batch["labels"], batch["segment_ids"]), np.int32)}

    # -- device ------------------------------------------------------------------------------
    def totals(self, batch):
        mask = batch["next_labels"] != IGNORE
        micro = batch["input_ids"].shape[0] if batch["input_ids"].ndim == 3 else 1
        return {"weight": jnp.sum(batch["completions"]), "tokens": jnp.sum(mask).astype(jnp.float32),
                "micro_batches": jnp.float32(micro)}

    def token_logps(self, model, batch, rng=None, *, with_entropy=False):
        """log p(next token) at logits / temperature [B, T] (0 off the completions) and the mask."""
        mask = batch["next_labels"] != IGNORE
        hidden = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"], rng=rng,
                                     band=self.band)
        out = model.target_logprobs(hidden / self.temperature, jnp.where(mask, batch["next_labels"], 0),
                                    with_entropy=with_entropy)
        logps, entropy = out if with_entropy else (out, None)
        return jnp.where(mask, logps, 0.0), mask.astype(jnp.float32), entropy

    def reference_logps(self, model, batch):
        return self.token_logps(model, batch)[0]

    def _per_sequence(self, values, seg):
        """Per-token values summed over each completion, and broadcast back to its tokens."""
        per_row = self.per_row + 1
        sums = per_example(values, seg, 1, per_row)  # one prompt per row
        branch = jnp.clip(seg >> 24, 0, per_row - 1)
        index = (seg & (BRANCH - 1)) > 0
        back = jnp.take_along_axis(sums[:, 0, :], branch, axis=1)
        return sums[:, 0, 1:], jnp.where(index & (branch > 0), back, 0.0)

    def loss(self, model, batch, rng, ref=None, totals=None):
        totals = totals or self.totals(batch)
        seg = batch["segment_ids"]
        logps, mask, entropy = self.token_logps(model, batch, rng, with_entropy=True)
        old = jax.lax.stop_gradient(logps) if self.old_from_policy else batch["old_logps"]
        advantage = batch["advantages"]
        seq_log_ratio = None
        if self.sequence_level:
            _, ratio_sum = self._per_sequence((logps - old) * mask, seg)
            _, count = self._per_sequence(mask, seg)
            seq_log_ratio = ratio_sum / jnp.maximum(count, 1.0)
        per_token, kl = G.per_token_loss(self.loss_type, logps, old, advantage, mask, epsilon_low=self.epsilon_low,
                                         epsilon_high=self.epsilon_high, delta=self.delta,
                                         sequence_ratio=seq_log_ratio, beta=self.beta, ref=ref,
                                         bias_correction=self.bias_correction_kl)
        if self.loss_type == "grpo":
            sums, _ = self._per_sequence(per_token, seg)
            lengths, _ = self._per_sequence(mask, seg)
            term = jnp.sum(sums / jnp.maximum(lengths, 1.0))
        elif self.loss_type == "bnpo":
            term = jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0)
        elif self.loss_type == "dr_grpo":
            term = jnp.sum(per_token) / self.max_completion_length
        else:
            term = jnp.sum(per_token)
        tokens = jnp.maximum(jnp.sum(mask), 1.0)
        out = {self.loss_type: term, "entropy": jnp.sum(entropy * mask) / tokens}
        if kl is not None:
            out["kl"] = jax.lax.stop_gradient(jnp.sum(kl * mask)) / tokens
        out.update(self._clip_metrics(logps, old, advantage, mask, seq_log_ratio, seg))
        return self.combine(out, totals), out

    def _clip_metrics(self, logps, old, advantage, mask, seq_log_ratio, seg):
        """TRL's clipping metrics: the fraction of tokens (of completions, at sequence level) clipped
        low / high / either, and each micro-batch's min / max over completions of their clipped
        fraction (averaged over the micro-batches, as TRL logs them)."""
        coef = jax.lax.stop_gradient(jnp.exp(logps - old if seq_log_ratio is None else seq_log_ratio))
        lengths, _ = self._per_sequence(mask, seg)
        present, _ = self._per_sequence((seg > 0).astype(jnp.float32), seg)  # > 0 for every completion slot used

        def counted(flags):  # the fraction of tokens (at sequence level: of completions) flagged
            flags = flags.astype(jnp.float32) * mask
            if not self.sequence_level:
                return jnp.sum(flags) / jnp.maximum(jnp.sum(mask), 1.0)
            per_completion = self._per_sequence(flags, seg)[0] / jnp.maximum(lengths, 1.0)
            return jnp.sum(per_completion) / jnp.maximum(jnp.sum(present > 0), 1.0)

        if self.loss_type == "cispo":
            return {"cispo_clip_ratio": counted((coef > self.epsilon_high) & (advantage > 0))}
        low = (coef < 1 - self.epsilon_low) & (advantage < 0)
        high = (coef > 1 + self.epsilon_high) & (advantage > 0)
        # the completions a min / max runs over: those with a trained token (TRL's NaN means skip the others),
        # at sequence level every completion (TRL's ratio is then one value per completion, masked or not)
        has = (present if self.sequence_level else lengths) > 0
        low_seq = self._per_sequence(low * mask, seg)[0] / jnp.maximum(lengths, 1.0)
        high_seq = self._per_sequence(high * mask, seg)[0] / jnp.maximum(lengths, 1.0)
        any_seq = jnp.any(has)
        return {"clip_ratio/low_mean": counted(low), "clip_ratio/high_mean": counted(high),
                "clip_ratio/region_mean": counted(low | high),
                "clip_ratio/low_min": jnp.where(any_seq, jnp.min(jnp.where(has, low_seq, jnp.inf)), 0.0),
                "clip_ratio/high_max": jnp.where(any_seq, jnp.max(jnp.where(has, high_seq, -jnp.inf)), 0.0)}


def lay_out_group(prompt: list[int], completions: list[list[int]], logps: list[np.ndarray], advantages: list[float],
                  trains: list[bool]) -> dict[str, list]:
    """One row: the prompt once, then each completion after a copy of the prompt's last token (branch
    b = 1, 2, ... of sample 1), with the per-token arrays GRPO reads. `trains[i]` False (a truncated
    completion under mask_truncated_completions) keeps completion i in the row but trains nothing."""
    p = len(prompt)
    ids, labels = list(prompt[:-1]), [IGNORE] * (p - 1)
    segments, positions = [1] * (p - 1), list(range(p - 1))
    old, adv = [0.0] * (p - 1), [0.0] * (p - 1)
    for b, (tokens, lp, a, train) in enumerate(zip(completions, logps, advantages, trains), start=1):
        n = len(tokens)
        ids += [prompt[-1]] + list(tokens)
        labels += [IGNORE] + (list(tokens) if train else [IGNORE] * n)
        segments += [1 + b * BRANCH] * (n + 1)
        positions += range(p - 1, p + n)
        # the value at a position belongs to the token it predicts (the next one)
        old += list(np.asarray(lp[:n], np.float32)) + [0.0]
        adv += [float(a)] * n + [0.0]
    return {"input_ids": ids, "labels": labels, "segment_ids": segments, "positions": list(positions),
            "old_logps": old, "advantages": adv, "completions": [float(len(completions))]}


def collate_rows(rows: list[dict | None], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows of `lay_out_group` -> [rows, length] arrays (missing rows all padding)."""
    n = len(rows)
    out = {"input_ids": np.full((n, length), pad_id, np.int32), "labels": np.full((n, length), IGNORE, np.int32),
           "segment_ids": np.zeros((n, length), np.int32), "positions": np.zeros((n, length), np.int32),
           "old_logps": np.zeros((n, length), np.float32), "advantages": np.zeros((n, length), np.float32),
           "completions": np.zeros((n, 1), np.float32)}
    for i, row in enumerate(rows):
        if row is None:
            continue
        k = len(row["input_ids"])
        for key in ("input_ids", "labels", "segment_ids", "positions", "old_logps", "advantages"):
            out[key][i, :k] = row[key]
        out["completions"][i] = row["completions"]
    return out
