"""The token layout for context parallelism: rows cut into 2C chunks, device i of C holding chunks
i and 2C-1-i, so that under a causal mask every device has the same amount of work in ring
attention (the first chunks see few keys, the last ones many; each device gets one of each).

Worked example, C = 2, a row of 8 tokens t0..t7 cut into 4 chunks of 2:

    natural:   [t0 t1 | t2 t3 | t4 t5 | t6 t7]        device 0: t0..t3, device 1: t4..t7
    balanced:  [t0 t1 t6 t7 | t2 t3 t4 t5]            device 0: chunks 0, 3; device 1: chunks 1, 2

Every per-token array of the batch moves the same way (the objective's layout says which arrays are
per-token; per-row arrays such as reference log-probs stay). Attention masks by segment ids and
positions, and the losses sum over tokens, so the layout changes no result, with one exception:
the next-token target of a token is its right-hand neighbour in the *natural* order, so
`next_labels` (jaxtune.batch.next_token_labels) is computed before the tokens move (objectives that
need more, such as the next input ids, add them in their `finalize`). Lengths are padded (each
array's padding value) to a multiple of 2C first.
"""

from __future__ import annotations

import numpy as np

from jaxtune.batch import IGNORE, Layout, next_token_labels


def balanced_order(length: int, ways: int) -> np.ndarray:
    """The token indices, in the order the balanced layout stores them (length divisible by 2 * ways)."""
    chunks = np.arange(length).reshape(2 * ways, length // (2 * ways))
    order = [c for i in range(ways) for c in (chunks[i], chunks[2 * ways - 1 - i])]
    return np.concatenate(order)


def balance(batch: dict[str, np.ndarray], ways: int, layout: Layout | None = None) -> dict[str, np.ndarray]:
    """`batch` with its per-token arrays (all of them when `layout` is None) padded to a multiple of
    2 * ways tokens, `next_labels` added when it has labels, and laid out balanced for `ways`
    sequence devices."""
    def per_token(key):
        return layout is None or layout[key].per_token

    def fill(key):
        return IGNORE if key in ("labels", "next_labels") else (layout[key].fill if layout is not None else 0)

    length = batch["input_ids"].shape[-1]
    extra = -length % (2 * ways)
    if extra:
        batch = {k: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, extra)], constant_values=fill(k)) if per_token(k) else v
                 for k, v in batch.items()}
    if "labels" in batch and "next_labels" not in batch:
        batch = {**batch, "next_labels": np.asarray(next_token_labels(batch["labels"], batch["segment_ids"]))}
    order = balanced_order(length + extra, ways)
    return {k: v[..., order] if per_token(k) else v for k, v in batch.items()}
