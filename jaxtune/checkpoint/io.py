"""Low-level checkpoint files: safetensors reading and sharded writing, atomic directories.

Everything written goes to a temporary sibling first and is renamed into place, so a crash never
leaves a half-written export where a good one was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxtune.errors import ModelLoadError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MiB', '2e9'."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot read {size!r} as a size (examples: 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out_dir` only if the block finishes.

    The old directory (if any) is moved aside, the new one renamed in, then the old one removed;
    on error the temporary directory is deleted and `out_dir` is untouched.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class TensorToWrite:
    """A tensor to export, produced on demand so only one shard is in memory at a time."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(out_dir: Path, tensors: Sequence[TensorToWrite], max_shard_size: int | str = "5GB") -> list[str]:
    """Write `tensors` as HF does: one `model.safetensors`, or numbered shards plus an index.

    Tensors keep their order; a shard closes before the tensor that would push it past
    `max_shard_size` (a single larger tensor gets a shard of its own). Returns the file names.
    """
    limit = parse_size(max_shard_size)
    shards: list[list[TensorToWrite]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = [SAFETENSORS_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        arrays = {}
        for t in shard:
            arr = np.ascontiguousarray(t.produce())
            if arr.shape != tuple(t.shape) or arr.dtype != np.dtype(t.dtype):
                raise AssertionError(f"{t.name}: produced {arr.shape} {arr.dtype}, planned {t.shape} {t.dtype}")
            arrays[t.name] = arr
            weight_map[t.name] = fname
        save_file(arrays, str(out_dir / fname), metadata={"format": "pt"})
        del arrays
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        names.append(SAFETENSORS_INDEX)
    return names


class SafetensorsReader:
    """Tensor-by-tensor access to a checkpoint directory (single file or sharded with an index).

    Files are memory-mapped by safetensors; `get` copies one tensor out at a time.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / SAFETENSORS_INDEX
        single = self.directory / SAFETENSORS_SINGLE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{index_path} is not a valid safetensors index ({e})") from None
            self._file_of = {name: self.directory / f for name, f in weight_map.items()}
        elif single.exists():
            self._file_of = None
            self._single = single
        else:
            raise ModelLoadError(
                f"no weights in {self.directory}: looked for {SAFETENSORS_SINGLE} and {SAFETENSORS_INDEX}"
            )
        self._handles: dict[Path, object] = {}
        if self._file_of is None:
            self._file_of = {name: single for name in self._open(single).keys()}

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.exists():
                raise ModelLoadError(f"{path} is listed in {SAFETENSORS_INDEX} but does not exist")
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"{path} is not a valid safetensors file ({e})") from None
        return self._handles[path]

    def names(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._open(self._file_of[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> np.ndarray:
        path = self._file_of[name]
        try:
            return self._open(path).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read tensor {name} from {path} ({e})") from None

    def close(self) -> None:
        self._handles.clear()
