"""The jitted training step: objective-agnostic, with gradient accumulation (jaxtune/trainer.py runs it).

The step is one pure function of (trainable params, frozen params, optimizer state, batch, rng,
step, reference params). A batch holds `gradient_accumulation_steps` micro-batches stacked on a
leading axis, laid out as the objective declares (jaxtune.objectives.base). The objective's `totals`
of the whole accumulated batch come first (its unit count `weight`: trained tokens for SFT, pairs for
DPO, and any other denominator); a `lax.scan` then runs the micro-batches, summing each one's loss sum
over the whole batch's weight (so the gradients come out normalized) and its metric sums, which are
divided by the totals once: the loss is normalized by the units of the whole accumulated batch
(accumulating 4 x 1 is the same step as one batch of 4). An objective with a reference model gets the
reference's log-probs from the same step: the policy's state with adapters off and `ref_params`
overlaid (objectives/reference.py).

`RaggedStep` is the same step over micro-batches of different lengths (GRPO's, each padded to its
own length as TRL pads each of its micro-batches): a jitted call per micro-batch adds its gradients
to the accumulator, compiled once per length, and one more applies the update. Its results are the
stacked step's on the same micro-batches.
"""

from __future__ import annotations

import ctypes
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtune.errors import JaxtuneError
from jaxtune.models.moe import router_terms
from jaxtune.objectives.reference import reference_model


def _reference_of(graphdef, objective, reference: bool, trainable, frozen, ref_params, micro):
    """The reference values the objective needs for `micro`: computed by the reference model in the
    step, carried by the batch (precomputed), or None (no reference)."""
    if reference:
        return objective.reference_logps(reference_model(graphdef, trainable, frozen, ref_params), micro)
    if objective.needs_reference:
        if objective.reference_key not in micro:
            raise JaxtuneError(f"{objective.name} needs reference log-probs: the batch carries none and the step "
                               "builds no reference model")
        return micro[objective.reference_key]
    return None


def _parts(graphdef, objective, optimizer, schedule, *, use_rng: bool, reference: bool, grad_shardings=None,
           opt_device_shardings=None):
    """(grads_of, update) of a step: one micro-batch's (loss share, metric sums) and gradients, and the
    optimizer update from the accumulated gradients (with the step's logged values)."""

    def micro_loss(trainable, frozen, micro, key, ref, totals, micro_batches):
        """This micro-batch's share of the step's loss: its loss sum over the whole batch's weight, so
        that the gradients come out normalized (no division pass over a second gradient-sized buffer)."""
        model = nnx.merge(graphdef, trainable, frozen)
        model.collect_router_stats = True
        loss, sums = objective.loss(model, micro, key if use_rng else None, ref, totals)
        loss, sums = with_router_loss(model, loss, sums, totals["weight"] / micro_batches)
        return loss / jnp.maximum(totals["weight"], 1.0), sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def grads_of(trainable, frozen, micro, key, totals, micro_batches, ref_params):
        ref = _reference_of(graphdef, objective, reference, trainable, frozen, ref_params, micro)
        return grad_fn(trainable, frozen, micro, key, ref, totals, micro_batches)

    def update(trainable, opt_state, grads, loss, metrics, totals, step_index):
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        if opt_device_shardings is not None:
            opt_state = jax.device_put(opt_state, opt_device_shardings)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        out = normalize(objective, metrics, totals)
        out.update(loss=loss, grad_norm=grad_norm, lr=schedule(step_index), weight=totals["weight"])
        return trainable, opt_state, out

    return grads_of, update


def _micro_keys(rng, step_index, micro_batches: int):
    return jax.random.split(jax.random.fold_in(rng, step_index), micro_batches)


