"""GRPO's batches (jaxtune/objectives/grpo.py): rollouts on the training mesh, rewards, advantages.

    prompts (a loader over the prepared prompt rows)
      -> G completions each, sampled by jaxtune.generate.sample: jitted, on the training mesh, with the
         very arrays being trained (no copy, no weight sync); the G completions of a prompt share one
         prefill
      -> decoded, scored by the reward functions (TRL's calling convention, jaxtune/objectives/rewards.py)
      -> advantages (TRL's formulas, jaxtune/objectives/grpo_losses.py)
      -> rows (a prompt and `per_row` of its completions, objectives/grpo.lay_out_group)
      -> the batches of `steps_per_rollout` optimizer steps, passed over `num_iterations` times

Each rollout draws with its own key (the seed folded with the rollout's index), and its old
log-probs are the sampler's, so a run resumed from a checkpoint samples and trains exactly what the
uninterrupted run did. Checkpoints fall on rollout boundaries (the trainer defers a save that falls
inside a rollout to its end).

Every process runs the host side of the whole rollout (prompts, decoding, layout) and places the step
batches whole; the reward functions run on process 0 only and their values are broadcast, so a
function with side effects or randomness runs once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxtune.data.loader import BatchLoader
from jaxtune.errors import JaxtuneError
from jaxtune.generate import SamplingConfig, left_pad, make_rollout
from jaxtune.logging import info, keep_until, warn_once
from jaxtune.objectives import grpo_losses
from jaxtune.objectives.grpo import collate_rows, lay_out_group
from jaxtune.objectives.rewards import RewardFunctions, TrainerState
from jaxtune.parallel import mesh as M

PROMPT_BUCKET = 32  # prompt widths round up to this, so similar rollouts share one compiled sampler
_ROLLOUT_STREAM = 0x524F4C4C  # folds the seed into the rollouts' own key stream (apart from dropout's)


def row_buckets(longest: int, step: int = 64) -> list[int]:
    """The padded lengths of GRPO's micro-batches: multiples of `step`, each at most 1.125x the last
    past 8 steps (a micro-batch pads at most an eighth plus `step` tokens). Each micro-batch pads to its
    own bucket and a new length compiles the step's per-micro-batch call once (about 2 s for
    SmolLM2-135M on 2 CPU cores), so the buckets stay few: 9 up to 576 tokens, 29 up to 8k."""
    top = -(-longest // step) * step
    buckets, b = [], step
    while b < top:
        buckets.append(b)
        b = max(b + step, -(-int(b * 1.125) // step) * step)
    return buckets + [top]



def training_row_buckets(cfg, per_row: int) -> list[int]:
    """`row_buckets` of GRPO's training rows: a prompt (at most sequence_len tokens), then per_row
    completions of at most max_completion_length tokens, each after a copy of the prompt's last token
    (objectives/grpo.py `lay_out_group`)."""
    return row_buckets(cfg.sequence_len + per_row * ((cfg.grpo_settings.max_completion_length or 512) + 1))


def _keep_rows(rows, _length):
    return list(rows)


def merge_fits(model) -> bool:
    """`rollout_merge_adapters`: whether a rollout can sample from a merged copy of the adapted kernels
    (it needs their bytes again, on top of what training holds; the copy is freed when the rollout
    ends). Warns and keeps the adapters live when free memory is short (under 20% headroom left) or
    nothing can merge; names the adapters that stay live either way."""
    from jaxtune.peft.lora import merged_kernel_bytes, unmerged_adapters
    from jaxtune.plan import free_memory

    live = unmerged_adapters(model)
    if live:
        warn_once(f"rollout_merge_adapters: {len(live)} adapted module(s) cannot merge and stay live in rollouts "
                  f"(QLoRA's NF4 kernels, experts' adapters): {', '.join(live[:3])}{' ...' if len(live) > 3 else ''}")
    need = merged_kernel_bytes(model)
    if not need:
        warn_once("rollout_merge_adapters: no adapter can merge (none on an unquantized projection); rollouts keep "
                  "the adapters live")
        return False
    free = free_memory()
    if free is not None and need > 0.8 * free:
        warn_once(f"rollout_merge_adapters: the merged copy of the adapted kernels needs {need / 2**20:.1f} MiB per "
                  f"device, {free / 2**20:.1f} MiB is free; rollouts keep the adapters live")
        return False
    info(f"rollouts sample from a merged copy of the adapted kernels ({need / 2**20:.1f} MiB per device)")
    return True


class Rollouts:
    """The GRPO batch source of `jaxtune.trainer.Trainer`: `next_step` gives the next optimizer step's
    host batch (a new rollout when the last one is used up) and the rollout's metrics: its A micro-batches
    as a list of [1, rows, length_a] (each its own length), or [1, rows, length] when A is 1."""

    def __init__(self, cfg, data, objective, *, mesh, model, graphdef, eos_ids, output_dir: Path | None = None):
        s = cfg.grpo_settings
        self.cfg, self.objective, self.mesh, self.shape = cfg, objective, mesh, objective.shape
        self.tokenizer = data.tokenizer
        self.pad_id = objective.pad_id
        self.accum = cfg.gradient_accumulation_steps
        self.max_new = s.max_completion_length or 512
        if s.temperature == 0:
            warn_once("trl.temperature is 0: every completion of a prompt is the same greedy one, so rewards never "
                      "vary within a group and GRPO learns nothing")
        self.sampling = SamplingConfig(max_new_tokens=self.max_new, temperature=s.temperature, top_p=s.top_p,
                                       top_k=s.top_k, min_p=s.min_p or 0.0, repetition_penalty=s.repetition_penalty)
        self.eos = tuple(sorted(set(int(e) for e in eos_ids)))
        self.merge_adapters = cfg.rollout_merge_adapters and merge_fits(model)
        self.sampler = make_rollout(graphdef, max_new_tokens=self.max_new, eos_ids=self.eos, pad_id=self.pad_id,
                                    num_generations=self.shape.generations, merge_adapters=self.merge_adapters)
        self.rewards = RewardFunctions.load(s.reward_funcs, s.reward_weights, cfg.code_dirs[1:])
        self.scale, self.aggregation = s.scale, s.multi_objective_aggregation
        self.mask_truncated, self.skip_zero = s.mask_truncated_completions, s.skip_zero_advantage_batches
        self.loader = BatchLoader(data.train, batch_size=self.shape.prompts, sequence_len=cfg.sequence_len,
                                  pad_id=self.pad_id, packed=False, pad_to_sequence_len=True,
                                  shuffle=not cfg.curriculum_sampling,
                                  seed=cfg.seed, shard_index=0, shard_count=1, collate=_keep_rows)
        self.eval_rows = data.eval if data.eval is not None and len(data.eval) else None
        ranks = self.mesh.shape["data"] * self.mesh.shape["fsdp"] * self.mesh.shape["expert"]
        self.rows_per_micro = cfg.micro_batch_size // self.shape.per_row * ranks
        self.buckets = training_row_buckets(cfg, self.shape.per_row)
        self.key = jax.random.fold_in(jax.random.key(cfg.seed), _ROLLOUT_STREAM)
        self.log_completions = bool(s.log_completions)
        self.to_print = s.num_completions_to_print
        self.completions_path = output_dir / "completions.jsonl" if output_dir is not None else None
        self._log_started = False
        self.index = 0  # rollouts made
        self.num_tokens = 0  # prompt + completion tokens sampled so far (TRL's num_tokens)
        self.pending: list[dict] = []  # step batches left of the current rollout
        self._iterator = None
        self._loader_state = None

    # -- the plan and the state ----------------------------------------------------------------
    @property
    def rollouts_per_epoch(self) -> int:
        return self.loader.batches_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.rollouts_per_epoch * self.shape.optimizer_steps

    @property
    def at_boundary(self) -> bool:
        """Whether the current rollout is used up (the state is then just the loader and the index)."""
        return not self.pending

    def state(self) -> dict:
        return {"loader": self._loader_state, "rollout": self.index, "num_tokens": self.num_tokens}

    def restore(self, state: dict | None) -> None:
        state = state or {}
        self._loader_state = state.get("loader")
        self.index = int(state.get("rollout", 0))
        self.num_tokens = int(state.get("num_tokens", 0))
        self.pending, self._iterator = [], None

    def layout(self) -> dict:
        return {"prompts_per_rollout": self.shape.prompts, "generations": self.shape.generations}

    # -- the steps ------------------------------------------------------------------------------
    def next_step(self, trainable, frozen, *, step: int, epoch: float, max_steps: int) -> tuple[dict, dict]:
        """(the next optimizer step's host batch, metrics): a new rollout first when the last is used up;
        its metrics come with its first step."""
        metrics = {}
        if not self.pending:
            metrics = self._roll(trainable, frozen, TrainerState(step, epoch, max_steps))
        batch = self.pending.pop(0)
        micros = batch if isinstance(batch, list) else [batch]
        if self.skip_zero and not any(np.any(m["advantages"]) for m in micros):
            metrics["skipped_zero_adv_batches"] = 1.0
        return batch, metrics

    def _prompts(self) -> list[dict]:
        if self._iterator is None:
            self._iterator = self.loader.iterate(num_epochs=None, state=self._loader_state)
        rows = next(self._iterator)
        self._loader_state = self.loader.state()
        return [r for r in rows if r is not None]

    def _sample(self, trainable, frozen, prompts: list[list[int]], key) -> dict[str, np.ndarray]:
        """G completions of each prompt (the batch filled to `shape.prompts` with copies of the first,
        whose completions are dropped): tokens, lengths, finished, logps, host arrays."""
        n = len(prompts)
        filled = list(prompts) + [prompts[0]] * (self.shape.prompts - n)
        ids, segments = left_pad(filled, self.pad_id, PROMPT_BUCKET)
        sharding = jax.sharding.NamedSharding(self.mesh, M.spec(("batch", None), ids.shape, self.mesh))
        with jax.set_mesh(self.mesh):
            out = self.sampler(trainable, frozen, M.place(ids, sharding), M.place(segments, sharding), key,
                               self.sampling.traced())
        keep = n * self.shape.generations
        return {k: M.to_host(getattr(out, k))[:keep] for k in ("tokens", "lengths", "finished", "logps")}

    def _score(self, prompts: list, completions: list, completion_ids: list, columns: dict, state: TrainerState):
        """Rewards [N, F] (NaN: skipped), the metrics the functions logged and their extra columns: computed on
        process 0, the values broadcast to the others."""
        if jax.process_count() == 1:
            return self.rewards(prompts, completions, completion_ids, columns, state)
        from jax.experimental import multihost_utils

        shape = (len(completions), len(self.rewards.names))
        scored = self.rewards(prompts, completions, completion_ids, columns, state) \
            if jax.process_index() == 0 else (np.zeros(shape), {}, {})
        values = multihost_utils.broadcast_one_to_all(np.asarray(scored[0], np.float64))
        return np.asarray(values), scored[1], scored[2]

    def _sample_and_score(self, trainable, frozen, rows: list[dict], key, state: TrainerState) -> dict:
        """One batch of prompt rows through sampling, decoding, the reward functions and advantages
        (training's rollouts and eval alike); the pieces as a dict, with the sampling time."""
        started = time.perf_counter()
        prompt_ids = [list(r["prompt_ids"]) for r in rows]
        out = self._sample(trainable, frozen, prompt_ids, key)
        sampled = time.perf_counter()
        completion_ids = [out["tokens"][i, :out["lengths"][i]].tolist() for i in range(len(out["lengths"]))]
        prompts, completions, columns = self._decoded(rows, completion_ids)
        rewards, logged, extra = self._score(prompts, completions, completion_ids, columns, state)
        advantages, _, is_std_zero = grpo_losses.advantages(rewards, self.rewards.weights, self.shape.generations,
                                                            scale_rewards=self.scale, aggregation=self.aggregation)
        return {"prompt_ids": prompt_ids, "out": out, "completion_ids": completion_ids, "prompts": prompts,
                "completions": completions, "rewards": rewards, "logged": logged, "extra": extra,
                "advantages": advantages, "is_std_zero": is_std_zero, "sampling_s": sampled - started}

    def _roll(self, trainable, frozen, state: TrainerState) -> dict:
        rows = self._prompts()
        started = time.perf_counter()
        r = self._sample_and_score(trainable, frozen, rows, jax.random.fold_in(self.key, self.index), state)
        scored = time.perf_counter()
        out = r["out"]
        self.pending = self._steps(r["prompt_ids"], r["completion_ids"], out, r["advantages"])
        self.index += 1
        lengths = out["lengths"].astype(np.float64)
        self.num_tokens += int(sum(len(p) for p in r["prompt_ids"]) * self.shape.generations + lengths.sum())
        metrics = self._metrics(r["rewards"], r["is_std_zero"], lengths, out["finished"])
        metrics.update(r["logged"])
        metrics.update({"num_tokens": float(self.num_tokens), "timing/rollout": r["sampling_s"],
                        "timing/reward": scored - started - r["sampling_s"],
                        "rollout_tokens_per_sec": float(lengths.sum()) / max(r["sampling_s"], 1e-9)})
        self._log(state.global_step + 1, r["prompts"], r["completions"], r["rewards"], r["advantages"], r["extra"])
        return metrics

    def _decoded(self, rows: list[dict], completion_ids: list[list[int]]):
        """TRL's reward inputs, prompt-major (each prompt's values repeated G times): prompts and
        completions as text, or as messages when the prompt is a message list."""
        g = self.shape.generations
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts, columns = [], {}
        for i, row in enumerate(rows):
            prompt = json.loads(row["prompt"])
            extra = json.loads(row["columns"])
            for _ in range(g):
                prompts.append(prompt)
                for k, v in extra.items():
                    columns.setdefault(k, []).append(v)
        if rows and isinstance(json.loads(rows[0]["prompt"]), list):
            completions = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = list(texts)
        return prompts, completions, columns

    def _steps(self, prompt_ids, completion_ids, out, advantages) -> list[dict]:
        """The rollout as the host batches of its optimizer steps, `num_iterations` passes over it."""
        g, per_row = self.shape.generations, self.shape.per_row
        finished = out["finished"]
        rows = []
        window, prefix = self.objective.band or (None, None)
        for p, prompt in enumerate(prompt_ids):
            if prefix is not None and (len(prompt) - 1 > prefix
                                       or any(len(completion_ids[i]) >= window for i in range(p * g, (p + 1) * g))):
                raise JaxtuneError(f"a rollout row breaks the attention layout it promises (prompt of {len(prompt)} "
                                   f"tokens, at most {prefix + 1}; completions at most {window - 1})")
            for start in range(p * g, (p + 1) * g, per_row):
                pick = range(start, start + per_row)
                rows.append(lay_out_group(prompt, [completion_ids[i] for i in pick], [out["logps"][i] for i in pick],
                                          [float(advantages[i]) for i in pick],
                                          [bool(finished[i]) or not self.mask_truncated for i in pick]))
        steps = self.shape.steps_per_rollout
        if steps > 1:  # each step mixes prompts (TRL shuffles the generation batch before splitting it)
            order = np.random.default_rng([self.cfg.seed, self.index]).permutation(len(rows))
            rows = [rows[i] for i in order]
        per_step = self.rows_per_micro * self.accum
        rows += [None] * (per_step * steps - len(rows))  # a short last rollout of an epoch: padding rows
        batches = []
        for s in range(steps):
            chunk = rows[s * per_step:(s + 1) * per_step]
            micro = []
            for a in range(self.accum):
                part = chunk[a * self.rows_per_micro:(a + 1) * self.rows_per_micro]
                longest = max((len(r["input_ids"]) for r in part if r is not None), default=1)
                micro.append(collate_rows(part, next(b for b in self.buckets if b >= longest), self.pad_id))
            # each micro-batch padded to its own length (as TRL pads each of its micro-batches), a list for the
            # trainer's RaggedStep (padding them all to the longest cost 12-14% more tokens in
            # scripts/bench_grpo.py's steps); one micro-batch: the stacked [1, rows, length]
            if self.accum == 1:
                batches.append({k: np.stack([m[k] for m in micro]) for k in micro[0]})
            else:
                batches.append([{k: v[None] for k, v in m.items()} for m in micro])
        return batches * self.shape.iterations

    def _metrics(self, rewards: np.ndarray, is_std_zero: np.ndarray, lengths: np.ndarray,
                 finished: np.ndarray) -> dict:
        """TRL's rollout metrics, by its names: the weighted reward (whatever the aggregation), each
        function's, the groups without spread, the completion lengths."""
        out = {}
        for f, name in enumerate(self.rewards.names):
            column = rewards[:, f]
            if np.any(~np.isnan(column)):
                out[f"rewards/{name}/mean"] = float(np.nanmean(column))
                out[f"rewards/{name}/std"] = float(grpo_losses.nanstd(column))
        total = np.nansum(rewards * self.rewards.weights[None], axis=1)
        total[np.isnan(rewards).all(axis=1)] = np.nan
        if np.any(~np.isnan(total)):
            out["reward"] = float(np.nanmean(total))
            out["reward_std"] = float(grpo_losses.nanstd(total))
        out["frac_reward_zero_std"] = float(np.mean(is_std_zero))
        out.update({"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                    "completions/max_length": float(lengths.max()),
                    "completions/clipped_ratio": float(np.mean(~finished))})
        ended = lengths[finished] if finished.any() else np.zeros(1)
        out.update({"completions/mean_terminated_length": float(ended.mean()),
                    "completions/min_terminated_length": float(ended.min()),
                    "completions/max_terminated_length": float(ended.max())})
        return out

    def _log(self, step, prompts, completions, rewards, advantages, extra) -> None:
        """completions.jsonl (log_completions) and the printed sample (num_completions_to_print)."""
        if jax.process_index() != 0:
            return
        records = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            record = {"step": step, "prompt": prompt, "completion": completion,
                      **{name: (None if np.isnan(rewards[i, f]) else float(rewards[i, f]))
                         for f, name in enumerate(self.rewards.names)},
                      **{k: v[i] for k, v in extra.items() if i < len(v)}, "advantage": float(advantages[i])}
            records.append(record)
        if self.log_completions and self.completions_path is not None:
            if not self._log_started:  # records of a run this one resumes (or replaces) past its start go
                keep_until(self.completions_path, step - 1)
                self._log_started = True
            with open(self.completions_path, "a") as f:
                f.writelines(json.dumps(r, default=str) + "\n" for r in records)
        if self.to_print:
            for r in records[:self.to_print]:
                info(f"step {step} completion (advantage {r['advantage']:+.3f}): {str(r['completion'])[:300]!r}")

    # -- eval -----------------------------------------------------------------------------------
    def evaluate(self, trainable, frozen, state: TrainerState) -> dict:
        """Mean reward (and TRL's other rollout metrics) over the held-out prompts, sampled with a fixed
        key so that evaluations along a run compare like with like."""
        loader = BatchLoader(self.eval_rows, batch_size=self.shape.prompts, sequence_len=self.cfg.sequence_len,
                             pad_id=self.pad_id, packed=False, pad_to_sequence_len=True, shuffle=False,
                             shard_index=0, shard_count=1, collate=_keep_rows)
        key = jax.random.fold_in(self.key, -1 & 0x7FFFFFFF)
        all_rewards, zero, lengths, finished = [], [], [], []
        for b, batch in enumerate(loader.iterate(num_epochs=1)):
            rows = [r for r in batch if r is not None]
            r = self._sample_and_score(trainable, frozen, rows, jax.random.fold_in(key, b), state)
            all_rewards.append(r["rewards"])
            zero.append(r["is_std_zero"])
            lengths.append(r["out"]["lengths"].astype(np.float64))
            finished.append(r["out"]["finished"])
        if not all_rewards:
            raise JaxtuneError("the eval set has no prompts")
        rewards = np.concatenate(all_rewards)
        metrics = self._metrics(rewards, np.concatenate(zero), np.concatenate(lengths), np.concatenate(finished))
        return {f"eval_{k}": v for k, v in metrics.items()}
