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

import ml_dtypes
import numpy as np
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


def read_json_file(path: Path, what: str) -> dict:
    """A JSON file's content, or a one-line error naming it: `no {what} in DIR (looked for PATH)`."""
    if not path.exists():
        raise ModelLoadError(f"no {what} in {path.parent} (looked for {path})")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from None


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


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 * 2**20


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `align`-byte boundary.

    On CPU, `jax.device_put` adopts such a buffer without copying, so a parameter assembled here
    costs its own size once, not twice.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, _Entry]:
    """Parse and validate a safetensors header (format: u64 length, JSON, raw little-endian data)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise ModelLoadError(f"{path} is not a valid safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a valid safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    entries = {}
    data_start, data_size = 8 + n, size - 8 - n
    for name, info in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: tensor {name} has an invalid header entry ({e!r})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise ModelLoadError(
                f"{path} is not a valid safetensors file (tensor {name}: bytes {begin}..{end} do not hold "
                f"{shape} {dtype} within {data_size} data bytes; the file may be truncated)"
            )
        entries[name] = _Entry(path, dtype, shape, data_start + begin, nbytes)
    return entries


class SafetensorsReader:
    """Tensor-by-tensor access to a checkpoint directory (single file or sharded with an index).

    Tensors are read with plain file reads into buffers the caller owns (`read_into`), not through
    a memory map: mapped checkpoint pages would count in the process's memory on top of the
    parameters being built. This is why jaxtune parses the (simple, documented) safetensors
    header itself instead of using `safetensors.safe_open`.
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
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.directory / f).exists():
                    raise ModelLoadError(f"{self.directory / f} is listed in {SAFETENSORS_INDEX} but does not exist")
            self._entries = {}
            for f in files:
                self._entries.update(_read_header(self.directory / f))
            missing = sorted(set(weight_map) - set(self._entries))
            if missing:
                raise ModelLoadError(f"{index_path} lists {missing[0]}, which is in none of the shards")
        elif single.exists():
            self._entries = _read_header(single)
        else:
            raise ModelLoadError(
                f"no weights in {self.directory}: looked for {SAFETENSORS_SINGLE} and {SAFETENSORS_INDEX}"
            )

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def file_of(self, name: str) -> Path:
        return self._entries[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name].dtype

    def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        """Read tensor `name` into `out` (same shape and dtype, C-contiguous); returns `out`."""
        e = self._entries[name]
        if out.shape != e.shape or out.dtype != e.dtype or not out.flags.c_contiguous:
            raise ValueError(f"{name}: buffer {out.shape} {out.dtype} does not fit {e.shape} {e.dtype}")
        try:
            with open(e.path, "rb") as f:
                f.seek(e.offset)
                got = f.readinto(out.reshape(-1).view(np.uint8))
        except OSError as err:
            raise ModelLoadError(f"cannot read tensor {name} from {e.path} ({err})") from None
        if got != e.nbytes:
            raise ModelLoadError(f"{e.path} is truncated: tensor {name} needs {e.nbytes} bytes, read {got}")
        return out

    def get(self, name: str) -> np.ndarray:
        e = self._entries[name]
        return self.read_into(name, np.empty(e.shape, e.dtype))
