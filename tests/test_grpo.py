"""GRPO (rl: grpo) against TRL 1.16's GRPOTrainer on the same prompts, completions and weights.

TRL's own `_generate_and_score_completions` and `_compute_loss` run on the completions our rollout
sampled (TRL's generation is stubbed to return them): its prompt tokenization, decoding, reward
calls, advantages, rollout metrics, reference log-probs, loss, loss metrics and gradients are the
reference for ours, for every loss type, token and sequence importance sampling, clipping, delta,
KL, each reward scaling and aggregation, truncated completions masked, and gradient accumulation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_updates_close

G = 4  # completions per prompt
MAX_NEW = 6
PROMPTS = [{"prompt": "w10 w11 w12", "level": 1}, {"prompt": "w20 w21", "level": 2},
           {"prompt": "w30 w31 w32 w33", "level": 3}, {"prompt": "w40", "level": 4}]
REWARDS = '''
def count7(prompts, completions, completion_ids, **kwargs):
    return [c.split().count("w7") + 0.25 * len(ids) for c, ids in zip(completions, completion_ids)]


def by_level(prompts, completions, completion_ids, level, **kwargs):
    # None (skip) for completions of one token; uses the dataset's extra column
    return [None if len(ids) < 2 else float(lv) * (ids[0] % 3) for ids, lv in zip(completion_ids, level)]
'''
# Loss and metrics are fp32 sums over a few hundred terms (rounding ~1e-6 relative); a wrong normalizer or a
# missing term is off by 1e-1 or more.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4  # per-tensor gradient, through a 2-layer fp32 forward and backward


def _completions(seed: int) -> dict[tuple, list[list[int]]]:
    """Fixed completions per prompt: words w4..w63, some ending with EOS (w2), some cut at MAX_NEW."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in range(len(PROMPTS)):
        group = []
        for g in range(G):
            n = int(rng.integers(1, MAX_NEW + 1))
            tokens = [int(t) for t in rng.integers(4, 64, n)]
            if g % 2 == 0 and n < MAX_NEW:
                tokens.append(2)
            group.append(tokens[:MAX_NEW])
        out[p] = group
    return out


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    (root / "grpo_test_rewards.py").write_text(REWARDS)
    sys.path.insert(0, str(root))
    import grpo_test_rewards

    yield grpo_test_rewards
    sys.path.remove(str(root))


def _config(tmp_path, model_dir, data, trl, **keys):
    from jaxtune.config import build_config

    return build_config({
        "base_model": str(model_dir), "rl": "grpo", "datasets": [{"path": str(data), "type": "prompt"}],
        "sequence_len": 32, "micro_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 4,
        "learning_rate": 1.0, "optimizer": "sgd", "lr_scheduler": "constant", "weight_decay": 0.0,
        "max_grad_norm": 0.0, "bf16": False, "save_strategy": "no", "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prep"),
        "trl": {"num_generations": G, "max_completion_length": MAX_NEW,
                "reward_funcs": ["grpo_test_rewards.count7", "grpo_test_rewards.by_level"],
                "reward_weights": [1.0, 0.5], **trl}, **keys})


def _trainer(cfg):
    from jaxtune.build import build_model
    from jaxtune.data.prepare import prepare
    from jaxtune.objectives import objective_for
    from jaxtune.peft.lora import trainable_filter
    from jaxtune.trainer import Trainer

    data = prepare(cfg)
    objective = objective_for(cfg, data)
    model, spec, _ = build_model(cfg, data.tokenizer)
    return Trainer(cfg, model, spec, objective, data, trainable_filter=trainable_filter(model, spec),
                   output_dir=Path(cfg.output_dir))


def _stub_sampler(trainer, completions, old_logps, seen: list):
    """Our rollout's sampler replaced by the fixed completions (and old log-probs) of each prompt."""
    by_ids = {}

    def sample(trainable, frozen, prompts, key):
        rows = []
        for ids in prompts:
            p = by_ids.setdefault(tuple(ids), len(by_ids))
            seen.append(list(ids))
            rows += [(completions[p][g], old_logps[p][g]) for g in range(G)]
        n = len(rows)
        tokens = np.zeros((n, MAX_NEW), np.int32)
        logps = np.zeros((n, MAX_NEW), np.float32)
        for i, (c, lp) in enumerate(rows):
            tokens[i, :len(c)] = c
            logps[i, :len(c)] = lp[:len(c)]
        lengths = np.asarray([len(c) for c, _ in rows])
        return {"tokens": tokens, "lengths": lengths, "finished": np.asarray([c[-1] == 2 for c, _ in rows]),
                "logps": logps}

    trainer.rollouts._sample = sample
    return by_ids


