"""Ray Data's webdataset reader and streaming executor vs the gallery job's own plumbing.

    .venv/bin/python bench/ray_data.py [--images 600] [--tars 6] [--num-cpus 2]

Needs `pandas` beside Ray (Ray Data imports it); vlmixer itself does not.
The same webdataset tars (small JPEGs, real skimage photos and synthetic
ones) go through the same tiny detector (configs/detector/tiny.yaml, shorter
side 64 so the run takes a minute) on one local Ray started once for both:

hand-made  `gallery build` as shipped: the plan streams one tar at a time,
           decode tasks read members by byte range, detector actors, the
           writer actor commits each shard; everything written.
Ray Data   `read_webdataset` (raw bytes) -> `map_batches` decode (the build's
           own `decode_bytes` and preprocessing, CPU tasks) -> `map_batches`
           detector (actor pool of the same size) -> `iter_batches` in the
           driver, which is where a shard would have to be committed; nothing
           is written, so this side does strictly less work.

Printed: images/s from the start of the job to its last result reaching
the driver (actor start and model load included on both sides; Ray Data
hands results over a block at a time, so a first-to-last-batch rate would
flatter it), wall time (the hand-made side also finalizes the gallery), and
the driver's peak RSS while running (sampled every 0.1 s).
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "detector" / "tiny.yaml"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    def __init__(self) -> None:
        self.peak, self._stop = 0.0, threading.Event()

    def __enter__(self) -> Sampler:
        def run() -> None:
            while not self._stop.wait(0.1):
                self.peak = max(self.peak, rss_mb())
        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def make_tars(folder: Path, n: int, tars: int) -> list[str]:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    per = -(-n // tars)
    paths = []
    for t in range(tars):
        p = folder / f"{t:05d}.tar"
        with tarfile.open(p, "w") as tf:
            for i in range(t * per, min(n, (t + 1) * per)):
                if i % 2 == 0:
                    ph = photos[(i // 2) % 4]
                    img = Image.fromarray(ph[int(rng.integers(0, 100)):, int(rng.integers(0, 100)):]).resize((64, 48))
                else:
                    low = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
                    img = Image.fromarray(low).resize((64, 48), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=85)
                for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", b"a caption")):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        paths.append(str(p))
    return paths


def fast_config(path: Path) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["INPUT"].update(MIN_SIZE_TEST=64, MAX_SIZE_TEST=96)
    cfg["MODEL"]["RPN"]["POST_NMS_TOPK_TEST"] = 32
    path.write_text(yaml.safe_dump(cfg))
    return path


def hand_made(tars: list[str], out: Path, config: Path, labelmap: Path, workers: int) -> tuple[float, float, float]:
    from vlmixer.pipeline.gallery import job

    events: list[tuple[float, int]] = []
    orig = job.Progress.update

    def update(p: job.Progress, s: dict) -> None:
        orig(p, s)
        events.append((time.perf_counter(), p.images))

    job.Progress.update = update  # type: ignore[method-assign]
    t = time.perf_counter()
    try:
        with Sampler() as s:
            job.build_gallery(job.BuildOptions(images=tuple(tars), detector=str(config), out=str(out),
                                               labelmap=str(labelmap), ray_address="auto", shard_size=100,
                                               batch_size=8, cpu_workers=workers, threads=1, progress=False))
    finally:
        job.Progress.update = orig  # type: ignore[method-assign]
    t1, n1 = events[-1]
    return n1 / (t1 - t), time.perf_counter() - t, s.peak


def _decode(batch: dict, pre: object) -> dict:
    """The build's own decode and preprocessing, as a Ray Data task (like our decode tasks)."""
    from vlmixer.pipeline.gallery.images import BadImage, decode_bytes

    keys, tensors, scales, sizes = [], [], [], []
    for key, data in zip(batch["__key__"], batch["jpg"]):
        try:
            img = decode_bytes(bytes(data))
        except BadImage:
            continue
        t, sc = pre(img.array)[:2]
        keys.append(key)
        tensors.append(np.asarray(t))
        scales.append(float(sc))
        sizes.append((img.height, img.width))
    return {"key": keys, "tensor": tensors, "scale": scales, "size": sizes}


