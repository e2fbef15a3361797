"""scripts/bench_gpu.py --smoke: every part of the GPU benchmark runs its real code paths at tiny
shapes on the CPU, so the script is ready whenever a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import cpu_env

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke(tmp_path):
    env = cpu_env()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "errors.txt").read_text().strip() == "", (tmp_path / "errors.txt").read_text()[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "table.txt").read_text()
    assert "could not run" not in table and "not run (the time" not in table, table

    train = {(r["framework"], r["mode"]) for r in results["train"]}
    assert train == {("jaxtune", "lora"), ("HF+PEFT sdpa", "lora"), ("jaxtune", "full"), ("HF sdpa", "full")}
    for r in results["train"]:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["first_step_s"] > 0
        # both frameworks train the same random-token rows from random weights: the loss sits near ln(vocab)
        assert abs(r["loss"] - 6.24) < 0.3, r
    attention = results["attention"]
    assert set(attention["backends"]) == {"xla", "blockwise"}
    for row in attention["rows"]:
        assert all(row[b]["ms"] > 0 for b in attention["backends"]), row
    (rollout,) = results["rollout"]
    assert rollout["jaxtune"]["sampled"] == rollout["jaxtune"]["tokens"]  # no EOS: every row runs to the end
    assert rollout["jaxtune"]["tokens_per_s"] > 0 and rollout["hf"]["tokens_per_s"] > 0
    assert {b["mode"] for b in results["breakdown"]} == {"lora", "full"}
    for b in results["breakdown"]:
        assert all(b[k] > 0 for k in ("matmuls_s", "head_s", "attention_s", "adamw_s")), b
    assert "targets:" in table and "total" in table
