"""Writing a patch gallery: one writer per part, one LMDB transaction per shard.

A shard is the gallery job's unit of work. Its images are buffered in memory
and written in a single write transaction whose last record is the shard's
commit marker, so a killed writer leaves either the whole shard or nothing,
and resume is "skip every shard that has a marker". A full map is not fatal:
the transaction is aborted, the map doubled and the shard written again.

Readers and writers. Readers map parts read-only without LMDB's lock table
(`lock=False`), so a writer cannot see them and would reuse pages they still
read. The protocol keeps the two apart instead: a part listed in
`manifest.json` is finalized and never written again; whatever is added
later (a `--retry-failed` pass, another source) goes into the next part, and
readers see it only when they reopen after the next finalize. One process at
a time writes a gallery: it holds `build.lock` (see `write_lock`) from its
first write through finalize, and a second writer is refused naming the
first.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import numpy as np

from vlmixer.errors import StoreError
from vlmixer.files import atomic_write_json
from vlmixer.storage import gallery_format as fmt
from vlmixer.storage import headers, write_lock
from vlmixer.storage.headers import read_json_object
from vlmixer.storage.lmdb_env import open_env, release_env
from vlmixer.storage.vocab import Vocabulary

LOCK_FILE = "build.lock"


@dataclass
class _PendingImage:
    key: str
    path: str
    width: int
    height: int
    features: np.ndarray
    records: np.ndarray


@dataclass
class ShardBuffer:
    """What one shard will commit; filled by `add_image` / `add_failure`."""

    shard_id: str
    feature_dim: int
    images: list[_PendingImage] = field(default_factory=list)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    _keys: set[str] = field(default_factory=set)

    def add_image(
        self,
        key: str,
        path: str,
        width: int,
        height: int,
        boxes: np.ndarray,
        features: np.ndarray,
        concepts: np.ndarray,
        confidences: np.ndarray,
        attr_ids: np.ndarray | None = None,
        attr_scores: np.ndarray | None = None,
    ) -> None:
        """Queue one image and its patches; patches are stored sorted by confidence descending."""
        if not key:
            raise StoreError("gallery: an image key must be a non-empty string")
        if key in self._keys:
            raise StoreError(f"gallery: image key {key!r} added twice in shard {self.shard_id}")
        if width <= 0 or height <= 0:
            raise StoreError(f"gallery: image {key!r} has size {width}x{height}")
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        n = boxes.shape[0]
        features = np.asarray(features)
        if features.shape != (n, self.feature_dim):
            raise StoreError(
                f"gallery: image {key!r}: features shape {features.shape}, expected ({n}, {self.feature_dim})"
            )
        concepts = np.asarray(concepts).reshape(-1)
        confidences = np.asarray(confidences, dtype=np.float32).reshape(-1)
        if concepts.shape[0] != n or confidences.shape[0] != n:
            raise StoreError(f"gallery: image {key!r}: {n} boxes but {concepts.shape[0]} concepts, "
                             f"{confidences.shape[0]} confidences")
        with np.errstate(over="ignore"):  # checked after the cast: > 65504 overflows to inf
            features = features.astype(fmt.FEATURE_DTYPE)
        if not np.all(np.isfinite(features)):
            raise StoreError(f"gallery: image {key!r}: non-finite feature values (or beyond float16 range)")
        rec = np.zeros(n, dtype=fmt.PATCH_DTYPE)
        rec["box"] = boxes
        rec["width"] = width
        rec["height"] = height
        rec["concept"] = concepts
        rec["conf"] = confidences
        rec["attr_ids"] = -1
        if attr_ids is not None:
            ai = np.asarray(attr_ids)
            ai = ai.reshape(n, ai.shape[-1] if ai.ndim == 2 else -1) if n else ai.reshape(0, 0)
            sc = (np.zeros(ai.shape, np.float32) if attr_scores is None
                  else np.asarray(attr_scores, np.float32).reshape(ai.shape))
            if sc.shape != ai.shape:
                raise StoreError(f"gallery: image {key!r}: attr_ids {ai.shape} vs attr_scores {sc.shape}")
            sc = np.where(ai >= 0, sc, -np.inf)
            order = np.argsort(-sc, axis=1, kind="stable")[:, : fmt.MAX_ATTRS]
            ai = np.take_along_axis(ai, order, axis=1)
            sc = np.take_along_axis(sc, order, axis=1)
            k = ai.shape[1]
            rec["attr_ids"][:, :k] = np.where(np.isfinite(sc), ai, -1)
            rec["attr_scores"][:, :k] = np.where(np.isfinite(sc), sc, 0)
        order = np.argsort(-confidences, kind="stable")
        self.images.append(_PendingImage(key, str(path), int(width), int(height),
                                         features[order], rec[order]))
        self._keys.add(key)
        self.failures.pop(key, None)

    def add_failure(self, key: str, path: str, reason: str) -> None:
        """Record a bad image with its reason; it is listed in the store and skipped."""
        if key in self._keys:
            raise StoreError(f"gallery: image {key!r} both added and failed in shard {self.shard_id}")
        self.failures[key] = {"path": str(path), "reason": str(reason), "shard": self.shard_id}


class GalleryWriter:
    """Writes shards into one part (`parts/part-NNNNN`) of a gallery.

    `part=None` is the first part not yet finalized (part 0 of a new gallery, the
    next one of a finished gallery): a finalized part may be mapped by readers and
    is refused. The writer holds the gallery's `build.lock` until `close`, unless
    `lock_held_by_driver` says the process steering it (a Ray job's driver, whose
    writer runs in an actor) holds it for the whole run. Several writers of
    different parts may run under one driver. The build header `gallery.json` is
    created by the first writer and must match for every later one, so a resumed
    build cannot silently change vocabulary or feature size.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        part: int | None = None,
        feature_dim: int,
        concepts: Vocabulary,
        attributes: Vocabulary | None = None,
        provenance: Mapping[str, Any] | None = None,
        map_size: int = 1 << 30,
        lock_held_by_driver: bool = False,
    ) -> None:
        self.root = Path(root)
        self._locked = not lock_held_by_driver
        if self._locked:
            acquire_build_lock(self.root)
        try:
            self._open(part, feature_dim, concepts, attributes, provenance, map_size)
        except BaseException:
            if self._locked:
                release_build_lock(self.root)
            raise

    def _open(self, part: int | None, feature_dim: int, concepts: Vocabulary, attributes: Vocabulary | None,
              provenance: Mapping[str, Any] | None, map_size: int) -> None:
        sealed = sealed_parts(self.root)
        if part is None:
            part = writable_part(self.root)
        elif fmt.part_name(part) in sealed:
            raise StoreError(f"{self.root}: part {fmt.part_name(part)} is finalized (listed in manifest.json) "
                             f"and may be mapped by readers; write part {writable_part(self.root)} instead "
                             "(GalleryWriter(part=None) picks it)")
        self.part = part
        self.feature_dim = int(feature_dim)
        header = {
            "format": fmt.FORMAT_NAME,
            "version": fmt.FORMAT_VERSION,
            "feature_dim": self.feature_dim,
            "block": fmt.BLOCK,
            "max_attrs": fmt.MAX_ATTRS,
            "concepts": concepts.to_json(),
            "concepts_sha256": concepts.sha256,
            "attributes": attributes.to_json() if attributes is not None else [],
            "attributes_sha256": attributes.sha256 if attributes is not None else None,
            "provenance": dict(provenance or {}),
        }
        ensure_header(self.root, header)
        self.env = open_env(self.root / "parts" / fmt.part_name(part), write=True, map_size=map_size)
        self.dbs = {name: self.env.open_db(name) for name in fmt.SUBDBS}

    # -- queries used for resume -------------------------------------------------
    def committed_shards(self) -> dict[str, dict[str, Any]]:
        with self.env.begin(db=self.dbs[b"shard"]) as txn:
            return {bytes(k).decode(): msgpack.unpackb(v) for k, v in txn.cursor()}

    def counts(self) -> tuple[int, int]:
        with self.env.begin() as txn:
            return (fmt.unpack_count(txn.get(b"n_images", db=self.dbs[b"meta"])),
                    fmt.unpack_count(txn.get(b"n_patches", db=self.dbs[b"meta"])))

    # -- writing -----------------------------------------------------------------
    @contextmanager
    def shard(self, shard_id: str) -> Iterator[ShardBuffer]:
        """Buffer a shard; it is committed when the block exits without an exception."""
        buf = ShardBuffer(shard_id=shard_id, feature_dim=self.feature_dim)
        yield buf
        self.commit(buf)

    def commit(self, buf: ShardBuffer) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    self._write(txn, buf)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _write(self, txn: lmdb.Transaction, buf: ShardBuffer) -> None:
        d = self.dbs
        sid = buf.shard_id.encode("utf-8")
        if txn.get(sid, db=d[b"shard"]) is not None:
            raise StoreError(f"gallery: shard {buf.shard_id!r} is already committed in part {self.part}")
        n_images = fmt.unpack_count(txn.get(b"n_images", db=d[b"meta"]))
        n_patches = fmt.unpack_count(txn.get(b"n_patches", db=d[b"meta"]))
        first_patch = n_patches
        feats, recs = [], []
        for img in buf.images:
            kb = img.key.encode("utf-8")
            if txn.get(kb, db=d[b"imgkey"]) is not None:
                raise StoreError(f"gallery: image key {img.key!r} is already in part {self.part}")
            img.records["image"] = n_images
            info = {"key": img.key, "path": img.path, "width": img.width, "height": img.height,
                    "start": n_patches, "count": len(img.records), "shard": buf.shard_id}
            txn.put(fmt.ukey(n_images), msgpack.packb(info), db=d[b"image"])
            txn.put(kb, fmt.ukey(n_images), db=d[b"imgkey"])
            txn.delete(kb, db=d[b"failed"])
            feats.append(img.features)
            recs.append(img.records)
            n_images += 1
            n_patches += len(img.records)
        if feats:
            self._write_blocks(txn, first_patch, np.concatenate(feats), np.concatenate(recs))
        for key, info in buf.failures.items():
            txn.put(key.encode("utf-8"), msgpack.packb(info), db=d[b"failed"])
        txn.put(b"n_images", fmt.pack_count(n_images), db=d[b"meta"])
        txn.put(b"n_patches", fmt.pack_count(n_patches), db=d[b"meta"])
        stats = dict(buf.stats)
        stats.update(images=len(buf.images), patches=n_patches - first_patch, failures=len(buf.failures))
        txn.put(sid, msgpack.packb(stats), db=d[b"shard"])  # commit marker: last

    def _write_blocks(self, txn: lmdb.Transaction, start: int, feats: np.ndarray, recs: np.ndarray) -> None:
        B = fmt.BLOCK
        pos = 0
        total = len(recs)
        while pos < total:
            gid = start + pos
            block, row = divmod(gid, B)
            take = min(B - row, total - pos)
            fbytes = feats[pos: pos + take].tobytes()
            rbytes = recs[pos: pos + take].tobytes()
            if row:
                old_f = txn.get(fmt.ukey(block), db=self.dbs[b"feat"])
                old_r = txn.get(fmt.ukey(block), db=self.dbs[b"pmeta"])
                old_s = txn.get(fmt.ukey(block), db=self.dbs[b"sums"])
                if old_f is None or old_r is None or old_s is None:
                    raise StoreError(f"gallery: part {self.part} block {block} missing while appending")
                # the block's checksums continue from the stored ones over the appended rows only, so
                # the old rows are not summed again and damage to them since stays detectable
                sums = fmt.extend_sums(old_s, fbytes, rbytes)
                fbytes = bytes(old_f) + fbytes
                rbytes = bytes(old_r) + rbytes
            else:
                sums = fmt.block_sums(fbytes, rbytes)
            txn.put(fmt.ukey(block), fbytes, db=self.dbs[b"feat"])
            txn.put(fmt.ukey(block), rbytes, db=self.dbs[b"pmeta"])
            txn.put(fmt.ukey(block), sums, db=self.dbs[b"sums"])
            pos += take

    def close(self) -> None:
        if self.env is not None:
            release_env(self.env)
            self.env = None
            if self._locked:
                release_build_lock(self.root)

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ensure_header(root: Path, header: dict[str, Any]) -> None:
    """Create `gallery.json`, or check an existing one describes the same gallery."""
    path = root / "gallery.json"
    if path.exists():
        old = read_json_object(path, "gallery header")
        check_format(old, path)
        for k in ("feature_dim", "block", "max_attrs", "concepts_sha256", "attributes_sha256"):
            if old.get(k) != header[k]:
                raise StoreError(f"{path}: existing gallery has {k}={old.get(k)!r}, this writer "
                                 f"{header[k]!r}; use a new output directory")
        return
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, header)


