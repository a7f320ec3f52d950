"""`vlmixer demo` end to end at its reduced size: every output exists and is well-formed."""
from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from vlmixer.cli import main
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.textstore import TextStoreReader


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def _decode(src: str, base: Path) -> Image.Image:
    if src.startswith("data:image/png;base64,"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    path = base / src
    assert path.exists(), f"mix.html references a missing image {src}"
    return Image.open(path)


@pytest.mark.slow
def test_demo_small_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    # no Ray here: the gallery tests run the Ray paths; this test checks the demo's outputs
    assert main(["demo", "--out", str(out), "--size", "small", "--ray-address", "none"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed

    s = json.loads((out / "summary.json").read_text())
    g, t = GalleryReader(out / "gallery"), TextStoreReader(out / "text")
    assert s["gallery_images"] == g.num_images == s["photos"] + s["synthetic_images"] - s["gallery_failed"]
    assert s["gallery_patches"] == g.num_patches >= 10 * g.num_images  # at least the configured minimum
    assert s["sentences"] == len(t) >= 80
    assert s["grounded_spans"] == sum(len(t.span_array(i)) for i in range(len(t))) > 0
    md = (out / "summary.md").read_text()
    assert f"| gallery patches | {g.num_patches} |" in md and f"| sentences | {len(t)} |" in md
    assert main(["verify", str(out / "gallery"), str(out / "text")]) == 0

    for name in ["loss.png", *s["grids"]]:
        with Image.open(out / name) as im:
            im.load()
            assert im.width > 100 and im.height > 100
    assert s["grids"] and all(n.startswith("gallery_") for n in s["grids"])

    report = (out / "gallery_report.html").read_text(encoding="utf-8")
    assert "(gallery_report.html)" in md and f"{g.num_images:,} images" in report and "built with a detector" in report

    html = (out / "mix.html").read_text(encoding="utf-8")
    p = _Images()
    p.feed(html)
    p.close()
    assert p.srcs, "mix.html shows no patch"
    for src in p.srcs:
        im = _decode(src, out)
        im.load()
        assert im.width > 0 and im.height > 0

    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == s["train_steps"]
    assert list((out / "run").rglob("events.out.tfevents.*")), "no TensorBoard log"
