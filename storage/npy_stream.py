"""One-dimensional `.npy` files written and read in chunks through plain file I/O.

A memory map would be simpler, but every page it touches counts as resident
memory of the process until it is unmapped: a finalize that writes or reads
gigabytes of index through maps has a peak RSS that grows with the gallery.
Through read/write the same bytes pass via the page cache, which the kernel
owns. The files are ordinary `.npy` (format 1.0), byte for byte what
`np.lib.format.open_memmap` writes, so readers memory-map them as before.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vlmixer.errors import StoreError


class NpyWriter:
    """Appends to a `(length,)` array of `dtype`; `close` checks every element was written.

    With `length=None` it writes headerless values: a temporary for an array whose length is
    known only at the end, turned into a `.npy` by `npy_from_raw`."""

    def __init__(self, path: Path, dtype: str | np.dtype, length: int | None) -> None:
        self.path, self.dtype, self.length = path, np.dtype(dtype), length
        self.written = 0
        self._f: BinaryIO = open(path, "wb")  # noqa: SIM115  closed in close() or abandon()
        if length is not None:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (int(length),)}
            np.lib.format.write_array_header_1_0(self._f, header)

    def append(self, values: np.ndarray) -> None:
        a = np.ascontiguousarray(values, dtype=self.dtype)
        if self.length is not None and self.written + len(a) > self.length:
            raise StoreError(f"{self.path}: more than {self.length} values written")
        self._f.write(a.data)
        self.written += len(a)

    def close(self) -> None:
        """Flush and fsync: a manifest written after this never names a file the disk lacks."""
        if self._f.closed:
            return
        try:
            if self.length is not None and self.written != self.length:
                raise StoreError(f"{self.path}: {self.written} values written of {self.length}")
            self._f.flush()
            if self.length is not None:
                os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def abandon(self) -> None:
        """Close without the checks, on an error path (a no-op after `close`)."""
        self._f.close()


def npy_from_raw(raw: Path, path: Path, dtype: str | np.dtype, chunk_bytes: int = 16 << 20) -> None:
    """Write the headerless values of `raw` as the `.npy` file `path`, then delete `raw`."""
    dt = np.dtype(dtype)
    n = raw.stat().st_size // dt.itemsize
    per = max(1, chunk_bytes // dt.itemsize)
    w = NpyWriter(path, dt, n)
    try:
        with open(raw, "rb") as f:
            for _ in range(0, n, per):
                w.append(np.fromfile(f, dtype=dt, count=per))
        w.close()
    finally:
        w.abandon()
    raw.unlink()


class NpyReader:
    """Reads slices of a one-dimensional `.npy` without mapping it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "rb")  # noqa: SIM115  closed in close()
        version = np.lib.format.read_magic(self._f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(self._f)
        if len(shape) != 1 or fortran or dtype.hasobject:
            raise StoreError(f"{path}: expected a flat array of plain values, found {shape} {dtype}")
        self.dtype, self.length, self._data = dtype, int(shape[0]), self._f.tell()

    def read(self, start: int, count: int) -> np.ndarray:
        count = max(0, min(count, self.length - start))
        self._f.seek(self._data + start * self.dtype.itemsize)
        out = np.fromfile(self._f, dtype=self.dtype, count=count)
        if len(out) != count:
            raise StoreError(f"{self.path}: cut short at element {start + len(out)} of {self.length}")
        return out

    def close(self) -> None:
        self._f.close()
