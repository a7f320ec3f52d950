"""Reading a finished patch gallery (`finalize_gallery`, which finishes one, lives in gallery_finalize).

Patch ids are global: the parts in name order, each part's patches in the
order it committed them; an image's patches are contiguous and sorted by
confidence, so a threshold or a cap is a prefix. The reader opens nothing
until first use and reopens after a fork, so one reader object can be handed
to a DataLoader and every worker gets its own LMDB handles (readonly,
lock=False, readahead=False). Per-patch scalars and the indexes the trainer
samples from are memory-mapped `.npy` files: many workers share them through
the page cache and nothing loads all features.

A reader reads the generation of the gallery its manifest names: the parts it
lists are never written again (see gallery_writer), and what a later append
adds is seen after reopening. `check_blocks=True` checks each feature and
record block against its stored CRC-32 the first time this process reads it.
"""
from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from vlmixer.errors import StoreError
from vlmixer.storage import gallery_format as fmt
from vlmixer.storage.gallery_failures import open_failures
from vlmixer.storage.gallery_finalize import finalize_gallery
from vlmixer.storage.gallery_format import unpack_record
from vlmixer.storage.gallery_writer import check_format, open_part_readonly
from vlmixer.storage.headers import read_json_object
from vlmixer.storage.lmdb_env import PID, release_env
from vlmixer.storage.vocab import Vocabulary


@dataclass(frozen=True)
class ImageRecord:
    index: int
    key: str
    path: str
    width: int
    height: int
    patch_start: int
    patch_count: int


@dataclass(frozen=True)
class Patch:
    id: int
    feature: np.ndarray  # (D,) float16
    box: np.ndarray  # (4,) float32 x1,y1,x2,y2 pixels
    width: int
    height: int
    concept: int
    confidence: float
    attr_ids: np.ndarray  # (k,) int, only the valid ones
    attr_scores: np.ndarray  # (k,) float32
    image: int  # global image index


def block_problem(txn: lmdb.Transaction, dbs: dict[bytes, Any], block: int) -> str | None:
    """What is wrong with a block's checksums (None: both match), given a part's read transaction."""
    key = fmt.ukey(block)
    fv, mv, sv = (txn.get(key, db=dbs[n]) for n in (b"feat", b"pmeta", b"sums"))
    if fv is None or mv is None:
        return "block missing"
    if sv is None or len(sv) != 8:
        return "block checksum missing"
    f_sum, m_sum = fmt.unpack_sums(sv)
    if zlib.crc32(fv) != f_sum:
        return "feature bytes do not match their CRC-32"
    if zlib.crc32(mv) != m_sum:
        return "patch records do not match their CRC-32"
    return None


