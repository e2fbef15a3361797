"""The parallelism keys: the device mesh (Axolotl's names), Axolotl's FSDP / DeepSpeed settings
mapped onto it, and multi-host start-up.

    dp_shard_size          FSDP degree: parameters, gradients and optimizer state sharded (ZeRO-3)
    dp_replicate_size      plain data-parallel degree (parameters replicated)
    tensor_parallel_size   heads and MLP columns split
    context_parallel_size  the sequence split, ring attention (alias sequence_parallel_degree)

What FSDP / DeepSpeed settings mean here (`sharding_stage` resolves them; jaxtune.parallel.mesh
builds the mesh):
- `fsdp: [full_shard, ...]`, `fsdp_config: {sharding_strategy: FULL_SHARD}` or
  `reshard_after_forward: true`, DeepSpeed ZeRO stage 3: stage 3, parameters sharded too;
- `shard_grad_op` / `reshard_after_forward: false` / ZeRO-1 and -2: parameters replicated, the
  optimizer state and gradients sharded over the `fsdp` axis;
- `no_shard`: plain data parallelism.
With any of them and no `dp_shard_size`, the `fsdp` axis takes every device the other axes leave
(as Accelerate's FSDP does). Optimizer-state offload (`offload_optimizer` in a DeepSpeed file,
`offload` in `fsdp`, `fsdp_config.offload_params`) keeps the optimizer state in host memory.
Parameter offload is an error: it would move every parameter to the device for each step anyway.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from jaxtune.config.base import Section
from jaxtune.logging import warn_once

FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard", "auto_wrap", "offload")
STRATEGY_STAGE = {"FULL_SHARD": 3, "HYBRID_SHARD": 3, "SHARD_GRAD_OP": 2, "NO_SHARD": 0, "_HYBRID_SHARD_ZERO2": 2}
# fsdp_config keys (with or without Accelerate's `fsdp_` prefix) that change nothing under XLA.
FSDP_NO_EFFECT = {
    "version": "jaxtune has one FSDP: sharding by the mesh's fsdp axis",
    "state_dict_type": "checkpoints are orbax (sharded) and exports are whole HF safetensors",
    "auto_wrap_policy": "XLA shards every parameter by the logical-axis rules; there are no wrap units",
    "transformer_layer_cls_to_wrap": "XLA shards every parameter by the logical-axis rules; there are no wrap units",
    "min_num_params": "XLA shards every parameter by the logical-axis rules; there are no wrap units",
    "use_orig_params": "a torch FSDP setting",
    "cpu_ram_efficient_loading": "each host always reads only the weights its devices hold",
    "sync_module_states": "every host loads the same checkpoint; nothing to broadcast",
    "limit_all_gathers": "XLA schedules the all-gathers",
    "backward_prefetch": "XLA schedules the all-gathers",
    "forward_prefetch": "XLA schedules the all-gathers",
}
FSDP_MEANINGFUL = ("sharding_strategy", "reshard_after_forward", "offload_params", "activation_checkpointing")


class ParallelKeys(Section):
    dp_shard_size: int | None = Field(None, ge=1, description="FSDP degree: the mesh's fsdp axis (parameters, "
                                      "gradients and optimizer state sharded). Default: 1, or every device the "
                                      "other axes leave when fsdp / a DeepSpeed ZeRO config is set.")
    dp_replicate_size: int | None = Field(None, ge=1, description="Plain data-parallel degree (the mesh's data "
                                          "axis). Default: every device the other axes leave.")
    tensor_parallel_size: int = Field(1, ge=1, description="Tensor-parallel degree (heads and MLP columns split).")
    context_parallel_size: int = Field(1, ge=1, description="Sequence-parallel degree: each sequence split over "
                                       "this many devices, attention as a ring.")
    expert_parallel_size: int = Field(1, ge=1, description="Expert-parallel degree (a mixture of experts): the "
                                      "experts split over this many devices, tokens sent to them and back by "
                                      "all-to-all; the axis is data-parallel for everything else.")
    fsdp: list[str] | None = Field(None, description="Axolotl/Accelerate FSDP options (full_shard, shard_grad_op, "
                                   "hybrid_shard, no_shard, auto_wrap, offload), mapped onto the mesh.")
    fsdp_config: dict[str, Any] | None = Field(None, description="Accelerate's FSDP settings; sharding_strategy / "
                                               "reshard_after_forward / offload_params / activation_checkpointing "
                                               "apply, the rest are torch-specific (one warning each).")
    fsdp_version: int | None = Field(None, description="Accepted (one FSDP here).")
    deepspeed: str | None = Field(None, description="A DeepSpeed JSON: its zero_optimization stage and "
                                  "offload_optimizer map onto the mesh (ZeRO-1/2: optimizer state sharded, ZeRO-3: "
                                  "parameters too).")
    coordinator_address: str | None = Field(None, description="Multi-host: host:port of process 0 for "
                                            "jax.distributed (env JAXTUNE_COORDINATOR).")
    num_processes: int | None = Field(None, ge=1, description="Multi-host: number of processes "
                                      "(env JAXTUNE_NUM_PROCESSES).")
    process_id: int | None = Field(None, ge=0, description="Multi-host: this process's index "
                                   "(env JAXTUNE_PROCESS_ID).")

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # Accelerate writes "full_shard auto_wrap"
            value = value.split()
        if isinstance(value, bool):  # fsdp: true
            value = ["full_shard"] if value else None
        return value

    @model_validator(mode="after")
    def _check_parallel(self) -> ParallelKeys:
        unknown = [o for o in self.fsdp or [] if o not in FSDP_OPTIONS]
        if unknown:
            raise ValueError(f"fsdp: unknown option {', '.join(unknown)}; choose from {', '.join(FSDP_OPTIONS)}")
        for key in self.fsdp_config or {}:
            bare = key.removeprefix("fsdp_")
            if bare in FSDP_NO_EFFECT:
                warn_once(f"fsdp_config.{key} has no effect in jaxtune: {FSDP_NO_EFFECT[bare]}")
            elif bare not in FSDP_MEANINGFUL:
                raise ValueError(f"fsdp_config: unknown key '{key}'")
        if self.fsdp_version is not None:
            warn_once(f"fsdp_version has no effect in jaxtune: {FSDP_NO_EFFECT['version']}")
        if self.fsdp and self.deepspeed:
            raise ValueError("fsdp and deepspeed cannot both be set")
        if self.num_processes is not None and self.process_id is not None and self.process_id >= self.num_processes:
            raise ValueError(f"process_id {self.process_id} is not below num_processes {self.num_processes}")
        stage = sharding_stage(self)  # reads the DeepSpeed file: errors surface at validation
        if stage.offload_params:
            raise ValueError(f"{stage.source}: parameter offload is not supported (every parameter would move to the "
                             "device for each step, so the step's memory does not shrink); shard the parameters "
                             "over more devices (dp_shard_size) or quantize the frozen ones (adapter: qlora)")
        return self


@dataclasses.dataclass(frozen=True)
class ShardingStage:
    """What the FSDP / DeepSpeed keys ask for: ZeRO stage (0: none, 1/2: optimizer state and
    gradients sharded, 3: parameters too), offloads, and which key said so."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    source: str = "dp_shard_size"


