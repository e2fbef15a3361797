"""What an objective is: the one piece of training that knows what a batch means.

An objective owns its batch. It declares
- `layout`: every batch key with its logical axes (jaxtune.batch.Layout), which the trainer reads to
  stack micro-batches, place them on the mesh (rows over the data axes, tokens over `sequence`) and
  reorder tokens for context parallelism;
- `collate(rows, length)`: prepared rows -> a host batch of `length` tokens per row;
- `finalize(batch)`: host arrays that need the tokens in their natural order (next-token targets),
  added before placement;
- `totals(batch)`: the counts its loss and metrics are normalized by, over the whole accumulated
  batch (trained tokens for SFT, pairs for DPO, ...), computed once per step before any micro-batch;
- `loss(model, batch, rng, ref=None, totals=None)`: for one micro-batch, (loss_sum, sums): the
  differentiable loss as a sum over its units, each term already scaled to the `weight`
  denominator (`combine`), and the micro-batch's sums of every metric and of each term (raw);
- `reference_logps(model, batch)` when `needs_reference`: what it needs of the reference model
  (run with the reference's weights, without gradients), or precomputed and carried by the batch.

The trainer computes `totals` of the whole accumulated batch first, sums the micro-batches' loss_sum
over totals["weight"] (so the gradients come out normalized) and their metric sums, each metric then
divided by totals[its denominator] (default "weight"). Since each term arrives scaled by weight / its own
denominator, the loss is exactly sum over terms of term_sum / totals[term's denominator]: a loss that
mixes a per-token mean with a per-pair mean (ORPO: NLL per token, odds ratio per pair) is the mean
its formula says, whatever the accumulation. `weight` is what `unit` names in the logs. Called with
one micro-batch and no totals, `loss` normalizes by that micro-batch's own totals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.batch import BRANCH, Layout


def per_example(values: jax.Array, segment_ids: jax.Array, examples: int, branches: int = 3) -> jax.Array:
    """Sum [B, T] token values by (row, example, branch) -> [B, examples, branches] (branch 0 the
    shared prompt, b >= 1 the b-th answer or completion; jaxtune.batch); padding tokens (segment 0)
    count nowhere."""
    b = segment_ids.shape[0]
    example = (segment_ids & (BRANCH - 1)) - 1
    branch = segment_ids >> 24  # BRANCH == 1 << 24
    row = jnp.arange(b, dtype=jnp.int32)[:, None]
    slots = b * examples * branches
    index = jnp.where(segment_ids > 0, (row * examples + example) * branches + branch, slots)
    sums = jax.ops.segment_sum(values.reshape(-1), index.reshape(-1), num_segments=slots + 1)
    return sums[:slots].reshape(b, examples, branches)


class Objective:
    name: str = ""
    data_kind: str = "sft"  # the prepared rows it trains on: sft | preference | unpaired
    unit: str = "trained_tokens"  # what totals["weight"] counts (logged per step)
    layout: Layout
    loss_terms: Mapping[str, str] = {"loss": "weight"}  # term -> its denominator in totals
    metric_denominators: Mapping[str, str] = {}  # metric -> denominator (default "weight")
    needs_reference: bool = False
    uses_dropout: bool = True  # LoRA dropout applies (preference objectives run without, as TRL does)
    reference_key: str | None = None  # batch key of precomputed reference values, when the objective has them

    def collate(self, rows: Sequence[dict | None], length: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def finalize(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays computed in the natural token order (before a context-parallel reorder)."""
        return batch

    def totals(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        raise NotImplementedError

    def loss(self, model, batch: Mapping[str, jax.Array], rng: jax.Array | None, ref: jax.Array | None = None,
             totals: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def combine(self, terms: Mapping[str, jax.Array], totals: Mapping[str, jax.Array]) -> jax.Array:
        """The loss sum of a micro-batch: each term scaled by weight / its denominator's total."""
        import jax.numpy as jnp

        weight = jnp.maximum(totals["weight"], 1.0)
        out = None
        for term, denominator in self.loss_terms.items():
            value = terms[term]
            if denominator != "weight":
                value = value * (weight / jnp.maximum(totals[denominator], 1.0))
            out = value if out is None else out + value
        return out

    def reference_logps(self, model, batch: Mapping[str, jax.Array]) -> jax.Array:
        raise NotImplementedError(f"{self.name} uses no reference model")

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics derived from the normalized ones (host side), e.g. KTO's reward margin."""
        return metrics

    def denominator(self, metric: str) -> str:
        return self.metric_denominators.get(metric, "weight")
