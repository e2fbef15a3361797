"""The preallocated KV cache used by the sampler (and by GRPO's rollouts)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.models.config import ModelConfig


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
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array

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
    def length(self) -> int:
        return self.k.shape[3]
