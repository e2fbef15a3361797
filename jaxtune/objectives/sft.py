"""Supervised fine-tuning: next-token cross-entropy on the trained (label != -100) tokens.

Labels are aligned with the inputs (HF's convention): `labels[t]` is the target for the token at
t, predicted from position t - 1. Position t - 1 predicts t only inside one packed sample: at a
segment boundary (and on padding) nothing is trained, whatever the labels say.

    input_ids   = [a0 a1 a2 | b0 b1 | pad]      segment_ids = [1 1 1 2 2 0]
    labels      = [-  a1 a2 | -  b1 | - ]
    trained     : a1 (from a0), a2 (from a1), b1 (from b0)   -> weight 3
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.batch import IGNORE, TOKENS, Key, Layout, next_token_labels, next_token_targets
from jaxtune.objectives.base import Objective

__all__ = ["SFT", "batch_targets", "next_token_labels", "next_token_targets"]


def batch_targets(batch) -> tuple[jax.Array, jax.Array]:
    """(targets, trained mask) of a batch: from `next_labels` when it has them (computed before a
    context-parallel reorder), else from labels."""
    if "next_labels" in batch:
        trained = batch["next_labels"] != IGNORE
        return jnp.where(trained, batch["next_labels"], 0), trained
    return next_token_targets(jnp.asarray(batch["labels"]), jnp.asarray(batch["segment_ids"]))


class SFT(Objective):
    name = "sft"
    data_kind = "sft"
    unit = "trained_tokens"
    uses_dropout = True

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id
        self.layout = Layout({"input_ids": Key(TOKENS, fill=pad_id), "labels": Key(TOKENS, fill=IGNORE),
                              "segment_ids": Key(TOKENS), "positions": Key(TOKENS),
                              "next_labels": Key(TOKENS, fill=IGNORE)})

    def collate(self, rows, length):
        from jaxtune.data.packing import pad_batch

        return pad_batch(list(rows), length, self.pad_id)

    def totals(self, batch):
        return {"weight": batch_targets(batch)[1].sum().astype(jnp.float32)}

    def loss(self, model, batch, rng, ref=None, totals=None):
        hidden = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"], rng=rng)
        targets, trained = batch_targets(batch)
        nll_sum = model.target_nll_sum(hidden, targets, trained.astype(jnp.float32))
        return nll_sum, {"weight": trained.sum().astype(jnp.float32)}