def check_format(meta: Mapping[str, Any], path: Path) -> None:
    headers.check_format(meta, path, name=fmt.FORMAT_NAME, version=fmt.FORMAT_VERSION, what="gallery",
                       remedy="rebuild the gallery")


def acquire_build_lock(root: str | Path) -> None:
    """Become the one process writing the gallery at `root` (re-entrant within a process)."""
    write_lock.acquire(Path(root) / LOCK_FILE, f"gallery {root}")


def release_build_lock(root: str | Path) -> None:
    write_lock.release(Path(root) / LOCK_FILE)


def build_lock(root: str | Path) -> contextlib.AbstractContextManager[None]:
    """Hold the gallery's write lock over a whole build (writers, then finalize)."""
    return write_lock.held(Path(root) / LOCK_FILE, f"gallery {root}")


def sealed_parts(root: str | Path) -> set[str]:
    """Names of the parts the current manifest lists: finalized, never written again."""
    path = Path(root) / "manifest.json"
    if not path.exists():
        return set()
    manifest = read_json_object(path, "gallery manifest")
    return {str(p.get("name")) for p in manifest.get("parts", []) if isinstance(p, dict)}


def writable_part(root: str | Path) -> int:
    """The part an append writes: the one after the last finalized part (resumed if it exists)."""
    sealed = [int(n.split("-", 1)[1]) for n in sealed_parts(root) if n.startswith("part-")]
    return max(sealed) + 1 if sealed else 0