class GalleryReader:
    """Random access to a finished gallery by patch id, image or concept. Fork-safe."""

    def __init__(self, root: str | Path, *, expect_concepts_sha256: str | None = None,
                 check_blocks: bool = False) -> None:
        self.root = Path(root)
        self.check_blocks = bool(check_blocks)
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: gallery directory does not exist")
        self.manifest = read_json_object(self.root / "manifest.json", "gallery manifest (was the build finished?)")
        check_format(self.manifest, self.root / "manifest.json")
        self.header = read_json_object(self.root / "gallery.json", "gallery header")
        check_format(self.header, self.root / "gallery.json")
        for k in ("images", "patches", "feature_dim", "parts", "concepts_sha256"):
            if k not in self.manifest:
                raise StoreError(f"{self.root / 'manifest.json'}: corrupted gallery manifest (no {k!r})")
        if self.manifest["concepts_sha256"] != self.header["concepts_sha256"]:
            raise StoreError(f"{self.root}: manifest and header disagree on the concept vocabulary")
        self.concepts = Vocabulary.from_json(self.header["concepts"])
        if self.concepts.sha256 != self.header["concepts_sha256"]:
            raise StoreError(f"{self.root}/gallery.json: concept vocabulary does not match its sha256")
        if expect_concepts_sha256 is not None and expect_concepts_sha256 != self.concepts.sha256:
            raise StoreError(f"{self.root}: gallery concept vocabulary (sha256 {self.concepts.sha256[:12]}) "
                             f"differs from the expected one ({expect_concepts_sha256[:12]}); tag the text "
                             "with this gallery's vocabulary (`--concepts GALLERY`)")
        attrs = self.header.get("attributes") or []
        self.attributes = Vocabulary.from_json(attrs) if attrs else None
        self.feature_dim = int(self.manifest["feature_dim"])
        self.num_images = int(self.manifest["images"])
        self.num_patches = int(self.manifest["patches"])
        self._parts = self.manifest["parts"]
        self._patch_offsets = np.array([p["patch_offset"] for p in self._parts] + [self.num_patches], np.int64)
        self._patch_offsets_list = [int(x) for x in self._patch_offsets]
        self._single_part = len(self._parts) == 1
        self._image_offsets = np.array([p["image_offset"] for p in self._parts] + [self.num_images], np.int64)
        self._pid = -1
        self._state: dict[str, Any] = {}

    # -- lazy, per-process handles -------------------------------------------------
    def part_views(self) -> list[tuple[Any, dict[bytes, Any]]]:
        """(read transaction, named sub-databases) of each part, in manifest order: what `verify`
        walks block by block. They belong to this reader; don't close them."""
        st = self._open()
        return list(zip(st["txns"], st["dbs"]))

    def _open(self) -> dict[str, Any]:
        if self._pid == PID[0]:
            return self._state
        state: dict[str, Any] = {"envs": [], "txns": [], "dbs": []}
        for p in self._parts:
            env = open_part_readonly(self.root / "parts" / p["name"])
            dbs = {n: env.open_db(n, create=False) for n in fmt.SUBDBS}
            state["envs"].append(env)
            state["dbs"].append(dbs)
            state["txns"].append(env.begin(buffers=True))
        state["feat"] = [(t, d[b"feat"]) for t, d in zip(state["txns"], state["dbs"])]
        idx = self.root / "index"
        for name in fmt.INDEX_FILES:
            f = idx / f"{name}.npy"
            if not f.exists():
                raise StoreError(f"{f}: missing gallery index file; run `vlmixer gallery finalize`")
            try:
                state[name] = np.load(f, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise StoreError(f"{f}: unreadable index array ({e})") from None
        if len(state["patch_concept"]) != self.num_patches or len(state["image_patch_start"]) != self.num_images + 1:
            raise StoreError(f"{idx}: indexes {len(state['patch_concept'])} patches, the manifest this reader "
                             f"opened {self.num_patches}: the gallery was finalized again since; reopen it")
        state["checked"] = set()
        self._state, self._pid = state, PID[0]
        return state

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_pid"], d["_state"] = -1, {}
        return d

    def close(self) -> None:
        if self._pid == PID[0]:
            for t in self._state["txns"]:
                t.abort()
            for e in self._state["envs"]:
                release_env(e)
        self._pid, self._state = -1, {}

    def _locate(self, pid: int) -> tuple[int, int]:
        if not 0 <= pid < self.num_patches:
            raise IndexError(f"patch id {pid} out of range [0, {self.num_patches})")
        part = bisect.bisect_right(self._patch_offsets_list, pid) - 1
        return part, pid - self._patch_offsets_list[part]

    def _block(self, part: int, db: bytes, block: int) -> memoryview:
        st = self._open()
        v = st["txns"][part].get(fmt.ukey(block), db=st["dbs"][part][db])
        if v is None:
            raise StoreError(f"{self.root}: part {self._parts[part]['name']} has no {db.decode()} block {block}")
        return v

    def check_block(self, part: int, block: int) -> None:
        """Compare a block's features and records with their stored CRC-32s (once per process)."""
        st = self._open()
        if (part, block) in st["checked"]:
            return
        problem = block_problem(st["txns"][part], st["dbs"][part], block)
        if problem is not None:
            raise StoreError(f"{self.root}: part {self._parts[part]['name']} block {block}: {problem}; "
                             "the store is damaged (`vlmixer verify` lists every bad block)")
        st["checked"].add((part, block))

    # -- patches -------------------------------------------------------------------
    def feature(self, pid: int) -> np.ndarray:
        """The (D,) float16 feature of one patch (a copy). The trainer's hot path: kept lean."""
        st = self._state if self._pid == PID[0] else self._open()
        pid = int(pid)
        if not 0 <= pid < self.num_patches:
            raise IndexError(f"patch id {pid} out of range [0, {self.num_patches})")
        if self._single_part:
            part, block, row = 0, *divmod(pid, fmt.BLOCK)
        else:
            offs = self._patch_offsets_list
            part = bisect.bisect_right(offs, pid) - 1
            block, row = divmod(pid - offs[part], fmt.BLOCK)
        txn, db = st["feat"][part]
        buf = txn.get(fmt.ukey(block), db=db)
        if buf is None:
            raise StoreError(f"{self.root}: part {self._parts[part]['name']} has no feat block {block}")
        if self.check_blocks:
            self.check_block(part, block)
        D = self.feature_dim
        return np.frombuffer(buf, dtype=fmt.FEATURE_DTYPE, count=D, offset=row * D * 2).copy()

    def features(self, pids: np.ndarray | list[int]) -> np.ndarray:
        """(n, D) float16 features in the order of `pids`."""
        pids = np.asarray(pids, dtype=np.int64).reshape(-1)
        out = np.empty((len(pids), self.feature_dim), dtype=fmt.FEATURE_DTYPE)
        for i, pid in enumerate(pids):
            out[i] = self.feature(int(pid))
        return out

    def record(self, pid: int) -> np.void:
        """The PATCH_DTYPE record of one patch (box, image size, concept, conf, attributes)."""
        part, local = self._locate(int(pid))
        block, row = divmod(local, fmt.BLOCK)
        buf = self._block(part, b"pmeta", block)
        if self.check_blocks:
            self.check_block(part, block)
        return np.frombuffer(buf, dtype=fmt.PATCH_DTYPE, count=1, offset=row * fmt.PATCH_DTYPE.itemsize)[0].copy()

    def patch(self, pid: int) -> Patch:
        rec = self.record(pid)
        valid = rec["attr_ids"] >= 0
        return Patch(
            id=int(pid), feature=self.feature(pid), box=rec["box"].astype(np.float32),
            width=int(rec["width"]), height=int(rec["height"]), concept=int(rec["concept"]),
            confidence=float(rec["conf"]), attr_ids=rec["attr_ids"][valid].astype(np.int64),
            attr_scores=rec["attr_scores"][valid].astype(np.float32),
            image=int(self._open()["patch_image"][pid]),
        )

    # -- images --------------------------------------------------------------------
    def image(self, index: int) -> ImageRecord:
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range [0, {self.num_images})")
        part = int(np.searchsorted(self._image_offsets, index, side="right")) - 1
        local = index - int(self._image_offsets[part])
        st = self._open()
        v = st["txns"][part].get(fmt.ukey(local), db=st["dbs"][part][b"image"])
        if v is None:
            raise StoreError(f"{self.root}: image {index} missing from part {self._parts[part]['name']}")
        d = unpack_record(v, f"{self.root} image {index}")
        start = int(self._patch_offsets[part]) + d["start"]
        return ImageRecord(index, d["key"], d["path"], d["width"], d["height"], start, d["count"])

    def image_index(self, key: str) -> int:
        st = self._open()
        for part, (txn, dbs) in enumerate(zip(st["txns"], st["dbs"])):
            v = txn.get(key.encode("utf-8"), db=dbs[b"imgkey"])
            if v is not None:
                return int(self._image_offsets[part]) + fmt.unkey(v)
        raise KeyError(key)

    def image_patches(self, index: int) -> range:
        st = self._open()
        s = st["image_patch_start"]
        return range(int(s[index]), int(s[index + 1]))

    # -- index ---------------------------------------------------------------------
    def concept_patches(self, concept: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch ids of a concept and their confidences, confidence descending (memory-mapped)."""
        st = self._open()
        o = st["concept_offsets"]
        if not 0 <= concept < len(o) - 1:
            raise IndexError(f"concept id {concept} out of range [0, {len(o) - 1})")
        a, b = int(o[concept]), int(o[concept + 1])
        return st["concept_patches"][a:b], st["concept_confs"][a:b]

    def concept_counts(self) -> np.ndarray:
        return np.diff(np.asarray(self._open()["concept_offsets"]))

    def image_context(self, image: int) -> tuple[np.ndarray, np.ndarray]:
        """Concepts detected in an image (ascending) with their best confidence."""
        st = self._open()
        o = st["image_ctx_offsets"]
        a, b = int(o[image]), int(o[image + 1])
        return st["image_ctx_concepts"][a:b], st["image_ctx_confs"][a:b]

    def context(self, pid: int) -> tuple[np.ndarray, np.ndarray]:
        """A patch's contextual concepts: the other concepts of its source image, with confidences."""
        st = self._open()
        c, f = self.image_context(int(st["patch_image"][pid]))
        keep = c != st["patch_concept"][pid]
        return c[keep], f[keep]

    def patch_arrays(self) -> dict[str, np.ndarray]:
        """Memory-mapped per-patch and index arrays (see gallery_format.INDEX_FILES)."""
        st = self._open()
        return {name: st[name] for name in fmt.INDEX_FILES}

    # -- failures and shards -------------------------------------------------------
    def failures(self) -> list[dict[str, str]]:
        """Images recorded as bad by the build and not added since: {key, path, reason, shard, part}."""
        st = self._open()
        return open_failures([(p["name"], t, d) for p, t, d in zip(self._parts, st["txns"], st["dbs"])])

    def shards(self) -> dict[str, dict[str, Any]]:
        st = self._open()
        out = {}
        for txn, dbs in zip(st["txns"], st["dbs"]):
            for k, v in txn.cursor(db=dbs[b"shard"]):
                out[bytes(k).decode()] = unpack_record(v, f"{self.root} shard record")
        return out

    def __len__(self) -> int:
        return self.num_patches


# finalize_gallery is offered here too, beside the reader it makes openable; it lives in gallery_finalize
__all__ = ["GalleryReader", "ImageRecord", "Patch", "finalize_gallery", "unpack_record"]
