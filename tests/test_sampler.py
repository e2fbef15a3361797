"""The sampler as GRPO uses it: filters against transformers' logits processors, draws against the
distribution they define, returned log-probs against a teacher-forced forward, one prefill shared G
ways against the prompt repeated G times, and one compile across sampling settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxtune.generate import SamplingConfig, left_pad, make_rollout, process_logits, sample, sample_logits


def _hf_scores(logits: np.ndarray, seen_ids: list[list[int]], cfg: SamplingConfig) -> np.ndarray:
    """transformers' processors in generate()'s order on the same logits."""
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    scores = torch.tensor(logits)
    ids = torch.tensor(seen_ids)
    if cfg.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(ids, scores)
    if cfg.temperature != 1.0:
        scores = TemperatureLogitsWarper(cfg.temperature)(ids, scores)
    if cfg.top_k:
        scores = TopKLogitsWarper(cfg.top_k)(ids, scores)
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(ids, scores)
    if cfg.min_p:
        scores = MinPLogitsWarper(cfg.min_p)(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.3, top_k=7), SamplingConfig(temperature=1.0, top_p=0.8),
    SamplingConfig(temperature=0.9, top_k=20, top_p=0.6), SamplingConfig(temperature=1.0, min_p=0.1),
    SamplingConfig(temperature=0.8, top_p=0.95, min_p=0.05, repetition_penalty=1.3),
    SamplingConfig(temperature=1.0, top_k=1),
])
def test_filters_keep_what_transformers_keeps(cfg):
    """Kept tokens and their scores equal transformers' TemperatureLogitsWarper, TopK, TopP, MinP and
    RepetitionPenaltyLogitsProcessor (found here by bisection, not by sorting)."""
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((6, 500))).astype(np.float32)
    logits[0, :10] = logits[0, 0]  # ties at the top
    seen = [rng.integers(0, 500, 12).tolist() for _ in range(6)]
    seen_mask = np.zeros((6, 500), bool)
    for row, ids in enumerate(seen):
        seen_mask[row, ids] = True
    ours = np.asarray(process_logits(jnp.asarray(logits), cfg.traced(),
                                     jnp.asarray(seen_mask) if cfg.repetition_penalty != 1.0 else None))
    theirs = _hf_scores(logits, seen, cfg)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    kept = np.isfinite(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)
    assert 1 <= kept.sum(1).min() and (cfg.top_k == 0 and cfg.top_p == 1 and not cfg.min_p or kept.sum() < kept.size)


def test_draws_follow_the_filtered_distribution():
    """20000 draws per row land on each kept token with its renormalized probability (within 5 sigma
    of the binomial spread) and never on a filtered one."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((2, 40)), jnp.float32)
    cfg = SamplingConfig(temperature=0.8, top_k=12, top_p=0.9)
    probs = np.asarray(jax.nn.softmax(process_logits(logits, cfg.traced()), axis=-1))
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, 0.8, 12, 0.9)))(keys))
    for row in range(2):
        counts = np.bincount(draws[:, row], minlength=40) / len(keys)
        sigma = np.sqrt(probs[row] * (1 - probs[row]) / len(keys))
        assert np.all(np.abs(counts - probs[row]) <= 5 * sigma + 1e-9), (counts, probs[row])
        assert counts[probs[row] == 0].sum() == 0


@pytest.fixture
def tiny(tiny_lm):
    return tiny_lm[1]


PROMPTS = [[1, 2, 3, 4, 9, 11], [7, 8], [12, 13, 14]]


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.2),
                                 SamplingConfig(temperature=0.7)])
