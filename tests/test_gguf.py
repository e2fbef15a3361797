"""The bundled SmolLM2 GGUF: conversion equals transformers' GGUF loader; logits match transformers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from jaxtune import bundled
from jaxtune.checkpoint.gguf import _unpermute


def test_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    assert np.array_equal(_unpermute(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)


@pytest.fixture(scope="module")
def hf_from_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled.gguf_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def test_conversion_equals_transformers_gguf_loader(smollm2_dir, hf_from_gguf):
    hf_model, hf_tok = hf_from_gguf
    ours = load_file(smollm2_dir / "model.safetensors")
    reference = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied to embed_tokens
    for name, value in ours.items():
        assert value.dtype == np.float32
        assert np.array_equal(value, reference[name]), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(hf_model.config, key), key
    assert config["rms_norm_eps"] == pytest.approx(hf_model.config.rms_norm_eps)
    assert config["rope_parameters"]["rope_theta"] == hf_model.config.rope_parameters["rope_theta"] == 100000.0

    from transformers import AutoTokenizer

    ours_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["Hello world!", "  two spaces\n\ttab 12345 3.14159", "<|im_start|>user\nhi<|im_end|>",
             "émojis 🤗 ünïcödé 漢字", "def f(x):\n    return x**2  # c", "<repo_name> </s> <unk>"]
    for text in texts:
        assert ours_tok(text)["input_ids"] == hf_tok(text)["input_ids"], text
        ids = hf_tok(text)["input_ids"]
        assert ours_tok.decode(ids) == hf_tok.decode(ids)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert ours_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours_tok.eos_token == "<|im_end|>" and ours_tok.chat_template


def test_bundled_cache_is_reused(smollm2_dir):
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert bundled.prepare("smollm2") == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
    model, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Explain gravity in one sentence."}],
                                         tokenize=False, add_generation_prompt=True)
    ids = np.asarray([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected = smollm2_hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    assert np.abs(got - expected).max() <= 1e-3
