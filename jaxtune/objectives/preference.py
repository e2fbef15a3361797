"""Preference objectives: DPO (every TRL loss type), ORPO, SimPO/CPO and KTO.

Their rows (jaxtune.data.preference) hold examples laid out with segment ids (jaxtune.batch): a pair's
prompt once, its chosen answer as branch 1 and its rejected answer as branch 2 (for KTO: the
completion and the KL completion), several examples per row. One forward of the policy gives each
token's log-prob of its next token; `per_example` sums them by segment into [rows, examples, 3]
(prompt, branch 1, branch 2), so a whole batch of pairs is one forward of one compiled shape.

    sums = per_example(token_logps * completion_mask, segment_ids, K)     # [B, K, 3]
    chosen_logps, rejected_logps = sums[..., 1], sums[..., 2]

The reference model's sums come either from the step (the policy with adapters off, or a frozen copy
of the initial weights: jaxtune.objectives.reference) or from the batch (`ref_logps`, precomputed
once before training).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.batch import BRANCH, EXAMPLES, IGNORE, TOKENS, Key, Layout, continues, next_token_labels
from jaxtune.objectives import losses as L
from jaxtune.objectives.base import Objective, per_example

REF_KEY = "ref_logps"  # [rows, examples, 2]: the reference's summed completion log-probs of branches 1 and 2


class PreferenceObjective(Objective):
    """What DPO, ORPO, SimPO and KTO share: rows of laid-out examples, token log-probs from one
    forward, sums per example."""

    data_kind = "preference"
    unit = "pairs"
    uses_dropout = False

    def __init__(self, *, pad_id: int, examples_per_row: int):
        self.pad_id, self.examples = pad_id, max(1, int(examples_per_row))
        keys = {"input_ids": Key(TOKENS, fill=pad_id), "labels": Key(TOKENS, fill=IGNORE),
                "segment_ids": Key(TOKENS), "positions": Key(TOKENS),
                "next_ids": Key(TOKENS, fill=IGNORE), "next_labels": Key(TOKENS, fill=IGNORE),
                "example_valid": Key(EXAMPLES, dtype="float32")}
        if self.needs_reference:
            keys[REF_KEY] = Key(("batch", None, None), dtype="float32")
        self.layout = Layout(keys)
        self.reference_key = REF_KEY if self.needs_reference else None

    # -- host ---------------------------------------------------------------------------------
    def collate(self, rows: Sequence[dict | None], length: int) -> dict[str, np.ndarray]:
        from jaxtune.data.packing import pad_batch

        out = pad_batch(list(rows), length, self.pad_id)
        valid = np.zeros((len(rows), self.examples), np.float32)
        ref = np.zeros((len(rows), self.examples, 2), np.float32)
        has_ref = False
        for i, row in enumerate(rows):
            if row is None:
                continue
            valid[i, :row["examples"]] = 1.0
            if row.get(REF_KEY) is not None:
                has_ref = True
                ref[i, :row["examples"]] = np.asarray(row[REF_KEY], np.float32)
        out["example_valid"] = valid
        if has_ref:
            out[REF_KEY] = ref
        self.collate_extra(rows, out)
        return out

    def collate_extra(self, rows, out: dict[str, np.ndarray]) -> None:
        pass

    def finalize(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Next-token arrays in the natural token order: `next_ids` (the next input token of the same
        sequence, IGNORE at its end) and `next_labels` (the same where the next token trains)."""
        if "next_ids" in batch:
            return batch
        ids, seg = batch["input_ids"], batch["segment_ids"]
        last = [(0, 0)] * (ids.ndim - 1) + [(0, 1)]
        nxt_ids, nxt_seg = np.pad(ids[..., 1:], last), np.pad(seg[..., 1:], last)
        follows = continues(seg, nxt_seg) & (nxt_seg > 0)
        return {**batch, "next_ids": np.where(follows, nxt_ids, IGNORE).astype(np.int32),
                "next_labels": np.asarray(next_token_labels(batch["labels"], seg), np.int32)}

    # -- device -------------------------------------------------------------------------------
    def token_logps(self, model, batch, rng):
        """log p(next token) at every position with a next token [B, T] (0 elsewhere), and the
        completion mask (next token trains) and sequence mask (any next token) as float32."""
        sequence = batch["next_ids"] != IGNORE
        hidden = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"], rng=rng)
        logps = model.target_logprobs(hidden, jnp.where(sequence, batch["next_ids"], 0))
        completion = (batch["next_labels"] != IGNORE).astype(jnp.float32)
        sequence = sequence.astype(jnp.float32)
        return jnp.where(sequence > 0, logps, 0.0), completion, sequence, hidden

    def reference_logps(self, model, batch) -> jax.Array:
        logps, completion, _, _ = self.token_logps(model, batch, None)
        return per_example(logps * completion, batch["segment_ids"], self.examples)[..., 1:]

    def totals(self, batch):
        seg = batch["segment_ids"]
        completion = batch["next_labels"] != IGNORE
        branch = seg >> 24
        chosen = (branch == 1)
        return {"weight": jnp.sum(batch["example_valid"]),
                "chosen_tokens": jnp.sum(completion & chosen).astype(jnp.float32),
                # the whole chosen sequence: its prompt (branch 0) and its answer (branch 1)
                "chosen_sequence_tokens": jnp.sum((batch["next_ids"] != IGNORE) & (branch < 2)
                                                  & (seg > 0)).astype(jnp.float32)}


