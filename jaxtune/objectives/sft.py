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


def token_nll(logits: jax.Array, labels: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position negative log-likelihood [B, T-1] (0 where not trained) and the trained mask."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    trained = (targets != IGNORE) & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    picked = jnp.take_along_axis(logits, jnp.where(trained, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.where(trained, nll, 0.0), trained


class SFT:
    name = "sft"
    batch_keys = ("input_ids", "labels", "segment_ids", "positions")

    def loss(self, model, batch, rng):
        logits = model(batch["input_ids"], batch["segment_ids"], batch["positions"], rng=rng)
        nll, trained = token_nll(logits, batch["labels"], batch["segment_ids"])
        return nll.sum(), {"weight": trained.sum().astype(jnp.float32)}