def make_train_step(graphdef, objective, optimizer: optax.GradientTransformation, schedule, *, use_rng: bool,
                    reference: bool = False, state_shardings=None, grad_shardings=None, opt_device_shardings=None):
    """The jitted step: (trainable, frozen, opt_state, batch [A, B, ...], rng, step, ref_params=None) ->
    (trainable, opt_state, metrics). `traces` counts compilations (a test asserts it stays 1).
    `reference`: the objective's reference model is built in the step from the policy's state and
    `ref_params` (objectives/reference.py). On a mesh (jaxtune.parallel.mesh.place_training_state):
    `state_shardings` = (trainable's, opt_state's) shardings keeps the updated state where it was, so
    the step compiles once; `grad_shardings` shards the gradients like the optimizer state (ZeRO-1/2:
    a reduce-scatter, not an all-reduce); `opt_device_shardings` brings an optimizer state kept in
    host memory to the devices for the update (it goes back by `state_shardings`)."""
    grads_of, update = _parts(graphdef, objective, optimizer, schedule, use_rng=use_rng, reference=reference,
                              grad_shardings=grad_shardings, opt_device_shardings=opt_device_shardings)

    def step(trainable, frozen, opt_state, batch, rng, step_index, ref_params=None):
        step_fn.traces += 1
        micro_batches = jax.tree.leaves(batch)[0].shape[0]
        keys = _micro_keys(rng, step_index, micro_batches)
        totals = objective.totals(batch)
        first = jax.tree.map(lambda x: x[0], batch)

        def micro_grads(micro, key):
            return grads_of(trainable, frozen, micro, key, totals, micro_batches, ref_params)

        def zeros():
            (_, metric_shapes), _ = jax.eval_shape(micro_grads, first, keys[0])
            return (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32),
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))

        def body(carry, xs):
            grads, loss, metrics = carry
            (micro_loss_sum, micro_metrics), micro_grads_ = micro_grads(*xs)
            return (jax.tree.map(jnp.add, grads, micro_grads_), loss + micro_loss_sum,
                    jax.tree.map(jnp.add, metrics, micro_metrics)), None

        if micro_batches == 1:  # no accumulator buffers (one parameter-sized copy less)
            (loss, metrics), grads = micro_grads(first, keys[0])
        else:
            (grads, loss, metrics), _ = jax.lax.scan(body, zeros(), (batch, keys))
        return update(trainable, opt_state, grads, loss, metrics, totals, step_index)

    out_shardings = None if state_shardings is None else (*state_shardings, None)
    step_fn = jax.jit(step, donate_argnums=(0, 2), out_shardings=out_shardings)
    step_fn.traces = 0
    return step_fn


class RaggedStep:
    """The step over a list of micro-batches [1, B, L_i] of different lengths L_i: called as
    (trainable, frozen, opt_state, micro_batches, rng, step, ref_params=None) -> (trainable, opt_state,
    metrics, seconds spent compiling). Each micro-batch adds its loss share, metric sums and gradients
    to the accumulator in one jitted call (donated, so no second gradient-sized buffer), compiled once
    per length; the update is one more. The keys, totals and sums are the stacked step's
    (`make_train_step`): on the same micro-batches both give the same step up to summation order.
    `traces` counts compilations of the per-micro-batch call (one per length)."""

    def __init__(self, graphdef, objective, optimizer: optax.GradientTransformation, schedule, *, use_rng: bool,
                 reference: bool = False, state_shardings=None, grad_shardings=None, opt_device_shardings=None):
        grads_of, update = _parts(graphdef, objective, optimizer, schedule, use_rng=use_rng, reference=reference,
                                  grad_shardings=grad_shardings, opt_device_shardings=opt_device_shardings)
        self.traces = 0
        self._metric_shapes = None

        def accumulate(acc, trainable, frozen, micro, key, totals, ref_params, micro_batches):
            self.traces += 1
            (loss, metrics), grads = grads_of(trainable, frozen, jax.tree.map(lambda x: x[0], micro), key, totals,
                                              micro_batches, ref_params)
            grads = jax.tree.map(jnp.add, acc[0], grads)
            if grad_shardings is not None:
                grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
            return grads, acc[1] + loss, jax.tree.map(jnp.add, acc[2], metrics)

        def metric_shapes(trainable, frozen, micro, key, totals, ref_params, micro_batches):
            (_, metrics), _ = grads_of(trainable, frozen, jax.tree.map(lambda x: x[0], micro), key, totals,
                                       micro_batches, ref_params)
            return metrics

        def apply(trainable, opt_state, acc, totals, step_index):
            return update(trainable, opt_state, *acc, totals, step_index)

        self._grads_of_shapes = metric_shapes
        self._accumulate = jax.jit(accumulate, donate_argnums=0, static_argnums=7)
        self._apply = jax.jit(apply, donate_argnums=(0, 1),
                              out_shardings=None if state_shardings is None else (*state_shardings, None))
        self._totals = jax.jit(objective.totals)
        self._keys = jax.jit(_micro_keys, static_argnums=2)
        self._compiled: set = set()

    def __call__(self, trainable, frozen, opt_state, micros: list[dict], rng, step_index, ref_params=None):
        if not micros:
            raise JaxtuneError("a ragged step needs at least one micro-batch")
        a = len(micros)
        keys = self._keys(rng, step_index, a)
        totals = jax.tree.map(lambda *t: sum(t), *map(self._totals, micros))  # each a sum: the batch's is theirs
        if self._metric_shapes is None:
            self._metric_shapes = jax.eval_shape(self._grads_of_shapes, trainable, frozen, micros[0], keys[0],
                                                 totals, ref_params, a)
        acc = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32),
               jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._metric_shapes))
        compiling = 0.0
        for i, micro in enumerate(micros):
            args = (acc, trainable, frozen, micro, keys[i], totals, ref_params, a)
            shapes = repr(jax.tree.map(lambda x: (x.shape, x.dtype), micro))
            if shapes not in self._compiled:  # a new length: compile first, then hand the compiler's freed memory back
                started = time.perf_counter()
                self._accumulate.lower(*args).compile()
                compiling += time.perf_counter() - started
                self._compiled.add(shapes)
                release_freed_host_memory()
            acc = self._accumulate(*args)
            del args
        trainable, opt_state, out = self._apply(trainable, opt_state, acc, totals, step_index)
        return trainable, opt_state, out, compiling