def open_part_readonly(path: Path) -> lmdb.Environment:
    """A shared read handle (or this process's writer handle); give it back with `release_env`."""
    return open_env(path, write=False)


def list_parts(root: Path) -> list[Path]:
    parts_dir = root / "parts"
    if not parts_dir.is_dir():
        return []
    return sorted(p for p in parts_dir.iterdir() if p.is_dir() and p.name.startswith("part-"))


def committed_shards(root: str | Path) -> dict[str, dict[str, Any]]:
    """Every committed shard of every part: what a resumed build must not redo."""
    out: dict[str, dict[str, Any]] = {}
    for p in list_parts(Path(root)):
        env = open_part_readonly(p)
        try:
            with env.begin(db=env.open_db(b"shard", create=False)) as txn:
                for k, v in txn.cursor():
                    out[bytes(k).decode()] = {**msgpack.unpackb(v), "part": p.name}
        finally:
            release_env(env)
    return out


def open_failures(root: str | Path) -> list[dict[str, str]]:
    """Images recorded as failed (key, path, reason, shard, part) that no part holds since.

    A retry writes into the first unfinalized part, so a failure recorded in a
    finalized part stays there after the image succeeds elsewhere: that is not open.
    Needs no manifest (a build in progress asks)."""
    rows: list[dict[str, str]] = []
    held: set[bytes] = set()
    for p in list_parts(Path(root)):
        env = open_part_readonly(p)
        try:
            failed, imgkey = env.open_db(b"failed", create=False), env.open_db(b"imgkey", create=False)
            with env.begin() as txn:
                for k, v in txn.cursor(db=failed):
                    rows.append({"key": bytes(k).decode(), **msgpack.unpackb(bytes(v)), "part": p.name})
                held.update(bytes(k) for k in txn.cursor(db=imgkey).iternext(values=False))
        finally:
            release_env(env)
    return sorted((r for r in rows if r["key"].encode("utf-8") not in held), key=lambda r: r["key"])
