"""Batches for training: a grain pipeline over the prepared rows, sharded per host, resumable.

Per epoch e the rows are shuffled with seed `seed + e` (the same permutation on every host); host h
of H takes rows h, h+H, h+2H, ... of it, so the hosts together see every row exactly once per epoch.
Hosts whose share is one row short get an all-padding row (labels -100: it trains nothing), and the
last batch of an epoch is filled the same way, so every host runs the same number of steps and no
row is dropped.

Batches are numpy dicts made by the objective's `collate(rows, length)` (SFT: input_ids, labels,
segment_ids, positions, all [batch, length] int32). Packed rows are padded to `sequence_len` (the
row length); unpacked ones to the smallest length bucket that holds the batch (or the row length with
pad_to_sequence_len), so only a few shapes ever compile.

The iterator's state is {"epoch", "grain"} (grain's own iterator state within the epoch): saving it
with a checkpoint and passing it back to `iterate(state=...)` resumes at the very next batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxtune.data.packing import length_buckets, pad_batch


class _HostShard(Sequence):
    """Rows h, h+H, ... of an (already shuffled) dataset, padded with None to a common length."""

    def __init__(self, rows, index: int, count: int, length: int):
        self.rows, self.index, self.count, self.length = rows, index, count, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        j = self.index + i * self.count
        return self.rows[j] if j < len(self.rows) else None


class BatchLoader:
    def __init__(self, rows, *, batch_size: int, sequence_len: int, pad_id: int, packed: bool,
                 pad_to_sequence_len: bool = False, shuffle: bool = True, seed: int = 0,
                 shard_index: int | None = None, shard_count: int | None = None,
                 collate: Callable[[Sequence[dict | None], int], dict[str, np.ndarray]] | None = None):
        if shard_index is None or shard_count is None:
            import jax

            shard_index, shard_count = jax.process_index(), jax.process_count()
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} out of range for {shard_count} shards")
        self.rows = rows
        self.batch_size, self.sequence_len, self.pad_id = batch_size, sequence_len, pad_id
        self.packed, self.pad_to_sequence_len = packed, pad_to_sequence_len
        self.shuffle, self.seed = shuffle, seed
        self.shard_index, self.shard_count = shard_index, shard_count
        self.rows_per_host = math.ceil(len(rows) / shard_count)
        self.buckets = length_buckets(sequence_len)
        self.collate = collate or (lambda rows, length: pad_batch(list(rows), length, pad_id))

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.rows_per_host / self.batch_size)

    def collate_rows(self, rows: Sequence[dict | None]) -> dict[str, np.ndarray]:
        """A batch of `batch_size` rows (missing ones all padding) at this loader's length rule."""
        rows = list(rows) + [None] * (self.batch_size - len(rows))
        if self.packed or self.pad_to_sequence_len:
            length = self.sequence_len
        else:
            longest = max((len(r["input_ids"]) for r in rows if r is not None), default=1)
            length = next(b for b in self.buckets if b >= longest)
        return self.collate(rows, length)

    def epoch_dataset(self, epoch: int):
        import grain

        source = grain.MapDataset.source(self.rows)
        if self.shuffle:
            source = source.shuffle(seed=self.seed + epoch)
        host = grain.MapDataset.source(_HostShard(source, self.shard_index, self.shard_count, self.rows_per_host))
        return host.batch(self.batch_size, drop_remainder=False, batch_fn=self.collate_rows)

    def iterate(self, num_epochs: int | None = 1, state: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches over `num_epochs` (None: forever), starting from a saved `state`."""
        epoch = state["epoch"] if state else 0
        self._state = dict(state) if state else {"epoch": 0, "grain": None}
        while num_epochs is None or epoch < num_epochs:
            it = iter(self.epoch_dataset(epoch))
            if self._state.get("grain") is not None and self._state["epoch"] == epoch:
                it.set_state(self._state["grain"])
            for batch in it:
                self._state = {"epoch": epoch, "grain": it.get_state()}
                yield batch
            epoch += 1
            self._state = {"epoch": epoch, "grain": None}

    def state(self) -> dict:
        """Where the last `iterate` generator stands (JSON-serializable)."""
        return dict(getattr(self, "_state", {"epoch": 0, "grain": None}))
