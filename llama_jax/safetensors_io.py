"""Minimal safetensors reader/writer on numpy memmaps.

We read the format ourselves (an 8-byte header length, a JSON header, raw little-endian bytes)
so that a tensor is a zero-copy view of the mapped file: a device shard can be cut out of it
without materialising the tensor, and bf16 works without torch.  Writing streams tensor by
tensor, so exporting never holds more than one tensor on the host.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Lazy access to the tensors of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path}: truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise SafetensorsError(f"{self.path}: header length {n} exceeds file size {size}")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._data_start = 8 + n
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size > 8 + n else np.zeros(0, np.uint8)
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor '{name}' has unsupported dtype {info['dtype']}")
            b, e = info["data_offsets"]
            need = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
            if e - b != need or self._data_start + e > size:
                raise SafetensorsError(f"{self.path}: tensor '{name}' byte range does not match its shape/dtype")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.header[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file (no copy)."""
        info = self.header[name]
        b, e = info["data_offsets"]
        buf = self._mm[self._data_start + b:self._data_start + e]
        return buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def write_file(path: str | os.PathLike, tensors: Iterable[tuple[str, tuple, np.dtype, callable]],
               metadata: dict | None = None) -> None:
    """Write a safetensors file from (name, shape, dtype, producer) entries; each producer is
    called once, in order, when its bytes are due, so only one tensor is in memory at a time."""
    entries = list(tensors)
    header: dict = {}
    offset = 0
    for name, shape, dtype, _ in entries:
        dtype = np.dtype(dtype)
        if dtype not in NAMES:
            raise SafetensorsError(f"cannot write dtype {dtype} for tensor '{name}'")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in entries:
            arr = np.ascontiguousarray(np.asarray(produce(), dtype=dtype))
            if arr.shape != tuple(shape):
                raise SafetensorsError(f"tensor '{name}': produced shape {arr.shape}, declared {tuple(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)  # no bytes copy of the tensor (tobytes() would make one)
            del arr  # before the next producer runs: one tensor in memory at a time


def iter_files(paths: Iterable[Path]) -> Iterator[SafetensorsFile]:
    for p in paths:
        yield SafetensorsFile(p)
