"""Finishing a gallery: the index files the trainer samples from, then `manifest.json` last.

Finalize runs after every shard is committed and derives everything from the
parts, so re-running it rebuilds the same bytes, and a crash at any point
leaves either the old finished gallery or no manifest (not finished). It
streams each part's metadata blocks, never its features. The steps, in order:

1. `read_layout`: the header, and every part's counts turned into global offsets;
2. `write_patch_arrays`: per-patch concept, confidence and image, and each image's first patch;
3. `write_concept_index`: patches grouped by concept, confidence descending, then id;
4. `write_image_contexts`: each image's concepts, once each, with their best confidence;
5. `install_index` and `write_manifest`: swap the new index in, then write the manifest.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmixer.errors import StoreError
from vlmixer.files import atomic_write_json
from vlmixer.storage import gallery_format as fmt
from vlmixer.storage.gallery_failures import failed_images
from vlmixer.storage.gallery_writer import check_format, list_parts, open_part_readonly
from vlmixer.storage.headers import read_json_object
from vlmixer.storage.lmdb_env import release_env

# patches per step when finalize streams over the whole gallery (bounds its temporary memory)
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Layout:
    """Where every part's images and patches land in the global numbering."""

    root: Path
    header: dict[str, Any]
    parts: list[Path]
    part_info: list[dict[str, Any]]  # name, images, patches, shards, image_offset, patch_offset
    n_images: int
    n_patches: int

    @property
    def n_concepts(self) -> int:
        return len(self.header["concepts"])


def finalize_gallery(root: str | Path) -> dict[str, Any]:
    """Build the concept index and contextual concepts, then write `manifest.json` last."""
    layout = read_layout(Path(root))
    n_failed = len(failed_images(layout.root))
    tmp = layout.root / "index.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # a crashed finalize's leftovers
    tmp.mkdir()
    write_patch_arrays(tmp, layout)
    write_concept_index(tmp, layout)
    write_image_contexts(tmp, layout)
    install_index(layout.root, tmp)
    return write_manifest(layout, n_failed)


def read_layout(root: Path) -> Layout:
    header = read_json_object(root / "gallery.json", "gallery header")
    check_format(header, root / "gallery.json")
    parts = list_parts(root)
    part_info = []
    img_off = patch_off = 0
    for p in parts:
        env = open_part_readonly(p)
        try:
            meta = env.open_db(b"meta", create=False)
            shard = env.open_db(b"shard", create=False)
            with env.begin() as txn:
                ni = fmt.unpack_count(txn.get(b"n_images", db=meta))
                np_ = fmt.unpack_count(txn.get(b"n_patches", db=meta))
                n_shards = txn.stat(shard)["entries"]
        finally:
            release_env(env)
        part_info.append({"name": p.name, "images": ni, "patches": np_, "shards": n_shards,
                          "image_offset": img_off, "patch_offset": patch_off})
        img_off += ni
        patch_off += np_
    return Layout(root, header, parts, part_info, img_off, patch_off)


def _create(tmp: Path, name: str, dtype: str, n: int) -> np.memmap:
    return np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=(n,))


def _load(tmp: Path, name: str) -> np.ndarray:
    return np.load(tmp / f"{name}.npy", mmap_mode="r", allow_pickle=False)


def write_patch_arrays(tmp: Path, layout: Layout) -> None:
    """patch_concept, patch_conf, patch_image (global ids) and image_patch_start, from every part's
    metadata blocks and image records; concept ids outside the vocabulary are a StoreError."""
    n_patches, n_images = layout.n_patches, layout.n_images
    p_concept = _create(tmp, "patch_concept", "<i4", n_patches)
    p_conf = _create(tmp, "patch_conf", "<f4", n_patches)
    p_image = _create(tmp, "patch_image", "<i8", n_patches)
    img_start = _create(tmp, "image_patch_start", "<i8", n_images + 1)
    for info, p in zip(layout.part_info, layout.parts):
        env = open_part_readonly(p)
        try:
            pmeta = env.open_db(b"pmeta", create=False)
            idb = env.open_db(b"image", create=False)
            with env.begin(buffers=True) as txn:
                for k, v in txn.cursor(db=pmeta):
                    rec = np.frombuffer(v, dtype=fmt.PATCH_DTYPE)
                    g = info["patch_offset"] + fmt.unkey(k) * fmt.BLOCK
                    p_concept[g: g + len(rec)] = rec["concept"]
                    p_conf[g: g + len(rec)] = rec["conf"]
                    p_image[g: g + len(rec)] = rec["image"] + info["image_offset"]
                for k, v in txn.cursor(db=idb):
                    li = fmt.unkey(k)
                    rec_ = fmt.unpack_record(v, f"{p} image {li}")
                    img_start[info["image_offset"] + li] = info["patch_offset"] + rec_["start"]
        finally:
            release_env(env)
    img_start[n_images] = n_patches
    if n_patches and (p_concept.min() < 0 or p_concept.max() >= layout.n_concepts):
        raise StoreError(f"{layout.root}: patch concept ids outside the vocabulary of {layout.n_concepts} concepts")
    for a in (p_concept, p_conf, p_image, img_start):
        a.flush()


