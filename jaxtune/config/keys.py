"""Every Axolotl key's status in jaxtune, from Axolotl's own schema (`axolotl_keys.json`) and jaxtune's
config: implemented (a field), mapped (rewritten to a jaxtune key), no_effect (accepted, one warning) or
error (a feature jaxtune does not have). `jaxtune validate` reports the keys of a config that are not
implemented as they are; `scripts/gen_config_docs.py` writes docs/config.md from the same tables.

    key_statuses("top", "optimizer")  ->  [("implemented", "Optimizer by Axolotl/HF name: ...")]
"""

from __future__ import annotations

from pydantic import BaseModel

from jaxtune.config.base import (AXOLOTL_KEYS, DEPRECATED_KEYS, MAPPED, NO_EFFECT, NOT_SUPPORTED, PLUGIN_KEYS,
                                 PLUGIN_MODULES, is_off, plugin_status)

SECTIONS = ("top", "plugin", "dataset", "dataset_type", "trl")
STATUSES = ("implemented", "mapped", "no_effect", "error")


def section_models(section: str) -> list[type[BaseModel]]:
    from jaxtune.config import Config
    from jaxtune.config.data import DatasetConfig, UserDefinedFormat, UserDefinedPreference
    from jaxtune.config.rl import TRLKeys

    return {"top": [Config], "plugin": [Config], "dataset": [DatasetConfig],
            "dataset_type": [UserDefinedFormat, UserDefinedPreference], "trl": [TRLKeys]}[section]


def _field_description(section: str, key: str) -> str | None:
    for model in section_models(section):
        for name, field in model.model_fields.items():
            if key in (name, field.alias):
                return field.description or ""
    return None


def key_statuses(section: str, key: str) -> list[tuple[str, str]]:
    """Every status `key` has in `section` (a well-kept table gives exactly one)."""
    table = "top" if section == "plugin" else section
    out = []
    description = _field_description(section, key)
    if description is not None:
        out.append(("implemented", description))
    deprecated = DEPRECATED_KEYS.get(table, {}).get(key)
    if deprecated is not None:
        out.append(("mapped", f"renamed: {deprecated if isinstance(deprecated, str) else deprecated[0]}"))
    if key in MAPPED.get(table, {}):
        out.append(("mapped", MAPPED[table][key]))
    if key in NO_EFFECT.get(table, {}):
        out.append(("no_effect", NO_EFFECT[table][key]))
    if key in NOT_SUPPORTED.get(table, {}):
        out.append(("error", NOT_SUPPORTED[table][key]))
    if section == "plugin" and not out and key in PLUGIN_KEYS:
        module = PLUGIN_KEYS[key]
        status, reason = PLUGIN_MODULES.get(module, ("error", f"Axolotl's {module} plugin is not supported"))
        out.append((status, f"a key of Axolotl's {module} plugin: {reason}"))
    return out


def status_table() -> dict[str, dict[str, tuple[str, str]]]:
    """section -> Axolotl key -> (status, reason); keys with no status or several are left out (the test
    `test_every_axolotl_key_has_one_status` names them)."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for section in SECTIONS:
        out[section] = {}
        for key in AXOLOTL_KEYS[section]:
            statuses = key_statuses(section, key)
            if len(statuses) == 1:
                out[section][key] = statuses[0]
    return out


def config_report(data: dict) -> list[str]:
    """One line per key of a raw config (top level, datasets, trl) whose status is not `implemented`:
    what it was mapped to, why it has no effect. Errors never get here (validation raised)."""
    lines = []

    def report(section: str, key: str, value, where: str) -> None:
        statuses = key_statuses(section, key) or (key_statuses("plugin", key) if section == "top" else [])
        if len(statuses) != 1 or statuses[0][0] in ("implemented", "error"):
            return
        status, reason = statuses[0]
        if status == "no_effect" and is_off(value):
            return
        lines.append(f"{where}{key}: {'mapped' if status == 'mapped' else 'no effect'}: {reason}")

    for key, value in data.items():
        if key == "plugins":
            for entry in value or []:
                module, status, reason = plugin_status(entry)
                lines.append(f"plugins: {entry}: {status.replace('_', ' ')}: {reason}")
            continue
        report("top", key, value, "")
    for group in ("datasets", "test_datasets"):
        for i, entry in enumerate(data.get(group) or []):
            if isinstance(entry, dict):
                for key, value in entry.items():
                    report("dataset", key, value, f"{group}[{i}].")
    for key, value in (data.get("trl") or {}).items():
        report("trl", key, value, "trl.")
    return lines
