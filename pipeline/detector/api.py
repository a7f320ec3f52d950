"""The detector as the rest of the product uses it: images in, `Detections` out.

`Detector.from_config(path, weights=None)` builds the C4 model of the config.
Without `weights` the model has RANDOM weights (seeded, with frozen BN
statistics calibrated on one synthetic image so it still returns boxes): fit
for tests, the demo and benchmarks, meaningless as features. Real features
need a converted checkpoint (`vlmixer detector convert`), or a VinVL
maskrcnn-benchmark checkpoint, which is converted on load.

Preprocessing is split so Ray CPU tasks can do it: `preprocess` (resize,
RGB->BGR, uint8, on CPU) then `detect_preprocessed` (normalise, pad to 32,
batch, run on the device). `__call__` does both.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmixer.errors import VlmixerError
from vlmixer.files import sha256_file
from vlmixer.pipeline.detector._compat import ensure_detectron2
from vlmixer.pipeline.detector.config import config_sha256, load_detector_config
from vlmixer.pipeline.detector.convert import convert_vinvl_checkpoint, load_checkpoint, looks_like_vinvl
from vlmixer.storage.vocab import Vocabulary, load_vocabulary, read_labelmap_json, read_vocab_txt


@dataclass
class Detections:
    """Detections of one image; all numpy, CPU."""

    boxes: np.ndarray  # (n,4) float32, x1,y1,x2,y2 in pixels of the ORIGINAL image
    features: np.ndarray  # (n,D) float32 pooled res5 features of exactly those boxes
    concepts: np.ndarray  # (n,) int64, 0-based concept id (background removed)
    confidences: np.ndarray  # (n,) float32, sorted descending
    attr_ids: np.ndarray  # (n,K) int64, 0-based attribute ids, -1 padded
    attr_scores: np.ndarray  # (n,K) float32, 0 where padded
    image_size: tuple[int, int]  # (height, width) of the original image
    empty_reason: str | None = None  # why there is no box, when there is none

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """maskrcnn-benchmark's `Resize.get_size`: shorter side `min_size`, longer side at most `max_size`."""
    size = float(min_size)
    lo, hi = float(min(height, width)), float(max(height, width))
    if max_size > 0 and hi / lo * size > max_size:
        size = float(max(int(round(max_size * lo / hi)), 1))  # >= 1 for extreme aspect ratios
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return max(int(size * height / width), 1), max(int(size), 1)
    return max(int(size), 1), max(int(size * width / height), 1)


def caffe_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """py-faster-rcnn's test scale (bottom-up attention's `get_image_blob`): shorter side to
    `min_size` unless the rounded longer side would pass `max_size`."""
    lo, hi = min(height, width), max(height, width)
    scale = float(min_size) / float(lo)
    if max_size > 0 and round(scale * hi) > max_size:
        scale = float(max_size) / float(hi)
    return scale


def caffe_resize(arr: np.ndarray, scale: float) -> torch.Tensor:
    """HxWxC -> (C, h, w) float32 resized by `scale` as OpenCV's `cv2.resize(fx=fy=scale,
    INTER_LINEAR)` on a float image: output size rounded, source x = (x + 0.5) / scale - 0.5,
    two-tap linear weights, edges replicated, no antialiasing (unlike PIL's bilinear)."""
    src = torch.from_numpy(np.ascontiguousarray(arr)).float().permute(2, 0, 1)
    h0, w0 = src.shape[1:]
    h, w = max(int(round(h0 * scale)), 1), max(int(round(w0 * scale)), 1)

    def taps(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = (torch.arange(n_out, dtype=torch.float64) + 0.5) / scale - 0.5
        i0 = torch.floor(pos)
        frac = pos - i0
        i0 = i0.long()
        frac = torch.where(i0 < 0, torch.zeros_like(frac), frac)
        i0 = i0.clamp(min=0)
        frac = torch.where(i0 >= n_in - 1, torch.zeros_like(frac), frac)
        i0 = i0.clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), frac.float()

    x0, x1, fx = taps(w, w0)
    y0, y1, fy = taps(h, h0)
    rows = src[:, :, x0] * (1 - fx) + src[:, :, x1] * fx  # horizontal pass first, as OpenCV
    return rows[:, y0, :] * (1 - fy)[:, None] + rows[:, y1, :] * fy[:, None]


