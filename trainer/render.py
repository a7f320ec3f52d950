"""What the model reads: multi-modal sentences as data, HTML or PNG (`vlmixer mix show|sample`).

A sentence is mixed exactly as the trainer mixes it under a run's config
at a given epoch (the dataset `build.valp_dataset` makes for training, the
same per-sample random stream), so the page shows the training input, not a
look-alike. Each replaced word is shown as
the crop of its patch from the source image, captioned with the concept,
p_i and its probability within the candidate pool; when the source image
cannot be read, a grey box with the concept name stands in.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.trainer.build import valp_dataset
from vlmixer.trainer.config import TrainConfig
from vlmixer.trainer.data import WordPieceVocab


def mixed_sentences(texts: Sequence[TextStoreReader], gallery: GalleryReader, cfg: TrainConfig, *, n: int,
                    start: int = 0, epoch: int = 0) -> list[dict[str, Any]]:
    """Sentences start..start+n-1 of the stores (indexed as the trainer concatenates them), with their
    grounded words and the CMC outcome of each under `cfg` (its cmc keys, run.seed, max_len_valp)."""
    ds = valp_dataset(cfg, list(texts), gallery, WordPieceVocab.read(texts[0].vocab_file))
    names = gallery.concepts.names
    offsets = ds.corpus.offsets
    out = []
    for i in range(start, min(start + n, len(ds))):
        r = int(np.searchsorted(offsets, i, side="right")) - 1
        s = texts[r].sentence(i - int(offsets[r]))
        _, spans, mix, _ = ds.mixed(epoch, i)
        words = []
        for k, (cs, ce, ts, te, c) in enumerate(spans.tolist()):
            w: dict[str, Any] = {"text": s.text[cs:ce], "char_start": cs, "char_end": ce, "tokens": te - ts,
                                 "concept": c, "concept_name": names[c], "replaced": bool(mix.replaced[k])}
            if mix.replaced[k]:
                w.update(patch_id=int(mix.patch_ids[k]), p_i=float(mix.weight[k]), prob=float(mix.prob[k]))
            words.append(w)
        out.append({"index": i, "id": s.id, "text": s.text, "words": words})
    return out


def patch_crop(gallery: GalleryReader, pid: int, height: int = 64) -> Image.Image:
    """The patch's box cut from its source image, `height` pixels high; a grey box if unreadable."""
    p = gallery.patch(pid)
    path = gallery.image(p.image).path
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            sx, sy = im.width / max(p.width, 1), im.height / max(p.height, 1)  # stored boxes are in build pixels
            x1, y1, x2, y2 = (float(v) for v in p.box)
            crop = im.crop((int(x1 * sx), int(y1 * sy), max(int(x2 * sx), int(x1 * sx) + 1),
                            max(int(y2 * sy), int(y1 * sy) + 1)))
    except (OSError, ValueError):
        return placeholder(gallery.concepts.names[p.concept], height)
    w = max(1, round(crop.width * height / max(crop.height, 1)))
    return crop.resize((min(w, 4 * height), height))


def placeholder(label: str, height: int = 64) -> Image.Image:
    font = ImageFont.load_default()
    tw = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label, font=font))
    im = Image.new("RGB", (max(height, tw + 8), height), (160, 160, 160))
    ImageDraw.Draw(im).text((4, height // 2 - 6), label, fill=(255, 255, 255), font=font)
    return im


def _png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pieces(item: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """The sentence cut into (text, None) and (word text, grounded word) pieces in order."""
    text, pos, out = item["text"], 0, []
    for w in sorted(item["words"], key=lambda w: w["char_start"]):
        if w["char_start"] > pos:
            out.append((text[pos: w["char_start"]], None))
        out.append((text[w["char_start"]: w["char_end"]], w))
        pos = w["char_end"]
    if pos < len(text):
        out.append((text[pos:], None))
    return out


def render_html(items: list[dict[str, Any]], gallery: GalleryReader, path: str | Path, height: int = 64) -> Path:
    rows = []
    for it in items:
        parts = []
        for txt, w in _pieces(it):
            if w is None:
                parts.append(html.escape(txt))
            elif w["replaced"]:
                src = _png_b64(patch_crop(gallery, w["patch_id"], height))
                cap = f"{w['concept_name']} · p={w['p_i']:.3f} · P={w['prob']:.2f}"
                parts.append(f'<figure title="{html.escape(txt)} → patch {w["patch_id"]}"><img src="data:image/png;'
                             f'base64,{src}"><figcaption>{html.escape(cap)}</figcaption></figure>')
            else:
                parts.append(f'<span class="g" title="{html.escape(w["concept_name"])}">{html.escape(txt)}</span>')
        rows.append(f'<li><div class="src">#{it["index"]} {html.escape(it["id"])}: {html.escape(it["text"])}</div>'
                    f'<div class="mm">{"".join(parts)}</div></li>')
    doc = ("<!doctype html><meta charset='utf-8'><title>vlmixer mix show</title><style>"
           "body{font:16px sans-serif;margin:2em}li{margin:1.2em 0}.src{color:#888;font-size:13px}"
           ".mm{line-height:90px}figure{display:inline-block;margin:0 4px;vertical-align:middle;text-align:center}"
           "figcaption{font-size:11px;line-height:12px;color:#444}.g{border-bottom:2px dotted #58a}</style>"
           "<h1>Multi-modal sentences (Cross-Modal CutMix)</h1><p>Replaced words are shown as their patch, with "
           "the concept, p<sub>i</sub> and the probability P of that patch within its candidate pool; dotted words "
           "are grounded but stayed text.</p><ol>" + "".join(rows) + "</ol>")
    out = Path(path)
    out.write_text(doc, encoding="utf-8")
    return out


def render_png(items: list[dict[str, Any]], gallery: GalleryReader, path: str | Path, height: int = 64,
               width: int = 1000) -> Path:
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h, pad = height + 16, 10
    lines: list[list[tuple[int, Any]]] = []  # per line: (x, str | Image | (Image, caption))

    def flow(pieces: list[Any]) -> None:
        x, cur = pad, []
        for p in pieces:
            w = p[0].width if isinstance(p, tuple) else int(measure.textlength(p, font=font))
            if x + w > width - pad and cur:
                lines.append(cur)
                x, cur = pad, []
            cur.append((x, p))
            x += w + 4
        lines.append(cur)

    for it in items:
        pieces: list[Any] = [f"#{it['index']}"]
        for txt, w in _pieces(it):
            if w is not None and w["replaced"]:
                pieces.append((patch_crop(gallery, w["patch_id"], height), f"{w['concept_name']} p={w['p_i']:.2f}"))
            else:
                pieces.extend(t for t in txt.split() if t)
        flow(pieces)
    im = Image.new("RGB", (width, pad * 2 + line_h * max(len(lines), 1)), "white")
    d = ImageDraw.Draw(im)
    for k, line in enumerate(lines):
        y = pad + k * line_h
        for x, p in line:
            if isinstance(p, tuple):
                im.paste(p[0], (x, y))
                d.text((x, y + height + 1), p[1], fill=(60, 60, 60), font=font)
            else:
                d.text((x, y + height // 2 - 6), p, fill=(0, 0, 0), font=font)
    out = Path(path)
    im.save(out)
    return out


def as_jsonl_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-word sampled patch ids, for `mix sample --jsonl`."""
    rows = []
    for it in items:
        words = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in w.items()} for w in it["words"]]
        rows.append({"index": it["index"], "id": it["id"], "text": it["text"], "words": words})
    return rows
