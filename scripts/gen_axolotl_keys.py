"""Read every config key of Axolotl's pydantic schema once and store it as data
(`jaxtune/config/axolotl_keys.json`), so jaxtune can give each Axolotl key exactly one status without
ever importing Axolotl (its import pulls torch, transformers, bitsandbytes, ...).

The schema is read from the wheel's source with `ast`, not imported: the flat YAML keys are the fields
of `AxolotlInputConfig` and all its bases (by alias where a field has one), the keys of a dataset entry
are the fields of Axolotl's dataset models (`dataset_type`: of a user-defined `type:` mapping), the `trl:` keys those of `TRLConfig`, and each plugin's
keys (`axolotl/integrations/<name>/args.py`) are top-level keys tagged with the plugin.

    pip download axolotl==0.19.0 --no-deps -d /tmp/axdl
    python scripts/gen_axolotl_keys.py /tmp/axdl/axolotl-0.19.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "jaxtune" / "config" / "axolotl_keys.json"
SCHEMAS = "axolotl/utils/schemas/"
DATASET_MODELS = ("SFTDataset", "PretrainingDataset", "DPODataset", "KTODataset", "StepwiseSupervisedDataset",
                  "SyntheticDataset")
TYPE_MODELS = ("UserDefinedPrompterType", "UserDefinedDPOType", "UserDefinedKTOType")  # a dataset's `type:` mapping
DESCRIPTION_CHARS = 240


def _const(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return ast.unparse(node)


def _field(stmt: ast.AnnAssign) -> dict:
    entry = {"type": ast.unparse(stmt.annotation)}
    value = stmt.value
    if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) == "Field":
        kwargs = {k.arg: k.value for k in value.keywords if k.arg}
        if value.args:
            kwargs.setdefault("default", value.args[0])
        if "default" in kwargs:
            entry["default"] = _const(kwargs["default"])
        if "alias" in kwargs:
            entry["alias"] = _const(kwargs["alias"])
        extra = kwargs.get("json_schema_extra")
        if isinstance(extra, ast.Dict):
            for k, v in zip(extra.keys, extra.values):
                if isinstance(k, ast.Constant) and k.value == "description":
                    entry["description"] = _const(v)
        elif "description" in kwargs:
            entry["description"] = _const(kwargs["description"])
    elif value is not None:
        entry["default"] = _const(value)
    if isinstance(entry.get("description"), str):
        text = re.sub(r"\s+", " ", entry["description"]).strip()
        entry["description"] = text[:DESCRIPTION_CHARS] + ("..." if len(text) > DESCRIPTION_CHARS else "")
    if not isinstance(entry.get("default", None), (str, int, float, bool, list, dict, type(None))):
        entry["default"] = repr(entry["default"])
    return entry


def _classes(sources: dict[str, str]) -> dict[str, tuple[list[str], dict[str, dict], str]]:
    """class name -> (base names, own fields, module) over all given modules."""
    out = {}
    for module, text in sources.items():
        for node in ast.parse(text).body:
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
            fields = {}
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    name = stmt.target.id
                    if name.startswith("_") or name == "model_config":
                        continue
                    fields[name] = _field(stmt)
            out[node.name] = (bases, fields, module)
    return out


def _all_fields(classes, name: str) -> dict[str, dict]:
    """Fields of a class and its bases (bases first, the class's own last), keyed by their YAML name."""
    if name not in classes:
        return {}
    bases, own, module = classes[name]
    fields: dict[str, dict] = {}
    for base in bases:
        fields.update(_all_fields(classes, base))
    for key, entry in own.items():
        yaml_key = entry.pop("alias", None) or key
        fields[yaml_key] = {**entry, "model": name}
    return fields


def read_schema(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        version = next(n for n in names if n.endswith(".dist-info/METADATA")).split("-")[1].removesuffix(".dist")
        schema_src = {n: zf.read(n).decode() for n in names if n.startswith(SCHEMAS) and n.endswith(".py")}
        plugin_src = {n: zf.read(n).decode() for n in names
                      if re.fullmatch(r"axolotl/integrations/[^/]+/args\.py", n)}
    classes = _classes(schema_src)
    top = _all_fields(classes, "AxolotlInputConfig")
    dataset: dict[str, dict] = {}
    for model in DATASET_MODELS:
        for key, entry in _all_fields(classes, model).items():
            dataset.setdefault(key, entry)
    dataset_type: dict[str, dict] = {}
    for model in TYPE_MODELS:
        for key, entry in _all_fields(classes, model).items():
            dataset_type.setdefault(key, entry)
    trl = _all_fields(classes, "TRLConfig")
    plugins: dict[str, dict] = {}
    for module, text in sorted(plugin_src.items()):
        plugin = module.split("/")[2]
        plugin_classes = _classes({module: text})
        for cls in plugin_classes:
            for key, entry in _all_fields(plugin_classes, cls).items():
                if key not in top:
                    plugins.setdefault(key, {**entry, "plugin": plugin})
    return {"axolotl_version": version, "top": dict(sorted(top.items())), "plugin": dict(sorted(plugins.items())),
            "dataset": dict(sorted(dataset.items())), "dataset_type": dict(sorted(dataset_type.items())),
            "trl": dict(sorted(trl.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="axolotl-<version>-py3-none-any.whl")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    schema = read_schema(args.wheel)
    args.out.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    counts = {k: len(v) for k, v in schema.items() if isinstance(v, dict)}
    print(f"Axolotl {schema['axolotl_version']}: {counts} -> {args.out}")


if __name__ == "__main__":
    main()
