"""Detector benchmarks: `python bench/detector.py selection|detector ...`.

* selection: "NMS filter 1" vectorised (selection.py) vs the reference's
  per-class loop, on random score matrices (300 proposals x 1595 classes by
  default), for peaked scores (trained-like: sparse strategy) and
  near-uniform scores (random-weight-like: dense strategy).
* detector: images/s of a config with random weights on scikit-image photos
  resized to a fixed size, in batches, on a device (prints the device name);
  `--mixed` gives each image another size (the batch pads and masks each
  image to its own extent, so results equal the image alone: what that costs).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import nms


def per_class_loop(boxes: torch.Tensor, scores: torch.Tensor, iou: float = 0.3) -> torch.Tensor:
    """The reference's step 1 written as it is there: one NMS per class (legacy +1 boxes)."""
    mask = torch.zeros_like(scores)
    legacy = boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
    for j in range(scores.shape[1]):
        mask[nms(legacy, scores[:, j], iou), j] = 1
    return (mask * scores).max(dim=1)


def random_scores(n: int, classes: int, temperature: float, seed: int = 0,
                  device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand((n, 2), generator=g) * 600
    wh = torch.rand((n, 2), generator=g) * 300 + 4
    boxes = torch.cat([xy, (xy + wh).clamp(max=999)], dim=1)
    probs = torch.softmax(torch.randn((n, classes), generator=g) * temperature, dim=1)[:, 1:]
    return boxes.to(device), probs.to(device)


def _time(fn: Any, repeats: int, device: str) -> float:
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def bench_selection(n: int = 300, classes: int = 1595, repeats: int = 3, device: str = "cpu") -> list[dict[str, Any]]:
    from vlmixer.pipeline.detector.selection import select_boxes

    rows = []
    for name, temp in (("peaked (sparse)", 4.0), ("near-uniform (dense)", 0.5)):
        boxes, probs = random_scores(n, classes, temp, device=device)
        loop = _time(lambda b=boxes, p=probs: per_class_loop(b, p), 1, device)
        vec = _time(lambda b=boxes, p=probs: select_boxes([b], [p]), repeats, device)
        rows.append({"case": name, "proposals": n, "classes": classes, "loop_ms": round(loop * 1e3, 1),
                     "vectorised_ms": round(vec * 1e3, 1), "speedup": round(loop / vec, 1)})
    return rows


def photos(n: int, size: tuple[int, int], mixed: bool = False) -> list[np.ndarray]:
    """Real photos shipped with scikit-image, resized to `size` (random weights calibrated on
    photo-like input behave like a detector on photos; on noise they degenerate)."""
    import skimage.data
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
    out = []
    for i in range(n):
        img = getattr(skimage.data, names[i % len(names)])()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        h, w = size
        if mixed:  # aspect ratios 0.75 .. 1.0 of the given shape, no two alike in a batch
            h = int(h * (1.0 - 0.25 * (i % 4) / 3)) - (i % 3)
        out.append(np.asarray(Image.fromarray(img[..., :3]).resize((w, h), Image.BILINEAR)))
    return out


def bench_detector(config: str, device: str = "cpu", batch: int = 4, n_images: int = 8,
                   size: tuple[int, int] = (600, 1000), overrides: Sequence[str] = (),
                   mixed: bool = False) -> dict[str, Any]:
    from vlmixer.pipeline.detector import Detector

    t0 = time.perf_counter()
    det = Detector.from_config(config, device=device, overrides=list(overrides) + [f"VLMIXER.BATCH_SIZE={batch}"])
    build_s = time.perf_counter() - t0
    images = photos(n_images, size, mixed)
    items = [(*det.preprocess(im), im.shape[:2]) for im in images]
    det.detect_preprocessed(items[:batch])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    boxes = 0
    for s in range(0, n_images, batch):
        boxes += sum(len(d) for d in det.detect_preprocessed(items[s : s + batch]))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    return {"config": config, "device": name, "batch": batch, "images": n_images, "input": list(size),
            "resized": sorted({tuple(it[0].shape[1:]) for it in items}), "build_s": round(build_s, 1),
            "seconds_per_image": round(dt / n_images, 3), "images_per_s": round(n_images / dt, 2),
            "boxes_per_image": round(boxes / n_images, 1), "amp": det.cfg.VLMIXER.AMP}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/detector.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("selection")
    s.add_argument("--proposals", type=int, default=300)
    s.add_argument("--classes", type=int, default=1595)
    s.add_argument("--device", default="cpu")
    d = sub.add_parser("detector")
    d.add_argument("--config", required=True)
    d.add_argument("--device", default="cpu")
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--images", type=int, default=8)
    d.add_argument("--size", type=int, nargs=2, default=[600, 1000], metavar=("H", "W"))
    d.add_argument("--override", action="append", default=[])
    d.add_argument("--mixed", action="store_true", help="a different size per image (padding + masking)")
    a = p.parse_args(argv)
    if a.what == "selection":
        for row in bench_selection(a.proposals, a.classes, device=a.device):
            print(json.dumps(row))
    else:
        print(json.dumps(bench_detector(a.config, a.device, a.batch, a.images, tuple(a.size), a.override,
                                        a.mixed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
