"""What a batch is, for every layer: the ignore index, the segment-id rule, next-token targets, and
the layout an objective declares for its batch keys (so placement, host sharding, accumulation and
the sequence reorder treat every array right). Nothing here knows a model, a mesh or a loss.

Segment ids. 0 is padding; a packed sample has an id k >= 1, and a token attends only to tokens of
its own sample. A preference pair shares its prompt: it is laid out once, followed by the two
answers as *branches*, each starting with a copy of the prompt's last token:

    tokens       p0 p1 p2 | p3 c0 c1 c2 | p3 r0 r1         (prompt p0..p3, chosen c, rejected r)
    segment_ids  k  k  k  | k+B ...     | k+2B ...         (B = BRANCH)
    positions    0  1  2  | 3  4  5  6  | 3  4  5

A branch token (id >= BRANCH) attends to its own branch and to its prefix (id % BRANCH), never to
the other branch; positions continue from the prompt in both. So every branch token sees exactly
what it sees in the unshared sequence p0..p3 + answer, and the first answer token of each branch is
predicted inside its branch (from its copy of p3). The unshared layout of the same pair is just the
two branches with no prefix segment (`p0 p1 p2 p3 c0 c1 c2 | p0 p1 p2 p3 r0 r1`, ids k+B and k+2B):
the same rule, the same reductions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

IGNORE = -100  # label of a token that does not train (HF's ignore index)
BRANCH = 1 << 24  # segment ids k + b * BRANCH (b = 1, 2) are branches of the sample whose prefix has id k


def attends(q_segment_ids, kv_segment_ids):
    """The segment part of the attention rule (numpy or jax arrays, broadcasting): a query attends
    keys of its own segment and, in a branch, keys of the branch's prefix."""
    same = q_segment_ids == kv_segment_ids
    prefix = (q_segment_ids >= BRANCH) & (kv_segment_ids == (q_segment_ids & (BRANCH - 1)))
    return same | prefix


def continues(segment_ids, next_segment_ids):
    """Whether the next token is the same sequence's next token: same segment, or a prefix (id k)
    followed by its first branch (id k + BRANCH); a second branch follows the first, but does not
    continue it."""
    return (next_segment_ids == segment_ids) | ((segment_ids > 0) & (segment_ids < BRANCH)
                                                 & (next_segment_ids == segment_ids + BRANCH))


def _xp(x):
    import jax.numpy as jnp

    return np if isinstance(x, np.ndarray) else jnp


def next_token_targets(labels, segment_ids):
    """What each position predicts: targets [..., T] (labels shifted left by one; 0 where nothing is
    trained) and the trained mask (False at segment boundaries, padding and the last position).
    Labels are aligned with the inputs (HF's convention): `labels[t]` is the target for the token at
    t, predicted from position t - 1 of the same sequence.

        input_ids   = [a0 a1 a2 | b0 b1 | pad]      segment_ids = [1 1 1 2 2 0]
        labels      = [-  a1 a2 | -  b1 | - ]
        trained     : a1 (from a0), a2 (from a1), b1 (from b0)
    """
    xp = _xp(labels)
    last = [(0, 0)] * (labels.ndim - 1) + [(0, 1)]
    nxt_labels = xp.pad(labels[..., 1:], last, constant_values=IGNORE)
    nxt_segments = xp.pad(segment_ids[..., 1:], last)
    trained = (nxt_labels != IGNORE) & continues(segment_ids, nxt_segments) & (nxt_segments > 0)
    return xp.where(trained, nxt_labels, 0), trained


def next_token_labels(labels, segment_ids):
    """`next_token_targets` in one array: the target of each position, IGNORE where nothing is
    trained. Computed on the host while the tokens are in their natural order (before a context-
    parallel reorder, jaxtune.parallel.sequence, moves them)."""
    targets, trained = next_token_targets(labels, segment_ids)
    return _xp(labels).where(trained, targets, IGNORE)


@dataclasses.dataclass(frozen=True)
class Key:
    """One array of a batch, [rows, ...]: its logical axes (`batch` rows, `length` tokens,
    None for others, e.g. the examples of a row), dtype and the value that pads it."""

    axes: tuple[str | None, ...]
    dtype: str = "int32"
    fill: float = 0

    @property
    def per_token(self) -> bool:
        return self.axes[-1] == "length"


TOKENS = ("batch", "length")  # [rows, tokens]
EXAMPLES = ("batch", None)  # [rows, examples]: one value per packed example (pair, completion) of a row


class Layout(Mapping):
    """An objective's batch keys and their `Key`s. Host batches are dicts of numpy arrays with a row
    axis first (and, once stacked for accumulation, a micro-batch axis before it). Per-token arrays
    pad along their last axis, per-example arrays along their second."""

    def __init__(self, keys: dict[str, Key]):
        self._keys = dict(keys)

    def __getitem__(self, name: str) -> Key:
        return self._keys[name]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def with_keys(self, **keys: Key) -> Layout:
        return Layout({**self._keys, **keys})

    def check(self, batch: Mapping[str, np.ndarray]) -> None:
        unknown = sorted(set(batch) - set(self._keys))
        if unknown:
            raise KeyError(f"batch keys {unknown} are not in the objective's layout ({sorted(self._keys)})")

    def lengths(self, batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """(tokens, examples) of a host batch: the last axis of its per-token arrays and the second
        axis of its per-example ones (0 when it has none)."""
        tokens = max((v.shape[-1] for k, v in batch.items() if self[k].per_token), default=0)
        examples = max((v.shape[1] for k, v in batch.items() if not self[k].per_token and v.ndim > 1), default=0)
        return tokens, examples

    def pad(self, batch: Mapping[str, np.ndarray], tokens: int, examples: int) -> dict[str, np.ndarray]:
        """`batch` with per-token arrays padded to `tokens` and per-example arrays to `examples`."""
        self.check(batch)
        out = {}
        for name, value in batch.items():
            key = self[name]
            axis = value.ndim - 1 if key.per_token else 1
            extra = (tokens if key.per_token else examples) - value.shape[axis] if value.ndim > 1 else 0
            if extra:
                widths = [(0, 0)] * value.ndim
                widths[axis] = (0, extra)
                value = np.pad(value, widths, constant_values=key.fill)
            out[name] = value
        return out

    def like(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An all-padding batch shaped like `batch` (trains nothing)."""
        return {name: np.full(value.shape, self[name].fill, value.dtype) for name, value in batch.items()}

    def stack(self, group: Sequence[Mapping[str, np.ndarray]], count: int) -> dict[str, np.ndarray]:
        """[count, rows, ...] from up to `count` micro-batches, each padded to the longest; missing
        micro-batches are all padding."""
        sizes = [self.lengths(b) for b in group]
        tokens, examples = max(s[0] for s in sizes), max(s[1] for s in sizes)
        padded = [self.pad(b, tokens, examples) for b in group]
        while len(padded) < count:
            padded.append(self.like(padded[0]))
        return {k: np.stack([b[k] for b in padded]) for k in padded[0]}


__all__ = ["BRANCH", "EXAMPLES", "IGNORE", "Key", "Layout", "TOKENS", "attends", "continues", "next_token_labels",
           "next_token_targets"]
