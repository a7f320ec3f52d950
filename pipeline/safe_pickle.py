"""Reading pickles of numpy arrays from files people download, without running their code.

Two formats the jobs read are pickles: the bottom-up attention weights of
airsplay/py-bottom-up-attention (a `.pkl` dict of numpy arrays) and the `info`
member of MILVLG bottom-up-attention.pytorch `.npz` files (a dict pickled as a
0-d object array by `np.savez`). A pickle names functions to call while
loading, so `pickle.load` or `np.load(allow_pickle=True)` on such a file runs
whatever its author chose. This unpickler resolves only the few globals numpy
needs to rebuild arrays and scalars, each through a checked stand-in; any other
global (os.system, builtins.eval, a torch rebuild function, ...) is refused
before it is looked up, and the result is then checked to hold nothing but
arrays of plain dtypes, numbers, strings, lists and dicts.
"""
from __future__ import annotations

import codecs
import io
import pickle
from typing import Any

import numpy as np


class UnsafePickle(pickle.UnpicklingError):
    """The pickle names something other than the numpy array machinery, or holds other objects."""


def _reconstruct(cls: Any, *args: Any) -> Any:
    if cls is not np.ndarray:
        raise UnsafePickle(f"refused: array reconstruction of {cls!r}")
    return np.ndarray.__new__(np.ndarray, *args)


def _scalar(dtype: Any, *args: Any) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickle("refused: numpy scalar of an object dtype")
    if len(args) != 1 or not isinstance(args[0], bytes):
        raise UnsafePickle("refused: numpy scalar without its bytes")
    return np.frombuffer(args[0], dtype=dtype, count=1)[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickle("refused: array of an object dtype")
    arr = np.frombuffer(buf, dtype=dtype)
    if order == "F":
        return arr.reshape(tuple(shape)[::-1]).T
    return arr.reshape(tuple(shape))


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1")
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise UnsafePickle(f"refused: _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


# (module, name) -> the checked stand-in, across numpy 1.x and 2.x module names. `numpy.dtype` may build
# the object dtype of np.savez's 0-d wrapper: its elements still come only from these globals, and
# `check_plain` refuses any object array but that one wrapper.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
    ("collections", "OrderedDict"): dict,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and scalars, numbers, strings, bytes, lists, tuples and dicts; refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise UnsafePickle(f"refused global {module}.{name} (only numpy arrays, numbers, strings, lists "
                               "and dicts are read)")
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("refused: persistent id")


def check_plain(obj: Any, depth: int = 0) -> None:
    """Refuse anything but arrays of plain dtypes, numbers, strings, bytes, lists, tuples and dicts."""
    if depth > 8:
        raise UnsafePickle("refused: nested deeper than 8 levels")
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic)):
        if isinstance(obj, np.generic) and obj.dtype.hasobject:
            raise UnsafePickle("refused: a numpy object scalar")
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafePickle("refused: an object array (it would unpickle Python objects element by element)")
        return
    if isinstance(obj, (list, tuple)):
        for x in obj:
            check_plain(x, depth + 1)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise UnsafePickle(f"refused: a dict key of type {type(k).__name__}")
            check_plain(v, depth + 1)
        return
    raise UnsafePickle(f"refused: a {type(obj).__name__}")


def loads_numpy_only(data: bytes, *, encoding: str = "ASCII", unwrap: bool = False) -> Any:
    """Unpickle `data` if it holds only numpy arrays, numbers, strings, lists and dicts.

    `unwrap`: the pickle is np.savez's 0-d object array around one such object (MILVLG's `info`).
    `encoding="latin1"` reads Python 2 pickles (Detectron's `.pkl` weights). Anything else is
    an UnsafePickle saying what was refused; the payload never runs.
    """
    try:
        obj = NumpyOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()
    except UnsafePickle:
        raise
    except Exception as e:  # noqa: BLE001  truncated or foreign bytes: many exception types
        raise UnsafePickle(f"unreadable pickle ({type(e).__name__}: {str(e)[:80]})") from None
    if unwrap and isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        if obj.ndim != 0:
            raise UnsafePickle(f"refused: an object array of shape {obj.shape}; expected a single object")
        obj = obj.item()
    check_plain(obj)
    return obj
