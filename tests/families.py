"""Checks every model family passes (used by the per-family test files): HF -> jaxtune -> HF bit-exact,
and greedy decoding through the KV cache equal to transformers' generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

import jaxtune


def check_round_trip_is_bit_exact(model_dir: Path, out: Path) -> None:
    model, _ = jaxtune.load_pretrained(model_dir)
    written = jaxtune.save_pretrained(model, out)
    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(written / "model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name


def check_greedy_matches_transformers(model_dir: Path, eos: int = 2, pad: int = 0) -> None:
    """Two prompts of different lengths in one left-padded batch, 12 new tokens each."""
    from transformers import AutoModelForCausalLM

    from jaxtune.generate import Sampler, SamplingConfig

    model, _ = jaxtune.load_pretrained(model_dir)
    prompts = [[5, 17, 33, 8], [40, 41, 3, 9, 11, 60]]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = Sampler(model, eos_token_ids=[eos], pad_token_id=pad)(prompts, SamplingConfig(max_new_tokens=12))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=pad)
        assert out.tokens[row, : out.lengths[row]].tolist() == ref[0, len(prompt):].tolist(), prompt
