"""`vlmixer gallery show GALLERY CONCEPT --out FILE.png`: what the gallery holds, as a picture.

Numbers cannot tell a person whether "dog" patches are dogs. This draws the
concept's best patches, cropped from their source images (decoded with the
build's own `load_rgb`, so EXIF orientation matches the stored boxes), each
with its confidence and image key, in a grid.
"""
from __future__ import annotations

import difflib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlmixer.errors import VlmixerError
from vlmixer.files import atomic_write
from vlmixer.pipeline.gallery.images import BadImage, DecodePolicy
from vlmixer.pipeline.gallery.sources import ImageItem, load_item

LABEL_H = 28
TITLE_H = 30
BG = (245, 245, 245)


def resolve_concept(names: list[list[str]], concept: str) -> int:
    """A concept id from a numeric id, a canonical name or any variant (case-insensitive)."""
    if concept.strip().isdigit():
        cid = int(concept)
        if not 0 <= cid < len(names):
            raise VlmixerError(f"concept id {cid} out of range: the gallery has {len(names)} concepts")
        return cid
    want = concept.strip().lower()
    for i, variants in enumerate(names):
        if any(v.lower() == want for v in variants):
            return i
    close = difflib.get_close_matches(want, [v[0] for v in names], n=5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise VlmixerError(f"concept {concept!r} is not in the gallery's vocabulary{hint}")


def crop_patch(img: np.ndarray, box: np.ndarray, stored_wh: tuple[int, int], cell: int) -> Image.Image:
    h, w = img.shape[:2]
    sx, sy = w / max(stored_wh[0], 1), h / max(stored_wh[1], 1)  # the file changed size since the build
    x1, y1, x2, y2 = (float(box[0]) * sx, float(box[1]) * sy, float(box[2]) * sx, float(box[3]) * sy)
    x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
    x2, y2 = min(w, max(x1 + 1, int(np.ceil(x2)))), min(h, max(y1 + 1, int(np.ceil(y2))))
    crop = Image.fromarray(img[y1:y2, x1:x2])
    crop.thumbnail((cell, cell), Image.BILINEAR)
    if crop.width < cell // 4 and crop.height < cell // 4:  # tiny boxes: enlarge to be seen
        f = (cell // 2) / max(crop.width, crop.height)
        crop = crop.resize((max(1, round(crop.width * f)), max(1, round(crop.height * f))), Image.NEAREST)
    return crop


def image_path(stored: str, key: str, image_root: str | Path | None) -> Path:
    """Where an image's file is now: its stored path, else (the collection moved since the build)
    `image_root/KEY` or `image_root/<stored file name>`."""
    path = Path(stored)
    if image_root is not None and not path.is_file():
        cands = [Path(image_root) / key, Path(image_root) / path.name]
        path = next((c for c in cands if c.is_file()), path)
    return path


def _placeholder(cell: int, text: str) -> Image.Image:
    im = Image.new("RGB", (cell, cell), (200, 200, 200))
    ImageDraw.Draw(im).text((4, cell // 2 - 6), text, fill=(90, 0, 0), font=ImageFont.load_default())
    return im


def render_concept(gallery: str | Path, concept: str, out: str | Path, *, max_patches: int = 48,
                   columns: int = 8, cell: int = 128, image_root: str | Path | None = None) -> dict[str, Any]:
    """Write the grid picture; returns what it drew (concept, id, shown, total)."""
    from vlmixer.storage.gallery import GalleryReader

    if max_patches < 1 or columns < 1 or cell < 16:
        raise VlmixerError("--max-patches and --columns must be >= 1, --cell >= 16")
    reader = GalleryReader(gallery)
    names = [list(v) for v in reader.concepts.variants]
    cid = resolve_concept(names, concept)
    pids, confs = reader.concept_patches(cid)
    total = len(pids)
    pids, confs = np.asarray(pids[:max_patches]), np.asarray(confs[:max_patches])
    n = len(pids)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    sheet = Image.new("RGB", (cols * cell, TITLE_H + rows * (cell + LABEL_H)), BG)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    title = f"{names[cid][0]} (id {cid}): {total} patches" + (f", best {n} shown" if n < total else "")
    draw.text((6, 8), title if total else f"{names[cid][0]} (id {cid}): no patches in this gallery",
              fill=(0, 0, 0), font=font)
    cache: OrderedDict[int, np.ndarray | str] = OrderedDict()
    build = (reader.header.get("provenance") or {}).get("build") or {}
    # decode as the build did (EXIF orientation or not), so the boxes fall on the same pixels
    policy = DecodePolicy(mode=str(build.get("decode", "standard")), strict_modes=bool(build.get("strict_modes", True)))
    for k, (pid, conf) in enumerate(zip(pids, confs)):
        p = reader.patch(int(pid))
        rec = reader.image(p.image)
        if p.image not in cache:
            path = image_path(rec.path, rec.key, image_root)
            try:  # a plain file, or a webdataset tar member / parquet cell by its locator
                cache[p.image] = load_item(ImageItem(key=rec.key, path=str(path)), policy).array
            except BadImage as e:
                cache[p.image] = e.reason
            if len(cache) > 16:
                cache.popitem(last=False)
        src = cache[p.image]
        tile = (_placeholder(cell, src[:20]) if isinstance(src, str)
                else crop_patch(src, p.box, (rec.width, rec.height), cell))
        r, c = divmod(k, cols)
        x0, y0 = c * cell, TITLE_H + r * (cell + LABEL_H)
        sheet.paste(tile, (x0 + (cell - tile.width) // 2, y0 + (cell - tile.height) // 2))
        draw.text((x0 + 3, y0 + cell + 1), f"{float(conf):.3f}", fill=(0, 0, 140), font=font)
        draw.text((x0 + 3, y0 + cell + 13), rec.key[-(cell // 6):], fill=(60, 60, 60), font=font)
    reader.close()
    atomic_write(out, lambda f: sheet.save(f, format="PNG"))  # mode as open() gives, not mkstemp's 0600
    return {"concept": names[cid][0], "concept_id": cid, "shown": n, "total": total}
