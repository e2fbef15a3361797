"""DPO on the bundled SmolLM2-135M-Instruct (configs/dpo.yml), with before/after figures.

1. before: on the 64 held-out pairs (configs/data/dpo_eval.jsonl, never trained on), how often the
   base model already gives the chosen answer the higher log-probability, and the held-out
   rewards/accuracies of the untrained policy (the policy is the reference: every pair ties, 0);
2. `python -m jaxtune.train --config configs/dpo.yml` (the same code path): 24 DPO steps with LoRA;
3. after: the final held-out rewards/accuracies and margins (TRL's definitions), and the same log-prob
   preference for the exported merged model (output_dir/hf, as transformers would load it), with a
   few pairs' log-prob margins (chosen - rejected) side by side.

    .venv/bin/python scripts/dpo_example.py [key=value ...]    # overrides for configs/dpo.yml
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "dpo.yml"
EVAL_ROWS = REPO / "configs" / "data" / "dpo_eval.jsonl"


def preference(model_dir, data):
    """Summed log-prob margins (chosen - rejected) of the held-out pairs, in row order."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxtune
    from jaxtune.objectives.preference import DPO

    model, _ = jaxtune.load_pretrained(model_dir)
    pad = data.tokenizer.pad_token_id or 0
    objective = DPO(loss_types=["sigmoid"], loss_weights=None, beta=0.1, pad_id=pad, examples_per_row=data.examples_per_row)
    rows = [data.eval[i] for i in range(len(data.eval))]
    step = jax.jit(objective.reference_logps)
    margins = []
    for start in range(0, len(rows), 8):
        chunk = rows[start:start + 8]
        batch = objective.finalize(objective.collate(chunk, data.row_len))
        logps = np.asarray(step(model, jax.tree.map(jnp.asarray, batch)))
        margins += list((logps[..., 0] - logps[..., 1])[batch["example_valid"] > 0])
    return np.asarray(margins)


def main(overrides: list[str]) -> int:
    from jaxtune import bundled
    from jaxtune.config import load_config
    from jaxtune.data.prepare import prepare
    from jaxtune.train import run

    cfg = load_config(CONFIG, overrides)
    started = time.perf_counter()
    data = prepare(cfg)  # tokenize first: its worker processes fork before JAX starts its threads
    rows = [json.loads(line) for line in EVAL_ROWS.read_text().splitlines()]
    print(f"== 1/3 base model on {len(rows)} held-out pairs", flush=True)
    before = preference(bundled.resolve(cfg.base_model), data)
    print(f"== 2/3 DPO ({CONFIG.relative_to(REPO)}; output in {cfg.output_dir})", flush=True)
    result = run(cfg)
    print("== 3/3 the exported model (hf/) on the same pairs", flush=True)
    after = preference(result.exports["hf"], data)
    print("\nlog p(chosen) - log p(rejected) of the first held-out pairs (eval rows are not shuffled):")
    for i, row in enumerate(rows[:4]):
        print(f"  {row['messages'][0]['content']!r}: {row['chosen']!r} vs {row['rejected']!r}: "
              f"{before[i]:+.2f} before, {after[i]:+.2f} after")
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    print(f"\nheld-out rewards/accuracies: 0.00 before (policy = reference: every pair ties) -> "
          f"{evals[-1]['eval_rewards/accuracies']:.2f} after (step {evals[-1]['step']}; margins "
          f"{evals[-1]['eval_rewards/margins']:.2f})")
    print(f"held-out pairs whose chosen answer has the higher log-prob: {(before > 0).mean():.0%} base model -> "
          f"{(after > 0).mean():.0%} trained ({len(rows)} pairs)")
    print(f"outputs: {result.exports['hf']} (merged), {result.exports.get('adapter')} (PEFT adapter); "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
