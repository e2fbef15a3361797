"""The KV-cache sampler: greedy parity with transformers, one compile, EOS stops, sampling, adapters, CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxtune
from jaxtune.cli import main
from jaxtune.generate import Sampler, SamplingConfig, encode_prompts, generate, sample_logits

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def test_greedy_matches_transformers_generate(smollm2, smollm2_hf):
    model, tokenizer = smollm2
    results = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=32))  # one batch
    for prompt, result in zip(PROMPTS, results):
        ids = encode_prompts(tokenizer, [prompt])[0]
        with torch.no_grad():
            out = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        expected = out[0, len(ids):].tolist()
        assert result.token_ids == expected, prompt
    assert results[0].finish_reason == "eos" and results[0].token_ids[-1] == tokenizer.eos_token_id
    assert "Paris" in results[0].text


@pytest.fixture
def tiny(tiny_lm):
    return tiny_lm


def test_decode_with_cache_equals_full_forward(tiny):
    """Token-by-token decoding through the cache gives the logits of one full forward pass."""
    from jaxtune.models.cache import KVCache

    _, model = tiny
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)))
    full = model(ids)
    cache = KVCache.create(model.cfg, 2, 16, jnp.float32)
    ones = jnp.ones((2, 4), jnp.int32)
    hidden, cache = model.decode(ids[:, :4], ones, jnp.broadcast_to(jnp.arange(4), (2, 4)), cache)
    steps = [model.logits(hidden)]
    for t in range(4, 10):
        hidden, cache = model.decode(ids[:, t:t + 1], ones[:, :1], jnp.full((2, 1), t), cache)
        steps.append(model.logits(hidden))
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1), np.asarray(full), atol=1e-5)


def test_compiles_once_and_stops_at_eos(tiny):
    _, model = tiny
    sampler = Sampler(model, eos_token_ids=[5], pad_token_id=0)
    traces = []
    original = sampler._generate

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    sampler._compiled = jax.jit(counting, static_argnames=("max_new_tokens",))
    prompts = [[1, 2, 3], [4, 6, 7, 8, 9]]
    a = sampler(prompts, SamplingConfig(max_new_tokens=20))
    b = sampler([[9, 8], [3, 3, 3]], SamplingConfig(max_new_tokens=20, temperature=0.8, top_k=5, seed=3))
    assert len(traces) == 1  # same shapes, different values and sampling settings: no recompilation
    for out in (a, b):
        for row in range(2):
            n = out.lengths[row]
            if out.finished[row]:
                assert out.tokens[row, n - 1] == 5 and 5 not in out.tokens[row, : n - 1]
                assert (out.tokens[row, n:] == 0).all()
            else:
                assert n == 20


def test_sampling_filters_and_seeds():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    key = jax.random.key(0)
    greedy = np.asarray(jnp.argmax(logits, -1))
    assert np.array_equal(np.asarray(sample_logits(logits, key, 0.0, 0, 1.0)), greedy)
    assert np.array_equal(np.asarray(sample_logits(logits, key, 1.5, 1, 1.0)), greedy)  # top_k=1
    assert np.array_equal(np.asarray(sample_logits(logits, key, 1.0, 0, 1e-6)), greedy)  # tiny top_p
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    for seed in range(20):
        s = np.asarray(sample_logits(logits, jax.random.key(seed), 2.0, 3, 1.0))
        assert all(s[i] in top3[i] for i in range(4))
    a = sample_logits(logits, jax.random.key(7), 1.0, 0, 0.9)
    b = sample_logits(logits, jax.random.key(7), 1.0, 0, 0.9)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sampling_config_rejects_bad_values():
    with pytest.raises(jaxtune.JaxtuneError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(jaxtune.JaxtuneError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_adapter_merge_matches_peft(tmp_path, tiny):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    path, _ = tiny
    base = AutoModelForCausalLM.from_pretrained(path)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                      use_rslora=True)
    peft_model = get_peft_model(base, lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter").eval()
    ids = np.random.default_rng(0).integers(0, 64, (1, 12))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    from jaxtune.peft.adapter import merge_peft_adapter

    model, _ = jaxtune.load_pretrained(path)
    plain = np.asarray(model(jnp.asarray(ids)))
    merge_peft_adapter(model, tmp_path / "adapter")
    got = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(plain - expected).max() > 1e-3  # the adapter changes the output
    assert np.abs(got - expected).max() <= 1e-4


def test_cli_generate_json_batches_prompts(smollm2_dir, capsys):
    rc = main(["generate", "--model", str(smollm2_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2],
               "--max-new-tokens", "8", "--json"])
    assert rc == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in results] == [PROMPTS[0], PROMPTS[2]]
    assert all(1 <= len(r["token_ids"]) <= 8 for r in results)
    assert results[0]["text"].startswith("The capital of France is")


def test_cli_generate_sampling_is_reproducible(smollm2_dir, capsys):
    args = ["generate", "--model", str(smollm2_dir), "--prompt", "Tell me a story.", "--max-new-tokens", "12",
            "--temperature", "0.9", "--top-p", "0.9", "--top-k", "40", "--seed", "11", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == first
