"""Gallery build benchmark: Ray job vs a single-process loop, and the driver's memory.

    .venv/bin/python bench/gallery_build.py [--images 48] [--rss-images 5000] [--skip-rss]

1. Throughput, in one run, on the same images (small JPEGs: real skimage photos
   and synthetic ones) with the same tiny detector (configs/detector/tiny.yaml,
   random weights): a plain single-process loop (decode, detect, nothing
   written), the in-process build (`--ray-address none`, writes the gallery)
   and the Ray job on a local Ray (`ray.init(num_cpus=N)`). Rates are steady
   state: from the first finished batch to the last (startup, imports and
   model load excluded, and reported apart as wall time).
2. Driver memory: a Ray build over >= 5,000 small images (a faster variant of
   the tiny config: shorter side 64, so the run takes minutes, not an hour;
   the driver never sees pixels either way). The driver's RSS is sampled
   every 0.2 s; peaks of the first and last quarter of the images are printed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from vlmixer.pipeline.gallery import job
from vlmixer.pipeline.gallery.images import load_rgb
from vlmixer.pipeline.gallery.sources import read_source

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TINY = ROOT / "configs" / "detector" / "tiny.yaml"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_images(folder: Path, n: int, size: tuple[int, int]) -> None:
    """n JPEGs of `size`: skimage photos (cropped and scaled) and smooth synthetic pictures."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        if i % 2 == 0:
            p = photos[(i // 2) % len(photos)]
            y, x = int(rng.integers(0, p.shape[0] // 4)), int(rng.integers(0, p.shape[1] // 4))
            img = Image.fromarray(p[y:, x:]).resize((w, h), Image.BILINEAR)
        else:
            low = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
            img = Image.fromarray(low).resize((w, h), Image.BILINEAR)
        img.save(folder / f"img{i:06d}.jpg", quality=85)


def write_labelmap(path: Path, n_classes: int = 80, n_attributes: int = 20) -> Path:
    import json

    path.write_text(json.dumps({"label_to_idx": {f"c{i}": i for i in range(1, n_classes + 1)},
                                "attribute_to_idx": {f"a{i}": i for i in range(1, n_attributes + 1)}}))
    return path


class Recorder:
    """Hooks the build's progress: (time, images done) per finished batch, and RSS samples."""

    def __init__(self) -> None:
        self.events: list[tuple[float, int]] = []
        self.rss: list[tuple[int, float]] = []
        self._done = 0
        self._stop = threading.Event()
        self._orig = job.Progress.update
        rec = self

        def update(progress: job.Progress, s: dict) -> None:
            rec._orig(progress, s)
            rec._done = progress.images
            rec.events.append((time.perf_counter(), progress.images))

        job.Progress.update = update  # type: ignore[method-assign]

    def sample(self) -> None:
        while not self._stop.wait(0.2):
            self.rss.append((self._done, rss_mb()))

    def __enter__(self) -> Recorder:
        self._thread = threading.Thread(target=self.sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        job.Progress.update = self._orig  # type: ignore[method-assign]

    def steady_rate(self) -> float:
        if len(self.events) < 2:
            return float("nan")
        (t0, n0), (t1, n1) = self.events[0], self.events[-1]
        return (n1 - n0) / (t1 - t0)


def plain_loop(folder: Path, batch: int, threads: int | None = None) -> tuple[float, float]:
    """Decode + detect in one process, nothing written: the baseline. Returns (steady rate, wall).
    `threads`: torch intra-op threads (None: torch's default, all cores)."""
    import torch

    from vlmixer.pipeline.detector import Detector

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    t_wall = time.perf_counter()
    det = Detector.from_config(str(TINY), device="cpu")
    items = read_source(folder)
    events = []
    for i in range(0, len(items), batch):
        imgs = [load_rgb(it.path).array for it in items[i: i + batch]]
        det(imgs)
        events.append((time.perf_counter(), i + len(imgs)))
    torch.set_num_threads(default)
    (t0, n0), (t1, n1) = events[0], events[-1]
    return (n1 - n0) / (t1 - t0), time.perf_counter() - t_wall


def build(folder: Path, out: Path, labelmap: Path, config: Path, **kw) -> tuple[float, float, Recorder, object]:
    opts = job.BuildOptions(images=str(folder), detector=str(config), out=str(out), labelmap=str(labelmap),
                            progress=False, **kw)
    t = time.perf_counter()
    with Recorder() as rec:
        report = job.build_gallery(opts)
    return rec.steady_rate(), time.perf_counter() - t, rec, report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="images for the throughput comparison")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    ap.add_argument("--cpu-workers", type=int, help="detector actors of the Ray job when there is no GPU")
    ap.add_argument("--rss-images", type=int, default=5000)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--workdir", help="keep inputs and galleries here (default: a temporary directory)")
    ap.add_argument("--loop-only", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.loop_only:
        import torch

        rate, wall = plain_loop(Path(a.loop_only), a.batch_size, a.threads or None)
        print(rate, wall, a.threads or torch.get_num_threads())
        return 0
    tmp = Path(a.workdir or tempfile.mkdtemp(prefix="bench_gallery_"))
    tmp.mkdir(parents=True, exist_ok=True)
    labelmap = write_labelmap(tmp / "labelmap.json")
    print(f"machine: {os.cpu_count()} CPUs; local Ray with num_cpus={a.num_cpus}; workdir {tmp}", flush=True)

    if not a.skip_throughput:
        folder = tmp / "tp_images"
        if not folder.exists():
            make_images(folder, a.images, (320, 240))
        loops = {}
        for threads in (0, 1):  # each in a fresh process: torch's thread pool is set up once per process
            res = subprocess.run([sys.executable, __file__, "--loop-only", str(folder), "--threads", str(threads),
                                  "--batch-size", str(a.batch_size)], capture_output=True, text=True, check=True)
            rate, wall, used = res.stdout.strip().splitlines()[-1].split()
            loops[threads] = (float(rate), float(wall))
            print(f"single-process loop : {float(rate):6.2f} images/s steady  (wall {float(wall):.1f} s, "
                  f"{a.images} images, {used} torch thread(s))", flush=True)
        loop_rate, loop_wall = max(loops.values())
        inp_rate, inp_wall, _, _ = build(folder, tmp / "g_inprocess", labelmap, TINY, ray_address="none",
                                         device="cpu", batch_size=a.batch_size, shard_size=a.shard_size)
        print(f"in-process build    : {inp_rate:6.2f} images/s steady  (wall {inp_wall:.1f} s)", flush=True)
        ray_rate, ray_wall, _, rep = build(folder, tmp / "g_ray", labelmap, TINY, ray_address="local",
                                           num_cpus=a.num_cpus, batch_size=a.batch_size, shard_size=a.shard_size,
                                           cpu_workers=a.cpu_workers)
        print(f"Ray job (local)     : {ray_rate:6.2f} images/s steady  (wall {ray_wall:.1f} s incl. Ray start, "
              f"{rep.workers} detector actor(s))", flush=True)
        print(f"ratio Ray / best single-process loop: {ray_rate / loop_rate:.2f} (steady), "
              f"{loop_wall / ray_wall:.2f} (wall, Ray start and model load included)", flush=True)

    if not a.skip_rss:
        folder = tmp / "rss_images"
        if not folder.exists() or len(list(folder.iterdir())) != a.rss_images:
            make_images(folder, a.rss_images, (64, 48))
        fast = tmp / "tiny_fast.yaml"
        cfg = yaml.safe_load(TINY.read_text())
        cfg["INPUT"].update(MIN_SIZE_TEST=64, MAX_SIZE_TEST=96)
        cfg["MODEL"]["RPN"]["POST_NMS_TOPK_TEST"] = 32
        fast.write_text(yaml.safe_dump(cfg))
        rate, wall, rec, rep = build(folder, tmp / "g_rss", labelmap, fast, ray_address="local",
                                     num_cpus=a.num_cpus, batch_size=16, shard_size=256)
        n = a.rss_images
        # quarters of the streaming phase (by images done); the tail after the last batch (last
        # commits, finalize_gallery reading the metadata of every patch, Ray shutdown) apart
        quarters = [[r for d, r in rec.rss if q * n / 4 <= d < (q + 1) * n / 4] for q in range(4)]
        peaks = [max(q) if q else float("nan") for q in quarters]
        tail = max([r for d, r in rec.rss if d >= n] or [float("nan")])
        print(f"RSS run: {n} images 64x48, {rep.gallery_patches} patches, {rate:.1f} images/s, wall {wall:.0f} s",
              flush=True)
        print("driver peak RSS per quarter (MB): " + ", ".join(f"Q{i + 1} {p:.0f}" for i, p in enumerate(peaks)))
        print(f"last/first quarter: {peaks[3] / peaks[0]:.3f} (flat within 10% when <= 1.10); "
              f"after the last batch (commit, finalize, shutdown): peak {tail:.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
