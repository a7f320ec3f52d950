"""GPU check, detector part: VinVL's X152-C4 with random weights on 600x1000 photos.

    python bench/gpu/part_detector.py --results R.jsonl [--smoke]

Per precision (fp32 with TF32 off, TF32, bf16 autocast) and batch (1, 4, 8):
images/s and peak GPU memory. Then, at the largest batch: where the time goes
(backbone, RPN, res5 head, the rest of the ROI heads, box selection) timed by
CUDA events around each stage, the profiler's top CUDA kernels, and what bf16
does to the result (share of fp32 boxes it finds again, feature cosine).
The weights are random but calibrated (Detector.from_config), as in the
tests: the selection then sees photo-like score distributions.
`--smoke` runs the tiny config on the CPU, to rehearse the script itself.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from detector import photos  # noqa: E402  bench/detector.py: scikit-image photos at a fixed size
from figures import Results, device_row, peak_gib, pick_device, reset_peak, seconds_per_call, sync  # noqa: E402

CONFIGS = HERE.parents[1] / "configs" / "detector"
PRECISIONS = ("fp32", "tf32", "bf16")


def set_precision(det: Any, precision: str) -> None:
    """TF32 is torch's switch, bf16 the detector's own autocast key (read at every forward)."""
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    det.cfg.defrost()
    det.cfg.VLMIXER.AMP = "bf16" if precision == "bf16" else "none"
    det.cfg.freeze()


class StageTimer:
    """Times the detector's stages by events at module boundaries (one stream, so they add up)."""

    def __init__(self, det: Any, dev: torch.device) -> None:
        import vlmixer.pipeline.detector.model as model_module

        self.dev, self.ms = dev, {}
        self._open: dict[str, Any] = {}
        self._pairs: list[tuple[str, Any, Any]] = []
        self._handles = []
        m = det.model
        for name, mod in (("backbone", m.backbone), ("rpn", m.proposal_generator), ("roi_heads", m.roi_heads),
                          ("res5", m.roi_heads.res5)):
            self._handles.append(mod.register_forward_pre_hook(lambda *_a, n=name: self._start(n)))
            self._handles.append(mod.register_forward_hook(lambda *_a, n=name: self._stop(n)))
        self._module, self._select = model_module, model_module.select_boxes

        def timed_select(*args: Any, **kw: Any) -> Any:
            self._start("selection")
            try:
                return self._select(*args, **kw)
            finally:
                self._stop("selection")

        model_module.select_boxes = timed_select

    def _mark(self) -> Any:
        if self.dev.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _start(self, name: str) -> None:
        self._open[name] = self._mark()

    def _stop(self, name: str) -> None:
        self._pairs.append((name, self._open.pop(name), self._mark()))

    def collect(self) -> dict[str, float]:
        sync(self.dev)
        for name, a, b in self._pairs:
            ms = a.elapsed_time(b) if self.dev.type == "cuda" else (b - a) * 1e3
            self.ms[name] = self.ms.get(name, 0.0) + ms
        self._pairs.clear()
        return self.ms

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._module.select_boxes = self._select


def twins(a: Any, b: Any, iou_min: float = 0.9) -> tuple[float, float]:
    """(share of a's boxes with a same-concept box of b at IoU >= iou_min, mean feature cosine of those)."""
    if len(a) == 0:
        return 1.0, 1.0
    lt = np.maximum(a.boxes[:, None, :2], b.boxes[None, :, :2])
    rb = np.minimum(a.boxes[:, None, 2:], b.boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    iou = inter / (area(a.boxes)[:, None] + area(b.boxes)[None, :] - inter + 1e-9)
    iou[a.concepts[:, None] != b.concepts[None, :]] = 0
    j = iou.argmax(axis=1)
    ok = iou[np.arange(len(a)), j] >= iou_min
    if not ok.any():
        return 0.0, float("nan")
    fa, fb = a.features[ok], b.features[j[ok]]
    cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-12)
    return float(ok.mean()), float(cos.mean())


@contextmanager
def profiled(dev: torch.device) -> Iterator[Any]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        yield prof


