"""GRPO's loop on a tiny model over a 64-word vocabulary: it learns a verifiable reward, every rollout
samples with the weights of the moment (one compile), a resumed run continues the same trajectory,
and the reward functions, dataset transforms, eval, completion logs, zero-advantage skips and the
reference sync behave as TRL and Axolotl define them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.errors import JaxtuneError

from conftest import save_tiny  # noqa: F401  (fixtures live in conftest)

REWARDS = '''
def w7(prompts, completions, completion_ids, **kwargs):
    """The fraction of the completion's words that are w7."""
    return [c.split().count("w7") / max(len(c.split()), 1) for c in completions]


def token_sum(prompts, completions, completion_ids, **kwargs):
    """Varies within every group (a signal at every step)."""
    return [float(sum(ids)) for ids in completion_ids]


def constant(prompts, completions, completion_ids, **kwargs):
    return [1.0] * len(completions)


def with_answer(prompts, completions, completion_ids, answer, trainer_state, log_metric, **kwargs):
    log_metric("answers_seen", float(len(answer)))
    return [None if a == "skip" else float(a in c.split()) for c, a in zip(completions, answer)]


def breaks_on_w9(prompts, completions, completion_ids, **kwargs):
    return [1.0 / (0 if "w9" in c.split() else 1) for c in completions]


def to_prompt(cfg, dataset_idx=0, **kwargs):
    def transform(row, tokenizer=None):
        assert tokenizer is not None
        return {"prompt": row["question"], "answer": row["gold"]}
    return transform, {"remove_columns": ["question"]}
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding the reward module (imported from there, as jaxtune does)."""
    (tmp_path / "word_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("word_rewards", None)


def _prompts(path: Path, n: int = 16, **extra) -> Path:
    rows = [{"prompt": f"w{10 + i % 40} w{20 + i % 30} w{30 + i % 20}", **extra} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(workdir, model_dir, *, trl=None, **keys):
    from jaxtune.config import build_config

    return build_config({
        "base_model": str(model_dir), "rl": "grpo", "datasets": [{"path": str(_prompts(workdir / "p.jsonl")),
                                                                  "type": "prompt"}],
        "sequence_len": 16, "micro_batch_size": 8, "max_steps": 30, "learning_rate": 3e-3, "lr_scheduler": "constant",
        "bf16": False, "save_strategy": "no", "logging_steps": 1, "output_dir": str(workdir / "out"),
        "dataset_prepared_path": str(workdir / "prep"),
        "trl": {"num_generations": 8, "max_completion_length": 8, "reward_funcs": ["word_rewards.w7"], **(trl or {})},
        **keys})


def _records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def _trainer(cfg):
    from jaxtune.build import build_model
    from jaxtune.data.prepare import prepare
    from jaxtune.objectives import objective_for
    from jaxtune.peft.lora import trainable_filter
    from jaxtune.trainer import Trainer

    data = prepare(cfg)
    model, spec, _ = build_model(cfg, data.tokenizer)
    return Trainer(cfg, model, spec, objective_for(cfg, data), data, trainable_filter=trainable_filter(model, spec),
                   output_dir=Path(cfg.output_dir))


def test_tiny_model_learns_a_verifiable_reward(workdir, tiny_words_dir):
    """Reward: the fraction of w7 in the completion (a random model emits it 1 time in 64). 30 steps of
    GRPO (full fine-tuning) make it the model's habit."""
    from jaxtune import train

    train.run(_config(workdir, tiny_words_dir))
    rewards = [r["reward"] for r in _records(workdir / "out") if "reward" in r]
    assert len(rewards) == 30
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert first < 0.2 and last > first + 0.4, rewards