_AXOLOTL_DEEPSPEED = re.compile(r"zero([123])")


def _deepspeed_stage(path_text: str) -> ShardingStage:
    path = Path(path_text)
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"deepspeed: {path} is not valid JSON ({e})") from None
        zero = config.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        def on(key):
            return str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "")

        return ShardingStage(stage, offload_optimizer=on("offload_optimizer"), offload_params=on("offload_param"),
                             source=f"deepspeed ({path})")
    found = _AXOLOTL_DEEPSPEED.search(path.name)
    if found is None:
        raise ValueError(f"deepspeed: {path} not found (looked in {Path.cwd()}); give the path of a DeepSpeed JSON or "
                         "one of Axolotl's deepspeed_configs/zero{1,2,3}*.json names")
    # Axolotl's bundled configs, named by stage: zero3_bf16_cpuoffload_all / _params offload too.
    name = path.name
    warn_once(f"deepspeed: {path} not found; using Axolotl's {name} as its name says: ZeRO stage {found.group(1)}"
              + (", optimizer offload" if "offload" in name else ""))
    return ShardingStage(int(found.group(1)), offload_optimizer="offload" in name,
                         offload_params="offload_all" in name or "offload_params" in name,
                         source=f"deepspeed ({name})")


def sharding_stage(cfg) -> ShardingStage:
    """The ZeRO stage and offloads that the fsdp / fsdp_config / deepspeed keys ask for."""
    if cfg.deepspeed:
        return _deepspeed_stage(cfg.deepspeed)
    if not cfg.fsdp and not cfg.fsdp_config:
        return ShardingStage(3 if (cfg.dp_shard_size or 1) > 1 else 0)
    options = cfg.fsdp or []
    settings = {k.removeprefix("fsdp_"): v for k, v in (cfg.fsdp_config or {}).items()}
    stage = 3
    if "shard_grad_op" in options:
        stage = 2
    elif "no_shard" in options:
        stage = 0
    if "sharding_strategy" in settings:
        name = str(settings["sharding_strategy"]).upper()
        if name.isdigit():  # Accelerate also writes the enum's number (1 = FULL_SHARD)
            name = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD"}.get(name, name)
        if name not in STRATEGY_STAGE:
            raise ValueError(f"fsdp_config.sharding_strategy: {settings['sharding_strategy']} is not one of "
                             f"{', '.join(STRATEGY_STAGE)}")
        stage = STRATEGY_STAGE[name]
    if "reshard_after_forward" in settings:
        stage = 3 if settings["reshard_after_forward"] else 2
    offload = "offload" in options or bool(settings.get("offload_params"))
    # torch's FSDP offload moves parameters *and* optimizer state; jaxtune offloads the optimizer state
    if offload:
        warn_once("FSDP offload: the optimizer state lives in host memory; parameters stay on the devices (sharded)")
    return ShardingStage(stage, offload_optimizer=offload,
                         activation_checkpointing=bool(settings.get("activation_checkpointing")),
                         source="fsdp")
