"""The config schema: Axolotl's YAML keys, typed and validated (pydantic).

Every key is a typed, described field; unknown keys are errors that name the key and the closest
valid one. Deprecated Axolotl names are rewritten to their current name in one table
(`DEPRECATED_KEYS`), with one warning each. Keys that mean nothing on JAX are listed in
`NO_EFFECT_KEYS` and accepted with one warning each; keys of features jaxtune lacks
(`NOT_SUPPORTED_KEYS`) are errors. None is dropped silently (tables in `config/base.py`).

The keys are grouped by concern (`config/model.py`, `config/data.py`, `config/train.py`) and
joined in one flat `Config`, as Axolotl's YAML is flat. Mutually exclusive keys are errors.

    cfg = load_config("x.yml", overrides=["sequence_len=1024"])
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, PrivateAttr, ValidationError, model_validator

from jaxtune.config.base import (
    DEPRECATED_KEYS,
    NO_EFFECT_KEYS,
    NOT_SUPPORTED_KEYS,
    ConfigError,
    Section,
    map_axolotl_keys,
    rewrite_deprecated,
    warn_no_effect,
)
from jaxtune.config.data import DataKeys, DatasetConfig, UserDefinedFormat, UserDefinedPreference
from jaxtune.config.model import ModelKeys
from jaxtune.config.parallel import ParallelKeys
from jaxtune.config.rl import RLKeys
from jaxtune.config.train import TrainKeys

__all__ = ["Config", "ConfigError", "DatasetConfig", "UserDefinedFormat", "UserDefinedPreference", "DEPRECATED_KEYS",
           "NO_EFFECT_KEYS",
           "NOT_SUPPORTED_KEYS", "Section", "build_config", "load_config", "dump_config", "parse_override"]


class Config(ModelKeys, DataKeys, TrainKeys, ParallelKeys, RLKeys):
    """The whole config: model, data, training, parallelism and preference keys in one flat mapping,
    as Axolotl writes it."""

    # the directory of the config file it was read from: relative dataset paths, and the modules of
    # reward functions and dataset transforms, are also looked for there (after the working directory)
    _source_dir: str | None = PrivateAttr(None)

    @property
    def code_dirs(self) -> list[str]:
        """Where `module.fn` paths (reward functions, dataset transforms) are imported from."""
        return [os.getcwd()] + ([self._source_dir] if self._source_dir else [])

    @model_validator(mode="before")
    @classmethod
    def _deprecated(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = warn_no_effect(map_axolotl_keys(rewrite_deprecated(data, "top")), "top", cls.model_fields)
        fsdp_config = data.get("fsdp_config") or {}
        checkpointing = fsdp_config.get("activation_checkpointing", fsdp_config.get("fsdp_activation_checkpointing"))
        if checkpointing and data.get("gradient_checkpointing") is None:
            data = {**data, "gradient_checkpointing": True}  # FSDP's activation checkpointing is remat
        return data


def _fields_of(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_for(loc: tuple) -> type[BaseModel]:
    if loc and loc[0] in ("datasets", "test_datasets"):
        return UserDefinedFormat if len(loc) > 3 and loc[2] == "type" else DatasetConfig
    if loc and loc[0] == "trl":
        from jaxtune.config.rl import TRLKeys

        return TRLKeys
    return Config


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            candidates = _fields_of(_section_for(loc)) + list(NO_EFFECT_KEYS) + list(DEPRECATED_KEYS["top"])
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown config key '{where}'{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append((f"{where}: " if where else "") + f"{msg}" + (f" (got {err['input']!r})" if "input" in err and
                                                          not isinstance(err["input"], dict) else ""))
    return f"{source}: " + "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so numbers/bools/lists work)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{item}' has no key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def build_config(data: dict, *, source: str = "config", overrides: list[str] | None = None,
                 base_dir: str | os.PathLike | None = None) -> Config:
    data = dict(data or {})
    for item in overrides or []:
        keys, value = parse_override(item)
        target = data
        for k in keys[:-1]:
            target = target.setdefault(int(k) if isinstance(target, list) else k, {})
        target[keys[-1]] = value
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    if base_dir is not None:
        _resolve_paths(cfg, Path(base_dir))
        cfg._source_dir = str(Path(base_dir).resolve())
    return cfg


def _resolve_paths(cfg: Config, base: Path) -> None:
    """Relative local paths are relative to the config file's directory when they exist there."""
    for entry in list(cfg.datasets) + list(cfg.test_datasets or []):
        if "://" in entry.path or Path(entry.path).is_absolute():
            continue
        candidate = base.resolve() / entry.path
        if candidate.exists() and not Path(entry.path).exists():
            entry.path = str(candidate)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return build_config(data, source=str(path), overrides=overrides, base_dir=path.parent)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)
