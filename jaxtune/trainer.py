"""The training loop: batches, eval, checkpoints, logging around the jitted step (jaxtune/step.py).

Steps per epoch = ceil(batches per epoch / accumulation); the last step of an epoch may hold fewer
real micro-batches (the rest are all-padding, weight 0). `max_steps` overrides the epoch count.
A GRPO step's micro-batches may come as a list of different lengths (each padded to its own, as TRL
pads its micro-batches): `step.RaggedStep` runs those.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxtune.batch import Layout
from jaxtune.checkpoint.resume import Checkpoints
from jaxtune.data.loader import BatchLoader
from jaxtune.early_stopping import BestModel
from jaxtune.errors import JaxtuneError
from jaxtune.logging import MetricsWriter, Progress, info, warn
from jaxtune.optim import build_optimizer
from jaxtune.parallel import mesh as M
from jaxtune.step import RaggedStep, make_eval_step, make_train_step, normalize, release_freed_host_memory


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
                                     eos_ids=eos_ids_for(model, data.tokenizer), output_dir=output_dir, model=model)
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
        self.ragged_step = RaggedStep(self.graphdef, objective, self.optimizer, self.schedule, use_rng=use_rng,
                                      reference=self.reference, **placed.step_shardings) \
            if self.rollouts is not None else None
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

    def _run_step(self, stacked: dict | list[dict]) -> dict:
        if isinstance(stacked, list):  # micro-batches of their own lengths (GRPO)
            with jax.set_mesh(self.mesh):
                self.trainable, self.opt_state, out, compiling = self.ragged_step(
                    self.trainable, self.frozen, self.opt_state, [self._place(m) for m in stacked], self.rng,
                    np.int32(self.step), self.ref_params)
            record = {k: float(v) for k, v in jax.device_get(out).items()}
            if compiling:
                record["timing/compile"] = compiling
            return self._after_step(record)
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
        return self._after_step(record)

    def _after_step(self, record: dict) -> dict:
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
                micros = stacked if isinstance(stacked, list) else [stacked]
                tokens = sum(int((m["segment_ids"] > 0).sum()) for m in micros) * shares  # about all hosts'
                slots = sum(int(m["segment_ids"].size) for m in micros) * shares  # padding included
                if extra.get("skipped_zero_adv_batches"):  # GRPO: no learning signal, no forward, no update
                    record = {"loss": 0.0, "lr": float(self.schedule(self.step)), "grad_norm": 0.0,
                              "weight": float(sum(np.sum(m["completions"]) for m in micros))}
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