class _Detect:
    def __init__(self, config: str) -> None:
        import torch

        from vlmixer.pipeline.detector import Detector

        torch.set_num_threads(1)
        self.det = Detector.from_config(config, device="cpu")

    def __call__(self, batch: dict) -> dict:
        import torch

        items = [(torch.from_numpy(np.asarray(t)), s, tuple(sz))
                 for t, s, sz in zip(batch["tensor"], batch["scale"], batch["size"])]
        dets = self.det.detect_preprocessed(items)
        return {"key": list(batch["key"]),
                "features": [np.asarray(d.features, np.float16).tobytes() for d in dets],
                "patches": [int(d.boxes.shape[0]) for d in dets]}


def ray_data(tars: list[str], config: Path, workers: int) -> tuple[float, float, float]:
    import ray

    from vlmixer.pipeline.gallery.work import DetectorRunner

    pre = DetectorRunner(str(config), device="cpu").preprocessor()
    t = time.perf_counter()
    events: list[tuple[float, int]] = []
    with Sampler() as s:
        ds = ray.data.read_webdataset(tars, decoder=None)
        ds = ds.map_batches(_decode, fn_kwargs={"pre": pre}, batch_size=8, num_cpus=1)
        ds = ds.map_batches(_Detect, fn_constructor_args=(str(config),), batch_size=8, num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(size=workers))
        n = 0
        for b in ds.iter_batches(batch_size=None):
            n += len(b["key"])
            events.append((time.perf_counter(), n))
    t1, n1 = events[-1]
    return n1 / (t1 - t), time.perf_counter() - t, s.peak


def side(name: str, workdir: Path, num_cpus: int, workers: int) -> None:
    """One side in this (fresh) process with its own local Ray: the other side's leftovers
    (actors being torn down, Ray Data's resource accounting) cannot touch it."""
    import json

    import ray

    tars = sorted(str(p) for p in (workdir / "tars").glob("*.tar"))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    base = rss_mb()
    if name == "hand-made":
        rate, wall, peak = hand_made(tars, workdir / "g", workdir / "fast.yaml", workdir / "lm.json", workers)
    else:
        rate, wall, peak = ray_data(tars, workdir / "fast.yaml", workers)
    ray.shutdown()
    print(json.dumps({"rate": rate, "wall": wall, "peak": peak, "base": base}))


def main() -> None:
    import json
    import subprocess
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "_side":
        side(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--tars", type=int, default=6)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="detector actors on both sides")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_tars(work / "tars", a.images, a.tars)
        fast_config(work / "fast.yaml")
        (work / "lm.json").write_text(json.dumps({"label_to_idx": {f"c{i}": i for i in range(1, 81)},
                                                  "attribute_to_idx": {f"a{i}": i for i in range(1, 21)}}))
        print(f"{time.strftime('%Y-%m-%d')}: {a.images} images 64x48 in {a.tars} tars, local Ray num_cpus="
              f"{a.num_cpus}, {a.workers} detector actor(s), each side in its own process", flush=True)
        for name in ("hand-made", "Ray Data"):
            out = subprocess.run([sys.executable, __file__, "_side", name, str(work), str(a.num_cpus),
                                  str(a.workers)], capture_output=True, text=True, timeout=3000)
            if out.returncode != 0:
                print(f"{name:>10}: failed ({out.stderr.strip().splitlines()[-1:]})", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:>10}: {r['rate']:6.1f} images/s start to last result, wall {r['wall']:5.1f} s, driver peak RSS "
                  f"{r['peak']:.0f} MB (after ray.init {r['base']:.0f} MB)", flush=True)


if __name__ == "__main__":
    main()
