"""SIGKILL mid-run, then the same command again: the run resumes from the last complete checkpoint
and ends with the same losses and parameters as a run that was never killed (fp32, 1e-6: the same
computation on the same machine). For SFT with LoRA; for DPO with full fine-tuning, whose reference
is a frozen copy of the starting weights that the resumed run must rebuild from the base model, not
from the checkpoint; and for GRPO with LoRA and a KL term, whose resumed run must sample the same
completions (the rollout keys and the prompt loader are part of the checkpoint)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from conftest import cpu_env

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATA = CONFIGS / "data"
KINDS = {
    "sft": {"datasets": [{"path": str(DATA / "quickstart_train.jsonl"), "type": "chat_template"}], "sequence_len": 256,
            "adapter": "lora", "lora_target_linear": True, "lora_r": 4, "lora_dropout": 0.1},
    "dpo": {"rl": "dpo", "datasets": [{"path": str(DATA / "dpo_train.jsonl"), "type": "chat_template.default"}],
            "sequence_len": 64, "learning_rate": 1e-4},
    "grpo": {"rl": "grpo", "datasets": [{"path": str(DATA / "grpo_train.jsonl"), "type": "prompt"}],
             "test_datasets": [{"path": str(DATA / "grpo_eval.jsonl"), "type": "prompt"}], "val_set_size": None,
             "sample_packing": False, "sequence_len": 64, "micro_batch_size": 8, "max_steps": 24, "save_steps": 8,
             "eval_steps": 24, "adapter": "lora", "lora_target_linear": True, "lora_r": 4,
             "trl": {"num_generations": 4, "max_completion_length": 12, "beta": 0.04,
                     "reward_funcs": ["grpo_rewards.final_number"]}},
}


def _write_config(tmp_path: Path, name: str, model_dir: Path, kind: str) -> Path:
    cfg = {
        "base_model": str(model_dir), "val_set_size": 16, "sample_packing": True, "micro_batch_size": 4,
        "max_steps": 40, "learning_rate": 1e-3, "warmup_ratio": 0.1, "save_steps": 10, "eval_steps": 20,
        "save_total_limit": 2, "output_dir": str(tmp_path / name), "dataset_prepared_path": str(tmp_path / "prep"),
        **KINDS[kind],
    }
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path) -> subprocess.Popen:
    env = cpu_env()
    # run from configs/, where GRPO's reward module is (imported from the working directory, as Axolotl does)
    return subprocess.Popen([sys.executable, "-m", "jaxtune.train", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(CONFIGS))


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sigkill_then_same_command_resumes_to_the_same_result(tmp_path, tiny_chat_dir, kind):
    straight = _train(_write_config(tmp_path, "a", tiny_chat_dir, kind))
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()

    config_b = _write_config(tmp_path, "b", tiny_chat_dir, kind)
    victim = _train(config_b)
    first_checkpoint = tmp_path / "b" / "checkpoints" / ("8" if kind == "grpo" else "10")
    deadline = time.time() + 600
    while not first_checkpoint.is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "b" / "hf").exists()
    again = _train(config_b)
    log = again.communicate(timeout=600)[1].decode()
    assert again.returncode == 0, log
    assert "resumed from" in log

    def records(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    a, b = records("a"), records("b")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins", "reward", "kl", "eval_reward"):
            if key in ra:
                np.testing.assert_allclose(rb[key], ra[key], rtol=1e-6, err_msg=f"{key} at step {ra['step']}")
    weights = "hf/model.safetensors" if kind == "dpo" else "adapter/adapter_model.safetensors"
    wa, wb = (load_file(str(tmp_path / name / weights)) for name in ("a", "b"))
    for key in wa:
        np.testing.assert_allclose(wb[key], wa[key], atol=1e-6, err_msg=key)
