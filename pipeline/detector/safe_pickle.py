"""Read numpy `.pkl` checkpoints (detectron2 / Detectron model files) without running pickled code.

Why: a pickle names functions to call while loading, so `pickle.load` on a
downloaded file runs whatever its author chose. The bottom-up attention
weights of airsplay/py-bottom-up-attention ship only as such a file (a dict of
numpy arrays). This unpickler resolves only the few globals numpy needs to
rebuild arrays and scalars; any other global (os.system, builtins.eval,
a torch rebuild function, ...) is refused before it is called, so the file's
payload never runs.
"""
from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from vlmixer.errors import VlmixerError


def _reconstruct(cls: Any, *args: Any) -> Any:
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refused: array reconstruction of {cls!r}")
    return np.ndarray.__new__(np.ndarray, *args)


def _scalar(dtype: Any, *args: Any) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("refused: numpy scalar of an object dtype")
    if len(args) != 1 or not isinstance(args[0], bytes):
        raise pickle.UnpicklingError("refused: numpy scalar without its bytes")
    return np.frombuffer(args[0], dtype=dtype, count=1)[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("refused: array of an object dtype")
    arr = np.frombuffer(buf, dtype=dtype)
    if order == "F":
        return arr.reshape(tuple(shape)[::-1]).T
    return arr.reshape(tuple(shape))


def _dtype(spec: Any, *args: Any) -> np.dtype:
    d = np.dtype(spec, *args)
    if d.hasobject:
        raise pickle.UnpicklingError("refused: object dtype")
    return d


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1")
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refused: _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
    ("collections", "OrderedDict"): dict,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and scalars, numbers, strings, bytes, lists, tuples and dicts; refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (only numpy arrays, numbers, "
                                         "strings, lists and dicts are read)")
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused: persistent id")


def load_numpy_pickle(path: str | Path) -> Any:
    """The object in a numpy `.pkl` file, read with `NumpyOnlyUnpickler` (latin1 for Python 2 files).

    Raises VlmixerError naming the file when it holds anything else, or is not a pickle.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise VlmixerError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        obj = NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise VlmixerError(f"{p}: not a plain numpy checkpoint: {e}") from None
    except Exception as e:  # noqa: BLE001  truncated or not a pickle at all
        raise VlmixerError(f"{p}: cannot read as a numpy .pkl checkpoint ({type(e).__name__}: {e})") from None
    return obj
