"""Helpers for the gallery build tests (no tests here): image folders and a TEST DOUBLE detector.

`FakeDetector` is a stand-in with the agreed Detector API, used only where a
test is about plumbing (decoding, sharding, resume, crash isolation) and the
real detector would only cost time; it is a deterministic function of the
pixels, so equality between build paths still means something. Tests that the
issue asks to run on the real detector use `configs/detector/tiny.yaml`.
"""
from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TINY_CONFIG = ROOT / "configs" / "detector" / "tiny.yaml"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")


def ray_env() -> dict[str, str]:
    """Environment for Ray workers and CLI subprocesses: this directory importable, no auth token."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def photo(name: str) -> np.ndarray:
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.ascontiguousarray(a[..., :3])


def synthetic(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """Smooth colour blobs with noise: like a photo to a detector, made from nothing."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR)).astype(np.int16)
    img += rng.integers(-20, 20, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: Path, photos: int = 2, synth: int = 4, small: bool = True) -> list[str]:
    """A folder of JPEG/PNG files: real skimage photos (downscaled when `small`) and synthetic ones."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name in PHOTOS[:photos]:
        img = Image.fromarray(photo(name))
        if small:
            img.thumbnail((160, 160))
        img.save(folder / f"{name}.jpg", quality=90)
        names.append(f"{name}.jpg")
    for i in range(synth):
        ext = "png" if i % 2 else "jpg"
        Image.fromarray(synthetic(i, 64 + 16 * (i % 3), 96 + 8 * i)).save(folder / f"syn{i:03d}.{ext}")
        names.append(f"syn{i:03d}.{ext}")
    return names


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw_rows))
            + _png_chunk(b"IEND", b""))


def write_bad_images(folder: Path) -> dict[str, str]:
    """The issue's bad inputs; returns file name -> expected outcome ("fail:<reason start>" or "convert")."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = synthetic(7, 96, 128)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("<html><body>404 not found</body></html>\n", encoding="utf-8")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    g16 = (rgb[..., 0].astype(">u2") * 257)
    (folder / "gray16.png").write_bytes(
        png_bytes(128, 96, 16, 0, b"".join(b"\0" + g16[i].tobytes() for i in range(96))))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)]), "RGBA").save(folder / "rgba.png")
    # 40000 x 40000 pixels declared in the header, a few bytes of data: the guard must refuse it unread
    (folder / "bomb.png").write_bytes(png_bytes(40000, 40000, 8, 0, b"\0" * 40001 * 4))
    return {"truncated.jpg": "fail:truncated", "zero.jpg": "fail:empty file", "text.jpg": "fail:not an image",
            "bomb.png": "fail:too large", "cmyk.jpg": "convert", "gray16.png": "convert", "rgba.png": "convert"}


def write_labelmap(path: Path, n_classes: int, n_attributes: int) -> Path:
    """A VinVL-style label map (1-based) with made-up names, for detectors that name no classes."""
    data = {"label_to_idx": {f"thing{i}": i for i in range(1, n_classes + 1)},
            "attribute_to_idx": {f"attr{i}": i for i in range(1, n_attributes + 1)}}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- test double


class FakeDetections:
    def __init__(self, boxes, features, concepts, confidences, attr_ids, attr_scores, image_size):
        self.boxes, self.features, self.concepts = boxes, features, concepts
        self.confidences, self.attr_ids, self.attr_scores, self.image_size = (
            confidences, attr_ids, attr_scores, image_size)


