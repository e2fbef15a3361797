"""Data benchmark: chat_template tokenization + label masking, and packing efficiency.

Synthetic multi-turn conversations (2-5 exchanges, a system message on half of them) are encoded
  - by jaxtune (render + tokenize + locate every assistant turn + labels), one process and through
    `datasets.map(num_proc=N)` as `jaxtune preprocess` runs it;
  - by a plain transformers loop: `apply_chat_template(messages, tokenize=True)` (ids only, no mask),
    which is the floor any masking approach pays.
Then the masked rows are packed into sequence_len rows (first-fit decreasing) and the efficiency
is printed next to one-sample-per-row padding.

    python scripts/bench_data.py [--rows 20000] [--sequence-len 2048] [--processes 2]
"""

from __future__ import annotations

import argparse
import os
import random
import time

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part model train token data learning jax flax gradient loss batch").split()


def synthetic_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(5, 20)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(2, 5)):
            messages.append({"role": "user", "content": text(5, 40)})
            messages.append({"role": "assistant", "content": text(10, 120)})
        out.append(messages)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import datasets
    import numpy as np

    from jaxtune import bundled
    from jaxtune.checkpoint.hf import load_tokenizer
    from jaxtune.config import DatasetConfig
    from jaxtune.data.formats import build_encoder, tokenizer_info
    from jaxtune.data.packing import first_fit_decreasing, packing_efficiency
    from jaxtune.data.prepare import _encode_batch

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(bundled.prepare("smollm2"))
    conversations = synthetic_conversations(args.rows)
    encoder = build_encoder(DatasetConfig(path="synthetic", type="chat_template"),
                            tok=tokenizer_info(tokenizer), top_template="tokenizer_default",
                            top_jinja=None, train_on_inputs=False, sequence_len=args.sequence_len)

    t0 = time.perf_counter()
    plain = [tokenizer.apply_chat_template(m, tokenize=True) for m in conversations]
    plain_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ours = [encoder({"messages": m}, f"row {i}")[0] for i, m in enumerate(conversations)]
    ours_s = time.perf_counter() - t0
    plain_ids = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in plain]
    assert all(o["input_ids"] == p for o, p in zip(ours, plain_ids)), "token ids differ from transformers'"

    raw = datasets.Dataset.from_dict({"messages": conversations})
    t0 = time.perf_counter()
    mapped = raw.map(_encode_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                     fn_kwargs={"encoder": encoder, "where": "bench"},
                     num_proc=args.processes if args.processes > 1 else None)
    map_s = time.perf_counter() - t0

    lengths = np.asarray([len(o["input_ids"]) for o in ours])
    trained = sum(sum(t != -100 for t in o["labels"]) for o in ours)
    fits = lengths[lengths <= args.sequence_len]
    t0 = time.perf_counter()
    bins = first_fit_decreasing(fits, args.sequence_len)
    pack_s = time.perf_counter() - t0

    n = args.rows
    print(f"{n} synthetic conversations, SmolLM2 tokenizer (chatml), {os.cpu_count()} CPUs")
    print(f"{'':44}{'rows/s':>10}{'vs plain':>10}")
    print(f"{'transformers apply_chat_template (ids only)':44}{n / plain_s:>10.0f}{1:>9.2f}x")
    print(f"{'jaxtune encode + mask, 1 process':44}{n / ours_s:>10.0f}{plain_s / ours_s:>9.2f}x")
    print(f"{f'jaxtune datasets.map, num_proc={args.processes}':44}{n / map_s:>10.0f}{plain_s / map_s:>9.2f}x")
    print(f"tokens {lengths.sum()}, trained {trained} ({trained / lengths.sum():.1%}), mean length {lengths.mean():.0f}")
    print(f"packing into {args.sequence_len}: {len(fits)} samples -> {len(bins)} rows, efficiency "
          f"{packing_efficiency(fits, len(bins), args.sequence_len):.1%} (one per row: "
          f"{packing_efficiency(fits, len(fits), args.sequence_len):.1%}); FFD took {pack_s:.2f}s")
    assert len(mapped) == n


if __name__ == "__main__":
    main()