def test_returned_log_probs_equal_a_teacher_forced_forward(tiny, cfg):
    """Each sampled token's log-prob (log softmax(logits / temperature)) equals the one a full forward
    over prompt + completion gives: the same products, cached or not (fp32, 1e-5), whichever part of
    the cache a step reads (20 slots: widths 8, 16, 20), and whether it comes from the draw's own
    pass (no filter) or from the logits (filters and penalty on)."""
    ids, seg = left_pad(PROMPTS, 0, 8)
    out = jax.jit(lambda i, s, k: sample(tiny, i, s, k, cfg.traced(), max_new_tokens=20, eos_ids=(5,), pad_id=0,
                                         num_generations=2))(jnp.asarray(ids), jnp.asarray(seg), jax.random.key(3))
    assert out.tokens.shape == (6, 20) and out.lengths.min() >= 1 and out.lengths.max() > 16
    for row in range(6):
        prompt = PROMPTS[row // 2]
        n = int(out.lengths[row])
        full = np.asarray(prompt + np.asarray(out.tokens[row, :n]).tolist())[None]
        logits = np.asarray(tiny(jnp.asarray(full)), np.float64)[0] / 0.7
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        want = [logp[len(prompt) - 1 + j, full[0, len(prompt) + j]] for j in range(n)]
        np.testing.assert_allclose(np.asarray(out.logps[row, :n]), want, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(out.logps[row, n:]) == 0)


def test_shared_prefill_equals_the_prompt_repeated(tiny):
    """G completions from one prefill repeated G ways are the completions of the prompt repeated G
    times, with the same keys (greedy and sampled)."""
    ids, seg = left_pad(PROMPTS, 0, 8)
    rep_ids, rep_seg = np.repeat(ids, 4, axis=0), np.repeat(seg, 4, axis=0)
    for cfg in (SamplingConfig(), SamplingConfig(temperature=1.0, top_k=20)):
        def run(i, s, g):
            return jax.jit(lambda i, s: sample(tiny, i, s, jax.random.key(5), cfg.traced(), max_new_tokens=12,
                                               eos_ids=(5,), pad_id=0, num_generations=g))(jnp.asarray(i), jnp.asarray(s))
        shared, repeated = run(ids, seg, 4), run(rep_ids, rep_seg, 1)
        np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
        np.testing.assert_allclose(np.asarray(shared.logps), np.asarray(repeated.logps), atol=1e-5)
    assert len({tuple(np.asarray(shared.tokens[r])) for r in range(4)}) > 1  # sampled rows of a group differ


def test_rollout_compiles_once_across_settings_and_uses_the_state_it_is_given(tiny):
    from flax import nnx

    graphdef, state = nnx.split(tiny)
    empty = nnx.State({})
    calls = []
    rollout = make_rollout(graphdef, max_new_tokens=6, eos_ids=[5], pad_id=0, num_generations=2)
    ids, seg = (jnp.asarray(a) for a in left_pad(PROMPTS, 0, 8))
    a = rollout(state, empty, ids, seg, jax.random.key(0), SamplingConfig(temperature=1.0).traced())
    b = rollout(state, empty, ids, seg, jax.random.key(1), SamplingConfig(temperature=0.5, top_k=3, top_p=0.9,
                                                                         min_p=0.1).traced())
    calls.append(rollout._cache_size())
    assert calls == [1]  # new settings and keys: no recompilation
    zeroed = jax.tree.map(jnp.zeros_like, state)  # another state: its own outputs (nothing kept from before)
    c = rollout(zeroed, empty, ids, seg, jax.random.key(0), SamplingConfig(temperature=1.0).traced())
    np.testing.assert_allclose(np.asarray(c.logps)[np.asarray(c.logps) != 0], -np.log(64), rtol=1e-6)  # uniform
    assert not np.allclose(np.asarray(a.logps), np.asarray(c.logps))
    assert rollout._cache_size() == 1 and a.tokens.shape == b.tokens.shape == (6, 6)


def test_dropping_ended_rows_changes_no_token(tiny):
    """The decode loop that drops ended rows (batch 24 -> 16 -> 8 as completions end) samples exactly
    what the full-batch loop samples: the same tokens, lengths and finish flags, the same log-probs
    up to the products' rounding at another batch size; the phases really run (three loops)."""
    from jaxtune.generate import compaction_sizes

    prompts = [[1, 2, 3, 4, 9, 11], [7, 8], [12, 13, 14], [20, 21], [30], [40, 41, 42]]
    ids, seg = left_pad(prompts, 0, 8)
    eos = (5, 6, 7, 8)  # ~1 in 16 tokens ends a row: rows end all along the 24 steps
    cfg = SamplingConfig(temperature=1.0, top_p=0.95)
    assert compaction_sizes(24) == [24, 16, 8] and compaction_sizes(64) == [64, 48, 32, 24, 16, 8]

    def run(compact):
        fn = jax.jit(lambda i, s, k: sample(tiny, i, s, k, cfg.traced(), max_new_tokens=24, eos_ids=eos, pad_id=0,
                                            num_generations=4, compact=compact))
        loops = str(jax.make_jaxpr(fn)(jnp.asarray(ids), jnp.asarray(seg), jax.random.key(7))).count("while[")
        return fn(jnp.asarray(ids), jnp.asarray(seg), jax.random.key(7)), loops

    (full, loops_full), (dropped, loops_dropped) = run(False), run(True)
    assert (loops_full, loops_dropped) == (1, 3)
    lengths = np.asarray(full.lengths)
    assert lengths.min() < 12 and lengths.max() == 24 and 16 < np.asarray(full.finished).sum() < 24
    for name in ("tokens", "lengths", "finished"):
        np.testing.assert_array_equal(np.asarray(getattr(dropped, name)), np.asarray(getattr(full, name)))
    np.testing.assert_allclose(np.asarray(dropped.logps), np.asarray(full.logps), rtol=1e-5, atol=1e-5)
