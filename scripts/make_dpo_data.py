"""Write the DPO example's preference data: configs/data/dpo_{train,eval}.jsonl.

The preference is one the base model does not hold: both answers are correct, but the chosen one is
written as a labelled answer ("Answer: 56.") and the rejected one is the bare fact ("56"). A base
instruct model is indifferent or prefers the bare form, so held-out rewards/accuracies starts at
chance and DPO has to learn the preference. Deterministic (seeded); the eval questions never occur
in the training set.

    python scripts/make_dpo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
            "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Greece": "Athens", "Portugal": "Lisbon",
            "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Cuba": "Havana",
            "Thailand": "Bangkok", "Vietnam": "Hanoi", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
            "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Colombia": "Bogota", "Turkey": "Ankara",
            "Iran": "Tehran", "Iraq": "Baghdad", "Belgium": "Brussels", "Denmark": "Copenhagen",
            "Netherlands": "Amsterdam", "Switzerland": "Bern", "Australia": "Canberra", "Nigeria": "Abuja",
            "Ghana": "Accra", "Morocco": "Rabat", "Ethiopia": "Addis Ababa"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
             "up": "down", "open": "closed", "full": "empty", "strong": "weak", "rich": "poor", "young": "old",
             "hard": "soft", "wet": "dry", "loud": "quiet", "high": "low", "thick": "thin", "clean": "dirty",
             "true": "false", "near": "far", "first": "last", "inside": "outside", "win": "lose", "buy": "sell"}


def questions(rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for a in range(2, 13):
        for b in range(2, 13):
            out.append((f"What is {a} times {b}?", str(a * b)))
            out.append((f"What is {a * 7} plus {b * 3}?", str(a * 7 + b * 3)))
    for country, city in CAPITALS.items():
        out.append((f"What is the capital of {country}?", city))
        out.append((f"Which country has {city} as its capital?", country))
    for word, opposite in OPPOSITES.items():
        out.append((f"What is the opposite of '{word}'?", opposite))
        out.append((f"What is the opposite of '{opposite}'?", word))
    rng.shuffle(out)
    return out


def pair(question: str, fact: str) -> dict:
    return {"messages": [{"role": "user", "content": question}], "chosen": f"Answer: {fact}.", "rejected": fact}


def main() -> None:
    rng = random.Random(0)
    qs = questions(rng)
    eval_qs, train_qs = qs[:64], qs[64:64 + 448]
    out = Path(__file__).resolve().parents[1] / "configs" / "data"
    for name, items in (("dpo_train", train_qs), ("dpo_eval", eval_qs)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(pair(q, a)) + "\n" for q, a in items))
        print(f"{path}: {len(items)} pairs")


if __name__ == "__main__":
    main()
