"""The device mesh and the one table of logical-axis rules.

Axes: `data` (plain data parallelism: parameters replicated), `fsdp` (data parallelism with the
parameters, gradients and optimizer state sharded: ZeRO-3), `sequence` (context parallelism: the
sequence split, ring attention) and `tensor` (Megatron-style: heads and MLP columns split). Model
code knows no mesh: every parameter carries logical axis names (models/layers.py) and `RULES` maps
them to mesh axes here, MaxText-style. The batch splits over (data, fsdp), the sequence over
`sequence`.

A logical axis whose size the mesh axes do not divide stays replicated on that axis (a 9-head model
on tensor=2 keeps its heads whole), so every model runs on every mesh.

ZeRO stages (`MeshPlan.stage`, from dp_shard_size / fsdp / deepspeed, jaxtune.config.parallel): 3
shards parameters, gradients and optimizer state over `fsdp`; 1 and 2 keep parameters replicated
over `fsdp` and shard the optimizer state (the step's gradients follow it). NF4 blocks (QLoRA's
frozen kernels) shard their flat block axis over `fsdp`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.errors import JaxtuneError

AXES = ("data", "fsdp", "expert", "sequence", "tensor")
# logical axis -> mesh axes (in order); None: replicated.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # the expert axis is data-parallel outside the experts
    "length": ("sequence",),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": None,
    "layers": None,
    "experts": ("expert",),  # a mixture of experts' experts (jaxtune.parallel.experts)
}


def make_mesh(*, data: int | None = None, fsdp: int = 1, sequence: int = 1, tensor: int = 1, expert: int = 1,
              devices=None) -> Mesh:
    """A mesh over `devices` (default: all); `data` takes the devices the other axes leave."""
    devices = list(jax.devices() if devices is None else devices)
    others = fsdp * expert * sequence * tensor
    named = f"fsdp={fsdp} x expert={expert} x sequence={sequence} x tensor={tensor}"
    if data is None:
        if len(devices) % others:
            raise JaxtuneError(f"{len(devices)} devices cannot hold {named} = {others}: choose degrees whose "
                               "product divides the device count")
        data = len(devices) // others
    if data * others != len(devices):
        raise JaxtuneError(f"mesh data={data} x {named} needs {data * others} devices, not {len(devices)}")
    grid = np.asarray(devices).reshape(data, fsdp, expert, sequence, tensor)
    return Mesh(grid, AXES)


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """The mesh's degrees and the ZeRO stage a config asks for (see `plan_for`)."""

    data: int = 1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    stage: int = 3
    offload_optimizer: bool = False
    expert: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.expert * self.sequence * self.tensor

    @property
    def batch_ranks(self) -> int:
        """Data-parallel ranks: each takes micro_batch_size rows (sequence and tensor ranks share them;
        expert ranks are data-parallel outside the experts)."""
        return self.data * self.fsdp * self.expert

    def describe(self) -> str:
        zero = {0: "", 1: ", ZeRO-1", 2: ", ZeRO-2", 3: ""}[self.stage] if self.fsdp > 1 else ""
        expert = f" x expert={self.expert}" if self.expert > 1 else ""
        return (f"mesh data={self.data} x fsdp={self.fsdp}{expert} x sequence={self.sequence} x tensor={self.tensor}"
                f"{zero}" + (", optimizer state in host memory" if self.offload_optimizer else ""))

    def make(self, devices=None) -> Mesh:
        return make_mesh(data=self.data, fsdp=self.fsdp, sequence=self.sequence, tensor=self.tensor,
                         expert=self.expert, devices=devices)


