"""The training loop: objective-agnostic step, gradient accumulation, eval, checkpoints, logging.

The step is one pure function of (trainable params, frozen params, optimizer state, batch, rng,
step, reference params) jitted once. A batch holds `gradient_accumulation_steps` micro-batches
stacked on a leading axis, laid out as the objective declares (jaxtune.objectives.base). The
objective's `totals` of the whole accumulated batch come first (its unit count `weight`: trained
tokens for SFT, pairs for DPO, and any other denominator); a `lax.scan` then runs the micro-batches,
summing each one's loss sum over the whole batch's weight (so the gradients come out normalized) and
its metric sums, which are divided by the totals once: the loss is normalized by the units of the whole
accumulated batch (accumulating 4 x 1 is the same step
as one batch of 4). An objective with a reference model gets the reference's log-probs from the
same step: the policy's state with adapters off and `ref_params` overlaid (objectives/reference.py).

Steps per epoch = ceil(batches per epoch / accumulation); the last step of an epoch may hold fewer
real micro-batches (the rest are all-padding, weight 0). `max_steps` overrides the epoch count.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtune.batch import Layout
from jaxtune.checkpoint.resume import Checkpoints
from jaxtune.data.loader import BatchLoader
from jaxtune.early_stopping import BestModel
from jaxtune.errors import JaxtuneError
from jaxtune.logging import MetricsWriter, Progress, info, warn
from jaxtune.models.moe import router_terms
from jaxtune.objectives.reference import reference_model
from jaxtune.optim import build_optimizer
from jaxtune.parallel import mesh as M


class TrainingError(JaxtuneError):
    """Training cannot go on (non-finite loss, ...); the message names the step and the last checkpoint."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many steps, and when to evaluate and save."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int | None  # steps; None: never (besides the end)
    save_every: int | None

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def _interval(every: float | None, per_epoch: int | None, strategy: str | None, steps_per_epoch: int,
              total: int) -> int | None:
    if strategy == "no" or (per_epoch == 0 and every is None):
        return None
    if every is not None and strategy != "epoch":
        return max(1, round(every * total)) if every < 1 else int(every)
    if per_epoch is not None and strategy != "epoch":
        return max(1, steps_per_epoch // per_epoch)
    return steps_per_epoch


def make_plan(cfg, batches_per_epoch: int, has_eval: bool) -> Plan:
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accum))
    total = cfg.max_steps or math.ceil(steps_per_epoch * cfg.num_epochs)
    eval_every = _interval(cfg.eval_steps, cfg.evals_per_epoch, cfg.eval_strategy, steps_per_epoch, total) \
        if has_eval else None
    save_every = _interval(cfg.save_steps, cfg.saves_per_epoch, cfg.save_strategy, steps_per_epoch, total)
    return Plan(batches_per_epoch, steps_per_epoch, total, eval_every, save_every)


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

    def micro_loss(trainable, frozen, micro, key, ref, totals, micro_batches):
        """This micro-batch's share of the step's loss: its loss sum over the whole batch's weight, so
        that the gradients come out normalized (no division pass over a second gradient-sized buffer)."""
        model = nnx.merge(graphdef, trainable, frozen)
        model.collect_router_stats = True
        loss, sums = objective.loss(model, micro, key if use_rng else None, ref, totals)
        loss, sums = with_router_loss(model, loss, sums, totals["weight"] / micro_batches)
        return loss / jnp.maximum(totals["weight"], 1.0), sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(trainable, frozen, opt_state, batch, rng, step_index, ref_params=None):
        step_fn.traces += 1
        micro_batches = jax.tree.leaves(batch)[0].shape[0]
        keys = jax.random.split(jax.random.fold_in(rng, step_index), micro_batches)
        totals = objective.totals(batch)
        first = jax.tree.map(lambda x: x[0], batch)

        def grads_of(micro, key):
            ref = _reference_of(graphdef, objective, reference, trainable, frozen, ref_params, micro)
            return grad_fn(trainable, frozen, micro, key, ref, totals, micro_batches)

        def zeros():
            (_, metric_shapes), _ = jax.eval_shape(grads_of, first, keys[0])
            return (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32),
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))

        def body(carry, xs):
            grads, loss, metrics = carry
            (micro_loss_sum, micro_metrics), micro_grads = grads_of(*xs)
            return (jax.tree.map(jnp.add, grads, micro_grads), loss + micro_loss_sum,
                    jax.tree.map(jnp.add, metrics, micro_metrics)), None

        if micro_batches == 1:  # no accumulator buffers (one parameter-sized copy less)
            (loss, metrics), grads = grads_of(first, keys[0])
        else:
            (grads, loss, metrics), _ = jax.lax.scan(body, zeros(), (batch, keys))
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

    out_shardings = None if state_shardings is None else (*state_shardings, None)
    step_fn = jax.jit(step, donate_argnums=(0, 2), out_shardings=out_shardings)
    step_fn.traces = 0
    return step_fn


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


