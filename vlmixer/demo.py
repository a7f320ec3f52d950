"""`vlmixer demo`: the whole product end to end on bundled data, on a laptop CPU.

Every stage runs through the same CLI entry points a user types, in this
process, so the demo exercises exactly what the README documents:
real photos from scikit-image (plus synthetic scenes) -> Ray gallery build
with the tiny detector -> gallery report page -> spaCy tagging of bundled captions against the
gallery's vocabulary -> tiny pre-training -> pictures and a summary.
The detector has random weights unless `--detector-weights` is given, so its
concept labels are arbitrary: the demo shows the machinery, not semantics.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmixer.config import resolve_config
from vlmixer.errors import VlmixerError

PACKAGE_DATA = Path(__file__).parent / "data"

SIZES = {
    # name: (synthetic images, training steps, captions used)
    "full": (240, 300, 300),
    "small": (6, 30, 80),
}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right", "camera",
          "coins", "immunohistochemistry", "hubble_deep_field", "cat", "horse", "page", "text")


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], int], log: Callable[[str], None]) -> None:
        log(f"[demo] {name} ...")
        t = time.perf_counter()
        rc = fn()
        self.seconds[name] = time.perf_counter() - t
        if rc not in (0, None):
            raise VlmixerError(f"demo stage '{name}' failed with exit code {rc}")
        log(f"[demo] {name}: {self.seconds[name]:.1f} s")


def write_photos(folder: Path) -> list[str]:
    """The real photos that ship inside scikit-image, as RGB PNGs."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            img = np.asarray(loader())
        except Exception:  # noqa: BLE001 - a photo missing from this scikit-image build is skipped
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        if img.dtype != np.uint8:
            f = img.astype(np.float64)
            img = (255 * (f - f.min()) / max(float(f.max() - f.min()), 1e-9)).astype(np.uint8)
        Image.fromarray(img[..., :3]).save(folder / f"photo_{name}.png")
        written.append(name)
    return written


