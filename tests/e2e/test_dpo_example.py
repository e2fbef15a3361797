"""configs/dpo.yml end to end on the bundled SmolLM2-135M-Instruct (slow: minutes on 2 cores): LoRA DPO
learns a preference the base model does not hold, held-out rewards/accuracies >= 0.9."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cpu_env

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "dpo.yml"


@pytest.mark.slow
def test_dpo_example_learns_the_preference(tmp_path, smollm2_dir):
    # the user's command, with XLA's defaults (the suite's compile-speed flags would slow this long run)
    proc = subprocess.run([sys.executable, "-m", "jaxtune.train", "--config", str(CONFIG), f"base_model={smollm2_dir}",
                           f"output_dir={tmp_path / 'out'}", f"dataset_prepared_path={tmp_path / 'prep'}"],
                          env=cpu_env(xla_defaults=True), capture_output=True, text=True, timeout=20 * 60)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval_rewards/accuracies" in r][-1]
    assert final["eval_rewards/accuracies"] >= 0.9, final
    assert final["eval_rewards/margins"] > 0