def _pair_arrays(sums, lengths, valid, ref):
    """Flatten [B, K, ...] per-pair arrays to [B*K] PairLogps."""
    flat = lambda x: x.reshape(-1)  # noqa: E731
    ref_c, ref_r = (jnp.zeros_like(sums[..., 1]), jnp.zeros_like(sums[..., 2])) if ref is None else (ref[..., 0], ref[..., 1])
    return L.PairLogps(chosen=flat(sums[..., 1]), rejected=flat(sums[..., 2]), ref_chosen=flat(ref_c),
                       ref_rejected=flat(ref_r), chosen_len=flat(lengths[..., 1]), rejected_len=flat(lengths[..., 2]),
                       valid=flat(valid) > 0)


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, valid) -> dict:
    """TRL's per-pair metrics, as sums over the valid pairs."""
    def total(x):
        return jnp.sum(jnp.where(valid, x, 0.0))

    return {"rewards/chosen": total(chosen_rewards), "rewards/rejected": total(rejected_rewards),
            "rewards/accuracies": total((chosen_rewards > rejected_rewards).astype(jnp.float32)),
            "rewards/margins": total(chosen_rewards - rejected_rewards),
            "logps/chosen": total(chosen_logps), "logps/rejected": total(rejected_logps)}


class DPO(PreferenceObjective):
    """`rl: dpo`: a weighted sum of TRL's DPO loss types (`dpo_loss_type`, `dpo_loss_weights`)."""

    name = "dpo"
    needs_reference = True

    def __init__(self, *, loss_types: Sequence[str], loss_weights: Sequence[float] | None, beta: float,
                 label_smoothing: float = 0.0, use_weighting: bool = False, discopop_tau: float = 0.05, **kw):
        super().__init__(**kw)
        self.loss_types = tuple(loss_types)
        self.loss_weights = tuple(loss_weights or [1.0] * len(self.loss_types))
        self.beta, self.label_smoothing = beta, label_smoothing
        self.use_weighting, self.discopop_tau = use_weighting, discopop_tau
        self.loss_terms = {"pairs": "weight", **({"sft": "chosen_tokens"} if "sft" in self.loss_types else {})}

    def loss(self, model, batch, rng, ref=None, totals=None):
        logps, completion, _, hidden = self.token_logps(model, batch, rng)
        seg = batch["segment_ids"]
        sums = per_example(logps * completion, seg, self.examples)
        lengths = per_example(completion, seg, self.examples)
        pairs = _pair_arrays(sums, lengths, batch["example_valid"], ref)
        weights = self._wpo_weights(model, hidden, logps, completion, seg, lengths) if self.use_weighting else None
        out = L.dpo_terms(pairs, -sums[..., 1].sum(), loss_types=self.loss_types, loss_weights=self.loss_weights,
                          beta=self.beta, label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
                          weights=weights)
        if "sft" not in self.loss_types:
            del out["sft"]
        chosen_r = self.beta * jax.lax.stop_gradient(pairs.chosen - pairs.ref_chosen)
        rejected_r = self.beta * jax.lax.stop_gradient(pairs.rejected - pairs.ref_rejected)
        out.update(_pair_metrics(chosen_r, rejected_r, jax.lax.stop_gradient(pairs.chosen),
                                 jax.lax.stop_gradient(pairs.rejected), pairs.valid))
        return self.combine(out, totals or self.totals(batch)), out

    def _wpo_weights(self, model, hidden, logps, completion, seg, lengths):
        """WPO weights per pair (losses.wpo_weights), from log sum_v p_v^2 of every token."""
        from jaxtune.kernels.cross_entropy import linear_log_sum_sq_probs

        head, vocab_axis = model.head_matrix()
        flat = jax.lax.stop_gradient(hidden.reshape(-1, hidden.shape[-1]))
        sq = linear_log_sum_sq_probs(flat, jax.lax.stop_gradient(head), vocab_axis=vocab_axis,
                                    softcap=model.cfg.final_softcap).reshape(logps.shape)
        aligned = per_example(jax.lax.stop_gradient(logps - sq) * completion, seg, self.examples)
        return L.wpo_weights(aligned[..., 1:].reshape(-1, 2), lengths[..., 1:].reshape(-1, 2))


