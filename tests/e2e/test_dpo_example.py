"""configs/dpo.yml end to end on the bundled SmolLM2-135M-Instruct (slow: minutes on 2 cores): LoRA DPO
learns a preference the base model does not hold, held-out rewards/accuracies >= 0.9."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_example

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "dpo.yml"


@pytest.mark.slow
def test_dpo_example_learns_the_preference(tmp_path, smollm2_dir):
    records = run_example(CONFIG, smollm2_dir, tmp_path)
    final = [r for r in records if "eval_rewards/accuracies" in r][-1]
    assert final["eval_rewards/accuracies"] >= 0.9, final
    assert final["eval_rewards/margins"] > 0
