"""Images a build recorded as bad and has not added since, read from the parts themselves.

The shard that meets a bad image writes `failed[key] = {path, reason, shard}`
in its part; a later shard of the same part that adds the image deletes the
record in the same transaction. A retry that lands in another part cannot
delete it, so an image counts as failed only while no part holds it. The
build plans `--retry-failed` and reports from this before any manifest
exists, finalize counts it, and the reader lists it: one rule for all three.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from vlmixer.storage.gallery_format import unpack_record
from vlmixer.storage.gallery_writer import list_parts, open_part_readonly
from vlmixer.storage.lmdb_env import release_env

# (part name, an open read transaction of it, its named sub-databases)
PartView = tuple[str, lmdb.Transaction, Mapping[bytes, Any]]


def open_failures(views: Sequence[PartView]) -> list[dict[str, str]]:
    """Failures of the given parts whose image no part holds, by key: {key, path, reason, shard, part}.

    A key failed in several parts is listed once, with the record of the last part."""
    by_key: dict[str, dict[str, str]] = {}
    for name, txn, dbs in views:
        for k, v in txn.cursor(db=dbs[b"failed"]):
            key = bytes(k)
            if any(t.get(key, db=d[b"imgkey"]) is not None for _, t, d in views):
                continue
            text = key.decode("utf-8", errors="replace")
            by_key[text] = {"key": text, **unpack_record(v, f"{name}: failure record {text!r}"), "part": name}
    return [by_key[k] for k in sorted(by_key)]


def failed_images(root: str | Path) -> list[dict[str, str]]:
    """The open failures of a gallery, finished or not (no manifest needed)."""
    with _part_views(Path(root)) as views:
        return open_failures(views)


def count_failed_images(root: str | Path) -> int:
    """How many images `failed_images` lists, counted without holding them: a build of a
    web-scale collection can record millions, and finalize needs only the number."""
    n = 0
    with _part_views(Path(root)) as views:
        for i, (_, txn, dbs) in enumerate(views):
            for key in txn.cursor(db=dbs[b"failed"]).iternext(values=False):
                if any(t.get(key, db=d[b"imgkey"]) is not None for _, t, d in views):
                    continue
                if any(t.get(key, db=d[b"failed"]) is not None for _, t, d in views[i + 1:]):
                    continue  # counted with the last part that records it
                n += 1
    return n


@contextmanager
def _part_views(root: Path) -> Iterator[list[PartView]]:
    envs, views = [], []
    try:
        for p in list_parts(root):
            env = open_part_readonly(p)
            envs.append(env)
            dbs = {n: env.open_db(n, create=False) for n in (b"failed", b"imgkey")}
            views.append((p.name, env.begin(), dbs))
        yield views
    finally:
        for _, txn, _ in views:
            txn.abort()
        for env in envs:
            release_env(env)
