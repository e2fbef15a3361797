"""GPT-NeoX (Pythia) behind the family contract: logits of every config switch against transformers,
a LoRA step against PEFT, HF -> jaxtune -> HF bit-exact, greedy decoding equal to transformers' generate,
QLoRA trains, the exported adapter loads in PEFT with equal logits; and the contract itself: a family
is its module plus one line in the registry."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, save_tiny
from families import check_greedy_matches_transformers, check_qlora_trains_and_adapter_loads, check_round_trip_is_bit_exact
from test_train_step import check_lora_steps_match_peft
from transformers import GPTNeoXConfig

import jaxtune
from jaxtune.checkpoint.hf import load_model

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
CASES = {
    "pythia-parallel-partial-rope": dict(),  # rotary_pct 0.25, parallel residual, biases: Pythia's defaults
    "sequential-residual": dict(use_parallel_residual=False),
    "full-rope-no-bias": dict(rotary_pct=1.0, attention_bias=False),
    "gelu-tanh-rope-linear": dict(hidden_act="gelu_new", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tied": dict(tie_word_embeddings=True, rotary_emb_base=500.0),
}
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def _config(**kw) -> GPTNeoXConfig:
    return GPTNeoXConfig(**{**BASE, **kw})


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("neox"), _config(), "neox")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    path = save_tiny(tmp_path, _config(**CASES[case]), "neox")
    ids = np.random.default_rng(0).integers(0, 96, (2, 20))
    model, _ = jaxtune.load_pretrained(path)
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    assert np.abs(got - hf_logits(path, ids)).max() <= 1e-4, case


def test_config_switches_are_read(tmp_path):
    cfg = load_model(save_tiny(tmp_path, _config(use_parallel_residual=False, rotary_pct=0.5), "n")).cfg
    assert (cfg.architecture, cfg.parallel_residual, cfg.rotary_dim, cfg.head_dim) == \
        ("GPTNeoXForCausalLM", False, 8, 16)
    with pytest.raises(jaxtune.errors.ModelLoadError, match="hidden_act 'swish' is not supported for GPT-NeoX"):
        load_model(save_tiny(tmp_path / "bad", _config(hidden_act="swish"), "n"))


def test_round_trip_is_bit_exact(tmp_path, neox_dir):
    check_round_trip_is_bit_exact(neox_dir, tmp_path / "out")


def test_greedy_matches_transformers_generate(neox_dir):
    check_greedy_matches_transformers(neox_dir)


def test_lora_steps_match_peft(neox_dir):
    """LoRA on the fused query_key_value and the other projections, by PEFT's own module names."""
    check_lora_steps_match_peft(neox_dir, TARGETS)


def test_qlora_trains_and_adapter_loads_in_peft(tmp_path, neox_dir):
    check_qlora_trains_and_adapter_loads(neox_dir, tmp_path, TARGETS)


def test_a_family_is_its_module_and_one_registry_line():
    """No module outside jaxtune/models/<family>.py and the registry names a family module or a family's
    parameter names: the shared code reaches families through the contract (family_for)."""
    root = Path(jaxtune.__file__).parent
    from jaxtune.models import FAMILY_MODULES

    names = {f.__name__.rsplit(".", 1)[-1] for f in FAMILY_MODULES}
    assert names >= {"llama", "gpt_neox"}
    pattern = re.compile(r"models\.(" + "|".join(names) + r")\b|models import (" + "|".join(names) + r")\b")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.parent.name != "models" and pattern.search(p.read_text())]
    assert not offenders, offenders
    # LoRA and NF4 come by model surgery from peft/: the models know neither
    surgery = re.compile(r"jaxtune\.peft|kernels\.nf4|\blora_[ab]\b|lora_gate|lora_scale|QuantizedKernel|nf4_")
    knowing = [p.name for p in (root / "models").glob("*.py") if surgery.search(p.read_text())]
    assert not knowing, knowing
    for family in FAMILY_MODULES:
        for attr in ("ARCHITECTURES", "config_from_hf", "CausalLM", "hf_tensor_name", "LORA_TARGETS"):
            assert hasattr(family, attr), (family.__name__, attr)
    from jaxtune.models import SUPPORTED_ARCHITECTURES, family_for

    assert {"GPTNeoXForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"} <= set(SUPPORTED_ARCHITECTURES)
    with pytest.raises(jaxtune.errors.ModelLoadError, match="'GemmaForCausalLM' is not supported; supported: "
                       + re.escape(", ".join(SUPPORTED_ARCHITECTURES))):
        family_for("GemmaForCausalLM")


def test_lora_targets_are_checked_against_the_family(tmp_path, neox_dir, capsys):
    """Llama's projection names on a GPT-NeoX checkpoint: `jaxtune validate` names the family's own."""
    from jaxtune.cli import main

    path = tmp_path / "c.yml"
    path.write_text(f"base_model: {neox_dir}\nadapter: lora\nlora_target_modules: [q_proj, dense]\n"
                    f"datasets:\n  - path: {tmp_path}\n    type: completion\n")
    assert main(["validate", str(path)]) == 2
    assert ("q_proj are not projections of GPTNeoXForCausalLM's layers; it has query_key_value, dense, "
            "dense_h_to_4h, dense_4h_to_h") in capsys.readouterr().err
