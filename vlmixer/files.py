"""File primitives every layer uses: atomic writes, line files and content hashes.

They sit at the ground of the package (beside errors and the config loader) so that
storage, the batch jobs and the trainer share one crash-safe way of writing a file."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from vlmixer.errors import VlmixerError


def atomic_write(path: str | Path, fill: Callable[[BinaryIO], object]) -> None:
    """`fill` writes into a temporary file `.NAME.*.tmp` beside `path`; fsync, then os.replace.

    Streaming writers (a multi-GB checkpoint) never hold the whole file in memory;
    a crash leaves only the temporary, never a half `path`. The temporary is
    created as plain `open()` would create it (mode 0666 less the umask), not
    0600 as `tempfile.mkstemp` does, so a store written by one account on a
    shared cluster stays readable by the training job of another.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(p)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _create_temporary(p: Path) -> tuple[int, str]:
    for _ in range(100):
        tmp = str(p.parent / f".{p.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{p.parent}: cannot create a unique temporary file for {p.name}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))


def read_lines(path: str | Path, what: str) -> list[str]:
    """A UTF-8 text file's lines (vocabularies, image lists); unreadable is a VlmixerError
    naming the file and `what` it should have been."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise VlmixerError(f"{p}: cannot read {what} ({e})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dir_size(path: str | Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
