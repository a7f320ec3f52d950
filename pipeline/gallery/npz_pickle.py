"""Reading the pickled `info` of MILVLG bottom-up-attention.pytorch `.npz` files without running code.

Their extractor saves `info` (a dict of object ids, confidences, attribute ids
and the image size) through `np.savez`, which pickles it as a 0-d object array.
`np.load(allow_pickle=True)` would execute whatever a downloaded file's pickle
names. This unpickler resolves only the numpy callables an array needs and
then checks that the result holds nothing but arrays of plain dtypes, numbers,
strings, lists and dicts; any other global (`os.system`, `builtins.eval`, ...)
is refused before it is looked up, so a hostile file runs nothing.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from typing import Any

import numpy as np


class UnsafePickle(ValueError):
    """The pickle names something other than the numpy array machinery, or holds other objects."""


# (module, name) pairs a pickled numpy array of numbers or strings refers to, across numpy 1.x and 2.x
_ALLOWED = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickle(f"pickle refers to {module}.{name}, refused (only numpy arrays are allowed)")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("pickle uses persistent ids, refused")


def _check(obj: Any, depth: int = 0) -> None:
    if depth > 8:
        raise UnsafePickle("pickle nests deeper than 8 levels")
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic)):
        if isinstance(obj, np.generic) and obj.dtype.hasobject:
            raise UnsafePickle("pickle holds a numpy object scalar")
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafePickle("pickle holds a nested object array")
        return
    if isinstance(obj, (list, tuple)):
        for x in obj:
            _check(x, depth + 1)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise UnsafePickle(f"pickle dict key of type {type(k).__name__}")
            _check(v, depth + 1)
        return
    raise UnsafePickle(f"pickle holds a {type(obj).__name__}")


def loads_arrays_only(data: bytes) -> Any:
    """Unpickle `data` if it holds only numpy arrays, numbers, strings, lists and dicts."""
    try:
        obj = _ArraysOnly(io.BytesIO(data)).load()
    except UnsafePickle:
        raise
    except Exception as e:  # noqa: BLE001  truncated or foreign bytes: many exception types
        raise UnsafePickle(f"unreadable pickle ({type(e).__name__}: {str(e)[:80]})") from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        if obj.ndim != 0:
            raise UnsafePickle(f"object array of shape {obj.shape}; expected a single object")
        obj = obj.item()
    _check(obj)
    return obj


def read_npy_member(zf: zipfile.ZipFile, member: str) -> Any:
    """One `.npy` member of an npz: plain arrays as numpy loads them with allow_pickle=False,
    object arrays through the restricted unpickler."""
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{member}: unsupported .npy version {version}")
        if dtype.hasobject:
            return loads_arrays_only(f.read())
        count = int(np.prod(shape)) if shape else 1
        raw = f.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise ValueError(f"{member}: truncated array ({len(raw)} of {count * dtype.itemsize} bytes)")
        arr = np.frombuffer(raw, dtype=dtype, count=count)
        return arr.reshape(shape, order="F" if fortran else "C")
