"""Readers of region features other extractors released, one row (image) at a time.

Layouts, as their writers produce them:

* bottom-up-attention (peteanderson80, `tools/generate_tsv.py`): a headerless TSV,
  `image_id, image_w, image_h, num_boxes, boxes, features`, the last two base64 of
  float32 arrays (num_boxes x 4 pixel boxes, num_boxes x 2048).
* LXMERT (airsplay/lxmert, `src/utils.py`): the same idea with labels,
  `img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes,
  features`; ids are int64, 0-based into the Visual Genome 1600 objects / 400 attributes
  vocabularies (`objects_vocab.txt`, `attributes_vocab.txt`), one attribute per box.
* VinVL (microsoft/scene_graph_benchmark): `features.tsv` rows `key<TAB>{"num_boxes", "features"}`
  with float32 features of 2048 values plus 6 box-position values per box, and `predictions.tsv`
  rows `key<TAB>{"objects": [{"rect", "class", "conf", "attributes", "attr_scores"}], "image_h",
  "image_w"}` in the same order; classes and attributes are names.
* MILVLG bottom-up-attention.pytorch (`utils/extract_utils.py`): one `.npz` per image with
  `x` (features), `bbox`, `num_bbox`, `image_h`, `image_w` and a pickled `info` dict whose
  `objects_id`/`attrs_id` come from an argmax that includes the background (0) column.

A row either becomes a `RegionRow` or raises `BadRow` with a reason the gallery records.
"""
from __future__ import annotations

import binascii
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from vlmixer.pipeline.gallery.npz_pickle import read_npy_member
from vlmixer.pipeline.safe_pickle import UnsafePickle

BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features")
VINVL_POSITION_DIMS = 6  # x1/w, y1/h, x2/w, y2/h, box w/w, box h/h appended to each VinVL feature
NO_ATTRIBUTE = "__no_attribute__"  # scene_graph_benchmark's name for attribute id 0