def write_concept_index(tmp: Path, layout: Layout) -> None:
    """concept_offsets, concept_patches, concept_confs: per concept, confidence descending, then id.

    Memory: whole-gallery temporaries are one sort order (8 B/patch) and the negated confidences
    (4 B/patch) at a time; everything else streams in chunks of _CHUNK patches."""
    n_patches, n_concepts = layout.n_patches, layout.n_concepts
    concept, p_conf = np.asarray(_load(tmp, "patch_concept")), _load(tmp, "patch_conf")
    order = np.lexsort((-np.asarray(p_conf), concept))  # lexsort is stable: ties stay in id order
    c_patches = _create(tmp, "concept_patches", "<i8", n_patches)
    c_confs = _create(tmp, "concept_confs", "<f4", n_patches)
    c_patches[:] = order
    for a in range(0, n_patches, _CHUNK):
        c_confs[a: a + _CHUNK] = p_conf[order[a: a + _CHUNK]]
    del order
    c_off = _create(tmp, "concept_offsets", "<i8", n_concepts + 1)
    counts = np.bincount(concept, minlength=n_concepts) if n_patches else np.zeros(n_concepts, np.int64)
    c_off[0] = 0
    np.cumsum(counts, out=c_off[1:])
    for a in (c_patches, c_confs, c_off):
        a.flush()


def write_image_contexts(tmp: Path, layout: Layout) -> None:
    """image_ctx_offsets, image_ctx_concepts, image_ctx_confs: each concept of an image once
    (ascending), with its best confidence."""
    n_patches, n_images = layout.n_patches, layout.n_images
    p_concept, p_conf, p_image = (_load(tmp, n) for n in ("patch_concept", "patch_conf", "patch_image"))
    pair = np.lexsort((-np.asarray(p_conf), np.asarray(p_concept), np.asarray(p_image)))
    first = np.zeros(n_patches, dtype=bool)
    for a in range(0, n_patches, _CHUNK):
        idx = pair[max(a - 1, 0): a + _CHUNK]
        im_s, co_s = p_image[idx], p_concept[idx]
        new = (im_s[1:] != im_s[:-1]) | (co_s[1:] != co_s[:-1])
        if a == 0:
            first[0] = True
            first[1: len(idx)] = new
        else:
            first[a: a + len(new)] = new
    sel = pair[first]
    del pair, first
    ctx_c = _create(tmp, "image_ctx_concepts", "<i4", len(sel))
    ctx_f = _create(tmp, "image_ctx_confs", "<f4", len(sel))
    ctx_c[:] = p_concept[sel]
    ctx_f[:] = p_conf[sel]
    ctx_off = _create(tmp, "image_ctx_offsets", "<i8", n_images + 1)
    ctx_off[:] = np.searchsorted(p_image[sel], np.arange(n_images + 1), side="left")
    for a in (ctx_c, ctx_f, ctx_off):
        a.flush()


def install_index(root: Path, tmp: Path) -> None:
    """Replace `index/` by the finished `tmp`; the manifest goes first, so no reader ever pairs an
    old manifest with a half-replaced index."""
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()
    index_dir = root / "index"
    if index_dir.exists():
        shutil.rmtree(index_dir)
    os.replace(tmp, index_dir)


def write_manifest(layout: Layout, n_failed: int) -> dict[str, Any]:
    header = layout.header
    manifest = {
        "format": fmt.FORMAT_NAME,
        "version": fmt.FORMAT_VERSION,
        "images": layout.n_images,
        "patches": layout.n_patches,
        "failed": n_failed,
        "concepts": layout.n_concepts,
        "feature_dim": header["feature_dim"],
        "concepts_sha256": header["concepts_sha256"],
        "attributes_sha256": header["attributes_sha256"],
        "parts": layout.part_info,
    }
    atomic_write_json(layout.root / "manifest.json", manifest)
    return manifest