def preprocess_image(image_rgb: np.ndarray, min_size: int, max_size: int,
                     rule: str = "maskrcnn") -> tuple[torch.Tensor, float]:
    """HxWx3 uint8 RGB -> ((3,h,w) BGR tensor, scale), resized by the reference's rule. CPU only and
    model-free, so Ray CPU tasks can run it. Pass the original (H, W) along to
    `Detector.detect_preprocessed` for boxes in exact original pixels.

    `rule` "maskrcnn" (VinVL): maskrcnn-benchmark's sizes with PIL bilinear as torchvision does on
    PIL images; uint8 (small object-store traffic); scale h/H. "caffe" (bottom-up attention):
    py-faster-rcnn's scale and OpenCV's linear resize on the float image (`caffe_resize`);
    float32; the scale is that factor, by which the reference divides boxes back.
    """
    arr = _check_image(image_rgb)
    h0, w0 = arr.shape[:2]
    if rule == "caffe":
        scale = caffe_scale(h0, w0, min_size, max_size)
        return caffe_resize(arr[:, :, ::-1], scale), scale
    h, w = resized_size(h0, w0, min_size, max_size)
    if (h, w) != (h0, w0):
        arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR))
    t = torch.from_numpy(np.ascontiguousarray(arr[:, :, ::-1].transpose(2, 0, 1)))
    return t, h / h0


