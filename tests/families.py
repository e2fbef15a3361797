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


def check_qlora_trains_and_adapter_loads(model_dir: Path, tmp_path: Path, targets: list[str], **keys) -> None:
    """QLoRA (NF4 projections) through `jaxtune.train` on a family's tiny model (vocabulary 96): the loss
    falls, the adapter names the family's PEFT targets, and the exported PEFT adapter on the base model
    gives the merged export's logits in transformers + PEFT."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxtune import train
    from jaxtune.config import build_config

    rows = [{"text": " ".join(str(5 + (i * 7 + j) % 80) for j in range(24))} for i in range(32)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok_dir = tmp_path / "tok"
    word_tokenizer(tok_dir)
    cfg = build_config({"base_model": str(model_dir), "tokenizer_config": str(tok_dir),
                        "datasets": [{"path": str(data), "type": "completion"}], "sequence_len": 32,
                        "adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True, "lora_r": 8,
                        "lora_alpha": 16, "micro_batch_size": 4, "max_steps": 20, "learning_rate": 5e-3,
                        "lr_scheduler": "constant", "output_dir": str(tmp_path / "out"),
                        "dataset_prepared_path": str(tmp_path / "prep"), "save_strategy": "no", **keys})
    train.run(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.3, losses
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(targets)
    # QLoRA trains against the NF4-dequantized base, and the merged export holds it plus the adapter: the
    # PEFT adapter on that same base (exported from the quantized model without an adapter) must give
    # the merged export's logits, to fp32 rounding
    from jaxtune.checkpoint.hf import load_model, load_model_config
    from jaxtune.peft.qlora import mark_quantized, quantizing_place

    place = quantizing_place(None, architecture=load_model_config(model_dir).architecture,
                             double_quant=cfg.bnb_4bit_use_double_quant, experts=cfg.quantize_moe_experts)
    nf4 = mark_quantized(load_model(model_dir, place=place))
    jaxtune.save_pretrained(nf4, tmp_path / "nf4_base")
    ids = np.random.default_rng(1).integers(0, 96, (1, 16))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4_base", dtype=torch.float32)
    with torch.no_grad():
        plain = base(torch.tensor(ids)).logits.numpy()  # before PEFT wraps (and changes) `base`
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter"))
    with torch.no_grad():
        merged_logits = merged(torch.tensor(ids)).logits.numpy()
        adapted = peft_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(adapted - plain).max() > 1e-2  # the adapter changes the logits
    assert np.abs(adapted - merged_logits).max() <= 1e-4 * max(1.0, np.abs(merged_logits).max())


def word_tokenizer(out: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary: tokens '0' .. '95'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="1", eos_token="2", pad_token="0", unk_token="0")
    fast.save_pretrained(str(out))