@pytest.mark.parametrize("band", [False, True])
def test_each_rollout_samples_with_the_updated_weights_and_nothing_recompiles(workdir, tiny_words_dir, band,
                                                                              monkeypatch):
    """The sampler gets the trainer's state of the moment (the step donates the old buffers): the
    log-probs a rollout returns equal a teacher-forced forward under the weights after the previous
    step; the sampler compiles once, the step once per micro-batch length. With `band` the forward's
    attention reads only each completion's prompt and own tokens (4-token blocks: 28 of a row's 64
    keys); a rollout whose rows break that layout is an error, not a silently wrong attention."""
    from flax import nnx

    import jaxtune.kernels.blockwise as blockwise

    banded = []
    if band:
        monkeypatch.setattr(blockwise, "BAND_BLOCK", 4)
        band_attention = blockwise.band_attention
        monkeypatch.setattr(blockwise, "band_attention", lambda *a, **kw: banded.append(1) or band_attention(*a, **kw))
    trainer = _trainer(_config(workdir, tiny_words_dir, micro_batch_size=4, gradient_accumulation_steps=2,  # 4 a row
                               trl={"reward_funcs": ["word_rewards.token_sum"]}))
    objective = trainer.objective
    lengths = set()
    for step in range(3):
        batch, _ = trainer.rollouts.next_step(trainer.trainable, trainer.frozen, step=step, epoch=0.0, max_steps=30)
        assert isinstance(batch, list) and len(batch) == 2  # two micro-batches, each padded to its own length
        for m in batch:
            lengths.add(m["input_ids"].shape[-1])
            micro = jax.tree.map(lambda x: x[0], trainer._place(m))
            logps, mask, _ = objective.token_logps(nnx.merge(trainer.graphdef, trainer.trainable, trainer.frozen),
                                                   micro)
            np.testing.assert_allclose(np.asarray(micro["old_logps"]) * np.asarray(mask), np.asarray(logps),
                                       atol=1e-5, err_msg=f"rollout {step}")
        record = trainer._run_step(batch)
        assert record["grad_norm"] > 0
    assert trainer.ragged_step.traces == len(lengths) and trainer.train_step.traces == 0  # once per length
    assert trainer.rollouts.sampler._cache_size() == 1
    assert bool(banded) == band
    trainer.objective.band = (3, 2)  # completions of at most 2 tokens: these rows break it
    with pytest.raises(JaxtuneError, match="attention layout"):
        trainer.rollouts.next_step(trainer.trainable, trainer.frozen, step=3, epoch=0.0, max_steps=30)


def test_resumed_run_continues_the_same_trajectory(workdir, tiny_words_dir, monkeypatch):
    """Checkpoints at rollout boundaries hold the rollout index (the key), the prompt loader and the
    token count: a run resumed from step 4 samples, scores and trains what the uninterrupted one did."""
    from safetensors.numpy import load_file

    from jaxtune import train

    cfg = _config(workdir, tiny_words_dir, max_steps=8, save_steps=4, save_strategy="steps")
    train.run(cfg)
    straight = _records(workdir / "out")
    weights = load_file(str(workdir / "out" / "hf" / "model.safetensors"))
    shutil.rmtree(workdir / "out" / "checkpoints" / "8")
    shutil.rmtree(workdir / "out" / "hf")
    from jaxtune.trainer import Trainer

    restored = []
    original = Trainer.restore
    monkeypatch.setattr(Trainer, "restore", lambda self, source, step: restored.append(step) or original(
        self, source, step))
    train.run(cfg)
    assert restored == [4]
    resumed = _records(workdir / "out")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        for key in ("loss", "reward", "num_tokens", "completions/mean_length", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=f"{key} at step {a['step']}")
    again = load_file(str(workdir / "out" / "hf" / "model.safetensors"))
    for key in weights:
        np.testing.assert_allclose(again[key], weights[key], atol=1e-6, err_msg=key)


