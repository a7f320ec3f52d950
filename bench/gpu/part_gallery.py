"""GPU check, gallery part: the gallery job in-process on the GPU, and what feeds it.

    python bench/gpu/part_gallery.py --results R.jsonl [--smoke]

On the same JPEGs (about 1000x600, half photos, half smooth synthetic
scenes), with X152-C4 in bf16 autocast (random weights):
  decode+resize alone, 1 process and a pool of N processes (PIL, as the job);
  JPEG decode on the GPU (torchvision.io.decode_jpeg, batches of 8);
  the detector alone on decoded images;
  the job itself (`--ray-address none`, writes a gallery): steady images/s.
When the job runs clearly below the detector alone, decoding is the
bottleneck, and the rows say how many decode processes (or the GPU decoder)
would feed the detector. `--smoke`: tiny config on the CPU.
"""
from __future__ import annotations

import argparse
import functools
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from figures import Results, device_row, pick_device, sync  # noqa: E402
from gallery_build import Recorder, build, make_images, write_labelmap  # noqa: E402  bench/gallery_build.py

CONFIGS = HERE.parents[1] / "configs" / "detector"


def decode_rate(items: list, policy: object, pre: object, workers: int, chunk: int = 4) -> float:
    """Images/s of decode_batch (read, decode, validate, resize) in `workers` processes."""
    from vlmixer.pipeline.gallery.work import decode_batch

    chunks = [items[i: i + chunk] for i in range(0, len(items), chunk)]
    if workers <= 1:
        t = time.perf_counter()
        for c in chunks:
            decode_batch(c, policy, pre)
        return len(items) / (time.perf_counter() - t)
    with mp.get_context("fork").Pool(workers) as pool:  # before any CUDA context: fork is safe here
        pool.starmap(decode_batch, [(c, policy, pre) for c in chunks[:workers]])  # warm the workers
        t = time.perf_counter()
        pool.starmap(decode_batch, [(c, policy, pre) for c in chunks])
        return len(items) / (time.perf_counter() - t)


def gpu_decode_rate(paths: list[Path], dev: torch.device, batch: int = 8) -> float | None:
    from torchvision.io import decode_jpeg, read_file

    if dev.type != "cuda":
        return None
    data = [read_file(str(p)) for p in paths]
    decode_jpeg(data[:batch], device=dev)  # warm-up: loads nvjpeg
    sync(dev)
    t = time.perf_counter()
    for i in range(0, len(data), batch):
        decode_jpeg(data[i: i + batch], device=dev)
    sync(dev)
    return len(data) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16), help="decode processes")
    a = ap.parse_args(argv)
    from vlmixer.pipeline.detector import preprocess_image
    from vlmixer.pipeline.gallery.images import DecodePolicy
    from vlmixer.pipeline.gallery.sources import read_source

    res = Results(a.results)
    smoke = a.smoke
    dev = pick_device(smoke)  # no CUDA context yet (only asked whether there is one): forking stays safe
    n, size = (8, (320, 240)) if smoke else (a.images, (1000, 600))
    b = 2 if smoke else a.batch_size
    workers = min(a.workers, 2) if smoke else a.workers
    base = CONFIGS / ("tiny.yaml" if smoke else "vinvl_x152c4.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_gallery_"))
    folder = tmp / "images"
    t0 = time.perf_counter()
    make_images(folder, n, size)
    cfg = yaml.safe_load(base.read_text())
    cfg["VLMIXER"].update(AMP="bf16", BATCH_SIZE=b)
    config = tmp / f"{base.stem}_bf16.yaml"
    config.write_text(yaml.safe_dump(cfg))
    n_cls, n_att = cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"], cfg["VLMIXER"]["ATTRIBUTE"]["NUM_ATTRIBUTES"]
    labelmap = write_labelmap(tmp / "labelmap.json", n_cls, n_att)
    res.add("gallery_setup", images=n, size=f"{size[0]}x{size[1]}", jpeg_mb=round(
        sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 1), config=f"{base.name} + AMP bf16",
        batch=b, made_s=round(time.perf_counter() - t0, 1))

    items = read_source(folder)
    policy = DecodePolicy()
    pre = functools.partial(preprocess_image, min_size=int(cfg["INPUT"]["MIN_SIZE_TEST"]),
                            max_size=int(cfg["INPUT"]["MAX_SIZE_TEST"]))
    one = decode_rate(items, policy, pre, 1)
    res.add("gallery", what="decode + resize, 1 process (PIL)", images_per_s=round(one, 1))
    pool = decode_rate(items * 4, policy, pre, workers)  # enough work to spread over the pool
    res.add("gallery", what=f"decode + resize, {workers} processes (PIL)", images_per_s=round(pool, 1))

    res.add("device", **device_row(dev))
    gpu = gpu_decode_rate([Path(it.path) for it in items], dev)
    if gpu is not None:
        res.add("gallery", what="JPEG decode on the GPU (torchvision.io, batches of 8, no resize)",
                images_per_s=round(gpu, 1))

    from vlmixer.pipeline.detector import Detector
    from vlmixer.pipeline.gallery.work import decode_batch

    det = Detector.from_config(config, device=str(dev))
    decoded = [d.payload for d in decode_batch(items, policy, pre).items]
    det.detect_preprocessed(decoded[:b])
    sync(dev)
    t = time.perf_counter()
    for i in range(0, len(decoded), b):
        det.detect_preprocessed(decoded[i: i + b])
    sync(dev)
    alone = len(decoded) / (time.perf_counter() - t)
    res.add("gallery", what=f"detector alone, batch {b}", images_per_s=round(alone, 1))
    del det
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    rate, wall, rec, report = build(folder, tmp / "gallery", labelmap, config, ray_address="none",
                                    device=str(dev), batch_size=b, shard_size=max(2 * b, 32))
    assert isinstance(rec, Recorder)
    res.add("gallery", what="gallery job in-process (decode in the loop, writes LMDB)",
            images_per_s=round(rate, 1), wall_s=round(wall, 1), patches=report.gallery_patches)
    bound = rate < 0.8 * alone
    res.add("gallery_verdict", decode_bound=bound, job_vs_detector=round(rate / alone, 2),
            decode_processes_to_feed_detector=math.ceil(alone / one),
            gpu_decode_covers_detector=None if gpu is None else bool(gpu >= alone))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
