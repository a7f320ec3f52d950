"""Detectron-style numpy `.pkl` checkpoints (the bottom-up attention weights of
airsplay/py-bottom-up-attention), read through the pipeline's numpy-only unpickler."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmixer.errors import VlmixerError
from vlmixer.pipeline.safe_pickle import UnsafePickle, loads_numpy_only


def load_numpy_pickle(path: str | Path) -> Any:
    """The object in a numpy `.pkl` file (latin1 for Python 2 files), nothing but arrays, numbers,
    strings, lists and dicts. Raises VlmixerError naming the file when it holds anything else,
    or is not a pickle.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise VlmixerError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        return loads_numpy_only(data, encoding="latin1")
    except UnsafePickle as e:
        if str(e).startswith("unreadable pickle"):
            raise VlmixerError(f"{p}: cannot read as a numpy .pkl checkpoint ({e})") from None
        raise VlmixerError(f"{p}: not a plain numpy checkpoint: {e}") from None