def test_zero_advantages_skip_the_step_eval_scores_held_out_prompts_and_completions_are_logged(
        workdir, tiny_words_dir):
    from jaxtune import train

    cfg = _config(workdir, tiny_words_dir, max_steps=2, val_set_size=4, eval_steps=2,
                  trl={"reward_funcs": ["word_rewards.constant"], "skip_zero_advantage_batches": True,
                       "log_completions": True, "num_completions_to_print": 2})
    result = train.run(cfg)
    steps = [r for r in _records(workdir / "out") if "loss" in r]
    assert all(r["skipped_zero_adv_batches"] == 1 and r["grad_norm"] == 0 and r["reward"] == 1.0 for r in steps)
    assert result.last["eval_reward"] == 1.0 and result.last["eval_frac_reward_zero_std"] == 1.0
    from safetensors.numpy import load_file

    trained = load_file(str(workdir / "out" / "hf" / "model.safetensors"))
    base = load_file(str(Path(tiny_words_dir) / "model.safetensors"))
    assert all(np.array_equal(trained[k], base[k]) for k in base)  # skipped steps change nothing
    logged = [json.loads(line) for line in (workdir / "out" / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 2 * 8 and {r["step"] for r in logged} == {1, 2}
    assert set(logged[0]) >= {"prompt", "completion", "constant", "advantage"} and logged[0]["advantage"] == 0.0


def test_reward_functions_get_trls_arguments_and_errors_name_the_row(workdir):
    from jaxtune.errors import JaxtuneError
    from jaxtune.objectives.rewards import RewardFunctions, TrainerState

    rewards = RewardFunctions.load(["word_rewards.with_answer", "word_rewards.constant"], [2.0, 1.0])
    values, logged, _ = rewards(["w1 w2"] * 3, ["w5 w6", "w4", "w5"], [[5, 6], [4], [5]],
                                {"answer": ["w5", "w5", "skip"]}, TrainerState(3, 0.5, 10))
    np.testing.assert_array_equal(values[:, 0], [1.0, 0.0, np.nan])
    assert logged["answers_seen"] == 3.0 and "timing/reward/with_answer" in logged
    broken = RewardFunctions.load(["word_rewards.breaks_on_w9"], None)
    with pytest.raises(JaxtuneError, match=r"'breaks_on_w9' .*raised on completion 1 .*'w9'.*ZeroDivisionError"):
        broken(["p"] * 2, ["w5", "w9"], [[5], [9]], {}, TrainerState())
    with pytest.raises(JaxtuneError, match="module 'nowhere' not found .*working directory"):
        RewardFunctions.load(["nowhere.f"], None)
    with pytest.raises(JaxtuneError, match="has no function 'missing'"):
        RewardFunctions.load(["word_rewards.missing"], None)


def test_prompts_tokenize_as_trl_and_axolotl_transforms_apply(workdir, tokenizer):
    """Message-list prompts: the chat template with the generation prompt; string prompts: the text as
    it is; both as TRL's GRPOTrainer tokenizes them. `type: module.fn` is Axolotl's row transform."""
    import datasets
    from trl import GRPOTrainer

    from jaxtune.config import DatasetConfig
    from jaxtune.data.formats import build_encoder, tokenizer_info

    class TRL:  # the attributes GRPOTrainer._tokenize_prompts reads
        processing_class, chat_template, tools, chat_template_kwargs = tokenizer, None, None, {}
        environment_factories, _is_vlm = None, False

    info = tokenizer_info(tokenizer)
    encoder = build_encoder(DatasetConfig(path="x", type="prompt"), tok=info, top_template="tokenizer_default",
                            top_jinja=None, train_on_inputs=False, sequence_len=64, rl="grpo")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    for prompt in (conversation, "Question: 2+2? Answer:"):
        [row] = encoder({"prompt": prompt, "answer": "4"}, "row 0")
        want, _, _ = GRPOTrainer._tokenize_prompts(TRL(), [prompt])
        assert row["prompt_ids"] == list(want[0])
        assert json.loads(row["prompt"]) == prompt and json.loads(row["columns"]) == {"answer": "4"}

    transformed = build_encoder(DatasetConfig(path="x", type="word_rewards.to_prompt"), tok=info,
                                top_template="tokenizer_default", top_jinja=None, train_on_inputs=False,
                                sequence_len=64, rl="grpo")
    [row] = transformed({"question": "Name a color.", "gold": "red", "id": 7}, "row 0")
    assert json.loads(row["columns"]) == {"gold": "red", "id": 7, "answer": "red"}
    assert row["prompt_ids"] == tokenizer("Name a color.")["input_ids"]
    assert datasets  # (imported for GRPOTrainer's module)


def test_sync_ref_model_mixes_the_reference_as_trl_does(workdir, tiny_words_dir):
    """trl.sync_ref_model: every ref_model_sync_steps, ref <- alpha * policy + (1 - alpha) * ref
    (TRL's SyncRefModelCallback, run here on the same tensors); the synced reference is checkpointed."""
    import torch
    from flax import nnx
    from trl.trainer.callbacks import SyncRefModelCallback

    cfg = _config(workdir, tiny_words_dir, trl={"beta": 0.04, "sync_ref_model": True, "ref_model_sync_steps": 1,
                                               "ref_model_mixup_alpha": 0.6})
    trainer = _trainer(cfg)
    names = [k for k, _ in nnx.to_flat_state(trainer.ref_params)]

    def tensors(state):
        flat = dict(nnx.to_flat_state(state))
        return torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(np.asarray(flat[k][...]))) for k in names])

    theirs = tensors(trainer.ref_params)
    for step in range(2):
        batch, _ = trainer.rollouts.next_step(trainer.trainable, trainer.frozen, step=step, epoch=0.0, max_steps=30)
        trainer._run_step(batch)
        SyncRefModelCallback._sync_target_model(tensors(trainer.trainable), theirs, 0.6)
    ours = tensors(trainer.ref_params)
    moved = 0.0
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-6, atol=1e-7)
    for a, p in zip(ours, tensors(trainer.trainable)):
        moved = max(moved, float((a - p).abs().max().detach()))
    assert moved > 0  # the reference lags the policy: really mixed, not copied
    assert "reference" in trainer._state_tree()


