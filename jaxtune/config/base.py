"""What every config section shares: the strict base model and the status of every Axolotl key that is
not a jaxtune field (Axolotl's keys: `axolotl_keys.json`, read from its schema by
scripts/gen_axolotl_keys.py; their status and reasons: `key_status.yaml`).

- `DEPRECATED_KEYS`: an old Axolotl name -> its current name (and how the value maps); the value is
  moved and one warning is printed. `map_axolotl_keys`: Axolotl keys with a jaxtune equivalent
  (batch_size, cut_cross_entropy, float32, plugins), rewritten with one warning.
- `NO_EFFECT`: keys that change nothing on JAX; accepted with one warning naming the reason.
- `NOT_SUPPORTED`: keys whose feature jaxtune does not have (yet); setting them to anything but their
  off value is an error that says so, never a silent no-op.
- keys of Axolotl's plugins follow their plugin's status (`PLUGIN_MODULES`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from jaxtune.errors import JaxtuneError
from jaxtune.logging import warn_once


class ConfigError(JaxtuneError):
    """The config file or an override is invalid; the message says which key and why."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _unset(cls, value: Any, info: ValidationInfo) -> Any:
        """A key written with no value (`lora_r:`) is unset, as in Axolotl's schema where every key is
        optional: it takes its default."""
        if value is None and info.field_name in cls.model_fields:
            field = cls.model_fields[info.field_name]
            if not field.is_required():
                return field.get_default(call_default_factory=True)
        return value


def _attn(value: Any, name: str) -> str | None:
    return name if value else None


# section -> old name -> new name, or (new name, value mapping; None from the mapping drops the key).
DEPRECATED_KEYS: dict[str, dict[str, str | tuple[str, Callable[[Any], Any]]]] = {
    "top": {
        "flash_attention": ("attn_implementation", lambda v: _attn(v, "flash_attention_2")),
        "sdp_attention": ("attn_implementation", lambda v: _attn(v, "sdpa")),
        "xformers_attention": ("attn_implementation", lambda v: _attn(v, "xformers")),
        "flex_attention": ("attn_implementation", lambda v: _attn(v, "flex_attention")),
        "eager_attention": ("attn_implementation", lambda v: _attn(v, "eager")),
        "sequence_parallel_degree": "context_parallel_size",
        "dpo_beta": "rl_beta",
        "evaluation_strategy": "eval_strategy",
        "dataset_num_proc": "dataset_processes",
    },
    "dataset": {
        "train_on_split": "split",
        "conversation": "chat_template",
        "message_field_role": "message_property_mappings.role",
        "message_field_content": "message_property_mappings.content",
    },
}

_DIR = Path(__file__).resolve().parent


def _load_tables() -> tuple[dict, dict]:
    status = yaml.safe_load((_DIR / "key_status.yaml").read_text())
    axolotl = json.loads((_DIR / "axolotl_keys.json").read_text())
    return status, axolotl


# The status tables (config/key_status.yaml) and Axolotl's own keys (config/axolotl_keys.json, from its
# schema): section -> key -> reason, for keys that change nothing here and keys of missing features.
KEY_STATUS, AXOLOTL_KEYS = _load_tables()
NO_EFFECT: dict[str, dict[str, str]] = {sec: dict(t.get("no_effect") or {}) for sec, t in KEY_STATUS.items()
                                        if sec != "plugin_modules"}
NOT_SUPPORTED: dict[str, dict[str, str]] = {sec: dict(t.get("error") or {}) for sec, t in KEY_STATUS.items()
                                            if sec != "plugin_modules"}
MAPPED: dict[str, dict[str, str]] = {sec: dict(t.get("mapped") or {}) for sec, t in KEY_STATUS.items()
                                     if sec != "plugin_modules"}
PLUGIN_MODULES: dict[str, tuple[str, str]] = {m: tuple(v) for m, v in KEY_STATUS["plugin_modules"].items()}
# Keys Axolotl's plugins add (top level): key -> plugin module; their status is their plugin's.
PLUGIN_KEYS: dict[str, str] = {k: v["plugin"] for k, v in AXOLOTL_KEYS["plugin"].items()}
NO_EFFECT_KEYS, NOT_SUPPORTED_KEYS = NO_EFFECT["top"], NOT_SUPPORTED["top"]


def is_off(value) -> bool:
    """A key's "not set" values: Axolotl configs write `key: false` / `[]` / `0` for a feature they leave off."""
    return value in (None, False, [], {}, 0, "")