class Detector:
    """Faster R-CNN C4 feature extractor (see module docstring). Use `from_config`."""

    def __init__(self, *, cfg: Any, model: torch.nn.Module, device: torch.device, provenance: dict[str, Any],
                 concepts: Vocabulary | None = None, attributes: Vocabulary | None = None) -> None:
        from vlmixer.pipeline.detector.model import PadMasker

        self.cfg = cfg
        self.model = model.eval()
        self.device = device
        self.provenance = provenance
        self.concepts = concepts
        self.attributes = attributes
        self.num_classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        self.num_attributes = int(cfg.VLMIXER.ATTRIBUTE.NUM_ATTRIBUTES) if cfg.VLMIXER.ATTRIBUTE.ENABLED else 0
        self.feature_dim = int(cfg.MODEL.RESNETS.RES2_OUT_CHANNELS) * 8
        self.max_attributes = int(cfg.VLMIXER.ATTRIBUTE.MAX_PER_BOX)
        self.batch_size = int(cfg.VLMIXER.BATCH_SIZE)
        self._mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
        self._std = torch.tensor(cfg.MODEL.PIXEL_STD, dtype=torch.float32, device=device).view(3, 1, 1)
        self._masker = PadMasker(str(cfg.VLMIXER.STEM_POOL))
        self._masker.attach(model.backbone, model.proposal_generator.rpn_head)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config_path: str | Path, weights: str | Path | None = None, device: str = "cpu",
                    overrides: Sequence[str] = ()) -> Detector:
        """Build from a yaml config (+ KEY=VALUE overrides); load `weights` or init randomly."""
        ensure_detectron2()
        from detectron2.modeling import build_model

        import vlmixer.pipeline.detector.model as m

        cfg = load_detector_config(config_path, overrides)
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise VlmixerError(f"device {device!r}: CUDA is not available on this machine")
        cfg.defrost()
        cfg.MODEL.DEVICE = str(dev)
        cfg.freeze()
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(int(cfg.VLMIXER.RANDOM_INIT.SEED))
            model = build_model(cfg)
        m.set_frozen_bn_eps(model, cfg.VLMIXER.FROZEN_BN_EPS)
        model.eval()
        meta: dict[str, Any] = {}
        if weights is not None:
            wpath = Path(weights)
            ckpt = load_checkpoint(wpath)
            state, meta = _model_state(ckpt, cfg, wpath)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise VlmixerError(f"{wpath}: checkpoint does not fit config {cfg.VLMIXER.NAME}: "
                                   f"missing {sorted(missing)[:10]} unexpected {sorted(unexpected)[:10]}")
            ckpt_sha = sha256_file(wpath)
        else:
            ckpt_sha = "random"
        concepts, attributes = _vocabularies(cfg, meta)
        provenance = {
            "config_name": cfg.VLMIXER.NAME,
            "config_path": str(config_path),
            "config_sha256": config_sha256(cfg),
            "config_text": cfg.dump(),
            "checkpoint": str(weights) if weights is not None else None,
            "checkpoint_sha256": ckpt_sha,
            "random_weights": weights is None,
            "num_classes": int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
            "num_attributes": int(cfg.VLMIXER.ATTRIBUTE.NUM_ATTRIBUTES),
            "concept_vocab_sha256": concepts.sha256 if concepts else None,
            "attribute_vocab_sha256": attributes.sha256 if attributes else None,
            "labelmap_sha256": meta.get("labelmap_sha256"),
            "thresholds": {
                "selection": "nms_filter_1",
                "nms": float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST),
                "score": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
                "min_boxes": int(cfg.VLMIXER.SELECTION.MIN_DETECTIONS),
                "max_boxes": int(cfg.TEST.DETECTIONS_PER_IMAGE),
                "attribute": float(cfg.VLMIXER.ATTRIBUTE.SCORE_THRESH),
                "attributes_per_box": int(cfg.VLMIXER.ATTRIBUTE.MAX_PER_BOX),
                "rpn_nms": float(cfg.MODEL.RPN.NMS_THRESH),
                "rpn_pre_nms_topk": int(cfg.MODEL.RPN.PRE_NMS_TOPK_TEST),
                "rpn_post_nms_topk": int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST),
                "min_size": int(cfg.INPUT.MIN_SIZE_TEST),
                "max_size": int(cfg.INPUT.MAX_SIZE_TEST),
                "resize": str(cfg.VLMIXER.RESIZE),
                "size_divisibility": int(cfg.VLMIXER.SIZE_DIVISIBILITY),
                "nms_iou": str(cfg.VLMIXER.NMS_IOU),
                "nms_suppress_equal": bool(cfg.VLMIXER.NMS_SUPPRESS_EQUAL),
                "min_box_pixels": float(cfg.VLMIXER.MIN_BOX_PIXELS),
                "label": str(cfg.VLMIXER.SELECTION.LABEL),
            },
        }
        det = cls(cfg=cfg, model=model, device=dev, provenance=provenance, concepts=concepts, attributes=attributes)
        if dev.type == "cuda" and cfg.VLMIXER.CHANNELS_LAST:
            det.model.to(memory_format=torch.channels_last)
        if weights is None and cfg.VLMIXER.RANDOM_INIT.CALIBRATE:
            det._calibrate()
        return det

    def _calibrate(self) -> None:
        """Random weights: frozen BN statistics and RPN objectness from one seeded synthetic image (model.py)."""
        from vlmixer.pipeline.detector.model import calibrate_random_model

        h, w = (int(v) for v in self.cfg.VLMIXER.RANDOM_INIT.IMAGE_SIZE)
        g = torch.Generator().manual_seed(int(self.cfg.VLMIXER.RANDOM_INIT.SEED))
        # smooth colour blobs plus noise: spatial structure like a photo, no external data
        low = torch.rand((3, h // 32 + 1, w // 32 + 1), generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        img = (img * 200 + torch.rand((3, h, w), generator=g) * 55).clamp(0, 255).to(torch.uint8)
        calibrate_random_model(self.model, lambda: self._forward([img], [(h, w)]))

    # ------------------------------------------------------------------ inference
    def preprocess(self, image_rgb: np.ndarray) -> tuple[torch.Tensor, float]:
        """HxWx3 uint8 RGB -> ((3,h,w) uint8 BGR tensor resized per INPUT.MIN/MAX_SIZE_TEST, scale h/H).

        See `preprocess_image` (the same without a model, for Ray CPU tasks).
        """
        return preprocess_image(image_rgb, int(self.cfg.INPUT.MIN_SIZE_TEST), int(self.cfg.INPUT.MAX_SIZE_TEST),
                                str(self.cfg.VLMIXER.RESIZE))

    def __call__(self, images: list[np.ndarray]) -> list[Detections]:
        """Detect on HxWx3 uint8 RGB images, in batches of VLMIXER.BATCH_SIZE."""
        out: list[Detections] = []
        for start in range(0, len(images), max(self.batch_size, 1)):
            chunk = images[start : start + max(self.batch_size, 1)]
            items = []
            for img in chunk:
                t, s = self.preprocess(img)
                items.append((t, s, (int(img.shape[0]), int(img.shape[1]))))
            out.extend(self.detect_preprocessed(items))
        return out

    def detect_preprocessed(self, items: Sequence[Sequence[Any]]) -> list[Detections]:
        """Run on preprocessed images as ONE batch: items are (tensor, scale) or
        (tensor, scale, (orig_h, orig_w)) from `preprocess`."""
        if not items:
            return []
        tensors, sizes, scales = self._unpack(items)
        results = self._forward(tensors, [(int(t.shape[1]), int(t.shape[2])) for t in tensors], sizes, scales)
        return self._to_detections(results, tensors, sizes, scales)

    def detect_at_boxes(self, items: Sequence[Sequence[Any]], boxes: Sequence[np.ndarray],
                        labels: Sequence[np.ndarray]) -> list[Detections]:
        """Features and attributes at boxes the user gives (original-image pixels, x1 y1 x2 y2),
        with their 0-based classes; confidence 1.0, order kept. `items` as `detect_preprocessed`.

        Why: galleries with human-labelled concepts (COCO, Visual Genome) need the
        features the head computes for exactly those boxes, as VinVL's and
        bottom-up attention's given-box extraction do; no proposal, NMS or
        selection runs.
        """
        if len(items) != len(boxes) or len(boxes) != len(labels):
            raise VlmixerError("detect_at_boxes: items, boxes and labels differ in length")
        if not items:
            return []
        tensors, sizes, scales = self._unpack(items)
        net_boxes, net_labels = [], []
        for (sy, sx), b, lab in zip(scales, boxes, labels):
            b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
            lab = np.asarray(lab, dtype=np.int64).reshape(-1)
            if b.shape[0] != lab.shape[0]:
                raise VlmixerError(f"detect_at_boxes: {b.shape[0]} boxes but {lab.shape[0]} labels")
            if lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise VlmixerError(f"detect_at_boxes: class ids must be in [0, {self.num_classes})")
            nb = torch.from_numpy(b.copy())
            nb[:, 0::2] *= sx
            nb[:, 1::2] *= sy
            net_boxes.append(nb)
            net_labels.append(torch.from_numpy(lab.copy()))
        results = self._forward(tensors, [(int(t.shape[1]), int(t.shape[2])) for t in tensors], sizes, scales,
                                given=(net_boxes, net_labels))
        dets = self._to_detections(results, tensors, sizes, scales)
        for d, b in zip(dets, boxes):  # the user's boxes, exactly as given
            d.boxes = np.asarray(b, dtype=np.float32).reshape(-1, 4).copy()
        return dets

    def _unpack(self, items: Sequence[Sequence[Any]]
                ) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[tuple[float, float]]]:
        """Tensors, original (H, W) and (y, x) scales network/original: the preprocess scale under the
        Caffe rule (the reference divides boxes by it), else the ratio of the sizes (maskrcnn-benchmark)."""
        caffe = str(self.cfg.VLMIXER.RESIZE) == "caffe"
        tensors, sizes, scales = [], [], []
        for it in items:
            if len(it) not in (2, 3):
                raise VlmixerError("detect_preprocessed: items are (tensor, scale[, (height, width)])")
            t, s = it[0], float(it[1])
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != 3:
                raise VlmixerError("detect_preprocessed: image tensors must be (3, h, w) from preprocess()")
            if len(it) == 3:
                orig = (int(it[2][0]), int(it[2][1]))
            else:
                orig = (max(int(round(t.shape[1] / s)), 1), max(int(round(t.shape[2] / s)), 1))
            tensors.append(t)
            sizes.append(orig)
            scales.append((s, s) if caffe else (t.shape[1] / orig[0], t.shape[2] / orig[1]))
        return tensors, sizes, scales

    def _to_detections(self, results: list[Any], tensors: Sequence[torch.Tensor],
                       sizes: Sequence[tuple[int, int]], scales: Sequence[tuple[float, float]]) -> list[Detections]:
        out = []
        caffe = str(self.cfg.VLMIXER.RESIZE) == "caffe"
        # one device->host copy per field for the whole batch
        for inst, t, orig, (sy, sx) in zip(results, tensors, sizes, scales):
            rh, rw = (1.0 / sy, 1.0 / sx) if caffe else (orig[0] / t.shape[1], orig[1] / t.shape[2])
            boxes = inst.pred_boxes.tensor.float().cpu().clone()
            boxes[:, 0::2] *= rw
            boxes[:, 1::2] *= rh
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, orig[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, orig[0])
            out.append(Detections(
                boxes=boxes.numpy().astype(np.float32),
                features=inst.features.float().cpu().numpy().astype(np.float32),
                concepts=inst.pred_classes.cpu().numpy().astype(np.int64),
                confidences=inst.scores.float().cpu().numpy().astype(np.float32),
                attr_ids=inst.attr_ids.cpu().numpy().astype(np.int64),
                attr_scores=inst.attr_scores.float().cpu().numpy().astype(np.float32),
                image_size=orig,
                empty_reason=None if len(boxes) else self._empty_reason(orig),
            ))
        return out

    def _empty_reason(self, size: tuple[int, int]) -> str:
        px = float(self.cfg.VLMIXER.MIN_BOX_PIXELS)
        return (f"no boxes (every proposal is under the minimum box size of {px:g} px in this "
                f"{size[1]}x{size[0]} image)")

    @torch.inference_mode()
    def _forward(self, tensors: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]],
                 originals: Sequence[tuple[int, int]] | None = None,
                 scales: Sequence[tuple[float, float]] | None = None,
                 given: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> list[Any]:
        from detectron2.structures import Boxes, ImageList, Instances

        from vlmixer.pipeline.detector.model import padded_extent

        div = int(self.cfg.VLMIXER.SIZE_DIVISIBILITY)
        extents = [padded_extent(s, div) for s in sizes]
        fh, fw = max(e[0] for e in extents), max(e[1] for e in extents)
        originals = list(originals) if originals is not None else list(sizes)
        batch = torch.zeros((len(tensors), 3, fh, fw), dtype=torch.float32, device=self.device)
        for i, t in enumerate(tensors):
            x = t.to(self.device, non_blocking=True).float()
            batch[i, :, : x.shape[1], : x.shape[2]] = (x - self._mean) / self._std
        if self.device.type == "cuda" and self.cfg.VLMIXER.CHANNELS_LAST:
            batch = batch.contiguous(memory_format=torch.channels_last)
        images = ImageList(batch, [tuple(s) for s in sizes])
        images.vlmixer_extents = self._masker.set(extents, (fh, fw))
        images.vlmixer_scales = (list(scales) if scales is not None
                                 else [(s[0] / o[0], s[1] / o[1]) for s, o in zip(sizes, originals)])
        images.vlmixer_original_sizes = [tuple(o) for o in originals]
        amp = self.cfg.VLMIXER.AMP
        use_amp = self.device.type == "cuda" and amp != "none"
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        try:
            with torch.autocast(device_type=self.device.type, dtype=dtype, enabled=use_amp):
                feats = self.model.backbone(images.tensor)
                if given is None:
                    proposals, _ = self.model.proposal_generator(images, feats, None)
                    results, _ = self.model.roi_heads(images, feats, proposals, None)
                else:
                    proposals = []
                    for s, b in zip(sizes, given[0]):
                        inst = Instances(tuple(s))
                        inst.proposal_boxes = Boxes(b.to(self.device))
                        proposals.append(inst)
                    results, _ = self.model.roi_heads(images, feats, proposals, None, given_labels=given[1])
        finally:
            self._masker.clear()
        return results


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise VlmixerError(f"detector input must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise VlmixerError(f"detector input must be HxWx3 RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise VlmixerError(f"detector input must be uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise VlmixerError(f"detector input is empty: shape {image.shape}")
    return image


def _model_state(ckpt: dict[str, Any], cfg: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The detectron2-named state dict of a checkpoint: converted (ours) or VinVL (converted now)."""
    meta = ckpt.get("vlmixer") if isinstance(ckpt.get("vlmixer"), dict) else {}
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VlmixerError(f"{path}: checkpoint has no state dict of tensors (under 'model' or at top level)")
    if looks_like_vinvl(state):
        state = convert_vinvl_checkpoint(state, cfg)
    return state, meta or {}


def _vocabularies(cfg: Any, meta: dict[str, Any]) -> tuple[Vocabulary | None, Vocabulary | None]:
    concepts = attributes = None
    if meta.get("concepts"):
        concepts = Vocabulary.from_json(meta["concepts"])
    if meta.get("attributes"):
        attributes = Vocabulary.from_json(meta["attributes"])
    v = cfg.VLMIXER
    if v.LABELMAP:
        concepts, attributes = read_labelmap_json(v.LABELMAP)
    if v.CONCEPT_VOCAB:
        concepts = load_vocabulary(v.CONCEPT_VOCAB)
    if v.ATTRIBUTE_VOCAB:
        attributes = read_vocab_txt(v.ATTRIBUTE_VOCAB)
    n_cls, n_att = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES), int(v.ATTRIBUTE.NUM_ATTRIBUTES)
    if concepts is not None and len(concepts) != n_cls:
        raise VlmixerError(f"concept vocabulary has {len(concepts)} entries, the model {n_cls} classes")
    if attributes is not None and v.ATTRIBUTE.ENABLED and len(attributes) != n_att:
        raise VlmixerError(f"attribute vocabulary has {len(attributes)} entries, the model {n_att} attributes")
    return concepts, attributes
