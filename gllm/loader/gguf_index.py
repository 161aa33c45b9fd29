"""What gLLM reads of a GGUF file: its scalar metadata and where each tensor's bytes lie.

`gguf.GGUFReader` parses every metadata array of a file, and a tokenizer's vocabulary and merges are
about 100,000 strings: seconds even for a small model. The index is taken from the reader once, kept as
JSON in the cache (`gllm.loader.cache`), and later loads map the tensors straight from the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: its GGUF name and type, its shape (GGUF order, fastest dimension first), and its
    data as `GGUFReader` presents it: byte offset in the file, numpy dtype and shape."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    dtype: str
    data_shape: tuple[int, ...]


@dataclass
class GGUFIndex:
    path: Path
    meta: dict[str, Any]  # every scalar metadata value; arrays (vocabulary, merges) are left out
    tensors: list[TensorEntry]
    _map: np.memmap | None = field(default=None, repr=False)

    @classmethod
    def from_reader(cls, reader: GGUFReader, path: Path) -> GGUFIndex:
        meta = {}
        for key, f in reader.fields.items():
            if f.types and f.types[0] != GGUFValueType.ARRAY:
                value = f.contents()
                meta[key] = value.item() if isinstance(value, np.generic) else value
        tensors = [
            TensorEntry(
                t.name, GGMLQuantizationType(t.tensor_type), tuple(int(d) for d in t.shape),
                int(t.data_offset), t.data.dtype.str, tuple(int(d) for d in t.data.shape),
            )
            for t in reader.tensors
        ]  # fmt: skip
        return cls(path, meta, tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "tensors": [[t.name, int(t.tensor_type), t.shape, t.offset, t.dtype, t.data_shape] for t in self.tensors],
        }

    @classmethod
    def from_json(cls, value: dict[str, Any], path: Path) -> GGUFIndex:
        tensors = [
            TensorEntry(name, GGMLQuantizationType(kind), tuple(shape), offset, dtype, tuple(data_shape))
            for name, kind, shape, offset, dtype, data_shape in value["tensors"]
        ]
        return cls(path, dict(value["meta"]), tensors)

    def data(self, tensor: TensorEntry) -> np.ndarray:
        """The tensor's bytes, memory-mapped copy-on-write (pages are read from the file when touched and
        shared with the page cache), shaped as `GGUFReader` gives them."""
        if self._map is None:
            self._map = np.memmap(self.path, mode="c")
        dtype = np.dtype(tensor.dtype)
        raw = np.asarray(self._map[tensor.offset : tensor.offset + self._size(tensor)])  # a plain array: slices
        return raw.view(dtype).reshape(tensor.data_shape)  # of a memmap each cost a Python-level finalizer

    def read(self, tensor: TensorEntry) -> np.ndarray:
        """A copy of the tensor's bytes read from the file (its pages are not mapped into this process)."""
        with open(self.path, "rb") as f:
            f.seek(tensor.offset)
            raw = np.fromfile(f, dtype=np.uint8, count=self._size(tensor))
        return raw.view(np.dtype(tensor.dtype)).reshape(tensor.data_shape)

    @staticmethod
    def _size(tensor: TensorEntry) -> int:
        return int(np.prod(tensor.data_shape)) * np.dtype(tensor.dtype).itemsize
