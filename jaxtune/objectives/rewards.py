"""GRPO's reward functions and dataset transforms, loaded from the working directory as Axolotl does.

    trl:
      reward_funcs: [rewards.accuracy, rewards.format]     # rewards.py where you run jaxtune, or next
                                                           # to the config file
    datasets:
      - path: data/questions.jsonl
        type: rewards.to_prompt                            # optional: a row transform (Axolotl's form)

A reward function is called as TRL calls it, once per rollout:

    def accuracy(prompts, completions, completion_ids, answer, **kwargs) -> list[float | None]

`prompts` and `completions` are strings, or message lists for conversational prompts (a completion is
then `[{"role": "assistant", "content": text}]`); every other column of the dataset arrives as a
keyword argument (a list, one value per completion), with `trainer_state` (`global_step`, `epoch`),
`log_extra(column, values)` and `log_metric(name, value)`. None for a completion skips it (if every
function skips it, it gets no advantage). A function that raises is retried row by row, and the error
names the function and the first row that fails.

A dataset transform `type: module.fn` is Axolotl's: `fn(cfg, dataset_idx=i)` returns a row transform
`transform(row, tokenizer=None) -> row` (or `(transform, {"remove_columns": [...]})`); the rows it
returns need a `prompt` (a string or a message list) and may keep any other column for the rewards.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxtune.errors import JaxtuneError


def load_callable(path: str, what: str, search: Sequence[str] = ()) -> Callable:
    """`module.fn` (or `package.module.fn`) importable from the working directory, the `search`
    directories (the config file's) or the Python path."""
    if "." not in path:
        raise JaxtuneError(f"{what} {path!r} must be a dotted path module.function (e.g. rewards.accuracy)")
    module_name, name = path.rsplit(".", 1)
    dirs = [os.getcwd(), *search]
    for d in reversed(dirs):
        if d not in sys.path:
            sys.path.insert(0, d)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise JaxtuneError(f"{what} {path!r}: module {module_name!r} not found ({e}); it is imported from "
                           f"the working directory {dirs[0]}"
                           + "".join(f", the config's directory {d}" for d in dict.fromkeys(dirs[1:]) if d != dirs[0])
                           + " and the Python path") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise JaxtuneError(f"{what} {path!r}: {module.__name__} ({getattr(module, '__file__', '?')}) has no "
                           f"function {name!r}")
    return fn


@dataclasses.dataclass
class TrainerState:
    """What TRL passes reward functions as `trainer_state` (the fields they read)."""

    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0


@dataclasses.dataclass
class RewardFunctions:
    """The configured reward functions, called with TRL's convention."""

    names: list[str]
    functions: list[Callable]
    weights: np.ndarray

    @classmethod
    def load(cls, paths: Sequence[str], weights: Sequence[float] | None, search: Sequence[str] = ()) -> RewardFunctions:
        functions = [load_callable(p, "reward function", search) for p in paths]
        w = np.ones(len(paths), np.float32) if weights is None else np.asarray(weights, np.float32)
        return cls([p.rsplit(".", 1)[1] for p in paths], functions, w)

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list],
                 state: TrainerState) -> tuple[np.ndarray, dict[str, float], dict[str, list]]:
        """(rewards [N, F] with NaN where a function returned None, metrics it logged, extra columns
        it logged for the completions table)."""
        n = len(completions)
        metrics: dict[str, list[float]] = {}
        extra: dict[str, list] = {}
        kwargs = {**columns, "trainer_state": state,
                  "log_metric": lambda name, value: metrics.setdefault(name, []).append(float(value)),
                  "log_extra": lambda column, values: extra.setdefault(column, []).extend(values)}
        out = np.full((n, len(self.functions)), np.nan, np.float64)
        for f, (name, fn) in enumerate(zip(self.names, self.functions)):
            started = time.perf_counter()
            try:
                values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            except Exception as e:  # noqa: BLE001 - the user's function; find the row and say so
                raise self._error(name, fn, prompts, completions, completion_ids, columns, kwargs, e) from e
            if values is None or len(values) != n:
                raise JaxtuneError(f"reward function {name!r} returned {0 if values is None else len(values)} rewards "
                                   f"for {n} completions (one per completion, None to skip one)")
            out[:, f] = [np.nan if v is None else float(v) for v in values]
            metrics.setdefault(f"timing/reward/{name}", []).append(time.perf_counter() - started)
        return out, {k: float(np.mean(v)) for k, v in metrics.items()}, extra

    @staticmethod
    def _error(name, fn, prompts, completions, completion_ids, columns, kwargs, error) -> JaxtuneError:
        for row in range(len(completions)):
            one = {k: (v[row:row + 1] if k in columns else v) for k, v in kwargs.items()}
            try:
                fn(prompts=prompts[row:row + 1], completions=completions[row:row + 1],
                   completion_ids=completion_ids[row:row + 1], **one)
            except Exception as e:  # noqa: BLE001
                where = inspect.getsourcefile(fn) or "?"
                return JaxtuneError(f"reward function {name!r} ({where}) raised on completion {row} (prompt "
                                    f"{str(prompts[row])[:80]!r}, completion {str(completions[row])[:80]!r}): "
                                    f"{type(e).__name__}: {e}")
        return JaxtuneError(f"reward function {name!r} raised on the batch but on no single row: "
                            f"{type(error).__name__}: {error}")


def dataset_transform(type_name: str, cfg, dataset_index: int) -> tuple[Callable, dict]:
    """Axolotl's `type: module.fn` row transform for GRPO datasets: (transform(row), map kwargs)."""
    loader = load_callable(type_name, "dataset type", getattr(cfg, "code_dirs", [])[1:])
    made = loader(cfg, dataset_idx=dataset_index)
    transform, kwargs = made if isinstance(made, tuple) else (made, {})
    if not callable(transform):
        raise JaxtuneError(f"dataset type {type_name!r} returned {type(transform).__name__}, not a row transform")
    return transform, dict(kwargs or {})
