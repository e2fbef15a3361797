"""`python -m jaxtune.train --config x.yml [key=value ...]` (also `jaxtune train`).

    output_dir/
      config.resolved.yml   the config after defaults and aliases (written first)
      metrics.jsonl         step records (loss, lr, grad_norm, tokens_per_sec, epoch) and eval records
      events/               TensorBoard, with use_tensorboard: true
      checkpoints/<step>/   orbax checkpoints; the same command resumes from the newest
      hf/                   the final model, LoRA merged (transformers loads it)
      adapter/              the PEFT adapter (with adapter: lora / qlora)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxtune.config import Config, dump_config, load_config
from jaxtune.logging import info


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def export(model, spec, tokenizer, output_dir: Path, *, base_model: str | None) -> dict[str, Path]:
    """Write hf/ (merged) and, with an adapter, adapter/ (PEFT) into output_dir."""
    from jaxtune.checkpoint.hf import save_pretrained
    from jaxtune.peft.adapter import save_adapter

    written = {"hf": save_pretrained(model, output_dir / "hf", tokenizer=tokenizer)}
    if spec is not None:
        written["adapter"] = save_adapter(model, spec, output_dir / "adapter", base_model=base_model)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(written["adapter"]))
    return written


@dataclasses.dataclass
class TrainResult:
    model: object  # the trained model (adapters attached, not merged)
    spec: object  # its LoRA spec, or None (full fine-tuning)
    tokenizer: object
    last: dict  # the last step record (with eval_loss when evaluated at the end)
    exports: dict  # "hf" / "adapter" -> directory


def build(cfg: Config):
    """Everything training needs, before its first step: (trainer, model, spec, data, objective,
    mesh plan, precision). Data is prepared (or read from its cache) and the model loaded and placed."""
    import jax

    from jaxtune.build import build_model
    from jaxtune.objectives import objective_for
    from jaxtune.parallel.distributed import initialize
    from jaxtune.parallel.experts import check_expert_parallel
    from jaxtune.parallel.mesh import loading_place, plan_for
    from jaxtune.peft.unfrozen import trained_parameters
    from jaxtune.trainer import Trainer

    initialize(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        _write_atomic(output_dir / "config.resolved.yml", dump_config(cfg))
    data = _prepare_once(cfg)
    mesh_plan = plan_for(cfg)
    objective = objective_for(cfg, data, ranks=mesh_plan.batch_ranks)
    model, spec, precision = build_model(cfg, data.tokenizer, place=loading_place(mesh_plan, mesh_plan.make()))
    check_expert_parallel(mesh_plan.expert, model.cfg, cfg.quantize_moe_experts)
    trains, masks = trained_parameters(cfg, model, spec)
    trainer = Trainer(cfg, model, spec, objective, data, trainable_filter=trains, update_masks=masks,
                      output_dir=output_dir, mesh_plan=mesh_plan)
    return trainer, model, spec, data, objective, mesh_plan, precision


def run(cfg: Config) -> TrainResult:
    """Train a config end to end: prepare data, build the model, train (resuming), export."""
    import jax
    from flax import nnx

    from jaxtune import bundled
    from jaxtune.config.trackers import run_config, tracker_settings
    from jaxtune.logging import MetricsWriter

    trainer, model, spec, data, objective, mesh_plan, precision = build(cfg)
    output_dir = Path(cfg.output_dir)
    plan = trainer.plan
    trained = sum(x.size for x in jax.tree.leaves(trainer.trainable))
    total = trained + sum(x.size for x in jax.tree.leaves(trainer.frozen))
    ranks = mesh_plan.batch_ranks
    if trainer.rollouts is not None:
        shape = objective.shape
        batch = (f"rollouts of {shape.prompts} prompt(s) x {shape.generations} completions of up to "
                 f"{trainer.rollouts.max_new} tokens, {shape.steps_per_rollout} optimizer step(s) of "
                 f"{cfg.micro_batch_size} completions per rank x {ranks} rank(s) x {cfg.gradient_accumulation_steps} "
                 f"accumulation per pass, {shape.iterations} pass(es)")
    else:
        batch = (f"global batch {cfg.micro_batch_size} per rank x {ranks} data-parallel rank(s) x "
                 f"{cfg.gradient_accumulation_steps} accumulation = "
                 f"{cfg.micro_batch_size * ranks * cfg.gradient_accumulation_steps} rows of up to {data.row_len} tokens")
    info(f"training {trained:,} of {total:,} parameters ({'full' if spec is None else cfg.adapter}); compute "
         f"{precision.compute}; {mesh_plan.describe()} over {jax.device_count()} device(s), "
         f"{jax.process_count()} process(es); {batch}; objective {objective.name}"
         + (f" (reference: {'precomputed' if cfg.precompute_ref_log_probs else 'in the step'})"
            if objective.needs_reference else "")
         + f"; {plan.total_steps} steps ({plan.steps_per_epoch} per epoch)")
    resume = _resume_point(cfg, trainer)
    if resume is not None:
        trainer.restore(*resume)
    metrics = MetricsWriter(output_dir, resume_step=trainer.step, tensorboard=cfg.use_tensorboard,
                            trackers=tracker_settings(cfg), run_config=run_config(cfg),
                            primary=jax.process_index() == 0)
    try:
        last = trainer.train(metrics)
        trainer.load_best()  # load_best_model_at_end: the best checkpoint's parameters are exported
    finally:
        metrics.close()
        trainer.close()
    nnx.update(model, trainer.trainable)
    written = export(model, spec, data.tokenizer, output_dir, base_model=str(bundled.resolve(cfg.base_model)))
    info("exported " + ", ".join(str(p) for p in written.values()))
    return TrainResult(model, spec, data.tokenizer, last, written)


def _prepare_once(cfg: Config):
    """The prepared data. With several processes, process 0 builds the cache first and the others
    then read it (each prepares once)."""
    import jax

    from jaxtune.data.prepare import prepare

    if jax.process_count() == 1:
        return prepare(cfg)
    from jax.experimental import multihost_utils

    data = prepare(cfg) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jaxtune: data prepared")
    return data if data is not None else prepare(cfg)


def export_run(cfg: Config, checkpoint: str | None = None) -> dict[str, Path]:
    """`jaxtune export` (Axolotl's merge-lora): write hf/ and adapter/ into output_dir from a
    checkpoint (`checkpoint`: a `.../checkpoints/<step>` directory, default the newest in
    output_dir) or, when there is none, from `lora_model_dir` alone. One process: run it on one
    host (a checkpoint written by many hosts reads whole on one)."""
    from flax import nnx

    from jaxtune import bundled
    from jaxtune.build import build_model
    from jaxtune.checkpoint.resume import Checkpoints, resolve_resume
    from jaxtune.data.prepare import load_tokenizer_for
    from jaxtune.errors import JaxtuneError
    from jaxtune.peft.unfrozen import trained_parameters

    output_dir = Path(cfg.output_dir)
    tokenizer, _ = load_tokenizer_for(cfg)
    model, spec, _ = build_model(cfg, tokenizer)
    point = resolve_resume(checkpoint or None, Checkpoints(output_dir / "checkpoints"))
    if point is not None:
        source, step = point
        _, trainable, _ = nnx.split(model, trained_parameters(cfg, model, spec)[0], ...)
        items, _ = source.restore(step, {"params": nnx.to_pure_dict(trainable)})
        nnx.replace_by_pure_dict(trainable, items["params"])
        nnx.update(model, trainable)
        info(f"exporting checkpoint {source.directory / str(step)}")
    elif not cfg.lora_model_dir:
        raise JaxtuneError(f"nothing to export: {output_dir / 'checkpoints'} has no checkpoint and lora_model_dir "
                           "is not set")
    return export(model, spec, tokenizer, output_dir, base_model=str(bundled.resolve(cfg.base_model)))


def _resume_point(cfg: Config, trainer):
    from jaxtune.checkpoint.resume import resolve_resume

    return resolve_resume(cfg.resume_from_checkpoint, trainer.checkpoints)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxtune.train", description="Fine-tune a model from a config")
    parser.add_argument("--config", required=True, help="YAML config (Axolotl keys)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from jaxtune.errors import JaxtuneError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    try:
        cfg = load_config(args.config, list(args.overrides) + extra)
        run(cfg)
    except JaxtuneError as e:
        print(f"jaxtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
