"""One LMDB environment per path per process, shared and reference-counted.

LMDB refuses to open the same environment twice in one process, yet a build
driver reads committed shards while its writer is open, and `verify` opens a
reader beside the user's. Every open goes through here: readers share one
handle (or the writer's), the last release closes it, and a forked child
starts afresh instead of touching its parent's handles.

Before mapping, `check_data_file` compares data.mdb's size with the pages its
newest meta page claims: a truncated file (a copy cut short, a full disk)
would otherwise kill the process with SIGBUS on the first read past its end.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import lmdb

from vlmixer.errors import StoreError

MAX_DBS = 16
# This process's pid, refreshed by an at-fork hook: hot read paths compare against it
# instead of calling os.getpid() (a system call) on every record.
PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: PID.__setitem__(0, os.getpid()))
_ENVS: dict[str, list] = {}  # realpath -> [pid, env, writable, refcount]

# LMDB's meta page (lmdb.h / mdb.c, format version 1, 64-bit): a 16-byte page header, then
# magic u32, version u32, address u64, map size u64, two 48-byte database records (the free
# list's first field holds the page size), last used page number u64, transaction id u64.
_META = struct.Struct("<IIQQI44x48xQQ")
_META_OFFSET = 16
_MAGIC = 0xBEEFC0DE


def check_data_file(path: str | Path, *, allow_empty: bool = False) -> None:
    """Refuse an environment whose data.mdb is shorter than its last committed transaction needs.

    Each of the two meta pages names the last page in use; the newer one (higher
    transaction id) is what a reader maps, so the file must hold (last page + 1) pages.
    An empty file is a writer's environment that never committed (`allow_empty` for writers).
    """
    f = Path(path) / "data.mdb"
    try:
        size = f.stat().st_size
        if size == 0 and allow_empty:
            return
        with open(f, "rb") as fh:
            head = fh.read(_META_OFFSET + _META.size)
            if len(head) < _META_OFFSET + _META.size:
                raise StoreError(f"{f}: truncated to {size} bytes, smaller than one LMDB page; "
                                 "the store is damaged: restore or rebuild it")
            magic, _, _, _, psize, last, txn = _META.unpack_from(head, _META_OFFSET)
            if magic != _MAGIC or psize < 512 or psize & (psize - 1):
                raise StoreError(f"{f}: not an LMDB data file (bad meta page)")
            metas = [(txn, last)]
            fh.seek(psize)
            head2 = fh.read(_META_OFFSET + _META.size)
    except OSError as e:
        raise StoreError(f"{f}: cannot read LMDB part ({e.strerror or type(e).__name__})") from None
    if len(head2) == _META_OFFSET + _META.size:
        m2, _, _, _, _, last2, txn2 = _META.unpack_from(head2, _META_OFFSET)
        if m2 == _MAGIC:
            metas.append((txn2, last2))
    _, last = max(metas)
    need = (last + 1) * psize
    if size < need:
        raise StoreError(f"{f}: truncated: {size:,} bytes, its last transaction needs {need:,} bytes "
                         f"({last + 1} pages of {psize}); the store is damaged: restore or rebuild it")


def open_env(path: str | Path, *, write: bool, map_size: int = 1 << 30) -> lmdb.Environment:
    p = Path(path)
    key = os.path.realpath(p)
    pid = os.getpid()
    hit = _ENVS.get(key)
    if hit is not None and hit[0] != pid:
        # Inherited through fork: the parent's handle must not be used here, and py-lmdb
        # still counts it as open, so close this process's copy before opening afresh.
        del _ENVS[key]
        try:
            hit[1].close()
        except lmdb.Error:
            pass
        hit = None
    if hit is not None:
        if write and not hit[2]:
            raise StoreError(f"{p}: open for reading in this process; close readers before writing")
        hit[3] += 1
        return hit[1]
    if (p / "data.mdb").exists():
        check_data_file(p, allow_empty=write)
    if write:
        p.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(p), map_size=map_size, max_dbs=MAX_DBS, subdir=True, readahead=False,
                        meminit=False)
    else:
        if not (p / "data.mdb").exists():
            raise StoreError(f"{p}: missing LMDB part (data.mdb)")
        env = lmdb.open(str(p), readonly=True, lock=False, readahead=False, max_dbs=MAX_DBS, subdir=True,
                        max_readers=1024)
    _ENVS[key] = [pid, env, write, 1]
    return env


def release_env(env: lmdb.Environment) -> None:
    for key, hit in list(_ENVS.items()):
        if hit[1] is env:
            if hit[0] != os.getpid():
                return  # the parent's handle: open_env in this process replaces it
            hit[3] -= 1
            if hit[3] <= 0:
                del _ENVS[key]
                env.close()
            return
