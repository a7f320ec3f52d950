"""Image collections -> (stable key, path) items -> shards with stable ids.

A gallery build is resumable only if the same command cuts the same shards
every time, on any machine: keys are derived from the source alone (relative
path for folders and list files, the dataset's image id for COCO/VG json),
and shard membership from a seeded hash of the key, never from directory
listing order or the number of workers. Each shard carries the sha256 of its
key list, which the writer stores with the commit marker, so a resume against
a changed collection is refused instead of silently mixing two plans.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmixer.errors import VlmixerError
from vlmixer.pipeline.containers import parse_locator, read_located
from vlmixer.pipeline.gallery.images import (
    BadImage,
    DecodedImage,
    DecodePolicy,
    decode_bytes,
    read_regular_file,
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list", ".tsv"})


@dataclass(frozen=True, slots=True)
class ImageItem:
    """One image to process: `key` is its identity in the gallery, `path` where to read it.

    For a member of a webdataset tar or a parquet file, `path` is a locator
    (`containers.tar_locator`) and `offset`/`size` say where its bytes are when the
    planner knew it (a tar member's byte range; a parquet row in `offset`)."""

    key: str
    path: str
    offset: int = -1
    size: int = -1
    problem: str = ""  # why it cannot be read, when the planner already knows (a tar cut short)


@dataclass(frozen=True)
class Shard:
    """A unit of work and of commit: its id and keys never change for the same source and seed."""

    shard_id: str
    items: tuple[ImageItem, ...]

    @property
    def keys_sha256(self) -> str:
        return keys_digest(it.key for it in self.items)


def keys_digest(keys: Iterable[str]) -> str:
    """Order-independent digest of a key set (what a committed shard held)."""
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class WalkReport:
    """What a folder walk left out and why: directory links already walked (symlink loops,
    two links to one directory), unreadable directories. Special files named like images
    are not here: they are listed as images and their reading records them as failed."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    max_kept: int = 1000
    count: int = 0

    def add(self, path: str, reason: str) -> None:
        self.count += 1
        if len(self.skipped) < self.max_kept:
            self.skipped.append((path, reason))


def walk_images(root: Path, report: WalkReport | None = None) -> Iterator[ImageItem]:
    """Image files under `root` in a stable order, each real directory walked once.

    Directory symlinks are followed, but a directory is identified by (device, inode), so
    `self -> .` or two links into one tree cannot repeat or loop. Nothing is opened here:
    files are listed by name, and reading refuses anything but a regular file."""
    report = report if report is not None else WalkReport()
    seen: set[tuple[int, int]] = set()
    st = os.stat(root)
    seen.add((st.st_dev, st.st_ino))
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            report.add(rel or ".", f"unreadable directory ({e.strerror or e})")
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            r = f"{rel}/{e.name}" if rel else e.name
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    ds = e.stat(follow_symlinks=True)
                except OSError as err:
                    report.add(r, f"unreadable directory ({err.strerror or err})")
                    continue
                ident = (ds.st_dev, ds.st_ino)
                if ident in seen:
                    target = os.readlink(e.path) if e.is_symlink() else "a directory already walked"
                    report.add(r, f"directory already walked (link to {target})")
                    continue
                seen.add(ident)
                subdirs.append((Path(e.path), r))
            elif Path(e.name).suffix.lower() in IMAGE_EXTENSIONS:
                yield ImageItem(key=r, path=e.path)
        stack.extend(reversed(subdirs))


def _folder(root: Path) -> list[ImageItem]:
    return list(walk_images(root))


def _list_file(path: Path, image_root: Path | None) -> Iterator[ImageItem]:
    """One image per line: `path`, or `key<TAB>path`; relative paths are taken from the
    list file's directory (or `image_root`); blank lines and `#` comments are skipped.
    Streamed: a list of 100M lines never sits in memory."""
    base = str(image_root or path.parent)
    join, isabs, norm = os.path.join, os.path.isabs, os.path.normpath  # not pathlib: 100M lines
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if "\t" in line:
                    key, _, rel = line.partition("\t")
                    key, rel = key.strip(), rel.strip()
                    if not key or not rel:
                        raise VlmixerError(f"{path}:{n}: expected 'path' or 'key<TAB>path', got {line!r}")
                else:
                    key = rel = line
                yield ImageItem(key=key, path=norm(rel if isabs(rel) else join(base, rel)))
    except (OSError, UnicodeDecodeError) as e:
        raise VlmixerError(f"{path}: cannot read image list ({e})") from None


def _json_items(path: Path, image_root: Path | None) -> list[ImageItem]:
    """COCO (`{"images": [{"id", "file_name"}]}`) or Visual Genome image_data
    (`[{"image_id", "url"|"file_name"}]`); images are looked up under `image_root`
    (default: the json's directory), VG ones as `<image_id>.jpg` when no file name is given."""
    base = image_root or path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VlmixerError(f"{path}: cannot read image json ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        records, id_key = data["images"], "id"
    elif isinstance(data, list):
        records, id_key = data, "image_id"
    else:
        raise VlmixerError(f"{path}: expected a COCO json with an 'images' list or a VG list of images")
    items = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise VlmixerError(f"{path}: image entry {i} is not an object")
        rid = r.get(id_key, r.get("id"))
        name = r.get("file_name")
        if name is None and isinstance(r.get("url"), str):
            name = r["url"].rstrip("/").rsplit("/", 1)[-1]
        if name is None and rid is not None:
            name = f"{rid}.jpg"
        if rid is None or not isinstance(name, str) or not name:
            raise VlmixerError(f"{path}: image entry {i} needs '{id_key}' and 'file_name' (got {sorted(r)[:6]})")
        p = Path(name)
        items.append(ImageItem(key=str(rid), path=str(p if p.is_absolute() else base / p)))
    return items


def iter_source(src: str | Path, *, image_root: str | Path | None = None,
                walk: WalkReport | None = None) -> Iterator[ImageItem]:
    """The images of a folder, list file or COCO/VG json as they are found (unsorted, not yet
    checked for repeated keys: the planner does both on disk)."""
    p = Path(src)
    root = Path(image_root) if image_root is not None else None
    if p.is_dir():
        return walk_images(p, walk)
    if not p.exists():
        raise VlmixerError(f"{p}: image source does not exist (a folder, a list file, a COCO/VG json, "
                           "webdataset .tar shards or .parquet files)")
    if not p.is_file():
        raise VlmixerError(f"{p}: image source is not a regular file or a folder")
    if p.suffix.lower() == ".json":
        return iter(_json_items(p, root))
    if p.suffix.lower() in LIST_EXTENSIONS:
        return _list_file(p, root)
    raise VlmixerError(f"{p}: unknown image source; give a folder, a .txt/.lst list of paths, a json, "
                       "webdataset .tar shards or .parquet files")


def read_source(src: str | Path, *, image_root: str | Path | None = None) -> list[ImageItem]:
    """All images of a folder, list file or COCO/VG json, in key order; keys are unique.
    Holds the list in memory: for small collections and tools; builds use the streaming plan."""
    p = Path(src)
    items = list(iter_source(p, image_root=image_root))
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise VlmixerError(f"{p}: image key {it.key!r} appears twice ({seen[it.key]} and {it.path})")
        seen[it.key] = it.path
    if not items:
        raise VlmixerError(f"{p}: no images found")
    return sorted(items, key=lambda it: it.key)


def bucket_order(seed: int, key: str) -> int:
    """Where a key falls in the seeded shard order (see `make_shards`)."""
    return _bucket_hash(seed, key)


def _bucket_hash(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def make_shards(items: Sequence[ImageItem], shard_size: int, *, seed: int = 0) -> list[Shard]:
    """Cut items into shards of at most `shard_size`: order by a seeded hash of the key,
    then chunk. The result depends only on the key set, the size and the seed; the hash
    order spreads a folder's sub-directories (often one size or source each) over shards."""
    if shard_size < 1:
        raise VlmixerError(f"shard size must be >= 1, got {shard_size}")
    ordered = sorted(items, key=lambda it: (_bucket_hash(seed, it.key), it.key))
    shards = []
    for i in range(0, len(ordered), shard_size):
        chunk = sorted(ordered[i: i + shard_size], key=lambda it: it.key)
        shards.append(Shard(shard_id=f"s{seed}-{shard_size}-{i // shard_size:06d}", items=tuple(chunk)))
    return shards


def plan_summary(shards: Sequence[Shard]) -> dict[str, Any]:
    return {"shards": len(shards), "images": sum(len(s.items) for s in shards)}


# -- reading an item's bytes ----------------------------------------------------------------


def read_item_bytes(item: ImageItem) -> bytes:
    """The encoded image of an item: a plain file, a tar member or a parquet cell."""
    if parse_locator(item.path) is not None:
        try:
            return read_located(item.path, item.offset, item.size)
        except OSError as e:
            msg = str(e)
            raise BadImage(msg if msg.startswith(("truncated", "no image")) else f"unreadable ({msg})") from None
        except Exception as e:  # noqa: BLE001  a damaged parquet page is this image's problem only
            raise BadImage(f"unreadable ({type(e).__name__}: {str(e)[:100]})") from None
    return read_regular_file(item.path)


def load_item(item: ImageItem, policy: DecodePolicy) -> DecodedImage:
    """Read and decode one item; any problem is a `BadImage` with its reason."""
    if item.problem:
        raise BadImage(item.problem)
    return decode_bytes(read_item_bytes(item), policy)