def stack_micro_batches(group: list[dict], accum: int, layout: Layout) -> dict[str, np.ndarray]:
    """[A, B, ...] from up to A micro-batches (padded to the longest; missing ones all padding)."""
    return layout.stack(group, accum)


class Trainer:
    """Runs one config's training from prepared data and a built model; see `jaxtune.train.run`."""

    def __init__(self, cfg, model, spec, objective, data, *, trainable_filter, output_dir: Path,
                 mesh_plan: M.MeshPlan | None = None, update_masks=None):
        self.cfg, self.model, self.spec, self.objective, self.data = cfg, model, spec, objective, data
        self.output_dir = output_dir
        self.accum = cfg.gradient_accumulation_steps
        self.pad_id = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0
        self.mesh_plan = mesh_plan or M.plan_for(cfg)
        self.mesh = self.mesh_plan.make()
        # Each process loads the rows of the data-parallel ranks its devices hold.
        share, shares, ranks = M.host_batch_share(self.mesh)
        # Every process must build the same global shapes: with several, rows pad to sequence_len.
        pad_to_len = cfg.pad_to_sequence_len or jax.process_count() > 1
        self.loader = self.eval_loader = self.rollouts = None
        self.graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
        if objective.data_kind == "prompt":  # GRPO: the batches come from rollouts (jaxtune/rollout.py)
            from jaxtune.generate import eos_ids_for
            from jaxtune.rollout import Rollouts

            self.rollouts = Rollouts(cfg, data, objective, mesh=self.mesh, graphdef=self.graphdef,
                                     eos_ids=eos_ids_for(model, data.tokenizer), output_dir=output_dir)
            self.plan = make_plan(cfg, self.rollouts.steps_per_epoch * self.accum, self.rollouts.eval_rows is not None)
        else:
            self.loader = BatchLoader(data.train, batch_size=cfg.micro_batch_size * ranks, sequence_len=data.row_len,
                                      pad_id=self.pad_id, packed=data.packed, pad_to_sequence_len=pad_to_len,
                                      shuffle=not cfg.curriculum_sampling, seed=cfg.seed, shard_index=share,
                                      shard_count=shares,
                                      collate=objective.collate)
            if data.eval is not None and len(data.eval):
                self.eval_loader = BatchLoader(
                    data.eval, batch_size=(cfg.eval_batch_size or cfg.micro_batch_size) * ranks,
                    sequence_len=data.row_len, pad_id=self.pad_id, packed=data.eval_packed,
                    pad_to_sequence_len=pad_to_len, shuffle=False, shard_index=share, shard_count=shares,
                    collate=objective.collate)
            self.plan = make_plan(cfg, self.loader.batches_per_epoch, self.eval_loader is not None)
        self.optimizer, self.schedule = build_optimizer(cfg, self.plan.total_steps, update_masks)
        placed = M.place_training_state(self.mesh_plan, self.mesh, trainable, frozen, self.optimizer)
        self.trainable, self.frozen, self.opt_state = placed.trainable, placed.frozen, placed.opt_state
        nnx.update(model, self.trainable, self.frozen)  # the model holds the placed arrays, not a second copy
        # The reference model: built in the step (adapters off, plus a copy of whatever else differs from the
        # start), or its log-probs precomputed once for every row; both from the starting weights, taken here
        # before any resume.
        precompute = objective.needs_reference and bool(cfg.precompute_ref_log_probs)
        self.reference = objective.needs_reference and not precompute
        self.ref_params = None
        if self.reference:
            from jaxtune.objectives.reference import initial_copy

            self.ref_params = initial_copy(self.trainable, fresh_adapters=spec is not None and not cfg.lora_model_dir)
        if precompute:
            self.loader.rows = self._precomputed(data.train, "train", ranks * shares, data.packed)
            if self.eval_loader is not None:
                self.eval_loader.rows = self._precomputed(data.eval, "eval", ranks * shares, data.eval_packed)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.rng = jax.random.wrap_key_data(M.place(jax.random.key_data(jax.random.key(cfg.seed)), replicated))
        use_rng = objective.uses_dropout and spec is not None and spec.dropout > 0
        self._compiled: list = []  # the batch shapes train_step has been compiled for
        self.train_step = make_train_step(self.graphdef, objective, self.optimizer, self.schedule, use_rng=use_rng,
                                          reference=self.reference, **placed.step_shardings)
        self.eval_step = make_eval_step(self.graphdef, objective, reference=self.reference)
        self.checkpoints = Checkpoints(output_dir / "checkpoints", cfg.save_total_limit)
        self.best = BestModel.from_config(cfg, self.plan)
        self.step = 0
        self.position = {"loader": None, "batch_in_epoch": 0} if self.rollouts is None else {"rollouts": None}
        # TR-DPO (trl.sync_ref_model): the reference moves towards the policy every ref_model_sync_steps
        trl = cfg.trl
        self.sync = (trl.ref_model_mixup_alpha, trl.ref_model_sync_steps) \
            if trl is not None and trl.sync_ref_model and self.ref_params is not None else None
        if self.sync is not None:
            from jaxtune.objectives.reference import mix_into

            self._mix = jax.jit(mix_into, static_argnums=2, donate_argnums=0)

    def _precomputed(self, rows, split: str, ranks: int, packed: bool):
        """`rows` with the reference's log-probs of every row (objectives/reference.py: computed once
        from the starting weights, stored beside the prepared data). `ranks`: every data-parallel
        rank's, all hosts together (each batch is given whole to every process)."""
        from jaxtune.objectives.reference import WithColumn, fingerprint, precompute

        objective, cfg = self.objective, self.cfg
        path = self.data.path / f"ref_logps-{fingerprint(cfg, self.data.path, objective)}-{split}.npy"
        batch_rows = (cfg.eval_batch_size or cfg.micro_batch_size) * ranks
        buckets = BatchLoader(rows, batch_size=batch_rows, sequence_len=self.data.row_len, pad_id=self.pad_id,
                              packed=packed, shard_index=0, shard_count=1, collate=objective.collate)
        graphdef = self.graphdef
        step = jax.jit(lambda trainable, frozen, batch: objective.reference_logps(
            nnx.merge(graphdef, trainable, frozen), batch))

        def compute(chunk):
            host = objective.finalize(buckets.collate_rows(chunk))
            with jax.set_mesh(self.mesh):
                out = step(self.trainable, self.frozen, M.place_batch(host, self.mesh, objective.layout,
                                                                      whole=True))
            return M.to_host(out)[:len(chunk)]

        values = precompute(path, rows, compute, batch_rows=batch_rows, write=jax.process_index() == 0)
        return WithColumn(rows, objective.reference_key, values)

    # -- state ------------------------------------------------------------------------------
    def _state_tree(self) -> dict:
        tree = {"params": nnx.to_pure_dict(self.trainable),
                "optimizer": {"opt_state": jax.tree.leaves(self.opt_state), "rng": jax.random.key_data(self.rng)}}
        if self.sync is not None:  # a synced reference is state too
            tree["reference"] = nnx.to_pure_dict(self.ref_params)
        return tree

    def save(self) -> None:
        meta = {"step": self.step, **self.position, "config": self.cfg.model_dump(mode="json"),
                "data_layout": self._data_layout()}
        if self.rollouts is not None:
            meta["rollout_boundary"] = self.rollouts.at_boundary
        if self.best is not None:
            self.best.on_save(self.step)
            meta["best_model"] = dataclasses.asdict(self.best)
            if self.best.export_best and self.best.saved:
                self.checkpoints.protected = self.best.saved[1]
        self.checkpoints.save(self.step, self._state_tree(), meta)

    def load_best(self) -> None:
        """load_best_model_at_end: put the best checkpoint's parameters in the model (for the export)."""
        if self.best is None or not self.best.export_best or not self.best.saved or self.best.saved[1] == self.step:
            return
        value, step = self.best.saved
        state, _ = self.checkpoints.restore(step, {"params": nnx.to_pure_dict(self.trainable)})
        nnx.replace_by_pure_dict(self.trainable, state["params"])
        nnx.update(self.model, self.trainable)
        info(f"load_best_model_at_end: exporting checkpoint {step} ({self.best.metric} {value:.4f}), not step "
             f"{self.step}")

    def _data_layout(self) -> dict:
        """What the loader position means: rows per host batch and host shares, or the prompts of a
        rollout (a resumed run must read the data the same way; the mesh itself may differ)."""
        if self.rollouts is not None:
            return self.rollouts.layout()
        return {"host_batch_rows": self.loader.batch_size, "host_shares": self.loader.shard_count}

    def restore(self, source: Checkpoints, step: int) -> None:
        saved = source.read_meta(step).get("data_layout")
        if saved is not None and saved != self._data_layout():
            here, where = self._data_layout(), source.directory / str(step)
            if self.rollouts is not None:
                raise JaxtuneError(
                    f"checkpoint {where} sampled {saved.get('prompts_per_rollout')} prompt(s) x "
                    f"{saved.get('generations')} completions per rollout; this run samples {here['prompts_per_rollout']}"
                    f" x {here['generations']}: keep trl.generation_batch_size (micro_batch_size x ranks x "
                    "accumulation) and trl.num_generations as they were, so the prompts continue where they stopped")
            raise JaxtuneError(
                f"checkpoint {where} read {saved.get('host_batch_rows')} rows per step on each of "
                f"{saved.get('host_shares')} host share(s); this run reads {here['host_batch_rows']} on "
                f"{here['host_shares']}: keep micro_batch_size x data-parallel ranks (and the number of hosts) as they "
                "were, so the data continues where it stopped")
        state, meta = source.restore(step, self._state_tree())
        nnx.replace_by_pure_dict(self.trainable, state["params"])
        treedef = jax.tree.structure(self.opt_state)
        self.opt_state = jax.tree.unflatten(treedef, state["optimizer"]["opt_state"])
        self.rng = jax.random.wrap_key_data(state["optimizer"]["rng"])
        if self.sync is not None:
            nnx.replace_by_pure_dict(self.ref_params, state["reference"])
        self.step = int(meta["step"])
        self.position = {k: meta.get(k) for k in self.position}
        if self.best is not None and meta.get("best_model"):
            saved = meta["best_model"]
            self.best.best, self.best.bad, self.best.saved, self.best.last = (saved["best"], saved["bad"],
                                                                               saved["saved"], saved["last"])
            if self.best.export_best and self.best.saved:
                self.checkpoints.protected = self.best.saved[1]
        if self.rollouts is not None:
            self.rollouts.restore(self.position["rollouts"])
            if not meta.get("rollout_boundary", True):
                info(f"checkpoint {source.directory / str(step)} was written inside a rollout (at the end of training "
                     "or on interrupt): the resumed run starts the next rollout")
        info(f"resumed from {source.directory / str(step)} at step {self.step}")

    # -- loop -------------------------------------------------------------------------------
    def _place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return M.place_batch(self.objective.finalize(batch), self.mesh, self.objective.layout)

    def evaluate(self) -> dict[str, float]:
        """The eval set's loss and the objective's metrics (`eval_loss`, `eval_<metric>`): sums over all
        eval batches divided once by their totals. GRPO: the rewards of completions sampled for the
        held-out prompts (`eval_reward`, ...)."""
        if self.rollouts is not None:
            from jaxtune.objectives.rewards import TrainerState

            return self.rollouts.evaluate(self.trainable, self.frozen, TrainerState(
                self.step, self.step / self.plan.steps_per_epoch, self.plan.total_steps))
        objective = self.objective
        loss_sum, sums, totals = 0.0, {}, {}
        for batch in self.eval_loader.iterate(num_epochs=1):
            with jax.set_mesh(self.mesh):
                loss, s, t = jax.device_get(self.eval_step(self.trainable, self.frozen, self._place(batch),
                                                           self.ref_params))
            loss_sum += float(loss)
            for src, dst in ((s, sums), (t, totals)):
                for k, v in src.items():
                    dst[k] = dst.get(k, 0.0) + float(v)
        if len(objective.loss_terms) == 1:
            eval_loss = loss_sum / max(totals["weight"], 1.0)
        else:
            eval_loss = sum(sums[t] / max(totals[d], 1.0) for t, d in objective.loss_terms.items())
        metrics = {k: v for k, v in jax.device_get(normalize(objective, sums, totals)).items()}
        metrics = objective.finish({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})
        return {"eval_loss": eval_loss, **{f"eval_{k}": v for k, v in metrics.items()}}

    def _loader_steps(self):
        """Each step's stacked host batch from the loader, with the loader's position after it."""
        plan = self.plan
        epochs = None if self.cfg.max_steps else math.ceil(self.cfg.num_epochs)
        batches = self.loader.iterate(num_epochs=epochs, state=self.position["loader"])
        in_epoch = self.position["batch_in_epoch"]
        while True:
            group = []
            while len(group) < self.accum:
                batch = next(batches, None)
                if batch is None:
                    break
                group.append(batch)
                in_epoch += 1
                if in_epoch == plan.batches_per_epoch:
                    in_epoch = 0
                    break
            if not group:
                return
            yield stack_micro_batches(group, self.accum, self.objective.layout), {}, \
                {"loader": self.loader.state(), "batch_in_epoch": in_epoch}

    def _rollout_steps(self):
        """Each step's host batch from rollouts (GRPO), with the rollout's metrics on its first step."""
        from jaxtune.objectives.rewards import TrainerState

        while True:
            state = TrainerState(self.step, self.step / self.plan.steps_per_epoch, self.plan.total_steps)
            batch, extra = self.rollouts.next_step(self.trainable, self.frozen, step=self.step, epoch=state.epoch,
                                                   max_steps=state.max_steps)
            yield batch, extra, {"rollouts": self.rollouts.state()}

    def _run_step(self, stacked) -> dict:
        traces, started = self.train_step.traces, time.perf_counter()
        with jax.set_mesh(self.mesh):
            args = (self.trainable, self.frozen, self.opt_state, self._place(stacked), self.rng, np.int32(self.step),
                    self.ref_params)
            shapes = jax.tree.map(lambda x: (x.shape, x.dtype), args[3])
            if shapes not in self._compiled:  # a new batch shape: compile first, then hand the compiler's
                self.train_step.lower(*args).compile()  # freed memory back before the step allocates its own
                self._compiled.append(shapes)
                release_freed_host_memory()
            self.trainable, self.opt_state, out = self.train_step(*args)
            del args
        dispatched = time.perf_counter()
        record = {k: float(v) for k, v in jax.device_get(out).items()}
        if self.train_step.traces != traces:  # a new batch shape: the call returned after tracing and compiling
            record["timing/compile"] = dispatched - started
        if self.sync is not None and (self.step + 1) % self.sync[1] == 0:
            with jax.set_mesh(self.mesh):
                self.ref_params = self._mix(self.ref_params, self.trainable, self.sync[0])
        return record

    def train(self, metrics: MetricsWriter) -> dict:
        """Run until total_steps; returns the last record. Ctrl-C saves a checkpoint and re-raises."""
        plan = self.plan
        if self.step >= plan.total_steps:
            info(f"training already finished at step {self.step}")
            return {}
        progress = Progress(plan.total_steps, self.step, self.cfg.logging_steps)
        steps = self._rollout_steps() if self.rollouts is not None else self._loader_steps()
        shares = 1 if self.loader is None else self.loader.shard_count  # rollouts give every host the whole batch
        last, saved_step, save_due = {}, self.checkpoints.latest(), False
        interrupted, above = False, 0  # above: steps in a row over loss_watchdog_threshold
        threshold, patience = self.cfg.loss_watchdog_threshold, self.cfg.loss_watchdog_patience or 3
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while self.step < plan.total_steps:
                started = time.perf_counter()
                got = next(steps, None)
                if got is None:
                    break
                stacked, extra, position = got
                fetched = time.perf_counter()
                tokens = int((stacked["segment_ids"] > 0).sum()) * shares  # about all hosts'
                slots = int(stacked["segment_ids"].size) * shares  # padding included
                if extra.get("skipped_zero_adv_batches"):  # GRPO: no learning signal, no forward, no update
                    record = {"loss": 0.0, "lr": float(self.schedule(self.step)), "grad_norm": 0.0,
                              "weight": float(np.sum(stacked["completions"]))}
                else:
                    record = self._run_step(stacked)
                self.step += 1
                if not math.isfinite(record["loss"]):
                    raise TrainingError(
                        f"loss is {record['loss']} at step {self.step}; stopping. The last good checkpoint is "
                        + (str(self.checkpoints.directory / str(saved_step)) if saved_step is not None else "none")
                        + " (lower learning_rate or check the data of this step)")
                above = above + 1 if threshold is not None and record["loss"] > threshold else 0
                watchdog = above >= patience
                if watchdog:
                    warn(f"loss {record['loss']:.4g} above loss_watchdog_threshold {threshold:g} for {above} steps "
                         f"in a row at step {self.step}: stopping training here (eval, checkpoint and export run as "
                         "at the last step)")
                self.position = position
                ended = time.perf_counter()
                elapsed, trained = ended - started, ended - fetched
                found = self.objective.finish({k: v for k, v in record.items()
                                               if k not in ("loss", "lr", "grad_norm", "weight") and math.isfinite(v)})
                record = {"step": self.step, "loss": record["loss"], "lr": record["lr"],
                          "grad_norm": record["grad_norm"],
                          "tokens_per_sec": tokens / max(trained if self.rollouts is not None else elapsed, 1e-9),
                          "step_seconds": round(elapsed, 4), "token_slots": slots,
                          "epoch": round(self.step / plan.steps_per_epoch, 4),
                          self.objective.unit: int(record["weight"]), **found, **extra}
                if self.rollouts is not None:
                    record["timing/train"] = round(trained, 4)
                final = self.step == plan.total_steps or watchdog
                if self.step % self.cfg.logging_steps == 0 or final:
                    metrics.write(record)
                progress.update(self.step, record)
                last = record
                if plan.eval_every and (self.step % plan.eval_every == 0 or final):
                    evaluated = self.evaluate()
                    metrics.write({"step": self.step, **evaluated, "epoch": record["epoch"]})
                    progress.message(f"step {self.step}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in evaluated.items() if k in (
                            "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_reward")))
                    last = {**last, **evaluated}
                    if self.best is not None and self.best.observe(evaluated, self.step) and not final:
                        warn(f"{self.best.metric} has not improved for {self.best.bad} evaluations in a row "
                             f"(early_stopping_patience; best {self.best.best:.4g}): stopping training at step "
                             f"{self.step} (checkpoint and export run as at the last step)")
                        watchdog = final = True
                save_due = save_due or bool(plan.save_every and self.step % plan.save_every == 0)
                if (save_due and (self.rollouts is None or self.rollouts.at_boundary)) or (final and plan.save_every):
                    self.save()  # GRPO: at a rollout's end (a save due inside one waits), and the last step's
                    saved_step, save_due = self.step, False
                if watchdog:
                    break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            signal.signal(signal.SIGINT, previous)
            progress.close()
        if interrupted:
            if jax.process_count() > 1:  # a save needs every process; the others did not stop
                info(f"interrupted at step {self.step}; with several processes no checkpoint is written on "
                     f"interrupt (the last one is step {saved_step})")
            elif self.step and saved_step != self.step and self.cfg.save_strategy != "no":
                self.save()
                info(f"interrupted: saved checkpoint {self.checkpoints.directory / str(self.step)}; run the same "
                     "command again to resume")
            raise KeyboardInterrupt
        return last

    def close(self) -> None:
        self.checkpoints.close()
