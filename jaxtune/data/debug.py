"""`jaxtune preprocess --debug`: examples shown token by token with their labels."""

from __future__ import annotations

from jaxtune.data.chat import IGNORE


def describe_example(tokenizer, row: dict, *, color: bool = False) -> str:
    """One line per token: index, id, the token's text, and TRAIN or a dot; segments separated.

    Trained tokens are marked `*` (and green when `color`), so a mask error is visible at a glance.
    """
    ids, labels = row["input_ids"], row["labels"]
    segments = row.get("segment_ids") or [1] * len(ids)
    positions = row.get("positions") or list(range(len(ids)))
    lines = [f"{len(ids)} tokens, {sum(1 for t in labels if t != IGNORE)} trained"]
    for i, (tok, lab, seg, pos) in enumerate(zip(ids, labels, segments, positions)):
        if i and seg != segments[i - 1]:
            lines.append(f"---- segment {seg} ----")
        text = tokenizer.convert_ids_to_tokens(int(tok))
        mark = "*" if lab != IGNORE else "."
        line = f"{i:5d} seg {seg} pos {pos:4d} {mark} {tok:7d} {text!r}"
        if color and lab != IGNORE:
            line = f"\x1b[32m{line}\x1b[0m"
        lines.append(line)
    return "\n".join(lines)
