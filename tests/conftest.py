"""Shared fixtures: tiny random HF models saved to disk, and the bundled SmolLM2 converted once."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing in the tests may reach the hub, and `datasets` caches into a throw-away directory.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="jaxtune-test-datasets-"))
# float32 references mean float32: on a GPU, XLA would otherwise multiply float32 in TF32.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def save_tiny(tmp_path: Path, config, name: str = "model", dtype=None, edit_config=None) -> Path:
    """Instantiate a random transformers model from `config`, save it, return the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms and biases so they are really tested
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    out = tmp_path / name
    model.save_pretrained(out)
    if edit_config is not None:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def hf_logits(model_dir: Path, ids: np.ndarray, **kwargs) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The bundled SmolLM2 converted from its GGUF into a fresh cache (not the user's)."""
    from jaxtune import bundled

    home = tmp_path_factory.mktemp("jaxtune_home")
    old = os.environ.get("JAXTUNE_HOME")
    os.environ["JAXTUNE_HOME"] = str(home)
    try:
        yield bundled.prepare("smollm2")
    finally:
        if old is None:
            os.environ.pop("JAXTUNE_HOME", None)
        else:
            os.environ["JAXTUNE_HOME"] = old


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    import jaxtune

    return jaxtune.load_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    """SmolLM2's tokenizer (chatml chat template, eos <|im_end|>, no BOS added)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's tokenizer and vocabulary (so real chat data trains it)."""
    import shutil

    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    out = save_tiny(tmp_path_factory.mktemp("tiny_chat"), cfg, "tiny")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (smollm2_dir / f).exists():
            shutil.copy(smollm2_dir / f, out / f)
    return out