def warn_no_effect(data: dict, section: str = "top", fields: Iterable[str] = ()) -> dict:
    """Drop `section`'s no-effect keys from `data` with one warning each (when set); raise for keys of
    features jaxtune lacks when they are set. At the top level, keys of Axolotl's plugins that are not
    jaxtune `fields` follow their plugin's status."""
    prefix = "trl." if section == "trl" else ""  # a dataset entry's errors already name datasets[i]
    fields = set(fields)
    out, quiet = {}, {}
    for key, value in data.items():
        reason, status = None, None
        if key in NO_EFFECT.get(section, {}):
            status, reason = "no_effect", NO_EFFECT[section][key]
        elif key in NOT_SUPPORTED.get(section, {}):
            status, reason = "error", NOT_SUPPORTED[section][key]
        elif section == "top" and key in PLUGIN_KEYS and key not in fields and key not in MAPPED["top"]:
            module = PLUGIN_KEYS[key]
            status, reason = PLUGIN_MODULES.get(module, ("error", f"Axolotl's {module} plugin is not supported"))
            reason = f"a key of Axolotl's {module} plugin: {reason}"
        if status is None:
            out[key] = value
        elif status == "error" and not is_off(value):
            raise ValueError(f"'{prefix}{key}' is not supported: {reason}")
        elif status == "no_effect" and not is_off(value):
            quiet.setdefault(reason, []).append(prefix + key)
    for reason, keys in quiet.items():  # one warning per reason (vLLM's dozen keys say one thing)
        if len(keys) == 1:
            warn_once(f"config key '{keys[0]}' has no effect in jaxtune: {reason}")
        else:
            warn_once(f"config keys {', '.join(repr(k) for k in keys)} have no effect in jaxtune: {reason}")
    return out


def plugin_status(entry: str) -> tuple[str, str, str]:
    """(module, status, reason) of a `plugins:` entry such as axolotl.integrations.liger.LigerPlugin."""
    parts = str(entry).split(".")
    if len(parts) >= 4 and parts[:2] == ["axolotl", "integrations"]:
        module = parts[2]
        if module in PLUGIN_MODULES:
            return (module, *PLUGIN_MODULES[module])
        return module, "error", f"Axolotl's {module} plugin is not supported"
    return str(entry), "error", "jaxtune cannot load Axolotl plugins (Python code for Axolotl's trainer)"


def map_axolotl_keys(data: dict) -> dict:
    """Axolotl keys with a jaxtune equivalent (MAPPED["top"]), rewritten with one warning each: batch_size,
    cut_cross_entropy, float32, and `plugins:` entries by their plugin's status."""
    data = dict(data)

    def put(key, value, source):
        if data.get(key) not in (None, value):
            raise ValueError(f"{source} means {key}: {value}, but {key} is {data[key]}")
        data[key] = value

    if data.get("batch_size") is not None:
        total, micro = data.pop("batch_size"), data.get("micro_batch_size") or 1
        if total % micro:
            raise ValueError(f"batch_size {total} is not a multiple of micro_batch_size {micro}")
        put("gradient_accumulation_steps", total // micro, f"batch_size {total}")
        warn_once(f"batch_size {total} -> gradient_accumulation_steps {total // micro} (Axolotl's rule: batch_size / "
                  "micro_batch_size)")
    if "cut_cross_entropy" in data:
        value = data.pop("cut_cross_entropy")
        if value is not None:
            put("chunked_cross_entropy", bool(value), f"cut_cross_entropy: {value}")
    if "float32" in data:
        if data.pop("float32"):
            put("bf16", False, "float32: true")
    for entry in data.pop("plugins", None) or []:
        module, status, reason = plugin_status(entry)
        if status == "error":
            raise ValueError(f"plugins: {entry}: {reason}")
        if status == "mapped" and module == "cut_cross_entropy":
            data.setdefault("chunked_cross_entropy", True)
        if status == "implemented" and module == "swanlab":
            data.setdefault("use_swanlab", True)  # as Axolotl: listing the plugin turns SwanLab on
        if status != "implemented":
            warn_once(f"plugins: {entry}: {reason}")
    return data


def rewrite_deprecated(data: dict, section: str) -> dict:
    data = dict(data)
    for old, target in DEPRECATED_KEYS[section].items():
        if old not in data:
            continue
        value = data.pop(old)
        new, convert = (target, None) if isinstance(target, str) else target
        if convert is not None:
            value = convert(value)
            if value is None:
                continue
        warn_once(f"config key '{old}' is deprecated; use '{new}'" + (f": {value}" if convert else ""))
        if "." in new:
            parent, child = new.split(".")
            data[parent] = {**(data.get(parent) or {}), child: value}
        elif new in data and data[new] != value:
            raise ValueError(f"both '{old}' (deprecated) and '{new}' are set")
        else:
            data[new] = value
    return data