class ORPO(PreferenceObjective):
    """`rl: orpo` (TRL's experimental ORPOTrainer): NLL of the whole chosen sequence (prompt
    included, per token) minus beta * log sigmoid(log odds ratio) of the length-averaged answers."""

    name = "orpo"
    loss_terms = {"nll": "chosen_sequence_tokens", "odds_ratio": "weight"}
    metric_denominators = {"nll_loss": "chosen_sequence_tokens"}

    def __init__(self, *, beta: float, **kw):
        super().__init__(**kw)
        self.beta = beta

    def loss(self, model, batch, rng, ref=None, totals=None):
        logps, completion, sequence, _ = self.token_logps(model, batch, rng)
        seg = batch["segment_ids"]
        sums = per_example(logps * completion, seg, self.examples)
        lengths = jnp.maximum(per_example(completion, seg, self.examples), 1.0)
        mean = (sums / lengths).reshape(-1, 3)
        valid = batch["example_valid"].reshape(-1) > 0
        log_odds = L.orpo_log_odds(mean[:, 1], mean[:, 2])
        ratio = jax.nn.log_sigmoid(log_odds)
        nll = -jnp.sum(logps * sequence * ((seg >> 24) < 2))
        chosen_r = self.beta * jax.lax.stop_gradient(mean[:, 1])
        rejected_r = self.beta * jax.lax.stop_gradient(mean[:, 2])
        out = {"nll": nll, "odds_ratio": -self.beta * jnp.sum(jnp.where(valid, ratio, 0.0)),
               "nll_loss": jax.lax.stop_gradient(nll),
               "log_odds_ratio": jnp.sum(jnp.where(valid, jax.lax.stop_gradient(ratio), 0.0)),
               "log_odds_chosen": jnp.sum(jnp.where(valid, jax.lax.stop_gradient(log_odds), 0.0))}
        out.update(_pair_metrics(chosen_r, rejected_r, jax.lax.stop_gradient(mean[:, 1]),
                                 jax.lax.stop_gradient(mean[:, 2]), valid))
        return self.combine(out, totals or self.totals(batch)), out


