"""`jaxtune preprocess --debug`: examples shown token by token with their labels."""

from __future__ import annotations

from jaxtune.batch import BRANCH, IGNORE


def segment_name(seg: int, branches: tuple[str, str] = ("chosen", "rejected")) -> str:
    """A segment id as people read it: `3` (a sample, or a pair's shared prompt), `3/chosen`."""
    seg = int(seg)
    return str(seg) if seg < BRANCH else f"{seg & (BRANCH - 1)}/{branches[(seg >> 24) - 1]}"


def describe_example(tokenizer, row: dict, *, color: bool = False,
                     branches: tuple[str, str] = ("chosen", "rejected")) -> str:
    """One line per token: index, segment, position, `*` if trained (else a dot), id, the token's
    text; segments separated. Trained tokens are green when `color`, so a mask error is visible at a
    glance. Preference rows name their branches (`1/chosen`, `1/rejected`)."""
    ids, labels = row["input_ids"], row["labels"]
    segments = row.get("segment_ids") or [1] * len(ids)
    positions = row.get("positions") or list(range(len(ids)))
    lines = [f"{len(ids)} tokens, {sum(1 for t in labels if t != IGNORE)} trained"]
    for i, (tok, lab, seg, pos) in enumerate(zip(ids, labels, segments, positions)):
        if i and seg != segments[i - 1]:
            lines.append(f"---- segment {segment_name(seg, branches)} ----")
        text = tokenizer.convert_ids_to_tokens(int(tok))
        mark = "*" if lab != IGNORE else "."
        line = f"{i:5d} seg {segment_name(seg, branches)} pos {pos:4d} {mark} {tok:7d} {text!r}"
        if color and lab != IGNORE:
            line = f"\x1b[32m{line}\x1b[0m"
        lines.append(line)
    return "\n".join(lines)
