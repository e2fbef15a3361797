"""The config schema: Axolotl's YAML keys, typed and validated (pydantic).

Every key is a typed, described field; unknown keys are errors that name the key and the closest
valid one. Deprecated Axolotl names are rewritten to their current name in one table
(`DEPRECATED_KEYS`), with one warning each. Keys that mean nothing on JAX are listed in
`NO_EFFECT_KEYS` and accepted with one warning each; none is dropped silently.

This module holds the model and data sections; the trainer's keys join the same `Config` class.

    cfg = load_config("x.yml", overrides=["sequence_len=1024"])
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jaxtune.errors import JaxtuneError
from jaxtune.logging import warn_once


class ConfigError(JaxtuneError):
    """The config file or an override is invalid; the message says which key and why."""


# Deprecated name -> current name, per section. The value is moved and one warning is printed.
DEPRECATED_KEYS: dict[str, dict[str, str]] = {
    "top": {},
    "dataset": {
        "train_on_split": "split",
        "conversation": "chat_template",
        "message_field_role": "message_property_mappings.role",
        "message_field_content": "message_property_mappings.content",
    },
}

# Keys Axolotl has that change nothing here, with the reason printed in their one warning.
NO_EFFECT_KEYS: dict[str, str] = {
    "sample_packing_group_size": "jaxtune packs the whole dataset at once with first-fit-decreasing",
    "sample_packing_bin_size": "jaxtune packs the whole dataset at once with first-fit-decreasing",
    "sample_packing_eff_est": "packing efficiency is measured at preprocessing and printed",
    "total_num_tokens": "token counts are measured at preprocessing",
    "tokenizer_type": "tokenizers are always loaded with transformers' AutoTokenizer",
    "tokenizer_use_fast": "jaxtune always uses the fast (Rust) tokenizer",
    "is_llama_derived_model": "the architecture is read from config.json",
    "is_mistral_derived_model": "the architecture is read from config.json",
    "is_qwen_derived_model": "the architecture is read from config.json",
}

USER_DEFINED_FIELDS = ("system_prompt", "system_format", "field_system", "field_instruction", "field_input",
                       "field_output", "format", "no_input_format", "field")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class UserDefinedFormat(_Section):
    """`type:` given as a mapping: a prompt format written in the config (Axolotl's user-defined)."""

    system_prompt: str = Field("", description="System text used when the row has no system field.")
    system_format: str = Field("{system}", description="How the system text is written; must contain {system}.")
    field_system: str = Field("system", description="Column holding a per-row system text.")
    field_instruction: str = Field("instruction", description="Column holding the instruction.")
    field_input: str = Field("input", description="Column holding the optional input.")
    field_output: str = Field("output", description="Column holding the response (trained).")
    format: str = Field("{instruction} {input} ", description="Prompt template; may use {instruction} and {input}.")
    no_input_format: str = Field("{instruction} ", description="Prompt template for rows without input; no {input}.")
    field: str | None = Field(None, description="Unused for this format (accepted for Axolotl compatibility).")

    @field_validator("no_input_format")
    @classmethod
    def _no_input(cls, v: str) -> str:
        if "{input}" in v:
            raise ValueError("no_input_format must not contain {input}")
        return v

    @field_validator("system_format")
    @classmethod
    def _system(cls, v: str) -> str:
        if "{system}" not in v:
            raise ValueError("system_format must contain {system}")
        return v


class DatasetConfig(_Section):
    """One entry of `datasets:` / `test_datasets:`."""

    path: str = Field(..., description="Local file or directory, datasets hub id, or fsspec URL (s3://, gs://, file://...).")
    type: str | UserDefinedFormat | None = Field(
        None, description="Row format: alpaca, completion, input_output, chat_template, sharegpt (deprecated), "
        "pretrain, a preference or prompt type, or a user-defined mapping.")
    ds_type: Literal["json", "jsonl", "parquet", "csv", "arrow", "text"] | None = Field(
        None, description="File type when the extension does not say it.")
    data_files: str | list[str] | None = Field(None, description="Files within `path` (or hub repo) to load.")
    split: str = Field("train", description="Split to take.")
    name: str | None = Field(None, description="Dataset configuration name (hub datasets).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Hub datasets with loading scripts are not supported.")
    shards: int | None = Field(None, ge=1, description="Split the dataset into this many shards and keep one.")
    shards_idx: int | None = Field(None, ge=0, description="Which shard to keep (default 0).")
    preprocess_shards: int | None = Field(None, ge=1, description="Tokenize in this many pieces (memory bound).")
    field: str | None = Field(None, description="completion / pretrain: the text column (default `text`).")
    # chat_template / sharegpt
    field_messages: str | None = Field(None, description="Column holding the list of messages.")
    message_property_mappings: dict[str, str] | None = Field(
        None, description="Message keys to read: {role: <key>, content: <key>}.")
    roles: dict[str, list[str]] | None = Field(
        None, description="Target role -> source role names, e.g. {assistant: [gpt, model]}.")
    roles_to_train: list[str] | None = Field(None, description="Roles whose turns train (default: assistant).")
    train_on_eos: Literal["turn", "all", "last", "none"] | None = Field(
        None, description="Which end-of-turn tokens train: each trained turn's, all, the last, or none.")
    chat_template: str | None = Field(None, description="Per-dataset chat template (as the top-level key).")
    chat_template_jinja: str | None = Field(None, description="Per-dataset jinja template (chat_template: jinja).")
    drop_system_message: bool = Field(False, description="Remove system messages before rendering.")
    # preference pairs and prompts
    field_prompt: str | None = Field(None, description="Preference/prompt rows: the prompt column.")
    field_chosen: str | None = Field(None, description="Preference rows: the chosen response column.")
    field_rejected: str | None = Field(None, description="Preference rows: the rejected response column.")

    @model_validator(mode="before")
    @classmethod
    def _deprecated(cls, data: Any) -> Any:
        return _rewrite_deprecated(data, "dataset") if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        if self.trust_remote_code:
            raise ValueError("trust_remote_code: true is not supported: datasets with loading scripts cannot be "
                             "read (convert the dataset to parquet/json first)")
        if self.shards_idx is not None and self.shards is None:
            raise ValueError("shards_idx needs shards")
        if self.shards is not None and (self.shards_idx or 0) >= self.shards:
            raise ValueError(f"shards_idx {self.shards_idx} is out of range for shards: {self.shards}")
        return self


class Config(_Section):
    """The whole config (model and data sections)."""

    base_model: str | None = Field(None, description="HF model directory, or `bundled:smollm2`.")
    tokenizer_config: str | None = Field(None, description="Directory of the tokenizer, when not base_model's.")
    datasets: list[DatasetConfig] = Field(default_factory=list, description="Training datasets.")
    test_datasets: list[DatasetConfig] | None = Field(None, description="Explicit evaluation datasets.")
    dataset_weights: list[float] | None = Field(
        None, description="Share of each training dataset in the mix (normalized); rows are subsampled or "
        "repeated deterministically by seed. Default: plain concatenation.")
    shuffle_merged_datasets: bool = Field(True, description="Shuffle rows after merging datasets.")
    val_set_size: float = Field(0.0, ge=0, description="Eval split: fraction (< 1) or number of rows (>= 1).")
    dataset_shard_num: int | None = Field(None, ge=1, description="Keep one of this many shards of the merged data.")
    dataset_shard_idx: int | None = Field(None, ge=0, description="Which merged shard to keep.")
    seed: int = Field(42, description="Seed for shuffling, splitting and mixing.")
    sequence_len: int = Field(2048, ge=8, description="Maximum tokens per row (and packed row length).")
    excess_length_strategy: Literal["drop", "truncate", "raise"] = Field(
        "drop", description="What happens to rows longer than sequence_len.")
    sample_packing: bool = Field(False, description="Pack several samples per row (segment ids keep them apart).")
    eval_sample_packing: bool | None = Field(None, description="Pack the eval set (default: as sample_packing).")
    pad_to_sequence_len: bool = Field(False, description="Pad every batch to sequence_len (one shape).")
    train_on_inputs: bool = Field(False, description="Train on prompt tokens too.")
    chat_template: str = Field("tokenizer_default", description="tokenizer_default, a named template "
                               "(chatml, llama3, mistral, qwen3, gemma), or jinja (with chat_template_jinja).")
    chat_template_jinja: str | None = Field(None, description="The jinja template when chat_template: jinja.")
    eot_tokens: list[str] | None = Field(None, description="End-of-turn tokens besides the tokenizer's eos.")
    special_tokens: dict[str, str] | None = Field(None, description="bos_token/eos_token/pad_token/unk_token to set.")
    tokens: list[str] | None = Field(None, description="New tokens to add to the vocabulary.")
    dataset_prepared_path: str | None = Field(None, description="Cache directory of tokenized (packed) data.")
    dataset_processes: int | None = Field(None, ge=1, description="Tokenization processes (default: CPU count).")

    @model_validator(mode="before")
    @classmethod
    def _deprecated(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _rewrite_deprecated(data, "top")
        for key in [k for k in data if k in NO_EFFECT_KEYS]:
            warn_once(f"config key '{key}' has no effect in jaxtune: {NO_EFFECT_KEYS[key]}")
            data = {k: v for k, v in data.items() if k != key}
        return data

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.dataset_weights is not None:
            if len(self.dataset_weights) != len(self.datasets):
                raise ValueError(f"dataset_weights has {len(self.dataset_weights)} entries for "
                                 f"{len(self.datasets)} datasets")
            if any(w < 0 for w in self.dataset_weights) or sum(self.dataset_weights) <= 0:
                raise ValueError("dataset_weights must be >= 0 with a positive sum")
        if (self.chat_template == "jinja") != (self.chat_template_jinja is not None):
            raise ValueError("chat_template: jinja and chat_template_jinja go together")
        if self.dataset_shard_idx is not None and self.dataset_shard_num is None:
            raise ValueError("dataset_shard_idx needs dataset_shard_num")
        if self.dataset_shard_num is not None and (self.dataset_shard_idx or 0) >= self.dataset_shard_num:
            raise ValueError("dataset_shard_idx must be < dataset_shard_num")
        return self

    @property
    def packs_eval(self) -> bool:
        return self.sample_packing if self.eval_sample_packing is None else self.eval_sample_packing


def _rewrite_deprecated(data: dict, section: str) -> dict:
    data = dict(data)
    for old, new in DEPRECATED_KEYS[section].items():
        if old not in data:
            continue
        value = data.pop(old)
        warn_once(f"config key '{old}' is deprecated; use '{new}'")
        if "." in new:
            parent, child = new.split(".")
            data[parent] = {**(data.get(parent) or {}), child: value}
        elif new in data and data[new] != value:
            raise ValueError(f"both '{old}' (deprecated) and '{new}' are set")
        else:
            data[new] = value
    return data


def _fields_of(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_for(loc: tuple) -> type[BaseModel]:
    if loc and loc[0] in ("datasets", "test_datasets"):
        return UserDefinedFormat if len(loc) > 3 and loc[2] == "type" else DatasetConfig
    return Config


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            candidates = _fields_of(_section_for(loc)) + list(NO_EFFECT_KEYS)
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown config key '{where}'{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where or 'config'}: {msg}" + (f" (got {err['input']!r})" if "input" in err and
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