CASES = {
    # band: the step's attention reads only each completion's prompt and own tokens (4-token blocks, so
    # that rows of 64 tokens read 20 keys per query: jaxtune.kernels.blockwise.band_attention)
    "dapo": dict(trl={}, accum=1, perturb_old=False, band=True),
    "grpo-kl-clipped": dict(trl={"loss_type": "grpo", "beta": 0.04, "temperature": 0.7, "num_iterations": 2},
                            accum=2, perturb_old=True),
    "bnpo-gspo-delta": dict(trl={"loss_type": "bnpo", "importance_sampling_level": "sequence", "epsilon": 0.1,
                                 "epsilon_high": 0.3, "delta": 1.5, "scale_rewards": "batch", "num_iterations": 2},
                            accum=2, perturb_old=True, band=True),
    "dr_grpo-gdpo-masked": dict(trl={"loss_type": "dr_grpo", "scale_rewards": "none",
                                     "multi_objective_aggregation": "normalize_then_sum",
                                     "mask_truncated_completions": True}, accum=1, perturb_old=False),
    "cispo": dict(trl={"loss_type": "cispo", "epsilon_high": 1.05, "num_iterations": 2}, accum=1, perturb_old=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rollout_step_equals_trl_grpo_trainer(tmp_path, tiny_words_dir, reward_module, case, monkeypatch):
    """One GRPO step from the same weights and completions: advantages, rollout metrics, loss, loss
    metrics and the gradient of every weight equal TRL's."""
    import jaxtune.kernels.blockwise as blockwise

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import split_tensor_dict

    spec = CASES[case]
    trl_keys, accum = spec["trl"], spec["accum"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    completions = _completions(seed=len(case))
    rng = np.random.default_rng(7)
    old = {p: [(-4.16 + (0.3 * rng.standard_normal(MAX_NEW) if spec["perturb_old"] else np.zeros(MAX_NEW)))
                .astype(np.float32) for _ in range(G)] for p in range(len(PROMPTS))}

    # TRL: its trainer on the HF model; with beta, its reference is the starting model and the policy is moved
    # away from it first (so the KL and its gradient are not zero)
    tokenizer = AutoTokenizer.from_pretrained(tiny_words_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_words_dir, dtype=torch.float32)
    reference_keys = {k: v for k, v in trl_keys.items() if k not in ("reward_weights",)}
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8 // accum,
                      gradient_accumulation_steps=accum, num_generations=G, max_completion_length=MAX_NEW,
                      reward_weights=[1.0, 0.5], report_to="none", use_cpu=True, bf16=False, logging_steps=1,
                      **reference_keys)
    trl = GRPOTrainer(model=hf, reward_funcs=[reward_module.count7, reward_module.by_level], args=args,
                      train_dataset=datasets.Dataset.from_list(PROMPTS), processing_class=tokenizer)
    model_dir = tiny_words_dir
    if trl_keys.get("beta"):
        torch.manual_seed(1)
        with torch.no_grad():
            for p in trl.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model_dir = tmp_path / "moved"
        trl.model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)

    # jaxtune: the rollout (sampler stubbed with the same completions), then one step
    banded = []
    if spec.get("band"):
        monkeypatch.setattr(blockwise, "BAND_BLOCK", 4)
        band_attention = blockwise.band_attention
        monkeypatch.setattr(blockwise, "band_attention", lambda *a, **kw: banded.append(1) or band_attention(*a, **kw))
    ours = _trainer(_config(tmp_path, tiny_words_dir, data, trl_keys, micro_batch_size=8 // accum,
                            gradient_accumulation_steps=accum, sequence_len=8 if spec.get("band") else 32))
    if model_dir != tiny_words_dir:  # the moved policy, the reference left at the start
        from flax import nnx

        import jaxtune

        moved, _ = jaxtune.load_pretrained(model_dir)
        nnx.replace_by_pure_dict(ours.trainable, nnx.to_pure_dict(nnx.state(moved, nnx.Param)))
    prompts_seen: list = []
    by_ids = _stub_sampler(ours, completions, old, prompts_seen)
    before = {t.name: t.produce() for t in _hf(ours)}
    batch, rollout = ours.rollouts.next_step(ours.trainable, ours.frozen, step=0, epoch=0.0, max_steps=4)
    record = ours._run_step(batch)
    after = {t.name: t.produce() for t in _hf(ours)}
    assert bool(banded) == bool(spec.get("band"))

    # TRL on the same prompts (in our rollout's order) and completions
    order = sorted(by_ids, key=by_ids.get)
    prompt_of = {tuple(tokenizer(r["prompt"])["input_ids"]): r for r in PROMPTS}
    inputs = [prompt_of[ids] for ids in order for _ in range(G)]
    trl_prompt_ids = []

    def generate(prompt_ids, images, multimodal_fields, num_generations):
        trl_prompt_ids.extend(prompt_ids)
        return [completions[by_ids[tuple(ids)]][i % G] for i, ids in enumerate(prompt_ids)], None

    trl._generate_single_turn = generate
    trl.model.train()
    out = trl._generate_and_score_completions(inputs)
    assert [list(x) for x in trl_prompt_ids] == [p for p in prompts_seen for _ in range(G)]  # same prompt tokens
    n, width = out["completion_ids"].shape
    if spec["perturb_old"]:
        old_rows = [old[by_ids[tuple(ids)]][i % G] for i, ids in enumerate(trl_prompt_ids)]
        out["old_per_token_logps"] = torch.tensor(np.stack([r[:width] for r in old_rows])) * out["completion_mask"]
    trl.current_gradient_accumulation_steps = accum
    trl.model.zero_grad()
    loss = 0.0
    for micro in split_tensor_dict(out, accum) if accum > 1 else [out]:
        micro_loss = trl._compute_loss(trl.model, micro)
        micro_loss.backward()
        loss += float(micro_loss.detach())
    metrics = {k: float(np.nanmean(v)) for k, v in trl._metrics["train"].items() if len(v)}

    # advantages: ours are per token; each completion's first trained token carries its value
    ours_adv = _advantages_per_completion(batch, n)
    np.testing.assert_allclose(ours_adv, out["advantages"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(record["loss"], loss, rtol=LOSS_RTOL, atol=1e-7)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/count7/mean", "rewards/count7/std",
                "rewards/by_level/mean", "rewards/by_level/std", "completions/mean_length",
                "completions/min_length", "completions/max_length", "completions/clipped_ratio",
                "completions/mean_terminated_length", "num_tokens"):
        np.testing.assert_allclose(rollout[key], metrics[key], rtol=1e-5, err_msg=key)
    loss_metrics = ["entropy"] + (["kl"] if trl_keys.get("beta") else []) + (
        ["cispo_clip_ratio"] if trl_keys.get("loss_type") == "cispo" else
        ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
         "clip_ratio/high_max"])
    for key in loss_metrics:
        np.testing.assert_allclose(record[key], metrics[key], rtol=1e-4, atol=1e-6, err_msg=key)
    if spec["perturb_old"] and trl_keys.get("loss_type") != "cispo":
        assert metrics["clip_ratio/region_mean"] > 0  # clipping is really exercised
    # SGD with lr 1: each weight moved by minus its gradient
    grads = {name: p.grad.numpy() for name, p in trl.model.named_parameters() if p.grad is not None}
    names = sorted(grads)
    assert_updates_close([before[k] for k in names], [after[k] for k in names],
                         [before[k] - grads[k] for k in names], lr=1.0, steps=1, rtol=GRAD_RTOL, names=names)


def _hf(trainer):
    from flax import nnx

    from jaxtune.checkpoint.hf import hf_tensors

    nnx.update(trainer.model, trainer.trainable)
    return hf_tensors(trainer.model)


def _advantages_per_completion(batch, n: int) -> np.ndarray:
    """Each completion's advantage from our step batch (micro-batches [1, rows, T_a], or one [A, rows, T];
    completion order: row-major, branch by branch, as the rollout lays them out when it trains one step
    without shuffling)."""
    from jaxtune.batch import BRANCH

    values = []
    for micro in batch if isinstance(batch, list) else [batch]:
        adv, seg = micro["advantages"], micro["segment_ids"]
        for a in range(adv.shape[0]):
            for r in range(adv.shape[1]):
                branches = sorted({int(s) >> 24 for s in seg[a, r] if s >= BRANCH})
                for b in branches:
                    idx = np.flatnonzero((seg[a, r] >> 24) == b)
                    values.append(adv[a, r, idx[0]])
    assert len(values) == n
    return np.asarray(values)
