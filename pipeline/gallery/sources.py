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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmixer.errors import VlmixerError
from vlmixer.files import read_lines

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list", ".tsv"})


@dataclass(frozen=True, slots=True)
class ImageItem:
    """One image to process: `key` is its identity in the gallery, `path` where to read it."""

    key: str
    path: str


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


def _folder(root: Path) -> list[ImageItem]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            p = Path(dirpath) / name
            items.append(ImageItem(key=p.relative_to(root).as_posix(), path=str(p)))
    return items


def _list_file(path: Path, image_root: Path | None) -> list[ImageItem]:
    """One image per line: `path`, or `key<TAB>path`; relative paths are taken from the
    list file's directory (or `image_root`); blank lines and `#` comments are skipped."""
    base = image_root or path.parent
    lines = read_lines(path, "image list")
    items = []
    for n, line in enumerate(lines, 1):
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
        p = Path(rel)
        items.append(ImageItem(key=key, path=str(p if p.is_absolute() else base / p)))
    return items


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


def read_source(src: str | Path, *, image_root: str | Path | None = None) -> list[ImageItem]:
    """All images of a folder, list file or COCO/VG json, in key order; keys are unique."""
    p = Path(src)
    root = Path(image_root) if image_root is not None else None
    if p.is_dir():
        items = _folder(p)
    elif not p.exists():
        raise VlmixerError(f"{p}: image source does not exist (a folder, a list file or a COCO/VG json)")
    elif p.suffix.lower() == ".json":
        items = _json_items(p, root)
    elif p.suffix.lower() in LIST_EXTENSIONS:
        items = _list_file(p, root)
    else:
        raise VlmixerError(f"{p}: unknown image source; give a folder, a .txt/.lst list of paths, or a json")
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise VlmixerError(f"{p}: image key {it.key!r} appears twice ({seen[it.key]} and {it.path})")
        seen[it.key] = it.path
    if not items:
        raise VlmixerError(f"{p}: no images found")
    return sorted(items, key=lambda it: it.key)


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