class BadRow(Exception):
    """One row cannot be imported; `reason` starts with its category (e.g. `bad base64 (...)`)."""

    def __init__(self, reason: str, unknown: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unknown = tuple(unknown)  # the labels the vocabulary lacks, for the job's tally


@dataclass
class RegionRow:
    """One image as a file holds it: labels by name or by the file's own ids, not yet mapped."""

    key: str
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32 pixels
    features: np.ndarray  # (n, D) float32
    confidences: np.ndarray | None = None  # (n,)
    concept_names: list[str] | None = None
    concept_ids: np.ndarray | None = None  # (n,) ids as the file stores them
    attr_names: list[list[str]] | None = None
    attr_ids: np.ndarray | None = None  # (n, k) ids as the file stores them
    attr_scores: np.ndarray | None = None  # (n, k), or aligned with attr_names

    @property
    def labelled(self) -> bool:
        return self.concept_names is not None or self.concept_ids is not None


def _b64(value: bytes, what: str, dtype: str, count: int | None, row_boxes: int | None = None) -> np.ndarray:
    if value[:2] == b"b'" and value[-1:] == b"'":  # Python 3 ports of the BUTD writer store repr(bytes)
        value = value[2:-1]
    try:
        raw = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise BadRow(f"bad base64 in {what} ({e})") from None
    size = np.dtype(dtype).itemsize
    if len(raw) % size:
        raise BadRow(f"bad base64 in {what} ({len(raw)} bytes is not a whole number of {dtype} values)")
    if count is not None and len(raw) != count * size:
        got = len(raw) // size
        if what == "features":
            raise BadRow(f"wrong feature length ({got} float32 values for {row_boxes} boxes, expected {count})")
        raise BadRow(f"count mismatch ({what} holds {got} values, num_boxes implies {count})")
    return np.frombuffer(raw, dtype=dtype)


def _int(value: bytes | Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRow(f"bad {what} ({str(value)[:40]!r} is not an integer)") from None


def _size(w: int, h: int) -> tuple[int, int]:
    if w <= 0 or h <= 0:
        raise BadRow(f"bad image size ({w}x{h})")
    return w, h


def split_tsv(line: bytes) -> list[bytes]:
    return line.rstrip(b"\r\n").split(b"\t")


def tsv_key(line: bytes) -> str | None:
    """The first field of a TSV row, when it is readable text (for naming a bad row)."""
    tab = line.find(b"\t", 0, 400)
    k = line[: tab if tab >= 0 else 400].strip()  # never split(): it would copy the whole row
    try:
        return k.decode("utf-8") or None if len(k) <= 200 else None
    except UnicodeDecodeError:
        return None


def parse_butd(line: bytes, feature_dim: int) -> RegionRow:
    """A bottom-up-attention (6 fields) or LXMERT (10 fields) row."""
    f = split_tsv(line)
    if len(f) not in (len(BUTD_FIELDS), len(LXMERT_FIELDS)):
        raise BadRow(f"wrong field count ({len(f)} tab-separated fields; bottom-up-attention rows have "
                     f"{len(BUTD_FIELDS)}, LXMERT rows {len(LXMERT_FIELDS)})")
    key = f[0].decode("utf-8", "replace").strip()
    if not key:
        raise BadRow("empty image id")
    if len(f) == len(BUTD_FIELDS):
        w, h, n = _int(f[1], "image_w"), _int(f[2], "image_h"), _int(f[3], "num_boxes")
        labels = None
    else:
        h, w, n = _int(f[1], "img_h"), _int(f[2], "img_w"), _int(f[7], "num_boxes")
        labels = f[3:7]
    if n < 0:
        raise BadRow(f"bad num_boxes ({n})")
    w, h = _size(w, h)
    boxes = _b64(f[-2], "boxes", "<f4", 4 * n).reshape(n, 4)
    feats = _b64(f[-1], "features", "<f4", n * feature_dim, n).reshape(n, feature_dim)
    row = RegionRow(key=key, width=w, height=h, boxes=boxes, features=feats)
    if labels is not None:
        row.concept_ids = _b64(labels[0], "objects_id", "<i8", n)
        row.confidences = _b64(labels[1], "objects_conf", "<f4", n)
        row.attr_ids = _b64(labels[2], "attrs_id", "<i8", n).reshape(n, 1)
        row.attr_scores = _b64(labels[3], "attrs_conf", "<f4", n).reshape(n, 1)
    return row


def butd_labelled(line: bytes) -> bool:
    """Whether a file's first row is LXMERT's labelled variant (decides what the import needs)."""
    return len(split_tsv(line)) == len(LXMERT_FIELDS)


def butd_feature_dim(line: bytes) -> int:
    """Feature size of a bottom-up-attention/LXMERT row: features bytes / 4 / num_boxes."""
    f = split_tsv(line)
    if len(f) not in (len(BUTD_FIELDS), len(LXMERT_FIELDS)):
        raise BadRow(f"wrong field count ({len(f)})")
    n = _int(f[3] if len(f) == len(BUTD_FIELDS) else f[7], "num_boxes")
    if n <= 0:
        raise BadRow("no boxes to infer the feature size from")
    return len(_b64(f[-1], "features", "<f4", None)) // n


def _json(value: bytes, what: str) -> dict[str, Any]:
    try:
        d = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRow(f"bad json in {what} ({str(e)[:60]})") from None
    if not isinstance(d, dict):
        raise BadRow(f"bad json in {what} (not an object)")
    return d


def vinvl_feature_dim(feature_line: bytes) -> int:
    f = split_tsv(feature_line)
    if len(f) < 2:
        raise BadRow("wrong field count")
    d = _json(f[1], "features.tsv")
    n = _int(d.get("num_boxes"), "num_boxes")
    if n <= 0:
        raise BadRow("no boxes to infer the feature size from")
    return len(_b64(str(d.get("features", "")).encode(), "features", "<f4", None)) // n - VINVL_POSITION_DIMS


def parse_vinvl(feature_line: bytes, prediction_line: bytes, feature_dim: int) -> RegionRow:
    """One image from aligned rows of VinVL's features.tsv and predictions.tsv."""
    ff, pf = split_tsv(feature_line), split_tsv(prediction_line)
    if len(ff) < 2 or len(pf) < 2:
        raise BadRow(f"wrong field count (features.tsv row has {len(ff)}, predictions.tsv row {len(pf)}; "
                     "expected key<TAB>json)")
    key = ff[0].decode("utf-8", "replace").strip()
    pkey = pf[0].decode("utf-8", "replace").strip()
    if not key:
        raise BadRow("empty image key")
    if key != pkey:
        raise BadRow(f"key mismatch (features.tsv row {key!r}, predictions.tsv row {pkey!r}: the two files "
                     "must list images in the same order)")
    fd, pd = _json(ff[1], "features.tsv"), _json(pf[1], "predictions.tsv")
    n = _int(fd.get("num_boxes"), "num_boxes")
    objects = pd.get("objects")
    if not isinstance(objects, list):
        raise BadRow("bad json in predictions.tsv (no 'objects' list)")
    if n != len(objects):
        raise BadRow(f"count mismatch (num_boxes {n} in features.tsv, {len(objects)} objects in predictions.tsv)")
    per = feature_dim + VINVL_POSITION_DIMS
    feats = _b64(str(fd.get("features", "")).encode("ascii", "replace"), "features", "<f4", n * per, n)
    feats = feats.reshape(n, per)[:, :feature_dim]
    w = _int(pd.get("image_w", pd.get("width")), "image_w")
    h = _int(pd.get("image_h", pd.get("height")), "image_h")
    w, h = _size(w, h)
    boxes = np.zeros((n, 4), np.float32)
    confs = np.zeros(n, np.float32)
    names, attr_names, attr_scores = [], [], []
    for i, o in enumerate(objects):
        if not isinstance(o, dict):
            raise BadRow(f"bad json in predictions.tsv (object {i} is not an object)")
        try:
            boxes[i] = np.asarray(o["rect"], dtype=np.float32).reshape(4)
            confs[i] = float(o.get("conf", 1.0))
        except (KeyError, TypeError, ValueError):
            raise BadRow(f"bad json in predictions.tsv (object {i} needs 'rect' [x1, y1, x2, y2])") from None
        cls = o.get("class")
        if not isinstance(cls, str):
            raise BadRow(f"bad json in predictions.tsv (object {i} has no 'class' name)")
        names.append(cls)
        an, asc = o.get("attributes") or [], o.get("attr_scores") or []
        if len(an) != len(asc):
            raise BadRow(f"count mismatch (object {i}: {len(an)} attributes, {len(asc)} attr_scores)")
        attr_names.append([str(a) for a in an])
        attr_scores.append([float(s) for s in asc])
    row = RegionRow(key=key, width=w, height=h, boxes=boxes, features=feats, confidences=confs,
                    concept_names=names, attr_names=attr_names)
    row.attr_scores = attr_scores  # type: ignore[assignment]  ragged, aligned with attr_names
    return row


def _scalar_int(v: Any, what: str) -> int:
    try:
        return int(np.asarray(v).reshape(()))
    except (TypeError, ValueError):
        raise BadRow(f"bad {what} ({str(v)[:40]!r})") from None


def read_npz(path: str | Path | IO[bytes], key: str, feature_dim: int) -> RegionRow:
    """One MILVLG `.npz`; `info` goes through the restricted unpickler, never `allow_pickle=True`."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise BadRow(f"unreadable npz ({type(e).__name__}: {str(e)[:80]})") from None
    with zf:
        members = {m[:-4]: m for m in zf.namelist() if m.endswith(".npy")}
        missing = [m for m in ("x", "bbox") if m not in members]
        if missing:
            raise BadRow(f"missing array(s) {missing} (MILVLG npz files hold x, bbox, num_bbox, image_h, image_w, "
                         "info)")
        try:
            arrays = {name: read_npy_member(zf, m) for name, m in members.items() if name != "info"}
            info = read_npy_member(zf, members["info"]) if "info" in members else None
        except UnsafePickle as e:
            raise BadRow(f"unsafe pickle in info ({e})") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise BadRow(f"unreadable npz ({type(e).__name__}: {str(e)[:80]})") from None
    if info is not None and not isinstance(info, dict):
        raise BadRow(f"bad info (a {type(info).__name__}, expected a dict)")
    info = info or {}
    x = np.asarray(arrays["x"])
    boxes = np.asarray(arrays["bbox"])
    n = _scalar_int(arrays.get("num_bbox", info.get("num_boxes", len(boxes))), "num_bbox")
    if boxes.shape != (n, 4):
        raise BadRow(f"count mismatch (num_bbox {n}, bbox of shape {boxes.shape})")
    if x.shape != (n, feature_dim):
        if x.ndim == 2 and x.shape[0] == n:
            raise BadRow(f"wrong feature length ({x.shape[1]} values per box, expected {feature_dim})")
        raise BadRow(f"count mismatch (num_bbox {n}, x of shape {x.shape})")
    w = _scalar_int(arrays.get("image_w", info.get("image_w", 0)), "image_w")
    h = _scalar_int(arrays.get("image_h", info.get("image_h", 0)), "image_h")
    w, h = _size(w, h)
    image_id = info.get("image_id")
    row = RegionRow(key=str(image_id) if image_id not in (None, "") else key, width=w, height=h,
                    boxes=boxes.astype(np.float32), features=x.astype(np.float32, copy=False))
    if "objects_id" in info:
        row.concept_ids = _aligned(info, "objects_id", n).astype(np.int64)
        row.confidences = (_aligned(info, "objects_conf", n).astype(np.float32) if "objects_conf" in info
                           else np.ones(n, np.float32))
        if "attrs_id" in info:
            row.attr_ids = _aligned(info, "attrs_id", n).astype(np.int64).reshape(n, -1)
            row.attr_scores = (_aligned(info, "attrs_conf", n).astype(np.float32).reshape(n, -1)
                               if "attrs_conf" in info else np.ones_like(row.attr_ids, np.float32))
    return row


def _aligned(info: dict[str, Any], name: str, n: int) -> np.ndarray:
    a = np.asarray(info[name])
    if a.ndim == 0 or a.shape[0] != n or a.dtype.kind not in "iuf":
        raise BadRow(f"count mismatch (info[{name!r}] of shape {a.shape} and dtype {a.dtype}, num_bbox {n})")
    return a


def npz_labelled(path: str | Path) -> bool:
    """Whether the first file's `info` carries object ids (decides what the import needs)."""
    try:
        with zipfile.ZipFile(path) as zf:
            if "info.npy" not in zf.namelist():
                return False
            info = read_npy_member(zf, "info.npy")
    except (UnsafePickle, OSError, ValueError, zipfile.BadZipFile):
        return True  # decided per row, where the file is recorded as bad with its reason
    return isinstance(info, dict) and "objects_id" in info


def npz_feature_dim(path: str | Path) -> int:
    try:
        with zipfile.ZipFile(path) as zf:
            x = read_npy_member(zf, "x.npy")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise BadRow(f"unreadable npz ({type(e).__name__}: {str(e)[:80]})") from None
    if np.ndim(x) != 2:
        raise BadRow(f"x of shape {np.shape(x)}")
    return int(np.shape(x)[1])


@dataclass
class LabelMap:
    """Maps a row's labels onto the gallery vocabularies: names case-insensitively (any variant),
    ids as `file id - id_base`. A name or id the vocabulary lacks is reported, never guessed."""

    concepts: Sequence[Sequence[str]]
    attributes: Sequence[Sequence[str]] | None = None
    id_base: int = 0  # the file id of the first vocabulary entry (MILVLG: 1, its 0 is background)
    unlabelled: bool = False  # `--concepts none`: every patch is concept 0, confidence 1
    _c: dict[str, int] = field(default_factory=dict, repr=False)
    _a: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for table, vocab in ((self._c, self.concepts), (self._a, self.attributes or [])):
            for i, variants in enumerate(vocab):
                for v in variants:
                    table.setdefault(v.strip().lower(), i)

    def map_row(self, row: RegionRow) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(concepts, confidences, attr_ids, attr_scores) in gallery ids."""
        n = row.boxes.shape[0]
        unknown: list[str] = []
        if self.unlabelled:
            return np.zeros(n, np.int32), np.ones(n, np.float32), None, None
        if row.concept_names is not None:
            ids = np.array([self._c.get(s.strip().lower(), -1) for s in row.concept_names], np.int32)
            unknown += [f"concept {s!r}" for s, i in zip(row.concept_names, ids) if i < 0]
        elif row.concept_ids is not None:
            ids = (np.asarray(row.concept_ids, np.int64) - self.id_base)
            bad = (ids < 0) | (ids >= len(self.concepts))
            unknown += [f"concept id {int(i)}" for i in np.asarray(row.concept_ids)[bad]]
            ids = ids.astype(np.int32)
        else:
            raise BadRow("no labels (the file names no concepts; import it with --concepts none)")
        confs = (np.asarray(row.confidences, np.float32) if row.confidences is not None
                 else np.ones(n, np.float32))
        a_ids = a_sc = None
        if self.attributes is not None and row.attr_names is not None:
            k = max((len(a) for a in row.attr_names), default=0)
            a_ids = np.full((n, k), -1, np.int32)
            a_sc = np.zeros((n, k), np.float32)
            for i, (names, scores) in enumerate(zip(row.attr_names, row.attr_scores or [[]] * n)):
                for j, (s, sc) in enumerate(zip(names, scores)):
                    if s == NO_ATTRIBUTE:
                        continue
                    a = self._a.get(s.strip().lower(), -1)
                    if a < 0:
                        unknown.append(f"attribute {s!r}")
                    a_ids[i, j], a_sc[i, j] = a, sc
        elif self.attributes is not None and row.attr_ids is not None:
            raw = np.asarray(row.attr_ids, np.int64)
            a_sc = np.asarray(row.attr_scores, np.float32).reshape(raw.shape)
            a = raw - self.id_base
            # id_base 1: file id 0 is "no attribute"; a score of 0 carries none either (what export writes)
            none = (raw < self.id_base) | (a_sc <= 0)
            bad = ~none & (a >= len(self.attributes))
            unknown += [f"attribute id {int(i)}" for i in raw[bad]]
            a_ids = np.where(none, -1, a).astype(np.int32)
        if unknown:
            shown = sorted(set(unknown))
            raise BadRow(f"unknown label ({', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''} "
                         "not in the vocabulary)", unknown=unknown)
        return ids, confs, a_ids, a_sc
