"""What trains: the adapters (LoRA/QLoRA), every parameter (full fine-tuning), or, with Axolotl's
`unfrozen_parameters`, only the parameters whose Hugging Face names match one of its patterns.

Patterns are read as Axolotl reads them (`axolotl/utils/freeze.py`): a regex matched at the start of
the HF tensor name (`model.layers.3.mlp.up_proj.weight`), its dots literal except in `.+`, optionally
ending in a range `[start:end]` (or `[i]`) of the tensor's first HF dimension (rows of a weight, that is
output features; tokens of an embedding). Layers are stacked here (`layers/...` parameters carry a
leading layer axis), so a pattern may pick some layers of a stacked tensor or some rows of it: that
tensor trains under a 0/1 mask that zeroes the gradients outside (before clipping, as Axolotl's hook
does) and the updates outside (so weight decay and momentum leave frozen rows exactly as they were;
Axolotl's AdamW still decays them, which we treat as a bug, not a feature).

    filter_, masks = trained_parameters(cfg, model, spec)
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from flax import nnx

from jaxtune.errors import JaxtuneError
from jaxtune.models import family_for

_RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")


@dataclasses.dataclass(frozen=True)
class Pattern:
    raw: str
    regex: re.Pattern
    rows: tuple[int, int | None] | None  # [start, end) of the first HF dimension; None: all

    @classmethod
    def parse(cls, raw: str) -> Pattern:
        rows = None
        match = _RANGE.match(raw)
        name = raw
        if match:
            name, start, end = match.groups()
            if end is None:
                if not start:
                    raise JaxtuneError(f"unfrozen_parameters: {raw!r} has an empty range []")
                rows = (int(start), int(start) + 1)
            else:
                rows = (int(start or 0), int(end) if end else None)
        try:
            regex = re.compile(re.sub(r"\.(?!\+)", r"\\.", name))
        except re.error as exc:
            raise JaxtuneError(f"unfrozen_parameters: {raw!r} is not a valid regex: {exc}") from None
        return cls(raw, regex, rows)


def _path(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def select_unfrozen(model, patterns: list[str]) -> tuple[set[tuple[str, ...]], dict[str, np.ndarray]]:
    """(paths of the parameters that train, {path 'a/b/c': 0/1 mask} for those that train in part)."""
    parsed = [Pattern.parse(p) for p in ([patterns] if isinstance(patterns, str) else patterns)]
    family = family_for(model.cfg.architecture)
    used = set()
    paths, masks = set(), {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = _path(path)
        value = var.get_value()
        stack_layers = model.cfg.stack_layers(path[0])
        stacked = stack_layers is not None
        per_layer = value.shape[1:] if stacked else value.shape
        row_axis = len(per_layer) - 1 if path[-1] == "kernel" else 0  # HF stores kernels transposed
        rows_total = per_layer[row_axis] if per_layer else 1
        layers = stack_layers if stacked else [None]
        keep = np.zeros((len(layers), rows_total), bool)
        for i, layer in enumerate(layers):
            name = family.hf_tensor_name(path, layer)
            for pattern in parsed:
                if not pattern.regex.match(name):
                    continue
                used.add(pattern.raw)
                start, end = pattern.rows or (0, None)
                end = rows_total if end is None else end
                if start < 0 or end > rows_total or start >= end:
                    raise JaxtuneError(f"unfrozen_parameters: range [{start}:{end}] of {pattern.raw!r} does not fit "
                                       f"{name} ({rows_total} rows)")
                keep[i, start:end] = True
        if not keep.any():
            continue
        paths.add(path)
        if keep.all():
            continue
        shape = [1] * value.ndim
        offset = 1 if stacked else 0
        if stacked:
            shape[0] = len(layers)
        if per_layer:
            shape[offset + row_axis] = rows_total
        masks["/".join(path)] = keep.reshape(shape).astype(np.float32)
    unused = [p.raw for p in parsed if p.raw not in used]
    if unused:
        example = family.hf_tensor_name(("layers", "mlp", "up_proj", "kernel"), 0)
        raise JaxtuneError(f"unfrozen_parameters: {', '.join(map(repr, unused))} match no parameter of "
                           f"{model.cfg.architecture} (names look like {example!r})")
    return paths, masks


def trained_parameters(cfg, model, spec):
    """(nnx filter of what trains, {path: mask} of parameters that train in part, or None)."""
    from jaxtune.peft.lora import trainable_filter

    if not cfg.unfrozen_parameters:
        return trainable_filter(model, spec), None
    paths, masks = select_unfrozen(model, cfg.unfrozen_parameters)
    return (lambda path, var: isinstance(var, nnx.Param) and _path(path) in paths), (masks or None)
