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

from jaxtune.data.chat import IGNORE


def next_token_targets(labels: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What each position predicts: targets [B, T] (labels shifted left by one; 0 where nothing is
    trained) and the trained mask [B, T] (False at segment boundaries, padding and the last position)."""
    last = [(0, 0)] * (labels.ndim - 1) + [(0, 1)]  # [..., T]: any leading axes
    nxt_labels = jnp.pad(labels[..., 1:], last, constant_values=IGNORE)
    nxt_segments = jnp.pad(segment_ids[..., 1:], last)
    trained = (nxt_labels != IGNORE) & (nxt_segments == segment_ids) & (nxt_segments > 0)
    return jnp.where(trained, nxt_labels, 0), trained


def next_token_labels(labels, segment_ids):
    """`next_token_targets` in one array: the target of each position, IGNORE where nothing is
    trained. A batch may carry it precomputed as `next_labels` (when its tokens are reordered for
    context parallelism, jaxtune.parallel.sequence)."""
    targets, trained = next_token_targets(jnp.asarray(labels), jnp.asarray(segment_ids))
    return jnp.where(trained, targets, IGNORE)


def batch_targets(batch) -> tuple[jax.Array, jax.Array]:
    """(targets, trained mask) of a batch: from `next_labels` when it has them, else from labels."""
    if "next_labels" in batch:
        trained = batch["next_labels"] != IGNORE
        return jnp.where(trained, batch["next_labels"], 0), trained
    return next_token_targets(batch["labels"], batch["segment_ids"])


class SFT:
    name = "sft"
    batch_keys = ("input_ids", "labels", "segment_ids", "positions")

    def loss(self, model, batch, rng):
        hidden = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"], rng=rng)
        targets, trained = batch_targets(batch)
        nll_sum = model.target_nll_sum(hidden, targets, trained.astype(jnp.float32))
        return nll_sum, {"weight": trained.sum().astype(jnp.float32)}
