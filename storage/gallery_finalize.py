"""Finishing a gallery: the index files the trainer samples from, then `manifest.json` last.

Finalize runs after every shard is committed and derives everything from the
parts, so re-running it rebuilds the same bytes, and a crash at any point
(kill -9 included) leaves either the old finished gallery or no manifest
(not finished); the next run starts its temporaries afresh. It reads each
part's metadata blocks, never its features. The steps, in order:

1. `read_layout`: the header, and every part's counts turned into global offsets;
2. the per-patch concept, confidence and image, and each image's first patch;
3. the concept index: patches grouped by concept, confidence descending, then id;
4. the image contexts: each image's concepts, once each, with their best confidence;
5. `install_index` and `write_manifest`: swap the new index in, then write the manifest.

Steps 2-4 come twice. Under a memory budget (the default) they stream
through plain file I/O in chunks, and the concept index is an external
sort: sorted runs spilled to disk and merged (storage/external_sort.py);
peak memory is set by the budget, not by the gallery. Without one
(`memory_mb=None`) they sort whole arrays in memory, writing through memory
maps whose pages count as resident too: peak RSS about 160 bytes per patch
(1.6 GB at 10M patches, bench/scale.py). That path is simpler, and the
reference the budgeted one must equal byte for byte.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmixer.errors import StoreError
from vlmixer.files import atomic_write_json
from vlmixer.storage import gallery_format as fmt
from vlmixer.storage.external_sort import RUN_DTYPE, merge_all, order_records
from vlmixer.storage.finalize_budget import DEFAULT_FINALIZE_MEMORY_MB, SortBudget
from vlmixer.storage.gallery_failures import count_failed_images
from vlmixer.storage.gallery_writer import check_format, list_parts, open_part_readonly
from vlmixer.storage.headers import read_json_object
from vlmixer.storage.lmdb_env import release_env
from vlmixer.storage.npy_stream import NpyReader, NpyWriter, npy_from_raw

# in-memory path: patches per step where it streams (bounds its temporaries beside the sorts)
_CHUNK = 1 << 22
# disk finalize needs at its peak: the index files (28 B) and the sorted runs (20 B) of a patch
INDEX_BYTES_PER_PATCH = 48


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


def finalize_gallery(root: str | Path, memory_mb: int | None = DEFAULT_FINALIZE_MEMORY_MB, *,
                     budget: SortBudget | None = None) -> dict[str, Any]:
    """Build the concept index and contextual concepts, then write `manifest.json` last.

    `memory_mb` bounds the peak memory (None: whole arrays in memory); `budget` gives the sort's
    sizes directly instead, as tests do to reach every chunk boundary."""
    if budget is None and memory_mb is not None:
        budget = SortBudget.from_memory_mb(memory_mb)
    layout = read_layout(Path(root))
    n_failed = count_failed_images(layout.root)
    tmp = layout.root / "index.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # a crashed finalize's leftovers
    tmp.mkdir()
    try:
        if budget is None:
            write_patch_arrays(tmp, layout)
            write_concept_index(tmp, layout)
            write_image_contexts(tmp, layout)
        else:
            counts = stream_patch_arrays(tmp, layout, budget)
            sort_concept_index(tmp, layout, budget, counts)
            stream_image_contexts(tmp, layout, budget)
    except OSError as e:  # a full disk, most likely: the old index and manifest are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"{layout.root}: finalize could not write its index in {tmp} ({e.strerror or e}); "
                         f"it needs about {INDEX_BYTES_PER_PATCH} bytes per patch free beside the gallery, "
                         f"{INDEX_BYTES_PER_PATCH * layout.n_patches >> 20} MB here") from None
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


# ---- under a memory budget -------------------------------------------------------------


def _pmeta_windows(part: Path, info: dict[str, Any], read_bytes: int) -> Iterator[np.ndarray]:
    """A part's patch records in order, a window of blocks at a time; each window is read through
    a fresh mapping that is closed before the window is used, so the pages read do not pile up."""
    n_patches = info["patches"]
    n_blocks = -(-n_patches // fmt.BLOCK)
    per_window = max(1, read_bytes // (fmt.BLOCK * fmt.PATCH_DTYPE.itemsize))
    b = 0
    while b < n_blocks:
        end = min(n_blocks, b + per_window)
        first = b * fmt.BLOCK
        rec = np.empty(min(n_patches, end * fmt.BLOCK) - first, fmt.PATCH_DTYPE)
        raw = rec.view(np.uint8)
        env = open_part_readonly(part)
        try:
            db = env.open_db(b"pmeta", create=False)
            with env.begin(buffers=True) as txn:
                cur = txn.cursor(db=db)
                if not cur.set_key(fmt.ukey(b)):
                    raise StoreError(f"{part}: patch metadata block {b} missing; run `vlmixer verify`")
                for k, v in cur.iternext():
                    if fmt.unkey(k) != b:
                        raise StoreError(f"{part}: patch metadata block {b} missing; run `vlmixer verify`")
                    at = (b * fmt.BLOCK - first) * fmt.PATCH_DTYPE.itemsize
                    want = (min(n_patches, (b + 1) * fmt.BLOCK) - b * fmt.BLOCK) * fmt.PATCH_DTYPE.itemsize
                    if len(v) != want:
                        raise StoreError(f"{part}: patch metadata block {b} has {len(v)} bytes, expected {want}")
                    raw[at: at + want] = np.frombuffer(v, np.uint8)
                    b += 1
                    if b == end:
                        break
                if b != end:
                    raise StoreError(f"{part}: patch metadata block {b} missing; run `vlmixer verify`")
        finally:
            release_env(env)
        yield rec


def _image_start_windows(part: Path, info: dict[str, Any], read_bytes: int) -> Iterator[np.ndarray]:
    """Each image's first patch within its part, in image order, a window at a time."""
    n_images = info["images"]
    per_window = max(1, read_bytes // 256)  # an image record is about 100-200 bytes of msgpack
    i = 0
    while i < n_images:
        end = min(n_images, i + per_window)
        starts = np.empty(end - i, np.int64)
        env = open_part_readonly(part)
        try:
            db = env.open_db(b"image", create=False)
            with env.begin(buffers=True) as txn:
                cur = txn.cursor(db=db)
                first = i
                if cur.set_key(fmt.ukey(i)):
                    for k, v in cur.iternext():
                        if fmt.unkey(k) != i:
                            break
                        starts[i - first] = fmt.unpack_record(v, f"{part} image {i}")["start"]
                        i += 1
                        if i == end:
                            break
                if i != end:
                    raise StoreError(f"{part}: image record {i} missing; run `vlmixer verify`")
        finally:
            release_env(env)
        yield starts


def stream_patch_arrays(tmp: Path, layout: Layout, budget: SortBudget) -> np.ndarray:
    """The per-patch arrays and image starts, written as read; returns the patches per concept."""
    n_concepts = layout.n_concepts
    counts = np.zeros(n_concepts, np.int64)
    out = [NpyWriter(tmp / "patch_concept.npy", "<i4", layout.n_patches),
           NpyWriter(tmp / "patch_conf.npy", "<f4", layout.n_patches),
           NpyWriter(tmp / "patch_image.npy", "<i8", layout.n_patches),
           NpyWriter(tmp / "image_patch_start.npy", "<i8", layout.n_images + 1)]
    w_concept, w_conf, w_image, w_start = out
    try:
        for info, p in zip(layout.part_info, layout.parts):
            for rec in _pmeta_windows(p, info, budget.read_bytes):
                c = rec["concept"]
                if len(c) and (c.min() < 0 or c.max() >= n_concepts):
                    raise StoreError(f"{layout.root}: patch concept ids outside the vocabulary of "
                                     f"{n_concepts} concepts")
                counts += np.bincount(c, minlength=n_concepts)
                w_concept.append(c)
                w_conf.append(rec["conf"])
                w_image.append(rec["image"] + info["image_offset"])
            for starts in _image_start_windows(p, info, budget.read_bytes):
                w_start.append(starts + info["patch_offset"])
        w_start.append(np.array([layout.n_patches]))
        for w in out:
            w.close()
    finally:
        for w in out:
            w.abandon()
    return counts


def conf_desc_key(conf: np.ndarray) -> np.ndarray:
    """A uint32 per confidence that sorts ascending exactly as `-conf` does in numpy's sorts: the
    float bits of -conf made monotonic as unsigned, -0.0 folded onto 0.0 and every NaN onto one
    NaN after +inf. Integer keys sort several times faster than floats."""
    neg = -conf.astype("<f4") + np.float32(0.0)
    bits = neg.view("<u4").copy()
    bits[np.isnan(neg)] = 0x7FC00000
    return np.where(bits >> np.uint32(31) == 1, ~bits, bits | np.uint32(0x80000000))


def concept_sort_key(concept: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """One uint64 per patch that orders (concept ascending, confidence descending) exactly as
    `np.lexsort((-conf, concept))` does."""
    return (concept.astype(np.uint64) << np.uint64(32)) | conf_desc_key(conf).astype(np.uint64)


def sort_concept_index(tmp: Path, layout: Layout, budget: SortBudget, counts: np.ndarray) -> None:
    """concept_offsets, concept_patches, concept_confs by external sort: chunks of patches sorted
    in memory and spilled as runs, then merged (a single chunk is written directly)."""
    n = layout.n_patches
    spill = tmp / "runs"
    spill.mkdir()
    w_ids = NpyWriter(tmp / "concept_patches.npy", "<i8", n)
    w_confs = NpyWriter(tmp / "concept_confs.npy", "<f4", n)
    w_off = NpyWriter(tmp / "concept_offsets.npy", "<i8", layout.n_concepts + 1)
    readers = [NpyReader(tmp / "patch_concept.npy"), NpyReader(tmp / "patch_conf.npy")]

    def emit(batch: np.ndarray) -> None:
        w_ids.append(batch["id"])
        w_confs.append(batch["conf"])

    try:
        runs: list[tuple[Path, int]] = []
        for a in range(0, n, budget.run_records):
            c, f = (r.read(a, budget.run_records) for r in readers)
            rec = np.empty(len(c), RUN_DTYPE)
            rec["key"] = concept_sort_key(c, f)
            rec["id"] = np.arange(a, a + len(c))
            rec["conf"] = f
            del c, f
            rec = order_records(rec)  # ids ascend within a chunk
            if n <= budget.run_records:
                emit(rec)
            else:
                path = spill / f"run-{len(runs):06d}.bin"
                rec.tofile(path)
                runs.append((path, len(rec)))
            del rec
        merge_all(runs, budget, spill, emit)
        w_off.append(np.zeros(1, np.int64))
        w_off.append(np.cumsum(counts))
        for w in (w_ids, w_confs, w_off):
            w.close()
    finally:
        for r in readers:
            r.close()
        for w in (w_ids, w_confs, w_off):
            w.abandon()
    shutil.rmtree(spill)


def stream_image_contexts(tmp: Path, layout: Layout, budget: SortBudget) -> None:
    """image_ctx_* in one pass: an image's patches are contiguous, so chunks cut at image
    boundaries give, piece by piece, exactly what one sort of the whole gallery gives."""
    n, n_images, step = layout.n_patches, layout.n_images, budget.run_records
    readers = [NpyReader(tmp / f"{name}.npy") for name in ("patch_concept", "patch_conf", "patch_image")]
    w_c = NpyWriter(tmp / "image_ctx_concepts.raw", "<i4", None)
    w_f = NpyWriter(tmp / "image_ctx_confs.raw", "<f4", None)
    w_off = NpyWriter(tmp / "image_ctx_offsets.npy", "<i8", n_images + 1)

    def offsets(lo: int, hi: int, base: int, sel_image: np.ndarray) -> None:
        for s in range(lo, hi, step):
            w_off.append(base + np.searchsorted(sel_image, np.arange(s, min(hi, s + step)), side="left"))

    try:
        carry = [np.empty(0, r.dtype) for r in readers]
        a, base, next_image = 0, 0, 0
        while True:
            fresh = [r.read(a, step) for r in readers]
            a += len(fresh[0])
            c, f, im = (np.concatenate([x, y]) if len(x) else y for x, y in zip(carry, fresh))
            del fresh
            at_end = a >= n
            cut = len(im) if at_end else int(np.searchsorted(im, im[-1], side="left"))
            carry = [c[cut:], f[cut:], im[cut:]]
            c, f, im = c[:cut], f[:cut], im[:cut]
            if len(im):
                if im[0] < next_image or np.any(im[1:] < im[:-1]):
                    raise StoreError(f"{layout.root}: patches are not grouped by image near patch {a}; "
                                     "run `vlmixer verify`")
                # the order of np.lexsort((-f, c, im)), from two stable integer sorts: confidence,
                # then (image rank in the piece, concept)
                rank = np.zeros(len(im), np.uint64)
                np.cumsum(im[1:] != im[:-1], out=rank[1:])
                order = np.argsort(conf_desc_key(f), kind="stable")
                group = (rank << np.uint64(32)) | c.astype(np.uint64)
                order = order[np.argsort(group[order], kind="stable")]
                del rank, group
                im_s, c_s = im[order], c[order]
                first = np.ones(len(order), dtype=bool)
                first[1:] = (im_s[1:] != im_s[:-1]) | (c_s[1:] != c_s[:-1])
                sel = order[first]
                del order, im_s, c_s, first
                w_c.append(c[sel])
                w_f.append(f[sel])
                hi = int(im[-1]) + 1
                offsets(next_image, hi, base, im[sel])
                base, next_image = base + len(sel), hi
            if at_end:
                break
        offsets(next_image, n_images + 1, base, np.empty(0, np.int64))
        for w in (w_c, w_f, w_off):
            w.close()
    finally:
        for r in readers:
            r.close()
        for w in (w_c, w_f, w_off):
            w.abandon()
    npy_from_raw(tmp / "image_ctx_concepts.raw", tmp / "image_ctx_concepts.npy", "<i4")
    npy_from_raw(tmp / "image_ctx_confs.raw", tmp / "image_ctx_confs.npy", "<f4")


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
