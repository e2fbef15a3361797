"""Training checkpoints (orbax): what a resumed run needs to continue the exact same trajectory.

A checkpoint `output_dir/checkpoints/<step>/` holds one orbax item per part, so a part can be read
alone (`jaxtune export` reads only `params`):
- `params`: the parameters that train, by name;
- `optimizer`: the optimizer state (its leaves, in optax's order) and the run's RNG key;
- `meta` (JSON): step, epoch position, the data loader's position and the resolved config.

Arrays sharded over a mesh are saved by every process for the shards it holds (orbax's
multi-host save) and restore onto whatever mesh the resuming run has.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a crash
(even SIGKILL) during a save leaves the previous checkpoints as they were, and `latest()` never
returns a half-written one. `save_total_limit` keeps the newest N, and the `protected` one (the best
evaluation's, when the run exports it at the end) besides.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxtune.errors import JaxtuneError


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = None):
        self.directory = Path(directory).resolve()
        self.max_to_keep = max_to_keep
        self.protected: int | None = None  # a step rotation keeps (the best evaluation's)
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, items: dict[str, object], meta: dict) -> None:
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self._manager.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
        if self.max_to_keep:
            steps = sorted(self.steps())
            for old in steps[:-self.max_to_keep]:
                if old != self.protected:
                    self._manager.delete(old)

    def restore(self, step: int, like: dict[str, object]) -> tuple[dict, dict]:
        """The items named in `like` (trees of arrays giving the shapes, dtypes and shardings to
        restore into) and meta. The shardings are `like`'s, not the saved ones: a checkpoint saved
        on one mesh restores onto another (each process reads the parts its devices hold)."""
        if step not in self.steps():
            raise JaxtuneError(f"no checkpoint for step {step} in {self.directory} (has: {self.steps()})")

        def target(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

        args = {name: ocp.args.StandardRestore(jax.tree.map(target, tree)) for name, tree in like.items()}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as e:
            raise JaxtuneError(f"checkpoint {self.directory / str(step)} does not match this run's model and "
                               f"adapter settings ({e})") from None
        return {name: restored[name] for name in like}, restored.meta

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self) -> None:
        self._manager.close()


def resolve_resume(setting, checkpoints: Checkpoints) -> tuple[Checkpoints, int] | None:
    """Where to resume from for `resume_from_checkpoint` (None: start fresh): (checkpoints, step).

    A path may name a checkpoint of another output_dir (`.../checkpoints/<step>`).
    """
    latest = checkpoints.latest()
    if setting is None:
        return None if latest is None else (checkpoints, latest)
    if setting is True:
        if latest is None:
            raise JaxtuneError(f"resume_from_checkpoint: true but {checkpoints.directory} has no checkpoint")
        return checkpoints, latest
    if setting is False:
        if latest is not None:
            raise JaxtuneError(f"resume_from_checkpoint: false but {checkpoints.directory} already has checkpoints "
                               f"(steps {checkpoints.steps()}); remove them or choose another output_dir")
        return None
    path = Path(str(setting)).resolve()
    if not path.is_dir() or not path.name.isdigit():
        raise JaxtuneError(f"resume_from_checkpoint: {setting} is not a checkpoint directory (expected "
                           "<output_dir>/checkpoints/<step>)")
    source = checkpoints if path.parent == checkpoints.directory else Checkpoints(path.parent)
    return source, int(path.name)