class CPO(PreferenceObjective):
    """`rl: simpo` (TRL's experimental CPOTrainer with loss_type simpo): the loss on length-averaged
    log-probs with target margin `simpo_gamma`, plus `cpo_alpha` times the chosen answers' NLL."""

    name = "simpo"
    metric_denominators = {"nll_loss": "chosen_tokens"}

    def __init__(self, *, loss_type: str, beta: float, simpo_gamma: float, cpo_alpha: float,
                 label_smoothing: float = 0.0, **kw):
        super().__init__(**kw)
        self.loss_type, self.beta, self.simpo_gamma, self.cpo_alpha = loss_type, beta, simpo_gamma, cpo_alpha
        self.label_smoothing = label_smoothing
        self.loss_terms = {"pairs": "weight", **({"nll": "chosen_tokens"} if cpo_alpha else {})}

    def loss(self, model, batch, rng, ref=None, totals=None):
        logps, completion, _, _ = self.token_logps(model, batch, rng)
        seg = batch["segment_ids"]
        sums = per_example(logps * completion, seg, self.examples)
        if self.loss_type in ("simpo", "ipo"):
            sums = sums / jnp.maximum(per_example(completion, seg, self.examples), 1.0)
        flat = sums.reshape(-1, 3)
        valid = batch["example_valid"].reshape(-1) > 0
        losses, chosen_r, rejected_r = L.cpo_loss(self.loss_type, flat[:, 1], flat[:, 2], beta=self.beta,
                                                  label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
        nll = -jnp.sum(logps * completion * ((seg >> 24) == 1))
        out = {"pairs": jnp.sum(jnp.where(valid, losses, 0.0)), "nll_loss": jax.lax.stop_gradient(nll)}
        if self.cpo_alpha:
            out["nll"] = self.cpo_alpha * nll
        out.update(_pair_metrics(jax.lax.stop_gradient(chosen_r), jax.lax.stop_gradient(rejected_r),
                                 jax.lax.stop_gradient(flat[:, 1]), jax.lax.stop_gradient(flat[:, 2]), valid))
        return self.combine(out, totals or self.totals(batch)), out


class KTO(PreferenceObjective):
    """`rl: kto`: each row holds completions (branch 1) with a desirable / undesirable label and, for
    `loss_type: kto`, a mismatched KL completion under the same prompt (branch 2). The KL baseline is
    the micro-batch's mean policy-minus-reference log-ratio of the KL completions, clamped at 0, with
    no gradient (TRL computes it per batch the same way)."""

    name = "kto"
    data_kind = "unpaired"
    unit = "completions"
    needs_reference = True
    loss_terms = {"kto": "weight"}
    metric_denominators = {"rewards/chosen": "desirable", "logps/chosen": "desirable",
                           "rewards/rejected": "undesirable", "logps/rejected": "undesirable"}

    def __init__(self, *, loss_type: str, beta: float, desirable_weight: float, undesirable_weight: float, **kw):
        super().__init__(**kw)
        self.layout = self.layout.with_keys(kto_label=Key(EXAMPLES, fill=0))
        self.loss_type, self.beta = loss_type, beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def collate_extra(self, rows, out):
        labels = np.zeros((len(rows), self.examples), np.int32)
        for i, row in enumerate(rows):
            if row is not None:
                labels[i, :len(row["kto_label"])] = row["kto_label"]
        out["kto_label"] = labels

    def totals(self, batch):
        valid = batch["example_valid"]
        desirable = jnp.sum(valid * (batch["kto_label"] > 0))
        return {"weight": jnp.sum(valid), "desirable": desirable, "undesirable": jnp.sum(valid) - desirable}

    def loss(self, model, batch, rng, ref=None, totals=None):
        logps, completion, _, _ = self.token_logps(model, batch, rng)
        sums = per_example(logps * completion, batch["segment_ids"], self.examples).reshape(-1, 3)
        ref = ref.reshape(-1, 2)
        valid = batch["example_valid"].reshape(-1) > 0
        desirable = batch["kto_label"].reshape(-1).astype(jnp.float32)
        n = jnp.maximum(jnp.sum(valid), 1.0)
        if self.loss_type == "kto":
            kl = jnp.sum(jnp.where(valid, jax.lax.stop_gradient(sums[:, 2]) - ref[:, 1], 0.0)) / n
            kl = jnp.maximum(kl, 0.0)
        else:
            kl = jnp.zeros((), jnp.float32)
        losses = L.kto_loss(self.loss_type, sums[:, 1], ref[:, 0], desirable, kl, beta=self.beta,
                            desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        rewards = self.beta * jax.lax.stop_gradient(sums[:, 1] - ref[:, 0])
        chosen, rejected = valid & (desirable > 0), valid & (desirable == 0)

        def total(mask, x):
            return jnp.sum(jnp.where(mask, x, 0.0))

        out = {"kto": total(valid, losses), "kl": kl * jnp.sum(valid),
               "rewards/chosen": total(chosen, rewards), "rewards/rejected": total(rejected, rewards),
               "logps/chosen": total(chosen, jax.lax.stop_gradient(sums[:, 1])),
               "logps/rejected": total(rejected, jax.lax.stop_gradient(sums[:, 1]))}
        return self.combine(out, totals or self.totals(batch)), out

    def finish(self, metrics):
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics = {**metrics, "rewards/margins": metrics["rewards/chosen"] - metrics["rewards/rejected"]}
        return metrics
