"""The device mesh and the one table of logical-axis rules.

Axes: `data` (plain data parallelism: parameters replicated), `fsdp` (data parallelism with the
parameters, gradients and optimizer state sharded: ZeRO-3), `sequence` (context parallelism: the
sequence split, ring attention) and `tensor` (Megatron-style: heads and MLP columns split). Model
code knows no mesh: every parameter carries logical axis names (models/layers.py) and `RULES` maps
them to mesh axes here, MaxText-style. The batch splits over (data, fsdp), the sequence over
`sequence`.

A logical axis whose size the mesh axes do not divide stays replicated on that axis (a 9-head model
on tensor=2 keeps its heads whole), so every model runs on every mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.errors import JaxtuneError

AXES = ("data", "fsdp", "sequence", "tensor")
# logical axis -> mesh axes (in order); None: replicated.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": ("sequence",),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": None,
    "layers": None,
}


def make_mesh(*, data: int | None = None, fsdp: int = 1, sequence: int = 1, tensor: int = 1,
              devices=None) -> Mesh:
    """A mesh over `devices` (default: all); `data` takes the devices the other axes leave."""
    devices = list(jax.devices() if devices is None else devices)
    others = fsdp * sequence * tensor
    if data is None:
        if len(devices) % others:
            raise JaxtuneError(f"{len(devices)} devices cannot hold fsdp={fsdp} x sequence={sequence} x "
                               f"tensor={tensor} = {others}: choose degrees whose product divides the device count")
        data = len(devices) // others
    if data * others != len(devices):
        raise JaxtuneError(f"mesh data={data} x fsdp={fsdp} x sequence={sequence} x tensor={tensor} needs "
                           f"{data * others} devices, not {len(devices)}")
    grid = np.asarray(devices).reshape(data, fsdp, sequence, tensor)
    return Mesh(grid, AXES)


def spec(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes on `mesh` (each mesh axis used once;
    an axis the mesh sizes do not divide, or of size 1 on the mesh, stays replicated)."""
    used: set[str] = set()
    out = []
    for name, size in zip(logical, shape):
        axes = tuple(a for a in (RULES.get(name) or ()) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def _logical(variable) -> tuple:
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else (None,) * np.ndim(variable.get_value())


def state_shardings(state: nnx.State, mesh: Mesh):
    """A NamedSharding for each leaf of an nnx State, by its variables' logical axes."""
    def one(variable):
        value = variable.get_value()
        if not hasattr(value, "shape"):  # NF4 blocks (a tree of arrays): replicated in this release
            return variable.replace(jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), value))
        return variable.replace(NamedSharding(mesh, spec(_logical(variable), np.shape(value), mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """The state with every array placed by the rules."""
    shardings = state_shardings(state, mesh)
    return jax.tree.map(jax.device_put, state, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """[accumulation, batch, length] arrays: batch over (data, fsdp), length over sequence."""
    lead = (None,) * (ndim - 2)
    return NamedSharding(mesh, PartitionSpec(*lead, ("data", "fsdp"), "sequence"))


def replicate_rest(tree, mesh: Mesh):
    """Arrays of `tree` not yet placed on `mesh` (an optimizer's step counters) replicated on it."""
    def one(x):
        if isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(one, tree)


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)