def plan_for(cfg, device_count: int | None = None) -> MeshPlan:
    """The mesh of a config over `device_count` devices (default: all of them, every host's):
    tensor_parallel_size and context_parallel_size as given; dp_shard_size (default: 1, or all
    that is left when fsdp / deepspeed is set) and the data axis (dp_replicate_size, default: the
    rest) take the remaining devices."""
    from jaxtune.config.parallel import sharding_stage

    n = jax.device_count() if device_count is None else device_count
    zero = sharding_stage(cfg)
    tensor, sequence, expert = cfg.tensor_parallel_size, cfg.context_parallel_size, cfg.expert_parallel_size
    if n % (tensor * sequence * expert):
        raise JaxtuneError(f"{n} devices cannot be split into tensor_parallel_size={tensor} x "
                           f"context_parallel_size={sequence} x expert_parallel_size={expert}: their product must "
                           "divide the device count")
    rest = n // (tensor * sequence * expert)
    replicate = cfg.dp_replicate_size
    if cfg.dp_shard_size is not None:
        fsdp = cfg.dp_shard_size
    elif zero.stage > 0 and (cfg.fsdp or cfg.fsdp_config or cfg.deepspeed):
        fsdp = rest // (replicate or 1)
    else:
        fsdp = 1
    data = replicate if replicate is not None else rest // max(fsdp, 1)
    if data * fsdp != rest:
        raise JaxtuneError(f"dp_replicate_size={data} x dp_shard_size={fsdp} x tensor_parallel_size={tensor} x "
                           f"context_parallel_size={sequence} x expert_parallel_size={expert} = "
                           f"{data * fsdp * tensor * sequence * expert} is not the {n} devices there are")
    if zero.stage == 0 and fsdp > 1:
        raise JaxtuneError(f"dp_shard_size={fsdp} shards over {fsdp} devices, but {zero.source} says no sharding "
                           "(no_shard / ZeRO stage 0): drop one of them")
    stage = zero.stage if zero.stage > 0 else 3
    return MeshPlan(data, fsdp, sequence, tensor, stage, zero.offload_optimizer, expert)


def axes_dividing(size: int, names: tuple[str, ...], mesh) -> tuple[str, ...] | None:
    """The axes of `names` the mesh splits (size > 1), if together they divide `size` (else None)."""
    axes = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None


def spec(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
         exclude: tuple[str, ...] = ()) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes on `mesh` (each mesh axis used once;
    an axis the mesh sizes do not divide, or of size 1 on the mesh, or in `exclude`, stays
    replicated)."""
    used: set[str] = set(exclude)
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


def _nf4_spec(leaf, batch_dims: int, mesh: Mesh, exclude) -> PartitionSpec:
    """NF4 children [*layers, flat]: the flat block axis over fsdp where it divides."""
    shape = np.shape(leaf)
    fsdp = mesh.shape["fsdp"]
    if len(shape) > batch_dims and fsdp > 1 and "fsdp" not in exclude and shape[-1] % fsdp == 0:
        return PartitionSpec(*([None] * (len(shape) - 1)), "fsdp")
    return PartitionSpec()


def state_shardings(state: nnx.State, mesh: Mesh, *, exclude: tuple[str, ...] = (), memory_kind: str | None = None):
    """A NamedSharding for each leaf of an nnx State, by its variables' logical axes; mesh axes in
    `exclude` are not used (ZeRO-1/2 parameters: ("fsdp",)); `memory_kind` "pinned_host" keeps
    the arrays in host memory."""
    def named(p):
        return NamedSharding(mesh, p, memory_kind=memory_kind)

    def one(variable):
        value = variable.get_value()
        if not isinstance(value, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):  # NF4: arrays with layer axes
            batch_dims = len(getattr(value, "batch_shape", ()))
            return variable.replace(jax.tree.map(lambda a: named(_nf4_spec(a, batch_dims, mesh, exclude)), value))
        return variable.replace(named(spec(_logical(variable), np.shape(value), mesh, exclude)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, **kwargs) -> nnx.State:
    """The state with every array placed by the rules (`state_shardings`' keywords)."""
    return place(state, state_shardings(state, mesh, **kwargs))


def loading_place(plan: MeshPlan, mesh: Mesh):
    """A `place` for model loading (jaxtune.checkpoint.hf.load_model): each weight goes straight
    to its shards as it is read, so no device ever holds the whole model."""
    exclude = () if plan.stage == 3 else ("fsdp",)

    def put(_path, host: np.ndarray, axes):
        logical = tuple(axes) if axes else (None,) * host.ndim
        return place(host, NamedSharding(mesh, spec(logical, host.shape, mesh, exclude)))

    return put


def place(tree, shardings):
    """`tree`'s arrays put where `shardings` says; from host arrays or from other devices, also
    across processes (each process gives the whole array and keeps its shards)."""
    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        if jax.process_count() > 1:
            host = np.asarray(jax.device_get(x))
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.device_put(x, sharding)

    return jax.tree.map(one, tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 3, axes: tuple[str | None, ...] = ("batch", "length")) -> NamedSharding:
    """A batch array's sharding: rows (logical axis `batch`) over (data, fsdp, expert), tokens
    (`length`) over sequence, leading axes (accumulation) and others replicated."""
    lead = (None,) * (ndim - len(axes))
    mapped = {"batch": ("data", "fsdp", "expert"), "length": "sequence"}
    return NamedSharding(mesh, PartitionSpec(*lead, *(mapped.get(a) for a in axes)))


def host_batch_share(mesh: Mesh) -> tuple[int, int, int]:
    """(index, count, ranks): this process loads share `index` of `count` equal shares of every
    global batch, the rows of the `ranks` data-parallel ranks (data x fsdp x expert positions) its
    devices hold. Processes whose devices differ only along sequence / tensor load the same share."""
    grid = mesh.devices  # [data, fsdp, expert, sequence, tensor]
    fsdp, expert = grid.shape[1], grid.shape[2]
    me = jax.process_index()
    ranks = sorted({(d * fsdp + f) * expert + e for (d, f, e, _, _), dev in np.ndenumerate(grid)
                    if dev.process_index == me})
    n, total = len(ranks), grid.shape[0] * fsdp * expert
    if ranks != list(range(ranks[0], ranks[0] + n)) or ranks[0] % n or total % n:
        raise JaxtuneError(f"process {me} holds data-parallel ranks {ranks} of {total}: each process's devices must "
                           "hold a contiguous block of the (data, fsdp, expert) grid; order the devices host by host")
    return ranks[0] // n, total // n, n


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh, layout=None, *, whole: bool = False) -> dict[str, jax.Array]:
    """A host batch as global arrays on `mesh`: rows over (data, fsdp), tokens over sequence (laid out
    balanced for ring attention, jaxtune.parallel.sequence, when the sequence axis is split). `layout`
    (jaxtune.batch.Layout, the objective's) gives each array's logical axes; without one every array is
    [..., rows, tokens]. Each process gives its share of the rows (see `host_batch_share`), or with
    `whole` the whole batch (every process the same)."""
    ways = mesh.shape["sequence"]
    if ways > 1:
        from jaxtune.parallel.sequence import balance

        batch = balance(batch, ways, layout)
    out = {}
    count = host_batch_share(mesh)[1] if jax.process_count() > 1 and not whole else 1
    for key, value in batch.items():
        axes = layout[key].axes if layout is not None else ("batch", "length")
        sharding = batch_sharding(mesh, value.ndim, axes)
        if jax.process_count() == 1:
            out[key] = jax.device_put(value, sharding)
        elif whole:
            out[key] = place(value, sharding)
        else:
            row_axis = value.ndim - len(axes) + axes.index("batch")
            shape = tuple(n * count if i == row_axis else n for i, n in enumerate(value.shape))
            out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


