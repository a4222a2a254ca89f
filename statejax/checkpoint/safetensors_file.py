"""A small read-only safetensors reader over `np.memmap`, with checked headers.

The format: an 8-byte little-endian header length N, N bytes of JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the
raw little-endian tensor bytes, offsets relative to the end of the header.

Own reader rather than the `safetensors` package: no torch or safetensors dependency at runtime,
bf16 is viewed through `ml_dtypes.bfloat16` (which numpy alone cannot represent), and a corrupt
or truncated file is refused with an `InputError` naming the file and what is wrong. `get`
gives zero-copy views of the memory-mapped file (nothing is read until a view's pages are
touched); `read` gives an owned, aligned copy of one tensor (what the importer uses).
"""

import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from statejax.errors import InputError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Real headers are a few hundred kB at most; a larger length is garbage, not a header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# XLA's CPU client adopts host buffers aligned to 64 bytes instead of copying them.
_ALIGN = 64
_MAX_READ = 1 << 30


class SafetensorsFile:
    """One safetensors file, its header checked when opened.

    Attributes:
      path: the file.
      metadata: the header's string-to-string `__metadata__` ({} when absent).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise InputError(f"cannot read safetensors file {self.path}: {e}") from e
        if size < 8:
            raise InputError(f"safetensors file {self.path} is truncated: {size} bytes, "
                             "shorter than the 8-byte header length")
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise InputError(
                    f"safetensors file {self.path} is corrupt or truncated: header length "
                    f"{header_len} bytes but the file has {size - 8} bytes after the length "
                    f"field (allowed: header length <= {min(size - 8, _MAX_HEADER_BYTES)})")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"safetensors file {self.path} has an invalid JSON header: {e}") from e
        if not isinstance(header, dict):
            raise InputError(f"safetensors file {self.path} header is a "
                             f"{type(header).__name__}; allowed: a JSON object")
        meta = header.pop("__metadata__", None) or {}
        self.metadata = dict(meta) if isinstance(meta, dict) else {}
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self._entries = {name: self._check_entry(name, e, data_len) for name, e in header.items()}
        self._map = None  # mapped on the first `get`

    def _check_entry(self, name, entry, data_len):
        where = f"tensor {name!r} in safetensors file {self.path}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: header entry is not a JSON object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InputError(f"{where}: dtype {dtype!r}; allowed: {sorted(DTYPES)}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise InputError(f"{where}: shape {shape!r}; allowed: a list of ints >= 0")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise InputError(f"{where}: data_offsets {offsets!r}; allowed: [begin, end] ints")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise InputError(f"{where}: data_offsets {offsets} span {end - begin} bytes; "
                             f"{dtype} {shape} needs {nbytes}")
        if end > data_len:
            raise InputError(f"safetensors file {self.path} is truncated: {name!r} ends at byte "
                             f"{end} of the data section but the file holds {data_len}")
        return DTYPES[dtype], tuple(shape), begin

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            names = sorted(self._entries)
            raise InputError(
                f"safetensors file {self.path} has no tensor {name!r}; it holds {len(names)} "
                f"tensors: {names[:5]}" + (" ..." if len(names) > 5 else "")) from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor `name`."""
        return self._entry(name)[1]

    def dtype(self, name: str) -> str:
        """The stored dtype of tensor `name` as the header spells it, e.g. "BF16"."""
        return _DTYPE_NAMES[self._entry(name)[0]]

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only zero-copy view of the mapped file, in its stored dtype
        and shape (bf16 as `ml_dtypes.bfloat16`)."""
        dtype, shape, begin = self._entry(name)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + begin
        flat = self._map[start:start + math.prod(shape) * dtype.itemsize].view(dtype)
        return flat.reshape(shape)

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a fresh writable copy, 64-byte aligned, in its stored dtype and
        shape.

        Aligned so that `jax.device_put` on CPU adopts the buffer without a second copy. Read
        with large `preadv` calls rather than through the map: a cold read then streams like
        `cat` instead of faulting page by page.
        """
        dtype, shape, begin = self._entry(name)
        nbytes = math.prod(shape) * dtype.itemsize
        raw = np.empty(nbytes + _ALIGN, np.uint8)
        skip = -raw.ctypes.data % _ALIGN
        out = raw[skip:skip + nbytes]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:  # Linux returns at most ~2 GiB per call
                n = os.preadv(fd, [out[done:done + _MAX_READ]], self._data_start + begin + done)
                if n <= 0:
                    raise InputError(f"safetensors file {self.path} is truncated: {name!r} "
                                     f"stops after {done} of {nbytes} bytes")
                done += n
        finally:
            os.close(fd)
        return out.view(dtype).reshape(shape)
