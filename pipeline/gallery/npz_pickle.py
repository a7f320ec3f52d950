"""Reading the pickled `info` of MILVLG bottom-up-attention.pytorch `.npz` files without running code.

Their extractor saves `info` (a dict of object ids, confidences, attribute ids
and the image size) through `np.savez`, which pickles it as a 0-d object array.
`np.load(allow_pickle=True)` would execute whatever a downloaded file's pickle
names. Object members go through the pipeline's numpy-only unpickler
(`vlmixer.pipeline.safe_pickle`), so a hostile file runs nothing; plain members
are read as numpy reads them with allow_pickle=False.
"""
from __future__ import annotations

import zipfile
from typing import Any

import numpy as np

from vlmixer.pipeline.safe_pickle import loads_numpy_only


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
            return loads_numpy_only(f.read(), unwrap=True)
        count = int(np.prod(shape)) if shape else 1
        raw = f.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise ValueError(f"{member}: truncated array ({len(raw)} of {count * dtype.itemsize} bytes)")
        arr = np.frombuffer(raw, dtype=dtype, count=count)
        return arr.reshape(shape, order="F" if fortran else "C")
