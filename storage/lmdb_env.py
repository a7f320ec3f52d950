"""One LMDB environment per path per process, shared and reference-counted.

LMDB refuses to open the same environment twice in one process, yet a build
driver reads committed shards while its writer is open, and `verify` opens a
reader beside the user's. Every open goes through here: readers share one
handle (or the writer's), the last release closes it, and a forked child
starts afresh instead of touching its parent's handles.
"""
from __future__ import annotations

import os
from pathlib import Path

import lmdb

from vlmixer.errors import StoreError

MAX_DBS = 16
# This process's pid, refreshed by an at-fork hook: hot read paths compare against it
# instead of calling os.getpid() (a system call) on every record.
PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: PID.__setitem__(0, os.getpid()))
_ENVS: dict[str, list] = {}  # realpath -> [pid, env, writable, refcount]


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