def top_kernels(prof: Any, n: int = 8) -> list[dict[str, Any]]:
    """The CUDA kernels by their own device time (ops that launched them are left out: no double count)."""
    rows = []
    cuda = torch.autograd.DeviceType.CUDA
    for e in prof.key_averages():
        if getattr(e, "device_type", cuda) != cuda:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us:
            rows.append({"kernel": e.key[:70], "calls": int(e.count), "ms": us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows) or 1.0
    return [{**r, "ms": round(r["ms"], 2), "share": round(r["ms"] / total, 3)} for r in rows[:n]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU: rehearse the script")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--images", type=int, default=16, help="timed images per (precision, batch)")
    a = ap.parse_args(argv)
    from vlmixer.pipeline.detector import Detector

    res = Results(a.results)
    dev = pick_device(a.smoke)
    config = CONFIGS / ("tiny.yaml" if a.smoke else "vinvl_x152c4.yaml")
    batches = [1, 2] if a.smoke else a.batches
    n_img = 2 if a.smoke else max(a.images, max(batches))
    res.add("device", **device_row(dev))
    t0 = time.perf_counter()
    det = Detector.from_config(config, device=str(dev), overrides=[f"VLMIXER.BATCH_SIZE={max(batches)}"])
    images = photos(max(n_img, max(batches)), (600, 1000))
    items = [(*det.preprocess(im), im.shape[:2]) for im in images]
    res.add("detector_setup", config=config.name, build_and_calibrate_s=round(time.perf_counter() - t0, 1),
            input="600x1000", resized="x".join(map(str, items[0][0].shape[1:])))

    def run(batch: int, n: int) -> list[Any]:
        out = []
        for s in range(0, n, batch):
            out.extend(det.detect_preprocessed(items[s: s + batch]))
        return out

    results: dict[str, list[Any]] = {}
    for precision in PRECISIONS if dev.type == "cuda" else ("fp32",):
        set_precision(det, precision)
        try:
            for batch in batches:
                reset_peak(dev)
                n = (n_img // batch) * batch
                dt = seconds_per_call(lambda b=batch, k=n: run(b, k), dev, iters=1, warmup=1)
                res.add("detector", precision=precision, batch=batch, images=n, images_per_s=round(n / dt, 2),
                        ms_per_image=round(dt / n * 1e3, 2), peak_gib=peak_gib(dev))
            results[precision] = run(max(batches), max(batches))
        except Exception as e:  # noqa: BLE001  one shot on the GPU: a broken mode must not hide the others
            res.add("detector", precision=precision, batch=batch, error=f"{type(e).__name__}: {str(e)[:200]}")

    big = max(batches)
    for precision in [p for p in (("bf16", "fp32") if dev.type == "cuda" else ("fp32",)) if p in results]:
        set_precision(det, precision)
        timer = StageTimer(det, dev)
        try:
            run(big, big)
            timer.collect()
            timer.ms.clear()
            run(big, big)
            ms = timer.collect()
        finally:
            timer.close()
        rest = ms["roi_heads"] - ms.get("res5", 0.0) - ms.get("selection", 0.0)
        stages = {"backbone": ms["backbone"], "rpn": ms["rpn"], "res5 head": ms.get("res5", 0.0),
                  "roi rest (pool, predictors, attributes)": rest, "selection": ms.get("selection", 0.0)}
        total = sum(stages.values())
        for stage, v in stages.items():
            res.add("detector_stages", precision=precision, batch=big, stage=stage, ms_per_image=round(v / big, 2),
                    share=round(v / total, 3))
    precision = "bf16" if "bf16" in results else "fp32"  # the kernels of the mode a build would use
    set_precision(det, precision)
    with profiled(dev) as prof:
        run(big, big)
        sync(dev)
    for row in top_kernels(prof):
        res.add("detector_kernels", precision=precision, batch=big, **row)
    if "bf16" in results and "fp32" in results:
        shares, coss = zip(*(twins(f, b) for f, b in zip(results["fp32"], results["bf16"])))
        res.add("detector_bf16_vs_fp32", images=len(shares), boxes_found_again=round(float(np.mean(shares)), 3),
                feature_cosine=round(float(np.nanmean(coss)), 4),
                boxes_per_image_fp32=round(float(np.mean([len(d) for d in results["fp32"]])), 1),
                boxes_per_image_bf16=round(float(np.mean([len(d) for d in results["bf16"]])), 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