class FakeDetector:
    """TEST DOUBLE with the Detector API; its config yaml may say `sleep: s` (per image) and
    `fail_width: w` (raise on images of that original width, to test isolation)."""

    feature_dim = 16
    num_classes = 5
    num_attributes = 3
    concepts = None
    attributes = None

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.provenance = {"config_name": "fake", "random_weights": True}

    @classmethod
    def from_config(cls, config_path, weights=None, device="cpu") -> FakeDetector:
        cfg = yaml.safe_load(Path(config_path).read_text()) or {}
        return cls(cfg)

    def preprocess(self, image_rgb: np.ndarray):
        import torch

        h0, w0 = image_rgb.shape[:2]
        s = 64 / min(h0, w0)
        h, w = max(1, round(h0 * s)), max(1, round(w0 * s))
        arr = np.asarray(Image.fromarray(image_rgb).resize((w, h), Image.BILINEAR))
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), h / h0

    def detect_preprocessed(self, items):
        out = []
        for it in items:
            t, s = it[0], float(it[1])
            h0, w0 = it[2] if len(it) > 2 else (round(t.shape[1] / s), round(t.shape[2] / s))
            if self.cfg.get("fail_width") == w0:
                raise RuntimeError("fake detector: refusing this width")
            time.sleep(float(self.cfg.get("sleep", 0)))
            a = t.numpy().astype(np.float32) / 255.0
            n = 1 + int(a.mean() * 40) % 5
            boxes, feats = [], []
            for k in range(n):
                y1, x1 = (k * 7) % (a.shape[1] // 2), (k * 11) % (a.shape[2] // 2)
                y2, x2 = y1 + a.shape[1] // 2, x1 + a.shape[2] // 2
                reg = a[:, y1:y2, x1:x2]
                feats.append(np.concatenate([reg.mean((1, 2)), reg.std((1, 2)), reg.max((1, 2)), reg.min((1, 2)),
                                             np.full(4, k, np.float32)]))
                boxes.append([x1 * w0 / a.shape[2], y1 * h0 / a.shape[1], x2 * w0 / a.shape[2], y2 * h0 / a.shape[1]])
            feats = np.asarray(feats, np.float32)
            conf = 1.0 / (1.0 + np.arange(n, dtype=np.float32)) * (0.5 + 0.5 * feats[:, 0])
            order = np.argsort(-conf, kind="stable")
            out.append(FakeDetections(
                boxes=np.asarray(boxes, np.float32)[order], features=feats[order],
                concepts=(np.argmax(feats[:, :3], 1) + np.arange(n)).astype(np.int64)[order] % 5,
                confidences=conf[order], attr_ids=np.tile(np.array([[0, 2, -1]]), (n, 1)),
                attr_scores=np.tile(np.array([[0.9, 0.3, 0.0]], np.float32), (n, 1)), image_size=(h0, w0)))
        return out

    def __call__(self, images):
        return self.detect_preprocessed([(*self.preprocess(i), i.shape[:2]) for i in images])


def fake_factory(config, weights=None, device="cpu"):
    return FakeDetector.from_config(config, weights=weights, device=device)


def fake_config(path: Path, **cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg or {"name": "fake"}), encoding="utf-8")
    return path


def main_with_fake(argv: list[str]) -> int:
    """`python tests/test_gallery_build_support.py gallery build ...` with the fake detector (subprocess tests)."""
    from vlmixer.pipeline.gallery import job

    original = job.BuildOptions.__init__

    def init(self, *a, **kw):
        kw.setdefault("detector_factory", fake_factory)
        original(self, *a, **kw)

    job.BuildOptions.__init__ = init  # type: ignore[method-assign]
    from vlmixer.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    import test_gallery_build_support as mod  # the importable name Ray workers will use

    sys.exit(mod.main_with_fake(sys.argv[1:]))


def gallery_contents(root: Path) -> dict[str, dict]:
    """Everything a gallery holds, by image key, in stored order: for equality between builds."""
    from vlmixer.storage.gallery import GalleryReader

    r = GalleryReader(root)
    out = {}
    for i in range(r.num_images):
        rec = r.image(i)
        patches = [r.patch(p) for p in r.image_patches(i)]
        out[rec.key] = {
            "size": (rec.width, rec.height),
            "boxes": np.array([p.box for p in patches], np.float32).reshape(-1, 4),
            "features": np.array([p.feature for p in patches], np.float16).reshape(len(patches), r.feature_dim),
            "concepts": [p.concept for p in patches],
            "confidences": np.array([p.confidence for p in patches], np.float32),
            "attrs": [(p.attr_ids.tolist(), p.attr_scores.tolist()) for p in patches],
        }
    fails = {f["key"]: f["reason"] for f in r.failures()}
    counts = (r.num_images, r.num_patches)
    r.close()
    return {"images": out, "failures": fails, "counts": counts}


def assert_same_gallery(a: Path, b: Path, exact: bool = True) -> None:
    """Same images, same failures, and per image the same patches in the same order."""
    ca, cb = gallery_contents(a), gallery_contents(b)
    assert ca["counts"] == cb["counts"]  # no duplicated image or patch hides behind the dict below
    assert ca["counts"][0] == len(ca["images"]) and cb["counts"][0] == len(cb["images"])
    assert ca["failures"] == cb["failures"]
    assert sorted(ca["images"]) == sorted(cb["images"])
    for key, x in ca["images"].items():
        y = cb["images"][key]
        assert x["size"] == y["size"], key
        assert x["concepts"] == y["concepts"], key
        if exact:
            for f in ("boxes", "features", "confidences"):
                assert np.array_equal(x[f], y[f]), (key, f)
            assert x["attrs"] == y["attrs"], key
        else:
            np.testing.assert_allclose(x["boxes"], y["boxes"], atol=1e-3, err_msg=key)
            np.testing.assert_allclose(x["confidences"], y["confidences"], atol=1e-4, err_msg=key)
            np.testing.assert_allclose(x["features"].astype(np.float32), y["features"].astype(np.float32),
                                       rtol=2e-3, atol=2e-3, err_msg=key)
