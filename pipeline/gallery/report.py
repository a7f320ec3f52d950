"""`vlmixer gallery report GALLERY --out report.html`: one page that says what a gallery holds.

Built or imported, a gallery is millions of rows nobody reads. The page puts
the numbers (images, patches, failures, vocabularies), where it came from
(the provenance), how patches spread over images and confidences, the most
and least frequent concepts with a strip of each one's best patches cut
from the source images, and every recorded failure with its reason. It is
self-contained: pictures are inline PNG, styles inline, no script and no
network, so it can be mailed or opened from an archive.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmixer.errors import VlmixerError
from vlmixer.files import atomic_write_bytes
from vlmixer.pipeline.gallery.images import BadImage, DecodePolicy, load_rgb
from vlmixer.pipeline.gallery.render import crop_patch, image_path
from vlmixer.pipeline.gallery.work import failure_category

_CHUNK = 1 << 22
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums} .note{color:#8a4b00;font-size:13px}
pre{background:#f6f6f6;padding:8px;font-size:12px;max-height:320px;overflow:auto}
.strip img{max-height:72px;max-width:120px;margin-right:2px;border:1px solid #ccc;vertical-align:middle}
.plots img{margin-right:12px;border:1px solid #eee} .muted{color:#777}
"""


def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _histogram_png(counts: np.ndarray, edges: np.ndarray, title: str, xlabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=90)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4a78b5", edgecolor="white")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _chunked_hist(a: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """np.histogram over a memory-mapped array a chunk at a time (bounded memory)."""
    out = np.zeros(len(edges) - 1, np.int64)
    for s in range(0, len(a), _CHUNK):
        out += np.histogram(np.asarray(a[s: s + _CHUNK]), bins=edges)[0]
    return out


class _Images:
    """Source images for the strips, decoded once each, a few kept; remembers what was unreachable."""

    def __init__(self, image_root: str | Path | None) -> None:
        self.root = image_root
        self.cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self.missing: list[str] = []
        self.policy = DecodePolicy()

    def get(self, index: int, rec: Any) -> np.ndarray | None:
        if index in self.cache:
            return self.cache[index]
        img = None
        if rec.path or self.root is not None:
            try:
                img = load_rgb(image_path(rec.path, rec.key, self.root), self.policy).array
            except BadImage:
                img = None
        if img is None and len(self.missing) < 3:
            self.missing.append(rec.path or f"{rec.key}: no stored path")
        self.cache[index] = img
        if len(self.cache) > 32:
            self.cache.popitem(last=False)
        return img


def _strip(reader: Any, concept: int, images: _Images, n: int, cell: int) -> tuple[str, int]:
    """HTML of a concept's best `n` patches (cut from their images), and how many could be cut."""
    pids, confs = reader.concept_patches(concept)
    tiles = []
    for pid, conf in zip(np.asarray(pids[:n]), np.asarray(confs[:n])):
        p = reader.patch(int(pid))
        rec = reader.image(p.image)
        img = images.get(p.image, rec)
        if img is None:
            continue
        tile = crop_patch(img, p.box, (rec.width, rec.height), cell)
        tiles.append(f'<img src="{_png(tile)}" title="{html.escape(rec.key)} conf {float(conf):.3f}" '
                     f'alt="{html.escape(rec.key)}">')
    return "".join(tiles), len(tiles)


def _concept_rows(reader: Any, ids: list[int], counts: np.ndarray, images: _Images, strip: int, cell: int) -> str:
    rows = []
    for c in ids:
        tiles, got = _strip(reader, c, images, strip, cell) if counts[c] else ("", 0)
        cell_html = (f'<span class="strip">{tiles}</span>' if got
                     else '<span class="note">source images not reachable</span>')
        name = html.escape(", ".join(reader.concepts.variants[c]))
        rows.append(f'<tr><td class="n">{c}</td><td>{name}</td><td class="n">{int(counts[c]):,}</td>'
                    f"<td>{cell_html}</td></tr>")
    return ('<table><tr><th class="n">id</th><th>concept</th><th class="n">patches</th>'
            f"<th>best patches</th></tr>{''.join(rows)}</table>")


