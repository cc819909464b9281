"""safetensors files read and written with NumPy, bfloat16 and float16 included, single or sharded.

The format is a little-endian u64 header size, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`` and the raw tensor bytes. It is parsed
here directly (with ``ml_dtypes`` for bfloat16) rather than through ``safetensors.numpy``,
whose bfloat16 support depends on its version; tensors are memory-mapped, so a folder is read
without holding two copies. Sharded checkpoints (``model.safetensors.index.json`` with a
``weight_map``) are read and written the way transformers writes them.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _corrupt(path, why: str) -> ValueError:
    return ValueError(f"{path} could not be read as safetensors ({why}); the file is corrupt or truncated: "
                      "re-export or re-download it")


def read_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file (read-only memory maps)."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _corrupt(path, "no header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise _corrupt(path, f"header of {header_len} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _corrupt(path, f"header is not JSON: {err}") from None
    start = 8 + header_len
    out = {}
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}, which embedjax does not read")
        dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if start + end > size or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise _corrupt(path, f"tensor {name} runs past the end of the file or has the wrong byte count")
        out[name] = data[start + begin:start + end].view(dtype).reshape(shape)
    return out


def read_folder(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a model folder: ``model.safetensors``, or the shards its index names."""
    folder = pathlib.Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map; it is not a transformers shard index")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{index} names shard {shard}, which is missing from {folder}")
            tensors.update(read_file(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index} maps {len(missing)} tensors that no shard holds, e.g. {missing[:3]}")
        return tensors
    path = folder / SINGLE_FILE
    if not path.is_file():
        hint = (" (found pytorch_model.bin: convert it to safetensors first)"
                if (folder / "pytorch_model.bin").exists() else "")
        raise FileNotFoundError(f"{path} is missing{hint}: embedjax reads weights from model.safetensors "
                                f"or a sharded {INDEX_FILE}")
    return read_file(path)


def write_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write one ``.safetensors`` file (tensors in name order, 8-byte aligned header)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name} has dtype {array.dtype}, which safetensors cannot store here")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with pathlib.Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())


def write_folder(folder: str | os.PathLike, tensors: Mapping[str, np.ndarray], *,
                 max_shard_bytes: int | None = None) -> list[str]:
    """Write the weights into ``folder``: one ``model.safetensors``, or shards of at most
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own) plus the index.
    Returns the file names written."""
    folder = pathlib.Path(folder)
    total = sum(np.asarray(a).nbytes for a in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_file(folder / SINGLE_FILE, tensors)
        return [SINGLE_FILE]
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = np.asarray(tensors[name]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files, weight_map = [], {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(folder / file, {n: tensors[n] for n in names})
        files.append(file)
        weight_map.update({n: file for n in names})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    return files + [INDEX_FILE]
