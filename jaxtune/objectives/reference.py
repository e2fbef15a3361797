"""The reference model of the preference objectives, without a second copy of the model.

The reference is the policy as it was before training. Inside the jitted step it is built from the
policy's own state: every LoRA adapter's B is zeroed (a fresh adapter starts at B = 0, so this *is*
the starting policy, and no adapter weights are copied), and the trainable tensors whose starting
value differs from that (modules_to_save, an adapter continued from lora_model_dir, every weight under
full fine-tuning) are overlaid from `ref_params`, a frozen copy of just those tensors taken before
the first step and placed like the policy (no optimizer state). One compiled step computes both
models; the reference's forward is under stop_gradient, so it costs no backward pass.

With `precompute_ref_log_probs: true` the reference's log-probs are computed once, before training,
for every row of the prepared data (`precompute`), stored next to the prepared data keyed by the
model and data fingerprint, and carried by the batches; the step then needs no reference at all
(no weights copied, no reference forward).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.logging import info


def _names(path) -> list[str]:
    """A state path's names (flat-state paths hold strings, pytree paths DictKeys)."""
    return [str(getattr(k, "key", k)) for k in path]


def _is_lora_b(path) -> bool:
    return "lora_b" in _names(path)


def initial_copy(trainable: nnx.State, *, fresh_adapters: bool, abstract: bool = False) -> nnx.State | None:
    """The part of the trainable state the reference must keep a copy of: nothing for fresh LoRA
    adapters alone (zeroing B restores the start), every tensor but the adapters for fresh adapters
    with modules_to_save, everything otherwise (full fine-tuning, a continued adapter). `abstract`:
    the part itself, uncopied (for `jaxtune plan`'s shapes)."""
    def keep(path, _):
        return not (fresh_adapters and {"lora_a", "lora_b"} & set(_names(path)))

    flat = [(p, v) for p, v in nnx.to_flat_state(trainable) if keep(p, v)]
    if not flat:
        return None
    return nnx.from_flat_state(flat if abstract else [(p, jax.tree.map(jnp.copy, v)) for p, v in flat])


def mix_into(ref_params: nnx.State, trainable: nnx.State, alpha: float) -> nnx.State:
    """TR-DPO's reference update (TRL's SyncRefModelCallback): ref <- alpha * policy + (1 - alpha) *
    ref for every tensor the reference keeps (`ref_params` is not used afterwards: donate it)."""
    policy = dict(nnx.to_flat_state(trainable))
    return nnx.from_flat_state([
        (p, jax.tree.map(lambda r, q: (r * (1.0 - alpha) + q.astype(r.dtype) * alpha).astype(r.dtype), v, policy[p]))
        for p, v in nnx.to_flat_state(ref_params)])


def reference_state(trainable: nnx.State, ref_params: nnx.State | None) -> nnx.State:
    """The policy's trainable state as the reference sees it: LoRA B zeroed, `ref_params` overlaid."""
    state = jax.tree_util.tree_map_with_path(lambda p, x: jnp.zeros_like(x) if _is_lora_b(p) else x, trainable)
    if ref_params is not None:
        flat = dict(nnx.to_flat_state(state))
        flat.update(dict(nnx.to_flat_state(ref_params)))
        state = nnx.from_flat_state(list(flat.items()))
    return jax.lax.stop_gradient(state)


def reference_model(graphdef, trainable, frozen, ref_params):
    return nnx.merge(graphdef, reference_state(trainable, ref_params), frozen)


def fingerprint(cfg, data_path: Path, objective) -> str:
    """Identifies precomputed reference log-probs: the base model's files, the adapter continued
    from, precision, the prepared data and the objective's row layout."""
    from jaxtune import bundled

    def files(path):
        if not path:
            return None
        p = Path(bundled.resolve(path))
        entries = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.is_file())
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in entries]

    payload = {"base_model": files(cfg.base_model), "lora_model_dir": files(cfg.lora_model_dir),
               "adapter": cfg.adapter, "bf16": str(cfg.bf16), "fp16": cfg.fp16, "bfloat16": cfg.bfloat16,
               "float16": cfg.float16, "data": data_path.name, "objective": objective.name,
               "examples": objective.examples, "compute_dtype": cfg.bnb_4bit_compute_dtype,
               "double_quant": cfg.bnb_4bit_use_double_quant}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if jax.process_count() > 1:  # every process must agree (its own copy of the files may differ in mtime)
        from jax.experimental import multihost_utils

        chosen = multihost_utils.broadcast_one_to_all(np.frombuffer(digest.encode(), np.uint8))
        digest = bytes(np.asarray(chosen, np.uint8)).decode()
    return digest


def precompute(path: Path, rows, compute, *, batch_rows: int, save_every: int = 32, write: bool = True) -> np.ndarray:
    """Reference values of every row of `rows` ([rows, examples, 2]), computed by `compute(host
    batch rows) -> [n, examples, 2]` in order, `batch_rows` at a time, and stored at `path` (.npy).
    Resumable: partial results are saved every `save_every` batches and a restarted run continues
    from them; the final file is written under a temporary name and renamed. With several processes
    all compute (each its devices' share) and only the one with `write` writes."""
    exists = path.exists()
    if jax.process_count() > 1:  # process 0 decides, so that all compute (a collective) or none does
        from jax.experimental import multihost_utils

        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if exists:
        info(f"reference log-probs: using {path}")
        return np.load(path)
    partial = path.with_name(path.name + ".partial.npz")
    done, parts = 0, []
    if partial.exists():
        saved = np.load(partial)
        parts, done = [saved["values"]], int(saved["rows"])
        info(f"reference log-probs: resuming at row {done} of {len(rows)} ({partial})")
    n = len(rows)
    for i, start in enumerate(range(done, n, batch_rows)):
        parts.append(compute([rows[j] for j in range(start, min(start + batch_rows, n))]))
        done = min(start + batch_rows, n)
        if write and (i + 1) % save_every == 0 and done < n:
            _atomic_save(partial, values=np.concatenate(parts), rows=np.asarray(done))
    values = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
    if write:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, values)
        os.replace(tmp, path)
        partial.unlink(missing_ok=True)
        info(f"reference log-probs of {n} rows written to {path}")
    return values


def _atomic_save(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


class WithColumn:
    """A sequence of rows (dicts) with one more column taken from an array."""

    def __init__(self, rows, name: str, values: np.ndarray):
        self.rows, self.name, self.values = rows, name, values

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.rows[int(i)])
        row[self.name] = self.values[int(i)][:row["examples"]]
        return row