def with_router_loss(model, loss, sums: dict, share) -> tuple[jax.Array, dict]:
    """A mixture-of-experts model's load-balancing loss (transformers': router_aux_loss_coef times
    load_balancing_loss_func of the policy's forward pass, per micro-batch) added to the objective's
    loss, and logged: `aux_loss`, each layer's most loaded expert (`expert_load_max/layer_i`: its share
    of the routed slots times E, 1 when balanced) and the overall `expert_load_max` / `expert_load_min`.
    `share` = the batch's weight over the micro-batches, so that divided by the weight (the loss in
    micro_loss, the metrics in `normalize`) each is the mean over micro-batches. A dense model's loss and sums pass unchanged."""
    terms = router_terms(model)
    if terms is None:
        return loss, sums
    aux, load = terms
    coef = model.cfg.router_aux_loss_coef
    if coef:
        loss = loss + coef * aux * share
    sums = dict(sums, aux_loss=aux * share, expert_load_max=jnp.max(load) * share,
                expert_load_min=jnp.min(load) * share)
    for i, layer in enumerate(model.cfg.stack_layers("layers")):  # the routed layers, by their index
        sums[f"expert_load_max/layer_{layer}"] = jnp.max(load[i]) * share
    return loss, sums


def normalize(objective, sums: dict, totals: dict) -> dict:
    """Each metric sum divided by its denominator's total (terms and counts left out); a metric whose
    denominator is 0 in this batch (KTO without undesirable completions) is NaN, dropped from logs."""
    out = {}
    for key, value in sums.items():
        if key == "weight" or key in objective.loss_terms:
            continue
        total = totals[objective.denominator(key)]
        out[key] = jnp.where(total > 0, value / jnp.maximum(total, 1.0), jnp.nan)
    return out


def release_freed_host_memory() -> None:
    """Return the host heap's free pages to the OS (glibc's malloc_trim). XLA's compiler frees hundreds
    of MB that glibc keeps in its arenas: measured on the MoE benchmark's full fine-tuning step, peak
    RSS 2.29 GB without this between compiling and running the step, 1.95 GB with it. No-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_eval_step(graphdef, objective, *, reference: bool = False):
    """(trainable, frozen, batch, ref_params=None) -> (loss sum, metric and term sums, totals) of one
    eval batch; `Trainer.evaluate` adds them up over the eval set and divides once."""
    def step(trainable, frozen, batch, ref_params=None):
        model = nnx.merge(graphdef, trainable, frozen)
        ref = _reference_of(graphdef, objective, reference, trainable, frozen, ref_params, batch)
        totals = objective.totals(batch)
        loss, sums = objective.loss(model, batch, None, ref, totals)
        return loss, sums, totals

    return jax.jit(step)
