"""The preallocated KV cache used by the sampler (and by GRPO's rollouts)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.models.config import ModelConfig


def _take_rows(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x[:, keep] for a stacked cache [layers, batch, ...], one row at a time: a gather over the batch
    axis made XLA transpose the whole cache to batch-major and back (about 0.5 s per compaction of a
    64-row SmolLM2 rollout on a CPU, which takes 13 s)."""
    out = jnp.zeros((x.shape[0], keep.shape[0]) + x.shape[2:], x.dtype)

    def one(i, out):
        return jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(x, keep[i], 1, axis=1), i, axis=1)

    return jax.lax.fori_loop(0, keep.shape[0], one, out)


def cache_widths(length: int, parts: int = 8, unit: int = 8) -> list[int]:
    """The widths a decode step reads a cache of `length` slots in (its filled slots rounded up to the
    next): at most `parts`, multiples of `unit`, the last `length` ([8, 16, ..., 64] for 64 slots)."""
    step = -(-length // parts)
    step = -(-step // unit) * unit
    return [min(step * (j + 1), length) for j in range(-(-length // step))]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values for every layer, stacked: k, v [layers, batch, kv_heads, length, head_dim]
    (`AXES`). Head-major, so that a decode step's attention reads each (row, kv head)'s keys as one
    contiguous [length, head_dim] block (token-major made XLA transpose the whole cache of every
    layer at every step: 4x slower at 512 slots on a CPU).

    `positions` and `segment_ids` [batch, length] describe each slot for the attention mask
    (segment 0 = empty or padding, never attended by real tokens). `index` is the next slot to
    write; all rows advance together (prompts are left-padded).

    A decode step reads only a layer's filled slots, rounded up to one of `cache_widths` (the
    slots a 64-token completion reads average about half of them).

    `prefix`, when set, is a read-only cache of P rows (a prompt's keys and values, computed once)
    that every decode step also attends, shared by consecutive groups of rows: row i reads prefix row
    i // (batch / P). The sampler keeps the G completions of a prompt in their own slots and the
    prompt once (reading the prompt's slots G times was a third of a 64-row decode step on a CPU).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    prefix: KVCache | None = None

    AXES = ("layers", "batch", "kv_heads", None, "head_dim")  # logical axes of k and v (sharding rules)

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, length: int, dtype: Any) -> "KVCache":
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.zeros((batch, length), jnp.int32),
            segment_ids=jnp.zeros((batch, length), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def group(self) -> int:
        """Rows per prefix row (1 without a prefix)."""
        return 1 if self.prefix is None else self.k.shape[1] // self.prefix.k.shape[1]

    def take_rows(self, keep: jax.Array) -> KVCache:
        """The cache of rows `keep` (slot i holds row keep[i]); a prefix shared by groups of rows
        becomes one prefix row per kept row."""
        prefix = None if self.prefix is None else self.prefix.take_rows(keep // self.group)
        return dataclasses.replace(self, k=_take_rows(self.k, keep), v=_take_rows(self.v, keep),
                                   positions=jnp.take(self.positions, keep, axis=0),
                                   segment_ids=jnp.take(self.segment_ids, keep, axis=0), prefix=prefix)

    @property
    def length(self) -> int:
        return self.k.shape[3]