def write_synthetic(folder: Path, n: int, seed: int = 0) -> None:
    """Simple scenes (sky, ground, a few coloured shapes) so the gallery has more than a dozen images."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(200, 320)), int(rng.integers(160, 240))
        sky = rng.integers(60, 255, 3)
        ground = rng.integers(0, 200, 3)
        img = Image.new("RGB", (w, h), tuple(int(c) for c in sky))
        d = ImageDraw.Draw(img)
        horizon = int(h * rng.uniform(0.4, 0.7))
        d.rectangle([0, horizon, w, h], fill=tuple(int(c) for c in ground))
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x1, y1 = x0 + int(rng.integers(15, w // 2)), y0 + int(rng.integers(15, h // 2))
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=color)
        img.save(folder / f"synthetic_{i:04d}.jpg", quality=90)


def _loss_plot(metrics: Path, out: Path) -> dict[str, list[float]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    not_losses = {"step", "task", "lr", "grad_norm", "samples_per_s", "data_frac"}
    series: dict[str, list[float]] = {}
    steps: dict[str, list[int]] = {}
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for k, v in row.items():
            if k in not_losses or k.endswith(("_candidates", "_tokens")) or not isinstance(v, (int, float)):
                continue
            key = f"{row.get('task', 'train')}/{k}"
            series.setdefault(key, []).append(float(v))
            steps.setdefault(key, []).append(int(row["step"]))
    keys = sorted(series)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for k in keys:
        ax.plot(steps[k], series[k], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("vlmixer demo: tiny pre-training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return series


def run_demo(out: str | Path, *, size: str = "full", detector_weights: str | None = None,
             detector_config: str | None = None, labelmap: str | None = None,
             ray_address: str = "local", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage into `out`; returns the summary numbers also written to summary.md.

    By default the tiny detector config with random weights and the bundled 80-concept
    vocabulary; real weights come with their own config and label map (e.g.
    configs/detector/vinvl_x152c4.yaml + VG-SGG-dicts-vgoi6-clipped.json)."""
    from vlmixer.cli import main as cli
    from vlmixer.storage.gallery import GalleryReader
    from vlmixer.storage.textstore import TextStoreReader

    if detector_weights is None and (detector_config or labelmap):
        raise VlmixerError("--detector-config/--labelmap go with --detector-weights (random weights use the "
                           "tiny config and the bundled vocabulary)")
    if detector_weights is not None and labelmap is None:
        raise VlmixerError("--detector-weights needs --labelmap JSON naming the checkpoint's classes")
    if size not in SIZES:
        raise VlmixerError(f"--size {size!r}: choose one of {sorted(SIZES)}")
    n_synth, steps, n_captions = SIZES[size]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise VlmixerError(f"{out}: output directory is not empty; remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    times = StageTimes()
    t_start = time.perf_counter()
    if detector_weights is None:
        log("[demo] the detector has RANDOM weights: boxes, features and concept labels are arbitrary. "
            "Pass --detector-weights CKPT (converted with `vlmixer detector convert`) for real detections; "
            "the stages and formats stay the same.")

    images = out / "images"
    photos = write_photos(images)
    write_synthetic(images, n_synth)
    captions = out / "captions.txt"
    lines = (PACKAGE_DATA / "demo_captions.txt").read_text(encoding="utf-8").splitlines()[:n_captions]
    captions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(PACKAGE_DATA / "demo_concepts.txt", out / "concepts.txt")

    gallery, text, run = out / "gallery", out / "text", out / "run"
    cfg = detector_config or str(resolve_config("detector/tiny"))
    names = ["--labelmap", labelmap] if labelmap else ["--vocab", str(out / "concepts.txt")]
    build = ["gallery", "build", "--images", str(images), "--detector", cfg, *names, "--out", str(gallery),
             "--ray-address", ray_address, "--shard-size", "32", "--no-progress"]
    if ray_address == "local":
        build += ["--num-cpus", "2"]
    if detector_weights:
        build += ["--weights", detector_weights]
    times.run("gallery build", lambda: cli(build), log)
    times.run("text tag", lambda: cli(["text", "tag", "--input", str(captions), "--concepts", str(gallery),
                                       "--out", str(text), "--synonyms", "wordnet", "--no-progress"]), log)
    g = GalleryReader(gallery)  # opens its LMDB parts lazily: nothing held while training reads them
    feature_dim = g.feature_dim
    times.run("train", lambda: cli(["train", "--config", str(resolve_config("pretrain/tiny")),
                                    f"model.feature_dim={feature_dim}",
                                    f"data.gallery={gallery}", f"data.text_stores=[{text}]",
                                    f"data.tavp_galleries=[{gallery}]", f"run.out_dir={run}",
                                    f"optim.total_steps={steps}", "run.progress=false",
                                    f"run.ckpt_every={steps}"]), log)
    times.run("mix show", lambda: cli(["mix", "show", "--text", str(text), "--gallery", str(gallery),
                                       "--n", "12", "--out", str(out / "mix.html")]), log)

    times.run("gallery report", lambda: cli(["gallery", "report", str(gallery), "--out",
                                             str(out / "gallery_report.html")]), log)

    t = TextStoreReader(text)
    counts = g.concept_counts()
    top = [int(c) for c in np.argsort(-counts, kind="stable")[:3] if counts[c] > 0]
    grids = []
    for c in top:
        name = g.concepts.names[c]
        png = out / f"gallery_{name.replace(' ', '_')}.png"
        times.run(f"gallery show {name}", lambda n=name, p=png: cli(["gallery", "show", str(gallery), n,
                                                                     "--out", str(p)]), log)
        grids.append(png.name)
    series = _loss_plot(run / "metrics.jsonl", out / "loss.png")
    n_spans = sum(len(t.span_array(i)) for i in range(len(t)))
    summary = {
        "detector_weights": detector_weights or "random",
        "photos": len(photos), "synthetic_images": n_synth,
        "gallery_images": g.num_images, "gallery_patches": g.num_patches, "gallery_failed": len(g.failures()),
        "concepts_with_patches": int((counts > 0).sum()),
        "sentences": len(t), "grounded_spans": n_spans,
        "train_steps": steps,
        "loss_first": {k: v[0] for k, v in series.items() if v},
        "loss_last": {k: v[-1] for k, v in series.items() if v},
        "seconds": {k: round(v, 1) for k, v in times.seconds.items()},
        "images_per_second": round(g.num_images / times.seconds["gallery build"], 2),
        "sentences_per_second": round(len(t) / times.seconds["text tag"], 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "grids": grids,
    }
    g.close()
    t.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(_summary_md(summary), encoding="utf-8")
    log(f"[demo] done in {summary['total_seconds']} s: {out / 'summary.md'}, {out / 'mix.html'}")
    return summary


def _summary_md(s: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} s |" for k, v in s["seconds"].items())
    losses = "\n".join(f"| {k} | {s['loss_first'][k]:.4f} | {s['loss_last'][k]:.4f} |" for k in s["loss_first"])
    weights = ("random (the detector's labels are arbitrary; pass --detector-weights for real ones)"
               if s["detector_weights"] == "random" else s["detector_weights"])
    return f"""# vlmixer demo summary

Detector weights: {weights}

| what | count |
| --- | --- |
| real photos (scikit-image) | {s['photos']} |
| synthetic images | {s['synthetic_images']} |
| gallery images | {s['gallery_images']} |
| gallery patches | {s['gallery_patches']} |
| failed images | {s['gallery_failed']} |
| concepts with patches | {s['concepts_with_patches']} |
| sentences | {s['sentences']} |
| grounded spans | {s['grounded_spans']} |
| training steps | {s['train_steps']} |

Throughput: gallery build {s['images_per_second']} images/s, tagging {s['sentences_per_second']} sentences/s.

| stage | wall time |
| --- | --- |
{rows}

| loss | first logged | last logged |
| --- | --- | --- |
{losses}

![losses](loss.png)

Gallery report (counts, provenance, histograms, concept strips, failures):
[gallery_report.html](gallery_report.html).
Multi-modal sentences: [mix.html](mix.html). Patch grids: {', '.join(f'[{g}]({g})' for g in s['grids'])}.
TensorBoard: `tensorboard --logdir run`.
"""
