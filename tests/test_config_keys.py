"""Every key of Axolotl's schema has exactly one status in jaxtune, the config reference is generated
from the schema, `jaxtune validate` reports what it mapped and what has no effect, and the mapped keys
do what Axolotl does with them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny

from jaxtune.config import ConfigError, build_config
from jaxtune.config.base import AXOLOTL_KEYS
from jaxtune.config.keys import SECTIONS, key_statuses

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).resolve().parent / "axolotl_configs"


def test_every_axolotl_key_has_one_status():
    """Each key of Axolotl's schema (top level, plugin keys, dataset entries, user-defined types, trl:) is
    implemented, mapped, without effect or an error -- exactly one of them."""
    assert AXOLOTL_KEYS["axolotl_version"] and len(AXOLOTL_KEYS["top"]) > 300
    missing, doubled = [], []
    for section in SECTIONS:
        for key in AXOLOTL_KEYS[section]:
            statuses = key_statuses(section, key)
            if not statuses:
                missing.append(f"{section}.{key}")
            elif len(statuses) > 1:
                doubled.append(f"{section}.{key}: {[s for s, _ in statuses]}")
    assert not missing, f"Axolotl keys without a status (add them to config/key_status.yaml): {missing}"
    assert not doubled, f"Axolotl keys with several statuses: {doubled}"


def test_config_reference_is_generated_from_the_schema():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny local model, one with repository code (auto_map), and the repository's data files."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("axolotl_configs")
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    model = save_tiny(root, cfg, "model")
    remote = root / "remote"
    shutil.copytree(model, remote)
    raw = json.loads((remote / "config.json").read_text())
    raw["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (remote / "config.json").write_text(json.dumps(raw))
    return {"MODEL": str(model), "REMOTE_MODEL": str(remote),
            "DATA_PROMPTS": str(ROOT / "configs" / "data" / "grpo_train.jsonl"),
            "DATA": str(ROOT / "configs" / "data" / "quickstart_train.jsonl")}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yml")))
def test_validate_axolotl_style_configs(name, sources, tmp_path, capsys):
    """`jaxtune validate` over Axolotl-style configs written for this repository, one per key status: the
    resolved config, one line per mapped / no-effect key, and clear errors for missing features."""
    from jaxtune.cli import main

    text = (CONFIGS / name).read_text()
    for placeholder, value in sources.items():
        text = re.sub(rf"\b{placeholder}\b", value, text)
    path = tmp_path / name
    path.write_text(text)
    shutil.copy(ROOT / "configs" / "grpo_rewards.py", tmp_path / "grpo_rewards.py")
    expect = re.search(r"^# expect: (.*)$", text, re.M).group(1)
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    if expect.startswith("error: "):
        assert code == 2 and re.search(expect.removeprefix("error: "), err), err
        return
    assert code == 0, err
    resolved = yaml.safe_load(out)
    for line in re.findall(r"^# expect-line: (.*)$", text, re.M):
        assert any(l.startswith(f"#   {line}") for l in out.splitlines()), (line, out[-2000:])
    for item in re.findall(r"^# expect-resolved: (.*)$", text, re.M):
        key, value = item.split(": ", 1)
        assert resolved[key] == yaml.safe_load(value), (key, resolved.get(key))


def _cfg(**keys):
    return build_config({"base_model": "x", "datasets": [{"path": "d.jsonl", "type": "completion"}], **keys})


def test_mapped_keys_do_what_axolotl_does():
    assert _cfg(batch_size=16, micro_batch_size=4).gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match="batch_size 16 means gradient_accumulation_steps: 4, but"):
        _cfg(batch_size=16, micro_batch_size=4, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="batch_size 10 is not a multiple of micro_batch_size 4"):
        _cfg(batch_size=10, micro_batch_size=4)
    assert _cfg(cut_cross_entropy=False).chunked_cross_entropy is False
    assert _cfg(plugins=["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]).chunked_cross_entropy
    assert _cfg(float32=True).bf16 is False
    assert _cfg(evaluation_strategy="epoch").eval_strategy == "epoch"
    with pytest.raises(ConfigError, match="jaxtune cannot load Axolotl plugins"):
        _cfg(plugins=["my_company.plugins.Custom"])
    with pytest.raises(ConfigError, match="'trl.entropy_coef' is not supported: the entropy bonus"):
        _cfg(rl="grpo", trl={"reward_funcs": ["m.f"], "entropy_coef": 0.1})
    with pytest.raises(ConfigError, match=r"datasets\[0\]: 'field_tools' is not supported: a column of tool"):
        _cfg(datasets=[{"path": "d.jsonl", "type": "chat_template", "field_tools": "tools"}])
    # an off value of a missing feature is accepted silently (Axolotl configs write `key: false` often)
    assert _cfg(use_pose=False, fp8=None, relora=False).optimizer == "adamw_torch_fused"


def test_evals_per_epoch_zero_and_eval_strategy_no_turn_eval_off():
    """As Axolotl: evals_per_epoch: 0 or eval_strategy: no means no evaluation at all, with an eval set."""
    from jaxtune.trainer import make_plan

    assert make_plan(_cfg(evals_per_epoch=0), 40, has_eval=True).eval_every is None
    assert make_plan(_cfg(eval_strategy="no"), 40, has_eval=True).eval_every is None
    assert make_plan(_cfg(evals_per_epoch=4), 40, has_eval=True).eval_every == 10
    assert make_plan(_cfg(), 40, has_eval=True).eval_every == 40
