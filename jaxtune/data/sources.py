"""Where rows come from: local files and directories, fsspec URLs, and `datasets` hub paths.

Everything is read by `datasets`; this module decides how to call it and turns its failures into
errors that name the file and line (bad JSON), or say what was looked for (missing paths).

A dataset entry's `name` (a configuration, `datasets.load_dataset(path, name=...)`) is honoured where
a configuration can exist: a hub dataset, and a local directory in the hub layout (a README.md whose
YAML header lists `configs:`). Anywhere else (a single file, a `save_to_disk` directory, a directory
without `configs:`, an fsspec URL) it could mean nothing, and setting it is an error, never ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxtune.config import DatasetConfig
from jaxtune.errors import JaxtuneError

EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
              ".txt": "text"}


class DataSourceError(JaxtuneError):
    """A dataset could not be read; the message names the file, line or path."""


def _builder(entry: DatasetConfig, name: str) -> str | None:
    if entry.ds_type:
        return "json" if entry.ds_type == "jsonl" else entry.ds_type
    for ext, builder in EXTENSIONS.items():
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return builder
    return None


def _is_url(path: str) -> bool:
    return "://" in path


def _find_bad_json(files: list[Path]) -> str | None:
    """'file:line: message' for the first malformed JSON line/document, or None."""
    for file in files:
        if file.suffix not in (".json", ".jsonl") or not file.is_file():
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        try:
            json.loads(text)
            continue  # one JSON document (array or object)
        except json.JSONDecodeError as whole:
            if text.lstrip().startswith("["):
                return f"{file}:{whole.lineno}: invalid JSON: {whole.msg}"
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                return f"{file}:{lineno}: invalid JSON line: {exc.msg} (column {exc.colno})"
    return None


def load_rows(entry: DatasetConfig, index: int):
    """The raw `datasets.Dataset` of one entry (sharded if asked). `index` is used in messages."""
    import datasets

    where = f"datasets[{index}] ({entry.path})"
    path = Path(entry.path).expanduser()
    try:
        if _is_url(entry.path):
            ds = _load_url(entry, where)
        elif path.is_file():
            _no_name(entry, where, "a single local file has no configurations")
            builder = _builder(entry, path.name)
            if builder is None:
                raise DataSourceError(f"{where}: cannot tell the file type of {path.name}; set ds_type "
                                      f"(one of json, parquet, csv, arrow, text)")
            ds = _load_files(builder, [str(path)], where)
        elif path.is_dir():
            ds = _load_dir(entry, path, where)
        else:
            ds = _load_hub(entry, where, path)
    except DataSourceError:
        raise
    except Exception as exc:  # datasets raises many types; name the source and keep the cause
        raise DataSourceError(f"{where}: could not be read: {type(exc).__name__}: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if entry.split not in ds:
            raise DataSourceError(f"{where}: no split '{entry.split}' (has {sorted(ds)})")
        ds = ds[entry.split]
    if entry.shards:
        ds = ds.shard(num_shards=entry.shards, index=entry.shards_idx or 0, contiguous=True)
    return ds


def _load_files(builder: str, files: list[str], where: str, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as exc:
        if builder == "json":
            bad = _find_bad_json([Path(f) for f in files if not _is_url(f)])
            if bad:
                raise DataSourceError(bad) from None
        raise DataSourceError(f"{where}: could not be read as {builder}: {type(exc).__name__}: {exc}") from exc


def _load_dir(entry: DatasetConfig, path: Path, where: str):
    import datasets

    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        _no_name(entry, where, "a save_to_disk directory has no configurations (pick a split with split:)")
        return datasets.load_from_disk(str(path))  # written by save_to_disk
    configs = readme_configs(path)
    if configs and not entry.data_files:
        return _load_configured_dir(entry, path, configs, where)
    if entry.name:
        if configs:
            raise DataSourceError(f"{where}: name: {entry.name} selects a configuration of README.md and "
                                  "data_files selects files; set one of them")
        hint = f"; to read the folder {entry.name}/, set path: {path / entry.name}" if (path / entry.name).is_dir() \
            else ""
        scripts = "" if not list(path.glob("*.py")) else " (dataset loading scripts are not supported)"
        raise DataSourceError(f"{where}: name: {entry.name} selects a configuration, but the directory declares "
                              f"none (no `configs:` in a README.md YAML header){scripts}{hint}")
    if entry.data_files:
        names = [entry.data_files] if isinstance(entry.data_files, str) else entry.data_files
        files = [str(path / n) for n in names]
    else:
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _builder(entry, p.name))
    if not files:
        raise DataSourceError(f"{where}: the directory has no data files ({', '.join(EXTENSIONS)})")
    builders = {_builder(entry, Path(f).name) for f in files}
    if len(builders) != 1 or None in builders:
        raise DataSourceError(f"{where}: the directory mixes file types {sorted(map(str, builders))}; set "
                              "data_files or ds_type")
    return _load_files(builders.pop(), files, where)


def readme_configs(path: Path) -> dict[str, bool] | None:
    """{config name: is default} from the `configs:` of a directory's README.md YAML header (the hub
    layout), or None when it lists none."""
    import yaml

    readme = path / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    header = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(header)
    except yaml.YAMLError as exc:
        raise DataSourceError(f"{readme}: the YAML header cannot be read: {exc}") from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list) or not configs:
        return None
    return {str(c.get("config_name", "default")): bool(c.get("default")) for c in configs if isinstance(c, dict)}


def _load_configured_dir(entry: DatasetConfig, path: Path, configs: dict[str, bool], where: str):
    """A local directory in the hub layout: `datasets` reads the configuration README.md describes."""
    import datasets

    if entry.name is not None and entry.name not in configs:
        raise DataSourceError(f"{where}: no configuration '{entry.name}' in {path / 'README.md'} (has "
                              f"{sorted(configs)})")
    if entry.name is None and len(configs) > 1 and not any(configs.values()) and "default" not in configs:
        raise DataSourceError(f"{where}: {path / 'README.md'} lists configurations {sorted(configs)} and none is "
                              "the default; set name: to one of them")
    return datasets.load_dataset(str(path), name=entry.name, split=entry.split)


def _no_name(entry: DatasetConfig, where: str, why: str) -> None:
    if entry.name is not None:
        raise DataSourceError(f"{where}: name: {entry.name} cannot apply: {why}; remove it (it selects a hub "
                              "dataset's configuration, or one a directory's README.md lists under `configs:`)")


def _load_url(entry: DatasetConfig, where: str):
    import fsspec

    _no_name(entry, where, "fsspec URLs are read as files")

    fs, root = fsspec.core.url_to_fs(entry.path)
    protocol = entry.path.split("://", 1)[0]
    if not fs.exists(root):
        raise DataSourceError(f"{where}: {entry.path} does not exist")
    if fs.isdir(root):
        names = [entry.data_files] if isinstance(entry.data_files, str) else (entry.data_files or [])
        found = [f"{root.rstrip('/')}/{n}" for n in names] if names else \
            sorted(f for f in fs.find(root) if _builder(entry, f))
    else:
        found = [root]
    if not found:
        raise DataSourceError(f"{where}: no data files under {entry.path}")
    files = [f"{protocol}://{f}" if "://" not in f else f for f in found]
    builder = _builder(entry, files[0])
    if builder is None:
        raise DataSourceError(f"{where}: cannot tell the file type of {files[0]}; set ds_type")
    return _load_files(builder, files, where)


def _load_hub(entry: DatasetConfig, where: str, path: Path):
    import datasets

    try:
        return datasets.load_dataset(entry.path, name=entry.name, revision=entry.revision,
                                     data_files=entry.data_files, split=entry.split)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise DataSourceError(
            f"{where}: not found locally (no file or directory at {path.resolve()}) and could not be loaded "
            f"from the Hugging Face hub ({reason}); check the path, or the network if it is a hub dataset"
        ) from None
