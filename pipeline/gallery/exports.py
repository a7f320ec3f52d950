"""`vlmixer gallery export`: a gallery back out in the formats other tools read.

* `butd-tsv`: LXMERT's labelled TSV (`img_id, img_h, img_w, objects_id, objects_conf, attrs_id,
  attrs_conf, num_boxes, boxes, features`, base64 float32/int64), which LXMERT's and UNITER-style
  loaders read; `--columns butd` writes bottom-up-attention's six columns instead. The gallery's
  vocabularies go next to it as `objects_vocab.txt` / `attributes_vocab.txt`, one name per line,
  so the ids (0-based, as LXMERT's) resolve.
* `npz`: one file per image (`KEY.npz`) as MILVLG's extractor writes them (`x`, `bbox`, `num_bbox`, `image_h`,
  `image_w`, and `info` with 1-based object/attribute ids, 0 being their background column). Their
  readers expect `info` as a pickled dict, so this is the one place vlmixer writes a pickle: for a
  foreign tool, never read back by us except through the restricted unpickler.

Features go out as float32, as those formats expect. Both formats hold one attribute per box: the
gallery's best; a box without attributes gets id 0 (npz: the "no attribute" column) and score 0, which
`gallery import` reads back as no attribute. Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vlmixer.errors import VlmixerError
from vlmixer.files import atomic_write, atomic_write_bytes

EXPORT_FORMATS = ("butd-tsv", "npz")


def _b64(a: np.ndarray, dtype: str) -> bytes:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes())


def _image_arrays(reader: Any, index: int) -> tuple[Any, dict[str, np.ndarray]]:
    from vlmixer.storage import gallery_format as fmt

    rec = reader.image(index)
    pids = list(reader.image_patches(index))
    recs = (np.stack([reader.record(p) for p in pids]) if pids else np.zeros(0, fmt.PATCH_DTYPE))
    top = recs["attr_ids"][:, 0].astype(np.int64) if len(recs) else np.zeros(0, np.int64)
    top_sc = recs["attr_scores"][:, 0].astype(np.float32) if len(recs) else np.zeros(0, np.float32)
    has = top >= 0
    return rec, {
        "features": reader.features(pids).astype(np.float32) if pids else np.zeros((0, reader.feature_dim), np.float32),
        "boxes": recs["box"].astype(np.float32).reshape(-1, 4),
        "concepts": recs["concept"].astype(np.int64),
        "confs": recs["conf"].astype(np.float32),
        "attr": np.where(has, top, -1),
        "attr_conf": np.where(has, top_sc, 0).astype(np.float32),
    }


def _tsv_row(rec: Any, a: dict[str, np.ndarray], columns: str) -> bytes:
    n = len(a["boxes"])
    boxes, feats = _b64(a["boxes"], "<f4"), _b64(a["features"], "<f4")
    key = rec.key.encode("utf-8")
    if columns == "butd":
        fields = [key, b"%d" % rec.width, b"%d" % rec.height, b"%d" % n, boxes, feats]
    else:
        attr = np.where(a["attr"] >= 0, a["attr"], 0)
        fields = [key, b"%d" % rec.height, b"%d" % rec.width, _b64(a["concepts"], "<i8"), _b64(a["confs"], "<f4"),
                  _b64(attr, "<i8"), _b64(a["attr_conf"], "<f4"), b"%d" % n, boxes, feats]
    return b"\t".join(fields) + b"\n"


def _npz_path(root: Path, key: str) -> Path:
    rel = Path(key)
    if rel.is_absolute() or ".." in rel.parts or not key.strip():
        raise VlmixerError(f"image key {key!r} cannot name a file under {root}")
    return root / (key + ".npz")


def _write_npz(path: Path, rec: Any, a: dict[str, np.ndarray]) -> None:
    n = len(a["boxes"])
    info = {"image_id": rec.key, "image_h": rec.height, "image_w": rec.width, "num_boxes": n,
            "objects_id": a["concepts"] + 1, "objects_conf": a["confs"],
            "attrs_id": np.where(a["attr"] >= 0, a["attr"] + 1, 0).astype(np.int64), "attrs_conf": a["attr_conf"]}
    # `info` is a dict, which MILVLG's readers expect pickled (np.savez pickles object arrays)
    atomic_write(path, lambda f: np.savez(f, x=a["features"], bbox=a["boxes"], num_bbox=np.int64(n),
                                          image_h=np.int64(rec.height), image_w=np.int64(rec.width),
                                          info=np.array(info, dtype=object)))


def export_gallery(gallery: str | Path, out: str | Path, fmt: str, *, columns: str = "lxmert",
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write every image of `gallery` to `out` (a .tsv file, or a folder for npz); returns counts."""
    from vlmixer.storage.gallery import GalleryReader

    if fmt not in EXPORT_FORMATS:
        raise VlmixerError(f"--format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if columns not in ("lxmert", "butd"):
        raise VlmixerError(f"--columns {columns!r}: choose lxmert (with labels) or butd (six columns)")
    reader = GalleryReader(gallery)
    out = Path(out)
    n_img, n_patch = reader.num_images, 0
    try:
        if fmt == "butd-tsv":
            if out.is_dir():
                raise VlmixerError(f"{out}: --out is a directory; give the .tsv file to write")
            def fill(f: BinaryIO) -> None:
                nonlocal n_patch
                for i in range(n_img):
                    rec, a = _image_arrays(reader, i)
                    f.write(_tsv_row(rec, a, columns))
                    n_patch += len(a["boxes"])
                    if progress:
                        progress(i + 1, n_img)

            atomic_write(out, fill)
            vocab_dir = out.parent
        else:
            if out.exists() and not out.is_dir():
                raise VlmixerError(f"{out}: --out exists and is not a directory")
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n_img):
                rec, a = _image_arrays(reader, i)
                _write_npz(_npz_path(out, rec.key), rec, a)
                n_patch += len(a["boxes"])
                if progress:
                    progress(i + 1, n_img)
            vocab_dir = out
        written = {"objects_vocab.txt": reader.concepts}
        if reader.attributes is not None:
            written["attributes_vocab.txt"] = reader.attributes
        for name, vocab in written.items():
            atomic_write_bytes(vocab_dir / name, "".join(",".join(v) + "\n" for v in vocab.variants).encode("utf-8"))
    finally:
        reader.close()
    return {"out": str(out), "format": fmt, "images": n_img, "patches": n_patch,
            "vocabularies": [str(vocab_dir / n) for n in written]}
