"""The quickstart (`make demo`): fine-tune the bundled SmolLM2-135M-Instruct with LoRA on the
shipped JSON-extraction task and show what changed.

1. exact-match accuracy of the base model's greedy answers on the 64 held-out sentences
   (configs/data/quickstart_eval.jsonl, never trained on);
2. `python -m jaxtune.train --config configs/quickstart.yml` (the same code path), which prepares
   the data, trains 24 steps, evaluates, checkpoints and exports output_dir/hf and output_dir/adapter;
3. the same accuracy for the exported, merged model in output_dir/hf, as transformers or vLLM
   would load it, and a few answers side by side.

    .venv/bin/python scripts/quickstart.py [key=value ...]    # overrides for configs/quickstart.yml
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.yml"
EVAL_ROWS = REPO / "configs" / "data" / "quickstart_eval.jsonl"


def held_out() -> tuple[str, list[str], list[str]]:
    """(system message, user sentences, expected answers) of the held-out rows."""
    rows = [json.loads(line) for line in EVAL_ROWS.read_text().splitlines() if line.strip()]
    systems = {r["messages"][0]["content"] for r in rows}
    assert len(systems) == 1, "the held-out rows share one system message"
    return systems.pop(), [r["messages"][1]["content"] for r in rows], [r["messages"][2]["content"] for r in rows]


def answers(model_dir: str | Path, system: str, prompts: list[str]) -> list[str]:
    import jaxtune
    from jaxtune.generate import SamplingConfig, generate

    model, tokenizer = jaxtune.load_pretrained(model_dir)
    results = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=48), chat=True, system=system)
    return [r.text.strip() for r in results]


def main(overrides: list[str]) -> int:
    from jaxtune import bundled
    from jaxtune.config import load_config
    from jaxtune.data.prepare import prepare
    from jaxtune.train import run

    cfg = load_config(CONFIG, overrides)
    system, prompts, expected = held_out()
    started = time.perf_counter()
    # Tokenize first: its worker processes fork, which must happen before JAX starts its threads.
    prepare(cfg)
    print(f"== 1/3 base model on {len(prompts)} held-out sentences", flush=True)
    before = answers(bundled.resolve(cfg.base_model), system, prompts)
    print(f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"== 2/3 fine-tuning ({CONFIG.relative_to(REPO)}; output in {cfg.output_dir})", flush=True)
    result = run(cfg)
    print("== 3/3 the exported model (hf/) on the same sentences", flush=True)
    after = answers(result.exports["hf"], system, prompts)
    print(f"   ({time.perf_counter() - started:.0f} s)", flush=True)

    def accuracy(got: list[str]) -> float:
        return sum(g == e for g, e in zip(got, expected)) / len(expected)

    for i in range(3):
        print(f"\n  sentence: {prompts[i]}\n  expected: {expected[i]}\n  before:   {before[i][:120]!r}\n"
              f"  after:    {after[i][:120]!r}")
    metrics = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    print(f"\nheld-out exact match: {accuracy(before):.0%} before -> {accuracy(after):.0%} after "
          f"({len(expected)} sentences)")
    if evals:
        print(f"held-out eval loss: {evals[0]:.3f} (step {[m for m in metrics if 'eval_loss' in m][0]['step']}) -> "
              f"{evals[-1]:.3f} (end)")
    print(f"outputs: {result.exports['hf']} (merged model), {result.exports.get('adapter')} (PEFT adapter); "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