def test_rollouts_from_merged_adapters_sample_what_live_adapters_sample(workdir, tiny_words_dir, monkeypatch):
    """rollout_merge_adapters: the rollout samples from W + scale A B (made inside the jitted rollout) and
    gets the tokens live adapters get, with the same log-probs up to the products' rounding (fp32,
    1e-5); the adapters really change the samples (B is not zero here); the merged kernels are the
    export's layer by layer (what the merged safetensors hold), an ungated layer's unchanged; with too
    little free memory the rollouts keep the adapters live, and say so; the key needs GRPO with LoRA."""
    import copy
    import logging

    from flax import nnx

    from jaxtune.generate import make_rollout
    from jaxtune.peft.lora import LoraLinear, merge_for_sampling
    from jaxtune.rollout import merge_fits

    cfg = _config(workdir, tiny_words_dir, adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
                  peft_layers_to_transform=[1], rollout_merge_adapters=True)  # gated: layer 0 has no adapter
    trainer = _trainer(cfg)
    rollouts = trainer.rollouts
    assert rollouts.merge_adapters
    noise = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(trainer.trainable))))
    trainable = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(noise), a.shape, a.dtype), trainer.trainable)
    live = copy.copy(rollouts)
    live.sampler = make_rollout(trainer.graphdef, max_new_tokens=rollouts.max_new, eos_ids=rollouts.eos,
                                pad_id=rollouts.pad_id, num_generations=rollouts.shape.generations)
    prompts = [list(r["prompt_ids"]) for r in rollouts._prompts()]
    key = jax.random.key(4)
    merged, unmerged = rollouts._sample(trainable, trainer.frozen, prompts, key), live._sample(trainable, trainer.frozen,
                                                                                              prompts, key)
    np.testing.assert_array_equal(merged["tokens"], unmerged["tokens"])
    np.testing.assert_array_equal(merged["lengths"], unmerged["lengths"])
    np.testing.assert_allclose(merged["logps"], unmerged["logps"], rtol=1e-5, atol=1e-5)
    fresh = live._sample(trainer.trainable, trainer.frozen, prompts, key)  # B = 0: the base model
    assert not np.allclose(fresh["logps"], unmerged["logps"], atol=1e-3)
    model = nnx.merge(trainer.graphdef, trainable, trainer.frozen)  # the merged kernels: the export's, layer by layer
    want = {path: np.stack([m.merged_kernel(layer) for layer in range(2)]) for path, m in model.iter_modules()
            if type(m) is LoraLinear}
    assert merge_for_sampling(model) == len(want) == 7
    for path, m in model.iter_modules():
        if path in want:
            np.testing.assert_allclose(np.asarray(m.kernel.get_value()), want[path], rtol=1e-6, atol=1e-6)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("jaxtune").addHandler(handler)
    try:
        monkeypatch.setattr("jaxtune.plan.free_memory", lambda: 1024)  # bytes
        assert not merge_fits(trainer.model)
    finally:
        logging.getLogger("jaxtune").removeHandler(handler)
    assert any("rollouts keep the adapters live" in r.getMessage() for r in records)
    with pytest.raises(Exception, match="rollout_merge_adapters applies to rl: grpo with a LoRA adapter"):
        _config(workdir, tiny_words_dir, rollout_merge_adapters=True)


