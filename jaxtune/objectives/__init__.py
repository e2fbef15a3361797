"""Training objectives: a loss over a batch plus what the batch must hold.

An objective is the only piece of training that knows what the batch means. The trainer
(`jaxtune.trainer`) calls `objective.loss(model, batch, rng)` for each micro-batch; it returns
`(loss_sum, metrics)` where `loss_sum` is a sum over the micro-batch's units (tokens for SFT,
pairs for DPO) and `metrics["weight"]` counts those units. The trainer sums both over the
accumulated micro-batches and divides once, so the loss of an optimizer step is normalized by the
units of the whole accumulated batch. Other entries of `metrics` are sums too, divided by the same
weight when logged.

    class MyObjective:
        name = "my"
        batch_keys = ("input_ids", ...)
        def loss(self, model, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]: ...
"""

from __future__ import annotations

from typing import Protocol

import jax

from jaxtune.errors import JaxtuneError


class Objective(Protocol):
    name: str
    batch_keys: tuple[str, ...]

    def loss(self, model, batch: dict[str, jax.Array], rng: jax.Array | None) -> tuple[jax.Array, dict]: ...


def objective_for(kind: str) -> Objective:
    """The objective that trains on prepared data of `kind` (sft | preference | prompt)."""
    from jaxtune.objectives.sft import SFT

    if kind == "sft":
        return SFT()
    raise JaxtuneError(f"the datasets are {kind} rows, which train with an RL objective (DPO/GRPO) that is not in "
                       "this release; SFT needs sft-type datasets (chat_template, alpaca, completion, ...)")
