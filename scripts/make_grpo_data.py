"""Write the GRPO example's prompts: configs/data/grpo_{train,eval}.jsonl.

One-digit additions and multiplications ("What is 7 + 5?"), each with its answer in a column the
reward function reads (configs/grpo_rewards.py: 1 when the last number of the completion is the
answer). The bundled SmolLM2-135M-Instruct gets about one in four right when sampled at temperature
1: it restates the question, explains, and runs out of tokens, so rewards vary within most groups of
8 completions, which is what GRPO learns from. Deterministic (seeded); the eval questions never occur
in the training set.

    python scripts/make_grpo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Reply with the result only."


def questions() -> list[dict]:
    out = []
    for a in range(1, 10):
        for b in range(1, 10):
            out.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
            if a > 1 and b > 1:
                out.append({"question": f"What is {a} times {b}?", "answer": str(a * b)})
    return out


def main() -> None:
    rows = questions()
    random.Random(0).shuffle(rows)
    data = Path(__file__).resolve().parents[1] / "configs" / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:-32]), ("eval", rows[-32:])):
        with open(data / f"grpo_{name}.jsonl", "w") as f:
            for row in part:
                prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}]
                f.write(json.dumps({"prompt": prompt, "answer": row["answer"]}) + "\n")
        print(f"wrote {len(part)} prompts to {data / f'grpo_{name}.jsonl'}")


if __name__ == "__main__":
    main()
