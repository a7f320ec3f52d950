"""Boxes a user gives (`gallery build --boxes`): COCO instances, Visual Genome objects, or jsonl.

Why: a gallery of human-labelled concepts (COCO, Visual Genome) needs the
detector's features at the annotated boxes, with the annotation's category as
the concept, instead of detected boxes and predicted classes. Formats:

* COCO instances json: `images` (id, file_name), `annotations` (image_id,
  bbox as x, y, width, height, category_id), `categories` (id, name);
* Visual Genome objects json: a list of `{"image_id", "objects": [{"x", "y",
  "w", "h", "names": [...]}]}` (the first name is the category);
* jsonl: one `{"image", "boxes": [[x1, y1, x2, y2], ...], "labels": [...]}`
  per line.

An image is looked up by its gallery key (the COCO / VG image id when the same
json is the image source), its file name, its path, or its file name without
the extension (Visual Genome's `<image_id>.jpg`). Category
names map to gallery concepts as the text job maps words: the concept's name,
its variants, then WordNet synonyms (`pipeline.text.synonyms`); a category
that maps to nothing is counted and listed, never guessed, and its boxes are
left out.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmixer.errors import VlmixerError
from vlmixer.storage.vocab import Vocabulary


@dataclass
class ImageBoxes:
    """One image's annotated boxes (original pixels, x1 y1 x2 y2) and their category names."""

    boxes: list[list[float]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


@dataclass
class BoxAnnotations:
    """Every image's boxes, found by any of its names; `format` and `problems` say what was read."""

    path: str
    format: str
    images: dict[str, ImageBoxes]
    aliases: dict[str, str]  # file name / last path part -> the image's entry in `images`
    problems: list[str] = field(default_factory=list)

    def lookup(self, key: str, path: str) -> ImageBoxes | None:
        for k in (key, Path(path).name, path, Path(path).stem):
            name = k if k in self.images else self.aliases.get(k)
            if name is not None:
                return self.images[name]
        return None

    def category_counts(self) -> Counter[str]:
        return Counter(n for img in self.images.values() for n in img.names)


def _add(ann: BoxAnnotations, name: str, box: Sequence[float], category: str, *aliases: str) -> None:
    img = ann.images.setdefault(name, ImageBoxes())
    img.boxes.append([float(v) for v in box])
    img.names.append(category)
    for a in aliases:
        if a and a != name:
            ann.aliases.setdefault(a, name)


def _number_box(values: Any, where: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise ValueError(f"{where}: a box needs 4 numbers")
    out = [float(v) for v in values]
    if not all(np.isfinite(out)):
        raise ValueError(f"{where}: box has a non-finite number")
    return out


def _coco(path: Path, data: dict[str, Any]) -> BoxAnnotations:
    ann = BoxAnnotations(str(path), "coco", {}, {})
    cats = {c.get("id"): str(c.get("name")) for c in data.get("categories", []) if isinstance(c, dict)}
    files = {}
    for im in data.get("images", []):
        if isinstance(im, dict) and "id" in im:
            files[im["id"]] = str(im.get("file_name", ""))
    for i, a in enumerate(data["annotations"]):
        try:
            if not isinstance(a, dict):
                raise ValueError(f"annotation {i}: not an object")
            x, y, w, h = _number_box(a.get("bbox"), f"annotation {i}")
            cat = cats.get(a.get("category_id"))
            if cat is None:
                raise ValueError(f"annotation {i}: category_id {a.get('category_id')!r} is not in 'categories'")
            rid = a.get("image_id")
            fname = files.get(rid, "")
            _add(ann, str(rid), [x, y, x + w, y + h], cat, fname, Path(fname).name)
        except (ValueError, TypeError) as e:
            ann.problems.append(str(e))
    return ann


def _vg(path: Path, data: list[Any]) -> BoxAnnotations:
    ann = BoxAnnotations(str(path), "visual_genome", {}, {})
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "image_id" not in rec:
            ann.problems.append(f"record {i}: not an object with 'image_id'")
            continue
        rid = str(rec["image_id"])
        for j, o in enumerate(rec.get("objects") or []):
            try:
                if not isinstance(o, dict):
                    raise ValueError(f"image {rid} object {j}: not an object")
                x, y, w, h = _number_box([o.get("x"), o.get("y"), o.get("w"), o.get("h")], f"image {rid} object {j}")
                names = o.get("names") or ([o["name"]] if "name" in o else [])
                if not names:
                    raise ValueError(f"image {rid} object {j}: no 'names'")
                _add(ann, rid, [x, y, x + w, y + h], str(names[0]), f"{rid}.jpg")
            except (ValueError, TypeError) as e:
                ann.problems.append(str(e))
    return ann


def _jsonl(path: Path, lines: Iterable[str]) -> BoxAnnotations:
    ann = BoxAnnotations(str(path), "jsonl", {}, {})
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                raise ValueError("expected {\"image\": ..., \"boxes\": [...], \"labels\": [...]}")
            boxes, labels = rec.get("boxes"), rec.get("labels")
            if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
                raise ValueError("'boxes' and 'labels' must be lists of the same length")
            checked = [_number_box(b, f"box {k}") for k, b in enumerate(boxes)]
            image = rec["image"]
            ann.images.setdefault(image, ImageBoxes())
            for b, lab in zip(checked, labels):
                _add(ann, image, b, str(lab), Path(image).name)
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            ann.problems.append(f"line {n}: {e}")
    return ann


def read_annotations(path: str | Path) -> BoxAnnotations:
    """Parse an annotation file; unreadable files are errors, bad records are listed in `problems`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VlmixerError(f"{p}: cannot read box annotations ({e})") from None
    if p.suffix.lower() == ".jsonl":
        return _jsonl(p, text.splitlines())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise VlmixerError(f"{p}: not json ({e}); jsonl files must end in .jsonl") from None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return _coco(p, data)
    if isinstance(data, list) and all(isinstance(r, dict) and "objects" in r for r in data[:10]):
        return _vg(p, data)
    raise VlmixerError(f"{p}: expected COCO instances (an 'annotations' list), Visual Genome objects "
                       "(a list of {image_id, objects}) or a .jsonl file")


@dataclass(frozen=True)
class CategoryMap:
    """Annotation category -> concept id; the unmapped categories with their box counts."""

    to_concept: dict[str, int]
    unmapped: dict[str, int]
    how: dict[str, str]  # category -> "name" | "variant" | "wordnet:<synset>" ...

    def summary(self, max_listed: int = 20) -> str:
        n = sum(self.unmapped.values())
        if not n:
            return f"box categories: all {len(self.to_concept)} mapped to concepts"
        top = sorted(self.unmapped.items(), key=lambda kv: (-kv[1], kv[0]))[:max_listed]
        listed = ", ".join(f"{k} ({v})" for k, v in top)
        more = "" if len(self.unmapped) <= max_listed else f", ... {len(self.unmapped) - max_listed} more"
        return (f"box categories: {len(self.to_concept)} mapped; {len(self.unmapped)} unmapped "
                f"({n} boxes left out): {listed}{more}")


def map_categories(names: Counter[str], concepts: Vocabulary, *, synonyms: bool = True) -> CategoryMap:
    """Each category name -> a concept by name, variant, then (with `synonyms`) WordNet synonym,
    with the text job's mapping and rules; the rest unmapped with their box counts."""
    from vlmixer.pipeline.text.concepts import ConceptMapping, normalize_phrase

    rows = []
    version = "off"
    if synonyms:
        from vlmixer.pipeline.text import synonyms as wn

        rows = wn.wordnet_synonyms(concepts)
        version = wn.version()
    mapping = ConceptMapping.from_vocabulary(concepts, synonyms=rows, synonyms_version=version)
    by_phrase = {e.phrase: e for e in mapping.entries}
    index = {n: i for i, n in enumerate(concepts.names)}
    to_concept: dict[str, int] = {}
    how: dict[str, str] = {}
    unmapped: dict[str, int] = {}
    for name, count in names.items():
        e = by_phrase.get(normalize_phrase(name.replace("_", " ")))
        if e is None:
            unmapped[name] = int(count)
        else:
            to_concept[name] = index[e.concept]
            how[name] = e.source
    return CategoryMap(to_concept, unmapped, how)


def boxes_for_image(entry: ImageBoxes | None, cmap: dict[str, int], width: int, height: int,
                    min_pixels: float = 1.0) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The image's mapped boxes clipped to it (float32 (n, 4)) and concept ids, or a reason when none is left."""
    if entry is None:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), "no boxes for this image in the annotations"
    keep_b, keep_c = [], []
    for b, name in zip(entry.boxes, entry.names):
        c = cmap.get(name)
        if c is None:
            continue
        x1, x2 = min(max(b[0], 0.0), width), min(max(b[2], 0.0), width)
        y1, y2 = min(max(b[1], 0.0), height), min(max(b[3], 0.0), height)
        if x2 - x1 < min_pixels or y2 - y1 < min_pixels:
            continue
        keep_b.append([x1, y1, x2, y2])
        keep_c.append(c)
    if not keep_b:
        return (np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                f"no annotated box left (unmapped categories or boxes under {min_pixels:g} px)")
    return np.asarray(keep_b, np.float32), np.asarray(keep_c, np.int64), None
