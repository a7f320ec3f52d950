"""One writer per store at a time: an exclusive `flock` on a lock file inside the store.

flock rather than a file created with O_EXCL: the kernel drops the lock when its
holder dies (kill -9 included), so a crashed build never leaves a stale lock
behind, and a second writer is refused at once instead of both doing all the
work. The holder writes who it is (pid, host, command, start time) into the
file so the refusal can name it. Within one process the lock is re-entrant
(the build driver holds it while it runs writers and finalize in-process); a
forked child does not inherit the right to write.
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlmixer.errors import StoreError

_HELD: dict[str, list[int]] = {}  # realpath -> [pid, fd, depth]


def acquire(path: str | Path, what: str) -> None:
    """Take the exclusive lock `path` (created if missing) or raise StoreError naming its holder.

    `what` names the store for the message ("gallery out/g")."""
    p = Path(path)
    key = os.path.realpath(p)
    pid = os.getpid()
    held = _HELD.get(key)
    if held is not None and held[0] == pid:
        held[2] += 1
        return
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:  # another account's store, a read-only medium
        raise StoreError(f"{what}: cannot write here ({p}: {e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise StoreError(f"{what}: another process is writing it ({holder}); wait for it to finish or "
                         "write to another directory") from None
    except OSError as e:
        os.close(fd)
        raise StoreError(f"{p}: cannot lock for writing ({e.strerror})") from None
    os.ftruncate(fd, 0)
    cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
    os.pwrite(fd, (f"pid {pid} on {socket.gethostname()} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {cmd}\n").encode("utf-8", "replace"), 0)
    _HELD[key] = [pid, fd, 1]


def release(path: str | Path) -> None:
    key = os.path.realpath(path)
    held = _HELD.get(key)
    if held is None or held[0] != os.getpid():
        return
    held[2] -= 1
    if held[2] <= 0:
        del _HELD[key]
        os.close(held[1])  # closing the descriptor drops the flock


@contextmanager
def held(path: str | Path, what: str) -> Iterator[None]:
    acquire(path, what)
    try:
        yield
    finally:
        release(path)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
