"""Writers of the released region-feature formats, following their public layouts, for the import tests
and the import benchmark: bottom-up-attention's TSV (peteanderson80, `tools/generate_tsv.py`), LXMERT's
labelled TSV (airsplay/lxmert, `src/utils.py`), VinVL's features.tsv + predictions.tsv + .lineidx
(microsoft/scene_graph_benchmark) and MILVLG's per-image npz (`utils/extract_utils.py`)."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

OBJECTS = ["dog", "cat", "man", "traffic light", "car", "tree"]
ATTRS = ["red", "small", "wooden", "tall"]


def synthetic_rows(seed: int, n: int, dim: int = 16, max_boxes: int = 5, attrs_per_box: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(0, max_boxes + 1)) if i else max_boxes  # the first row has boxes (dim inference)
        w, h = int(rng.integers(64, 640)), int(rng.integers(64, 480))
        x1, y1 = rng.uniform(0, w / 2, k), rng.uniform(0, h / 2, k)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, k), y1 + rng.uniform(1, h / 2, k)], 1)
        rows.append(dict(
            key=f"{100000 + i}", width=w, height=h, boxes=boxes.astype(np.float32),
            features=(rng.standard_normal((k, dim)) * 4).astype(np.float32),
            concepts=rng.integers(0, len(OBJECTS), k), confs=rng.uniform(0.1, 1, k).astype(np.float32),
            attrs=rng.integers(0, len(ATTRS), (k, attrs_per_box)),
            attr_scores=rng.uniform(0.05, 1, (k, attrs_per_box)).astype(np.float32)))
    return rows


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def butd_line(r: dict) -> str:
    n = len(r["boxes"])
    return "\t".join([r["key"], str(r["width"]), str(r["height"]), str(n), b64(r["boxes"].astype("<f4")),
                      b64(r["features"].astype("<f4"))])


def lxmert_line(r: dict) -> str:
    n = len(r["boxes"])
    return "\t".join([r["key"], str(r["height"]), str(r["width"]), b64(r["concepts"].astype("<i8")),
                      b64(r["confs"].astype("<f4")), b64(r["attrs"][:, 0].astype("<i8")),
                      b64(r["attr_scores"][:, 0].astype("<f4")), str(n), b64(r["boxes"].astype("<f4")),
                      b64(r["features"].astype("<f4"))])


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(ln + "\n" for ln in lines), encoding="ascii")
    return path


def vinvl_lines(r: dict) -> tuple[str, str]:
    n = len(r["boxes"])
    b = r["boxes"]
    pos = np.stack([b[:, 0] / r["width"], b[:, 1] / r["height"], b[:, 2] / r["width"], b[:, 3] / r["height"],
                    (b[:, 2] - b[:, 0]) / r["width"], (b[:, 3] - b[:, 1]) / r["height"]], 1)
    feats = np.concatenate([r["features"], pos.reshape(n, 6)], 1).astype("<f4")
    f = r["key"] + "\t" + json.dumps({"num_boxes": n, "features": b64(feats)})
    objects = [{"rect": [float(x) for x in b[i]], "bbox_id": i, "class": OBJECTS[int(r["concepts"][i])],
                "conf": float(r["confs"][i]), "attributes": [ATTRS[int(a)] for a in r["attrs"][i]],
                "attr_scores": [float(s) for s in r["attr_scores"][i]]} for i in range(n)]
    p = r["key"] + "\t" + json.dumps({"objects": objects, "image_h": r["height"], "image_w": r["width"],
                                      "num_boxes": n})
    return f, p


def write_lineidx(tsv: Path) -> Path:
    offsets, pos = [], 0
    for line in tsv.read_bytes().splitlines(keepends=True):
        offsets.append(pos)
        pos += len(line)
    out = tsv.with_suffix(".lineidx")
    out.write_text("".join(f"{o}\n" for o in offsets))
    return out


def write_vinvl(folder: Path, rows: list[dict]) -> tuple[Path, Path]:
    pairs = [vinvl_lines(r) for r in rows]
    f = write_tsv(folder / "features.tsv", [a for a, _ in pairs])
    p = write_tsv(folder / "predictions.tsv", [b for _, b in pairs])
    write_lineidx(f)
    write_lineidx(p)
    return f, p


def write_npz(folder: Path, r: dict, with_attrs: bool = True) -> Path:
    """As MILVLG's `save_roi_features`: ids from an argmax over [background] + classes (so 1-based)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(r["boxes"])
    info = {"image_id": r["key"], "image_h": r["height"], "image_w": r["width"], "num_boxes": n,
            "objects_id": r["concepts"].astype(np.int64) + 1, "objects_conf": r["confs"].astype(np.float32)}
    if with_attrs:
        info["attrs_id"] = r["attrs"][:, 0].astype(np.int64) + 1
        info["attrs_conf"] = r["attr_scores"][:, 0].astype(np.float32)
    out = folder / f"{r['key']}.npz"
    np.savez_compressed(out, x=r["features"].astype(np.float32), bbox=r["boxes"].astype(np.float32), num_bbox=n,
                        image_h=r["height"], image_w=r["width"], info=info)
    return out


def write_vocabs(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "objects_vocab.txt").write_text("\n".join(OBJECTS) + "\n")
    (folder / "attributes_vocab.txt").write_text("\n".join(ATTRS) + "\n")
    return folder / "objects_vocab.txt", folder / "attributes_vocab.txt"