def write_report(gallery: str | Path, out: str | Path, *, image_root: str | Path | None = None, top: int = 30,
                 strip: int = 8, cell: int = 96, max_failures: int = 500) -> dict[str, Any]:
    """Write the page; returns the figures it shows (counts, concepts listed, strips cut, notes)."""
    from vlmixer.storage.gallery import GalleryReader

    if top < 1 or strip < 0 or cell < 16:
        raise VlmixerError("--top must be >= 1, --strip >= 0, --cell >= 16")
    reader = GalleryReader(gallery)
    try:
        arrays = reader.patch_arrays()
        counts = np.asarray(reader.concept_counts())
        per_image = np.diff(np.asarray(arrays["image_patch_start"]))
        failures = reader.failures()
        shards = reader.shards()
        prov = reader.header.get("provenance", {})
        images = _Images(image_root)
        order = np.argsort(-counts, kind="stable")
        present = [int(c) for c in order if counts[c] > 0]
        most = present[:top]
        least = sorted(present, key=lambda c: (counts[c], c))[:top]
        notes = []
        most_html = _concept_rows(reader, most, counts, images, strip, cell)
        least_html = _concept_rows(reader, least, counts, images, strip, cell)
        if images.missing:
            notes.append("Some source images are not reachable (" + "; ".join(images.missing) + "): the strips "
                         "show only patches whose image could be read. Pass --image-root DIR, or import with "
                         "--image-pattern so that an imported gallery knows where its images are.")
        plots = []
        if reader.num_images:
            hi = int(per_image.max()) + 1
            edges = np.arange(0, hi + 1, max(1, hi // 40), dtype=np.float64)
            if edges[-1] < hi:
                edges = np.append(edges, hi)
            plots.append(_histogram_png(np.histogram(per_image, bins=edges)[0], edges, "patches per image",
                                        "patches"))
        if reader.num_patches:
            conf = arrays["patch_conf"]
            edges = np.linspace(0.0, 1.0, 41)
            lo, hi = float(np.min(conf)), float(np.max(conf))
            if lo < 0 or hi > 1:
                edges = np.linspace(min(lo, 0.0), max(hi, 1.0), 41)
            plots.append(_histogram_png(_chunked_hist(conf, edges), edges, "patch confidence", "confidence"))
        unknown: Counter[str] = Counter()
        for st in shards.values():
            unknown.update(st.get("unknown_labels") or {})
        cats = Counter(failure_category(f["reason"]) for f in failures)
        figures = {
            "images": reader.num_images, "patches": reader.num_patches, "failed": len(failures),
            "concepts": len(reader.concepts), "concepts_with_patches": len(present),
            "attributes": len(reader.attributes) if reader.attributes is not None else 0,
            "feature_dim": reader.feature_dim, "shards": len(shards),
            "mean_patches_per_image": round(float(per_image.mean()), 2) if len(per_image) else 0.0,
        }
        page = _page(Path(gallery), figures, prov, plots, most_html, least_html, most, least, failures[:max_failures],
                     len(failures), cats, unknown, notes)
    finally:
        reader.close()
    atomic_write_bytes(out, page.encode("utf-8"))
    return {**figures, "most": most, "least": least, "notes": notes, "out": str(out)}


def _page(root: Path, figures: dict[str, Any], prov: dict[str, Any], plots: list[str], most_html: str,
          least_html: str, most: list[int], least: list[int], failures: list[dict[str, str]], n_failed: int,
          cats: Counter[str], unknown: Counter[str], notes: list[str]) -> str:
    esc = html.escape
    source = "imported from " + str(prov["import"].get("format")) if "import" in prov else "built with a detector"
    fig_rows = "".join(f'<tr><td>{esc(k.replace("_", " "))}</td><td class="n">{v:,}</td></tr>'
                       if isinstance(v, int) else f'<tr><td>{esc(k.replace("_", " "))}</td><td class="n">{v}</td></tr>'
                       for k, v in figures.items())
    note_html = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    if "import" in prov and prov["import"].get("concepts") == "none":
        note_html += ('<p class="note">Imported with --concepts none: every patch has the one placeholder '
                      "concept, so Cross-Modal CutMix cannot use this gallery.</p>")
    plot_html = "".join(f'<img src="{p}" alt="histogram">' for p in plots) or '<p class="muted">no patches</p>'
    fail_rows = "".join(f"<tr><td>{esc(f['key'])}</td><td>{esc(f['reason'])}</td><td class=\"muted\">"
                        f"{esc(str(f.get('path', '')))}</td></tr>" for f in failures)
    cat_html = ", ".join(f"{esc(c)}: {n}" for c, n in cats.most_common())
    fail_html = ("<p>None recorded.</p>" if not n_failed else
                 f"<p>{n_failed} recorded ({cat_html}){'; first ' + str(len(failures)) + ' listed' if len(failures) < n_failed else ''}.</p>"
                 f"<table><tr><th>key</th><th>reason</th><th>where</th></tr>{fail_rows}</table>")
    unk_html = ""
    if unknown:
        unk_rows = "".join(f'<tr><td>{esc(k)}</td><td class="n">{n}</td></tr>' for k, n in unknown.most_common(100))
        unk_html = ("<h2>Labels not in the vocabulary</h2><p>Rows naming them were recorded as failed; nothing was "
                    f"guessed.</p><table><tr><th>label</th><th class=\"n\">rows</th></tr>{unk_rows}</table>")
    prov_html = esc(json.dumps(prov, indent=1, sort_keys=True, ensure_ascii=False))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vlmixer gallery report: {esc(root.name)}</title>
<style>{STYLE}</style></head><body>
<h1>Gallery {esc(str(root))}</h1>
<p class="muted">{esc(source)}; {figures['images']:,} images, {figures['patches']:,} patches,
{figures['failed']:,} failed</p>
{note_html}
<h2>Counts</h2><table>{fig_rows}</table>
<h2>Distributions</h2><div class="plots">{plot_html}</div>
<h2>The {len(most)} most frequent concepts</h2>{most_html}
<h2>The {len(least)} least frequent concepts (with at least one patch)</h2>{least_html}
{unk_html}
<h2>Failures</h2>{fail_html}
<h2>Provenance</h2><pre>{prov_html}</pre>
</body></html>
"""
