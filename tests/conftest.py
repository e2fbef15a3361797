"""Shared fixtures: tiny random HF models saved to disk, and the bundled SmolLM2 converted once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
# Three quarters of the suite's time was XLA compiling hundreds of small programs (test_train_step.py:
# 105 of its 138 s in backend compiles). Two XLA:CPU options cut that: LLVM's optimization level 0, and
# the classic elemental emitters for fused loops instead of the newer MLIR fusion emitters (compiled
# slower here). A tiny LoRA train step compiles in 0.5 s instead of 3.8 s and runs in 7-11 ms
# instead of 2: tiny test models run in milliseconds either way (test_train_step.py 138 s -> 62 s).
# The programs compute the same operations (dots still run in XLA's library kernels; only the
# elementwise loops are emitted differently), so tolerances, which bound rounding, hold as before; a
# user's run keeps XLA's defaults. A flag the caller's XLA_FLAGS already sets is left as it is.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
for _flag in TEST_XLA_FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import margins  # noqa: E402  (JAXTUNE_MARGINS=file: how close each comparison sits to its tolerance)

if margins.ENABLED:
    margins.install()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(item):
        margins.set_test(item.nodeid)

    def pytest_sessionstart(session):
        margins.start(os.environ["JAXTUNE_MARGINS"])

    def pytest_sessionfinish(session):
        margins.write(os.environ["JAXTUNE_MARGINS"])


def cpu_env(devices: int | None = None, *, xla_defaults: bool = False, **extra: str) -> dict:
    """The environment for a subprocess: this one's, JAX on the CPU, the suite's XLA flags (XLA's
    defaults instead with `xla_defaults`, for runs timed as a user would run them), and exactly
    `devices` forced host devices (one when None: a forced count in the caller's XLA_FLAGS is dropped)."""
    drop = ("--xla_force_host_platform_device_count",) + (TEST_XLA_FLAGS if xla_defaults else ())
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith(drop)]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags), **extra}


def run_example(config: Path, model_dir: Path, tmp_path: Path) -> list[dict]:
    """A shipped example config trained as its user runs it (`python -m jaxtune.train --config ...`, XLA's
    defaults: the suite's compile-speed flags would slow these long runs) from another working directory
    (the config's relative paths resolve next to it), on `model_dir`, writing under `tmp_path`: the run's
    metrics.jsonl records."""
    proc = subprocess.run([sys.executable, "-m", "jaxtune.train", "--config", str(config), f"base_model={model_dir}",
                           f"output_dir={tmp_path / 'out'}", f"dataset_prepared_path={tmp_path / 'prep'}"],
                          cwd=tmp_path, env=cpu_env(xla_defaults=True), capture_output=True, text=True, timeout=20 * 60)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def save_tiny(tmp_path: Path, config, name: str = "model", dtype=None, edit_config=None) -> Path:
    """Instantiate a random transformers model from `config`, save it, return the directory.

    `config` is copied first: transformers' save_pretrained writes the saved dtype into the config
    object, and a shared config (a module-level case table) saved once in bf16 would make every later
    model built from it bf16 too, silently turning fp32 tests into bf16 ones."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
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
def tiny_lm(tmp_path_factory):
    """(directory, jaxtune model) of a tiny random Llama: 64 tokens, EOS 5 (sampler and generation tests)."""
    import jaxtune
    from transformers import LlamaConfig

    path = save_tiny(tmp_path_factory.mktemp("tiny_lm"), LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=5))
    return path, jaxtune.load_pretrained(path)[0]


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


@pytest.fixture(scope="session")
def tiny_words_dir(tmp_path_factory):
    """A tiny random Llama over a 64-word vocabulary with a word-level tokenizer ("w0" ... "w63"; w0 pad,
    w1 BOS, w2 EOS, w3 unknown): a reward function can read the sampled tokens as words, and a
    random model emits any one of them often enough for GRPO's groups to differ."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="w1", eos_token="w2", pad_token="w0",
                                        unk_token="w3")
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    out = save_tiny(tmp_path_factory.mktemp("tiny_words"), cfg, "words")
    tokenizer.save_pretrained(out)
    return out


# -- comparing parameters after optimizer steps --------------------------------------------------
# Adam divides each element's step by the root of that element's own second moment. An element whose
# gradient is near zero therefore moves by up to lr per step in a direction that rounding decides:
# a last-bit difference in one gradient (another CPU's matmul kernel) moved a parameter by 1.2e-6
# after two steps. Element by element, two correct runs can differ by up to 2 * lr * steps, on any
# machine. The update of a whole tensor is well conditioned: only a few elements are near zero, so the
# tensor's update error relative to its update stays near fp32 rounding (measured <= 1e-5 here and
# under every --xla_cpu_max_isa). A real error (a wrong, missing or extra gradient term) changes
# Adam's normalized step of every element it touches by O(1), so a tensor it touches is off by a
# relative 1e-1 or more. UPDATE_RTOL = 1e-3 sits 100x above rounding and 100x below a real error.
# In a small tensor one such element alone can exceed it (a 64 x 4 LoRA A of Gemma 2: one element off
# by 5e-5 = 1.6e-3 of the tensor's update, every other one within 2e-7), so the tensor-level check
# leaves out its worst 1% of elements (at least one), each still held to the element bound; a real
# error touches far more than 1% of a tensor.
UPDATE_RTOL = 1e-3


def assert_updates_close(before, after, reference_after, *, lr: float, steps: int, rtol: float = UPDATE_RTOL,
                         names=None) -> None:
    """Parameters after `steps` optimizer steps against a reference run from the same `before`.

    Per tensor: ||update - reference update|| over all but its worst 1% of elements <= rtol *
    ||reference update|| (plus fp32 rounding of the parameters themselves), and no element differs by
    more than Adam can move it (2 * lr * steps).
    """
    names = names or [str(i) for i in range(len(before))]
    for name, b, a, r in zip(names, before, after, reference_after, strict=True):
        b, a, r = (np.asarray(x, np.float64) for x in (b, a, r))
        update, reference = a - b, r - b
        # fp32 rounding of the stored parameters (one ulp of each) bounds what a zero update can show
        floor = 4 * np.finfo(np.float32).eps * np.linalg.norm(r)
        diffs = np.sort(np.abs(update - reference).ravel())
        err = np.linalg.norm(diffs[: diffs.size - max(1, diffs.size // 100)]) if diffs.size > 1 else diffs.sum()
        margins.note(err / (rtol * np.linalg.norm(reference) + floor) if err else 0.0)
        if margins.RECORD_ONLY:
            continue
        assert err <= rtol * np.linalg.norm(reference) + floor, (
            f"{name}: update differs by {err:.3g}, {err / max(np.linalg.norm(reference), 1e-30):.3g} of its norm "
            f"(tolerance {rtol})")
        worst = np.abs(update - reference).max(initial=0.0)
        assert worst <= 2 * lr * steps + floor, f"{name}: an element differs by {worst:.3g} > 2 * lr * steps"