def test_row_buckets_pad_little_and_cover_the_longest_row():
    from jaxtune.rollout import row_buckets

    for longest in (1, 64, 65, 584, 8300):
        buckets = row_buckets(longest)
        assert buckets == sorted(set(buckets)) and buckets[-1] >= longest and all(b % 64 == 0 for b in buckets)
        for n in range(1, longest + 1, 7):  # the bucket a row of n tokens pads to
            assert next(b for b in buckets if b >= n) <= 1.125 * n + 64


def test_plan_counts_grpo_rows_rollouts_and_the_reference(workdir, tiny_words_dir):
    """`jaxtune plan` for GRPO: the activations of the rows the rollouts really build (a prompt and
    per_row completions, padded to the longest bucket), the sampler's KV cache as KVCache.create
    allocates it for the rollout's prompts and completions, and the frozen reference copy that full
    fine-tuning keeps with beta != 0 (the bytes the trainer holds), none with beta 0."""
    from flax import nnx

    from jaxtune.models.cache import KVCache
    from jaxtune.plan import grpo_rows, plan_memory, rollout_cache_bytes

    cfg = _config(workdir, tiny_words_dir, micro_batch_size=4, gradient_accumulation_steps=2,
                  trl={"reward_funcs": ["word_rewards.token_sum"]})
    trainer = _trainer(cfg)
    batch, _ = trainer.rollouts.next_step(trainer.trainable, trainer.frozen, step=0, epoch=0.0, max_steps=30)
    per_row, row_len = grpo_rows(cfg, trainer.mesh_plan)
    assert per_row == trainer.objective.per_row == 4 and row_len == trainer.rollouts.buckets[-1]
    assert all(m["input_ids"].shape[-1] <= row_len for m in batch)
    mcfg = nnx.merge(trainer.graphdef, trainer.trainable, trainer.frozen).cfg
    shape = trainer.objective.shape
    caches = (KVCache.create(mcfg, shape.prompts, 32, jnp.float32),  # prompts of <= 16 tokens: one 32 bucket
              KVCache.create(mcfg, shape.completions, cfg.grpo_settings.max_completion_length, jnp.float32))
    assert rollout_cache_bytes(cfg, mcfg, trainer.mesh_plan, 4) == sum(c.k.nbytes + c.v.nbytes for c in caches)
    plan = plan_memory(cfg, devices=1)
    assert plan.rollout > rollout_cache_bytes(cfg, mcfg, trainer.mesh_plan, 4) and plan.reference == 0
    assert f"rollouts {plan.rollout / 2**30:12.3f} GiB".replace(" ", "") in plan.report().replace(" ", "")

    with_kl = _config(workdir, tiny_words_dir, micro_batch_size=4, gradient_accumulation_steps=2,
                      trl={"reward_funcs": ["word_rewards.token_sum"], "beta": 0.04})
    trainer = _trainer(with_kl)
    held = sum(x.nbytes for x in jax.tree.leaves(trainer.ref_params))
    assert held > 0 and plan_memory(with_kl, devices=1).reference == held