@dataclasses.dataclass
class PlacedState:
    """The training state placed on a mesh, and the step's sharding arguments (make_train_step)."""

    trainable: nnx.State
    frozen: nnx.State
    opt_state: object
    step_shardings: dict


def place_training_state(plan: MeshPlan, mesh: Mesh, trainable, frozen, optimizer) -> PlacedState:
    """Shard parameters and optimizer state as the plan's ZeRO stage says: stage 3 everything by
    the rules; stages 1/2 the optimizer state (initialised from the sharded layout, the gradients
    constrained to it) while the parameters stay replicated over fsdp; with offload the optimizer
    state in pinned host memory between steps."""
    params_exclude = () if plan.stage == 3 else ("fsdp",)
    sharded = shard_state(trainable, mesh)
    opt_state = replicate_rest(optimizer.init(sharded), mesh)
    kwargs = {}
    if params_exclude:
        kwargs["grad_shardings"] = shardings_of(sharded)
        trainable = shard_state(sharded, mesh, exclude=params_exclude)
        del sharded
    else:
        trainable = sharded
    frozen = shard_state(frozen, mesh, exclude=params_exclude)
    opt_shardings = shardings_of(opt_state)
    if plan.offload_optimizer:
        kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
        if "pinned_host" not in kinds:
            raise JaxtuneError(f"optimizer offload needs pinned host memory, which {jax.default_backend()} devices do "
                               f"not have here (memories: {', '.join(sorted(kinds))}); drop the offload setting")
        kwargs["opt_device_shardings"] = opt_shardings
        opt_shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_shardings)
        opt_state = jax.device_put(opt_state, opt_shardings)
    kwargs["state_shardings"] = (shardings_of(trainable), opt_shardings)
    return PlacedState(trainable, frozen, opt_state, kwargs)


def replicate_rest(tree, mesh: Mesh):
    """Arrays of `tree` not yet placed on `mesh` (an optimizer's step counters) replicated on it."""
    def one(x):
        if isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(one, tree)


def to_host(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one numpy array on this host: gathered
    from the other processes when it is not all here (a collective: every process calls it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)
