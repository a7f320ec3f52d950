"""The product's detectron2 parts for a Faster R-CNN C4 feature extractor.

Registered in detectron2's registries (importing this module registers them):

* `build_vlmixer_resnet_backbone` (BACKBONE_REGISTRY): detectron2's ResNet /
  ResNeXt stem + res2..res4, with configurable blocks per stage (tiny test
  models) and an optional Caffe-style stem pool (bottom-up attention);
* `VLMixerLegacyAnchorGenerator` (ANCHOR_GENERATOR_REGISTRY): the anchors of
  Detectron / maskrcnn-benchmark `generate_anchors` (centred at
  (stride-1)/2, rounded +1 widths, ratio-major order), so RPN weights of
  those models apply unchanged;
* `VLMixerRPN` (PROPOSAL_GENERATOR_REGISTRY): inference-only RPN with the
  post-processing of maskrcnn-benchmark (VinVL) or of
  bottom-up-attention.pytorch, on the anchors of each image's own extent of
  the feature map, so a batch gives the proposals of each image alone;
* `VLMixerRes5ROIHeads` (ROI_HEADS_REGISTRY): detectron2's `Res5ROIHeads`
  (RoIAlign or RoIPool 14x14 on res4, res5 box head, plain or dilated,
  average pool) plus the attribute head and the "NMS filter 1" box selection
  on the proposals, or features at given boxes.

Every convention that differs between the references is a config key
(config.py); pipeline/detector/README.md lists each reference setting and
where it is read.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmixer.pipeline.detector._compat import ensure_detectron2
from vlmixer.pipeline.detector.selection import Selection, select_boxes

ensure_detectron2()

from detectron2.config import configurable  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import (  # noqa: E402
    ANCHOR_GENERATOR_REGISTRY,
    BACKBONE_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_HEADS_REGISTRY,
)
from detectron2.modeling.anchor_generator import BufferList, DefaultAnchorGenerator  # noqa: E402
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet  # noqa: E402
from detectron2.modeling.proposal_generator.rpn import RPN  # noqa: E402
from detectron2.modeling.roi_heads import Res5ROIHeads  # noqa: E402
from detectron2.structures import Boxes, ImageList, Instances  # noqa: E402

_DEPTH_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
_BBOX_CLIP = math.log(1000.0 / 16)


def blocks_per_stage(cfg: Any) -> list[int]:
    """Blocks of res2..res5 from VLMIXER.RESNET_BLOCKS or MODEL.RESNETS.DEPTH."""
    if len(cfg.VLMIXER.RESNET_BLOCKS):
        return [int(b) for b in cfg.VLMIXER.RESNET_BLOCKS]
    return list(_DEPTH_BLOCKS[cfg.MODEL.RESNETS.DEPTH])


# --------------------------------------------------------------------------- backbone
class CaffeMaxPoolStem(BasicStem):
    """Stem of the Caffe bottom-up-attention ResNet: max pool 3x3/2, no padding, ceil mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


@BACKBONE_REGISTRY.register()
def build_vlmixer_resnet_backbone(cfg: Any, input_shape: ShapeSpec) -> ResNet:
    """ResNet/ResNeXt stem + res2..res4 (only the stages the RPN/ROI features need are built)."""
    norm = cfg.MODEL.RESNETS.NORM
    stem_cls = CaffeMaxPoolStem if cfg.VLMIXER.STEM_POOL == "caffe" else BasicStem
    stem = stem_cls(in_channels=input_shape.channels, out_channels=cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, norm=norm)
    out_features = list(cfg.MODEL.RESNETS.OUT_FEATURES)
    n_stages = max({"res2": 1, "res3": 2, "res4": 3, "res5": 4}[f] for f in out_features)
    blocks = blocks_per_stage(cfg)
    bottleneck = cfg.MODEL.RESNETS.NUM_GROUPS * cfg.MODEL.RESNETS.WIDTH_PER_GROUP
    in_ch = cfg.MODEL.RESNETS.STEM_OUT_CHANNELS
    out_ch = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS
    stages = []
    for idx in range(n_stages):
        first_stride = 1 if idx == 0 else 2
        stages.append(ResNet.make_stage(
            block_class=BottleneckBlock,
            num_blocks=blocks[idx],
            stride_per_block=[first_stride] + [1] * (blocks[idx] - 1),
            in_channels=in_ch,
            out_channels=out_ch,
            bottleneck_channels=bottleneck,
            num_groups=cfg.MODEL.RESNETS.NUM_GROUPS,
            norm=norm,
            stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1,
            dilation=1,
        ))
        in_ch, out_ch, bottleneck = out_ch, out_ch * 2, bottleneck * 2
    return ResNet(stem, stages, out_features=out_features, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


# --------------------------------------------------------------------------- anchors
def legacy_cell_anchors(stride: int, sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """Detectron's `generate_anchors` (as in maskrcnn-benchmark): (len(ratios)*len(sizes), 4),
    ratio-major, x1y1x2y2 with the +1 convention, centred at ((stride-1)/2, (stride-1)/2)."""
    base = np.array([0, 0, stride - 1, stride - 1], dtype=np.float64)

    def whctrs(a: np.ndarray) -> tuple[float, float, float, float]:
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mk(ws: np.ndarray, hs: np.ndarray, xc: float, yc: float) -> np.ndarray:
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack([xc - 0.5 * (ws - 1), yc - 0.5 * (hs - 1), xc + 0.5 * (ws - 1), yc + 0.5 * (hs - 1)])

    w, h, xc, yc = whctrs(base)
    size_ratios = (w * h) / np.asarray(ratios, dtype=np.float64)
    ws = np.round(np.sqrt(size_ratios))
    hs = np.round(ws * np.asarray(ratios, dtype=np.float64))
    ratio_anchors = mk(ws, hs, xc, yc)
    scales = np.asarray(sizes, dtype=np.float64) / stride
    out = []
    for a in ratio_anchors:
        w, h, xc, yc = whctrs(a)
        out.append(mk(w * scales, h * scales, xc, yc))
    return np.vstack(out)


@ANCHOR_GENERATOR_REGISTRY.register()
class VLMixerLegacyAnchorGenerator(DefaultAnchorGenerator):
    """Anchors of maskrcnn-benchmark / Detectron (see `legacy_cell_anchors`); grid offset 0."""

    def _calculate_anchors(self, sizes: Any, aspect_ratios: Any) -> BufferList:
        cells = [
            torch.from_numpy(legacy_cell_anchors(int(s), sz, ar)).float()
            for s, sz, ar in zip(self.strides, sizes, aspect_ratios)
        ]
        return BufferList(cells)

    def _grid_anchors(self, grid_sizes: list[list[int]]) -> list[torch.Tensor]:
        # as detectron2's, with meshgrid(indexing="ij") (no deprecation warning)
        out = []
        for (gh, gw), stride, base in zip(grid_sizes, self.strides, self.cell_anchors.buffers()):
            sx = torch.arange(0, int(gw) * stride, step=stride, dtype=torch.float32, device=base.device)
            sy = torch.arange(0, int(gh) * stride, step=stride, dtype=torch.float32, device=base.device)
            yy, xx = torch.meshgrid(sy + self.offset * stride, sx + self.offset * stride, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack((xx, yy, xx, yy), dim=1)
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return out


# --------------------------------------------------------------------------- RPN
def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, weights: Sequence[float], legacy: bool,
                 end_minus_one: bool | None = None) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) deltas to boxes.

    `legacy`: widths are x2 - x1 + 1 (Detectron, maskrcnn-benchmark, Caffe).
    `end_minus_one` (default: `legacy`): x2 = ctr + w/2 - 1 as Detectron and
    maskrcnn-benchmark; py-faster-rcnn, whose decode the Caffe bottom-up
    attention model and its detectron2 ports keep, writes x2 = ctr + w/2.
    """
    one = 1.0 if legacy else 0.0
    end = one if end_minus_one is None else (1.0 if end_minus_one else 0.0)
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0] + one
    heights = boxes[:, 3] - boxes[:, 1] + one
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = (deltas[:, 2] / ww).clamp(max=_BBOX_CLIP)
    dh = (deltas[:, 3] / wh).clamp(max=_BBOX_CLIP)
    px, py = dx * widths + ctr_x, dy * heights + ctr_y
    pw, ph = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw - end, py + 0.5 * ph - end], dim=1)


def padded_extent(size: tuple[int, int], divisibility: int) -> tuple[int, int]:
    """An image's height and width padded to the size divisibility (0: unpadded), as it runs alone."""
    h, w = size
    d = max(int(divisibility), 1)
    return (h + d - 1) // d * d, (w + d - 1) // d * d


def stage_extents(height: int, width: int, stem_pool: str = "pytorch") -> dict[int, tuple[int, int]]:
    """(h, w) of the feature map at each stride (1, 2, 4, 8, 16) for an input of this size alone.

    Why: a smaller image inside a padded batch owns only this part of each
    feature map; run alone, its convolutions see zeros (their padding) right
    after it. Every stride-2 layer of the C4 backbone (7x7/2 pad 3, 3x3/2 pad
    1, 1x1/2) gives ceil(n / 2); the stem's max pool gives ceil(n / 2)
    (3x3/2, pad 1) or floor(n / 2) (Caffe's 3x3/2, no pad, ceil mode).
    """
    def half(n: int) -> int:
        return (n + 1) // 2

    def pool(n: int) -> int:
        return max(n // 2, 1) if stem_pool == "caffe" else half(n)

    out = {1: (int(height), int(width))}
    h, w = half(height), half(width)
    out[2] = (h, w)
    h, w = pool(h), pool(w)
    out[4] = (h, w)
    for s in (8, 16):
        h, w = half(h), half(w)
        out[s] = (h, w)
    return out


def feature_extents(images: ImageList, stride: int) -> list[tuple[int, int]]:
    """Each image's own extent of the feature map at `stride` (set by the Detector, else ceil(size/stride))."""
    ext = getattr(images, "vlmixer_extents", None)
    if ext is not None:
        return [tuple(e[stride]) for e in ext]
    return [(-(-int(h) // stride), -(-int(w) // stride)) for h, w in images.image_sizes]


def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, iou_thresh: float, plus_one: bool,
             suppress_equal: bool = False) -> torch.Tensor:
    """Greedy NMS (torchvision's kernel), kept indices in score order.

    `plus_one`: areas and overlaps with +1 widths, as maskrcnn-benchmark's
    kernels. `suppress_equal`: suppress at IoU >= t (maskrcnn-benchmark's CPU
    kernel, which bottom-up-attention.pytorch calls) instead of IoU > t (its
    CUDA kernel, and torchvision), each with the threshold's precision there.
    """
    from torchvision.ops import nms

    b = boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device, dtype=boxes.dtype) if plus_one else boxes
    if suppress_equal:  # IoU >= float32(t)  <=>  IoU > the float32 just below it
        return nms(b, scores, float(np.nextafter(np.float32(iou_thresh), np.float32(0))))
    if plus_one:  # maskrcnn-benchmark's CUDA kernel takes a float threshold
        return nms(b, scores, float(np.float32(iou_thresh)))
    return nms(b, scores, float(iou_thresh))  # torchvision.ops.nms called with a Python float


@PROPOSAL_GENERATOR_REGISTRY.register()
class VLMixerRPN(RPN):
    """Inference-only RPN on one feature map with the reference post-processing.

    Per image, on the anchors of its own extent of the feature map (so a batch
    gives what the image gives alone), proposals are ranked by the raw
    objectness logit (stable sort: ties keep anchor order). Two orders, as the
    references run them:

    * maskrcnn-benchmark (VinVL): top PRE_NMS_TOPK_TEST anchors, decode,
      clip, drop boxes below MIN_SIZE, NMS, keep POST_NMS_TOPK_TEST;
    * bottom-up-attention.pytorch (`VLMIXER.RPN_FILTER_BEFORE_TOPK`): decode
      every anchor, clip, drop empty boxes and boxes not larger than MIN_SIZE
      pixels of the original image, then the top-k, NMS, keep.
    """

    @configurable
    def __init__(self, *, legacy: bool = True, end_minus_one: bool = True, nms_plus_one: bool = True,
                 nms_suppress_equal: bool = False, filter_before_topk: bool = False, stride: int = 16,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.legacy = legacy
        self.end_minus_one = end_minus_one
        self.nms_plus_one = nms_plus_one
        self.nms_suppress_equal = nms_suppress_equal
        self.filter_before_topk = filter_before_topk
        self.stride = stride

    @classmethod
    def from_config(cls, cfg: Any, input_shape: dict[str, ShapeSpec]) -> dict[str, Any]:
        ret = super().from_config(cfg, input_shape)
        v = cfg.VLMIXER
        ret["legacy"] = bool(v.LEGACY_BOXES)
        ret["end_minus_one"] = bool(v.LEGACY_BOXES) and v.BOX_DECODE == "detectron"
        ret["nms_plus_one"] = v.NMS_IOU == "plus_one"
        ret["nms_suppress_equal"] = bool(v.NMS_SUPPRESS_EQUAL)
        ret["filter_before_topk"] = bool(v.RPN_FILTER_BEFORE_TOPK)
        ret["stride"] = int(input_shape[cfg.MODEL.RPN.IN_FEATURES[0]].stride)
        return ret

    def forward(self, images: ImageList, features: dict[str, torch.Tensor], gt_instances: Any = None):  # type: ignore[override]
        if self.training:
            raise NotImplementedError("VLMixerRPN is inference-only; train with detectron2's RPN")
        feats = [features[f] for f in self.in_features]
        if len(feats) != 1:
            raise ValueError("VLMixerRPN takes exactly one feature map (C4)")
        feat = feats[0]
        anchors = self.anchor_generator(feats)[0].tensor  # (H*W*A, 4)
        logits, deltas = self.rpn_head(feats)
        n, a, fh, fw = logits[0].shape
        obj = logits[0].permute(0, 2, 3, 1).reshape(n, -1)  # (N, H*W*A)
        dlt = deltas[0].view(n, a, 4, fh, fw).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        ys = torch.arange(fh, device=feat.device).view(fh, 1, 1).expand(fh, fw, a).reshape(-1)
        xs = torch.arange(fw, device=feat.device).view(1, fw, 1).expand(fh, fw, a).reshape(-1)
        scales = getattr(images, "vlmixer_scales", None)
        one = 1.0 if self.legacy else 0.0
        out = []
        for i, (size, (eh, ew)) in enumerate(zip(images.image_sizes, feature_extents(images, self.stride))):
            h, w = int(size[0]), int(size[1])
            valid = torch.nonzero((ys < eh) & (xs < ew), as_tuple=True)[0]
            scores = obj[i, valid].float()
            k = int(self.pre_nms_topk[False])
            if self.filter_before_topk:
                boxes = self._decode_clip(dlt[i, valid], anchors[valid], h, w)
                ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & torch.isfinite(scores)
                if self.min_box_size > 0:
                    s = float(scales[i][0]) if scales is not None else 1.0
                    thr = self.min_box_size * s
                    ok &= ((boxes[:, 2] - boxes[:, 0] + one) > thr) & ((boxes[:, 3] - boxes[:, 1] + one) > thr)
                boxes, scores = boxes[ok], scores[ok]
                order = torch.argsort(scores, descending=True, stable=True)[:k]
                boxes, top = boxes[order], scores[order]
            else:
                order = torch.argsort(scores, descending=True, stable=True)[:k]
                sel = valid[order]
                top = scores[order]
                boxes = self._decode_clip(dlt[i, sel], anchors[sel], h, w)
                ok = torch.isfinite(boxes).all(dim=1) & torch.isfinite(top)
                if not self.legacy:  # detectron2 drops empty boxes
                    ok &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                if self.min_box_size > 0:
                    ok &= ((boxes[:, 2] - boxes[:, 0] + one) >= self.min_box_size) & (
                        (boxes[:, 3] - boxes[:, 1] + one) >= self.min_box_size)
                boxes, top = boxes[ok], top[ok]
            keep = nms_keep(boxes, top, self.nms_thresh, self.nms_plus_one, self.nms_suppress_equal)
            keep = keep[: int(self.post_nms_topk[False])]
            inst = Instances((h, w))
            inst.proposal_boxes = Boxes(boxes[keep])
            inst.objectness_logits = top[keep]
            out.append(inst)
        return out, {}

    def _decode_clip(self, deltas: torch.Tensor, anchors: torch.Tensor, h: int, w: int) -> torch.Tensor:
        boxes = decode_boxes(deltas.float(), anchors, self.box2box_transform.weights, self.legacy,
                             self.end_minus_one)
        one = 1.0 if self.legacy else 0.0
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=w - one)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=h - one)
        return boxes


# --------------------------------------------------------------------------- ROI heads
class AttributeHead(nn.Module):
    """Attribute predictor of VinVL/bottom-up attention: [feature, embed(class)] -> fc -> ReLU -> scores."""

    def __init__(self, *, feature_dim: int, num_classes: int, num_attributes: int,
                 embed_dim: int = 256, hidden_dim: int = 512) -> None:
        super().__init__()
        # num_classes + 1 rows: detectron2 class order, background last.
        self.cls_embedding = nn.Embedding(num_classes + 1, embed_dim)
        self.fc_attr = nn.Linear(feature_dim + embed_dim, hidden_dim)
        self.attr_score = nn.Linear(hidden_dim, num_attributes + 1)
        for m in (self.cls_embedding, self.fc_attr, self.attr_score):
            nn.init.normal_(m.weight, std=0.01)
        nn.init.zeros_(self.fc_attr.bias)
        nn.init.zeros_(self.attr_score.bias)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([features, self.cls_embedding(labels).to(features.dtype)], dim=1)
        return self.attr_score(F.relu(self.fc_attr(x)))


def box_sizes(boxes: torch.Tensor, scale: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
    """(n, 2) width and height of network-input boxes in ORIGINAL-image pixels, as the gallery stores them
    (scaled back and clipped to the original image)."""
    sy, sx = scale
    oh, ow = size
    x = (boxes[:, 0::2] / sx).clamp(0, ow)
    y = (boxes[:, 1::2] / sy).clamp(0, oh)
    return torch.stack([x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]], dim=1)


@ROI_HEADS_REGISTRY.register()
class VLMixerRes5ROIHeads(Res5ROIHeads):
    """Res5ROIHeads for feature extraction: pooled res5 features, class scores, "NMS filter 1"
    on the proposal boxes (no box regression) and the attribute head. Inference only.

    Output per image: Instances with pred_boxes (the selected proposals), scores,
    pred_classes (0-based), features (pooled res5), attr_ids (0-based, -1 pad)
    and attr_scores (0 pad). With `given_boxes` (features at boxes a user
    gives) the proposals are those boxes, all kept in their order, and their
    classes are given: only features and attributes are computed.
    """

    @configurable
    def __init__(self, *, attribute_head: nn.Module | None = None, selection: dict[str, Any] | None = None,
                 attr_thresh: float = 0.05, attr_max: int = 16, legacy: bool = True, stride: int = 16,
                 min_box_pixels: float = 1.0, attr_label_input: str = "selected", label_mode: str = "surviving",
                 select_in_original: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attribute_head = attribute_head
        self.selection = dict(selection or {})
        self.attr_thresh = attr_thresh
        self.attr_max = attr_max
        self.legacy = legacy
        self.stride = stride
        self.min_box_pixels = min_box_pixels
        self.attr_label_input = attr_label_input
        self.label_mode = label_mode
        self.select_in_original = select_in_original

    @classmethod
    def from_config(cls, cfg: Any, input_shape: dict[str, ShapeSpec]) -> dict[str, Any]:
        ret = super().from_config(cfg, input_shape)
        feature_dim = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
        att = cfg.VLMIXER.ATTRIBUTE
        if att.ENABLED:
            ret["attribute_head"] = AttributeHead(
                feature_dim=feature_dim, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                num_attributes=att.NUM_ATTRIBUTES, embed_dim=att.CLS_EMBED_DIM, hidden_dim=att.HIDDEN_DIM)
        ret["selection"] = {
            "iou_thresh": float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST),
            "score_thresh": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
            "min_boxes": int(cfg.VLMIXER.SELECTION.MIN_DETECTIONS),
            "max_boxes": int(cfg.TEST.DETECTIONS_PER_IMAGE),
            "prefilter": float(cfg.VLMIXER.SELECTION.PREFILTER),
            "legacy": cfg.VLMIXER.NMS_IOU == "plus_one",
            "suppress_equal": bool(cfg.VLMIXER.NMS_SUPPRESS_EQUAL),
        }
        ret["attr_thresh"] = float(att.SCORE_THRESH)
        ret["attr_max"] = int(att.MAX_PER_BOX)
        ret["attr_label_input"] = str(att.LABEL_INPUT)
        ret["legacy"] = bool(cfg.VLMIXER.LEGACY_BOXES)
        ret["stride"] = int(input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].stride)
        ret["min_box_pixels"] = float(cfg.VLMIXER.MIN_BOX_PIXELS)
        ret["label_mode"] = str(cfg.VLMIXER.SELECTION.LABEL)
        ret["select_in_original"] = bool(cfg.VLMIXER.SELECTION.IN_ORIGINAL_PIXELS)
        return ret

    @classmethod
    def _build_res5_block(cls, cfg: Any) -> tuple[nn.Module, int]:
        n_blocks = blocks_per_stage(cfg)[3]
        factor = 2 ** 3  # res5 is 8x res2
        bottleneck = cfg.MODEL.RESNETS.NUM_GROUPS * cfg.MODEL.RESNETS.WIDTH_PER_GROUP * factor
        out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * factor
        dilation = int(cfg.MODEL.RESNETS.RES5_DILATION)
        # dilated res5 (Caffe bottom-up attention): stride 1, 3x3 convs with dilation and padding 2
        first = 1 if dilation > 1 else 2
        blocks = ResNet.make_stage(
            BottleneckBlock, n_blocks, stride_per_block=[first] + [1] * (n_blocks - 1),
            in_channels=out_channels // 2, bottleneck_channels=bottleneck, out_channels=out_channels,
            num_groups=cfg.MODEL.RESNETS.NUM_GROUPS, norm=cfg.MODEL.RESNETS.NORM,
            stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1, dilation=dilation)
        return nn.Sequential(*blocks), out_channels

    def pooled_features(self, images: ImageList, features: dict[str, torch.Tensor],
                        boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pool (RoIAlign / RoIPool) each image on its own extent of the feature map, so a box at the
        bottom/right border samples what it samples when the image runs alone; then res5 and
        average pooling."""
        feat = features[self.in_features[0]]
        crops = []
        for i, (eh, ew) in enumerate(feature_extents(images, self.stride)):
            if boxes[i].shape[0] == 0:
                continue
            fmap = feat[i : i + 1, :, :eh, :ew]
            crops.append(self.pooler([fmap], [Boxes(boxes[i])]))
        if not crops:
            c = self.res5[-1].out_channels
            return feat.new_zeros((0, c))
        x = self.res5(torch.cat(crops))
        return x.mean(dim=(2, 3))

    def _drop_small(self, images: ImageList, proposals: list[Instances]) -> list[torch.Tensor]:
        """Proposal boxes without those narrower or lower than MIN_BOX_PIXELS in the original image."""
        boxes = [p.proposal_boxes.tensor for p in proposals]
        scales = getattr(images, "vlmixer_scales", None)
        originals = getattr(images, "vlmixer_original_sizes", None)
        if self.min_box_pixels <= 0 or scales is None or originals is None:
            return boxes
        out = []
        for b, s, o in zip(boxes, scales, originals):
            wh = box_sizes(b, s, o)
            out.append(b[(wh >= self.min_box_pixels).all(dim=1)])
        return out

    def forward(self, images: ImageList, features: dict[str, torch.Tensor],  # type: ignore[override]
                proposals: list[Instances], targets: Any = None, given_labels: list[torch.Tensor] | None = None):
        if self.training:
            raise NotImplementedError("VLMixerRes5ROIHeads is inference-only")
        if given_labels is None:
            boxes = self._drop_small(images, proposals)
        else:
            boxes = [p.proposal_boxes.tensor for p in proposals]
        pooled = self.pooled_features(images, features, boxes)
        logits = self.box_predictor.cls_score(pooled).float()
        probs = F.softmax(logits, dim=-1)[:, :-1]  # detectron2 puts background last
        counts = [b.shape[0] for b in boxes]
        per_img_probs = probs.split(counts)
        per_img_feats = pooled.split(counts)
        if given_labels is not None:
            sels = [Selection(indices=torch.arange(b.shape[0], device=b.device), labels=lab.to(b.device).long(),
                              scores=torch.ones(b.shape[0], device=b.device)) for b, lab in zip(boxes, given_labels)]
        else:
            sel_boxes = boxes
            if self.select_in_original:
                scales = getattr(images, "vlmixer_scales", None) or [(1.0, 1.0)] * len(boxes)
                sel_boxes = [b / torch.tensor([sx, sy, sx, sy], device=b.device, dtype=b.dtype)
                             for b, (sy, sx) in zip(boxes, scales)]
            sels = select_boxes(sel_boxes, list(per_img_probs), **self.selection)
            if self.label_mode == "argmax":
                sels = [_argmax_labels(s, p) for s, p in zip(sels, per_img_probs)]
        feats_sel = [f[s.indices] for f, s in zip(per_img_feats, sels)]
        if self.attr_label_input == "argmax_with_background":
            per_img_logits = logits.split(counts)
            attr_labels = [lg[s.indices].argmax(dim=1) for lg, s in zip(per_img_logits, sels)]
        else:
            attr_labels = [s.labels for s in sels]
        labels_all = torch.cat(attr_labels) if attr_labels else probs.new_zeros((0,), dtype=torch.long)
        attr_ids, attr_scores = self._attributes(torch.cat(feats_sel) if feats_sel else pooled[:0], labels_all)
        results = []
        start = 0
        for img_boxes, s, f, p in zip(boxes, sels, feats_sel, proposals):
            k = s.indices.numel()
            inst = Instances(p.image_size)
            inst.pred_boxes = Boxes(img_boxes[s.indices])
            inst.scores = s.scores
            inst.pred_classes = s.labels
            inst.features = f
            inst.attr_ids = attr_ids[start : start + k]
            inst.attr_scores = attr_scores[start : start + k]
            start += k
            results.append(inst)
        return results, {}

    def _attributes(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = feats.shape[0]
        k = self.attr_max
        if self.attribute_head is None or n == 0 or k <= 0:
            return (torch.full((n, max(k, 0)), -1, dtype=torch.long, device=feats.device),
                    torch.zeros((n, max(k, 0)), dtype=torch.float32, device=feats.device))
        probs = F.softmax(self.attribute_head(feats, labels).float(), dim=-1)
        return attribute_topk(probs, self.attr_thresh, k)


def attribute_topk(probs: torch.Tensor, thresh: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attributes as VinVL's AttributePostProcessor keeps them: index 0 ("no attribute") dropped,
    scores strictly above `thresh`, the best `k` per box (ties: lower index first), -1 / 0 padded."""
    probs = probs.clone()
    probs[:, 0] = 0.0
    probs = torch.where(probs > thresh, probs, torch.zeros_like(probs))
    kk = min(k, probs.shape[1])
    order = torch.argsort(probs, dim=1, descending=True, stable=True)[:, :kk]
    scores = probs.gather(1, order)
    ids = torch.where(scores > 0, order - 1, torch.full_like(order, -1))
    if kk < k:
        ids = F.pad(ids, (0, k - kk), value=-1)
        scores = F.pad(scores, (0, k - kk), value=0.0)
    return ids, scores


def _argmax_labels(sel: Selection, probs: torch.Tensor) -> Selection:
    """bottom-up-attention.pytorch reports each kept box's argmax class and its probability, not the
    class that survived NMS; the order stays by that reported confidence (stable)."""
    conf, lab = probs[sel.indices].max(dim=1)
    order = torch.argsort(conf, descending=True, stable=True)
    return Selection(indices=sel.indices[order], labels=lab[order], scores=conf[order])


# --------------------------------------------------------------------------- numerics helpers
def set_frozen_bn_eps(model: nn.Module, eps: float) -> None:
    """maskrcnn-benchmark's frozen BN has no eps; detectron2's has 1e-5."""
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = float(eps)


@torch.no_grad()
def calibrate_random_model(model: nn.Module, run: Any, min_var: float = 1e-4) -> None:
    """For random weights: one forward pass (`run()`) that sets, layer by layer, every frozen
    BN's statistics to those of its input (weight 1, bias 0), and standardises the RPN
    RPN outputs per anchor type (objectness: zero mean, unit std; box deltas: std 0.1).

    Why: with random convolutions and identity frozen BN the activations of a
    deep ResNet grow by orders of magnitude and the detector returns nothing
    useful; normalising each layer keeps them in range, like trained BN would.
    Without the RPN step, one anchor type's random offset wins every top-k and
    NMS leaves a handful of proposals instead of POST_NMS_TOPK_TEST.
    """
    hooks = []
    # Residual branches of identity blocks get gain 1/sqrt(blocks in the stage) so the
    # residual stream of a deep stage (36 blocks in X-152 res4) does not grow 36-fold.
    gains: dict[int, float] = {}
    for seq in model.modules():
        if isinstance(seq, nn.Sequential) and len(seq) and all(isinstance(b, BottleneckBlock) for b in seq):
            for b in seq:
                if b.shortcut is None:
                    gains[id(b.conv3.norm)] = 1.0 / math.sqrt(len(seq))

    def bn_pre_hook(mod: FrozenBatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()
        dims = [0] + list(range(2, x.dim()))
        mod.running_mean.copy_(x.mean(dim=dims))
        mod.running_var.copy_(x.var(dim=dims, unbiased=False).clamp(min=min_var))
        mod.weight.fill_(gains.get(id(mod), 1.0))
        mod.bias.zero_()

    def standardise(target_std: float) -> Any:
        def hook(mod: nn.Conv2d, args: Any, out: torch.Tensor) -> torch.Tensor:
            mean = out.float().mean(dim=(0, 2, 3))
            std = out.float().std(dim=(0, 2, 3)).clamp(min=1e-6) / target_std
            mod.weight.div_(std.view(-1, 1, 1, 1).to(mod.weight.dtype))
            if mod.bias is not None:
                mod.bias.copy_(((mod.bias.float() - mean) / std).to(mod.bias.dtype))
            return (out - mean.view(1, -1, 1, 1).to(out.dtype)) / std.view(1, -1, 1, 1).to(out.dtype)
        return hook

    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            hooks.append(m.register_forward_pre_hook(bn_pre_hook))
    rpn = getattr(getattr(model, "proposal_generator", None), "rpn_head", None)
    # objectness: unit spread per anchor type; box deltas: small, so proposals stay near anchors
    for name, target_std in (("objectness_logits", 1.0), ("anchor_deltas", 0.1)):
        conv = getattr(rpn, name, None)
        if isinstance(conv, nn.Conv2d):
            hooks.append(conv.register_forward_hook(standardise(target_std)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()


class PadMasker:
    """Zero activations outside each image's own extent inside a mixed-size batch.

    Why: with padding, a small image in a batch sees the (non-zero, after BN
    bias and ReLU) activations of the padded area where, run alone, its
    convolutions would see zero padding. Zeroing the input of every
    convolution with a spatial kernel (and the stem output before its max
    pool, whose inputs are >= 0) to the image's true extent at that stride
    (`stage_extents`: ceil of size/stride at each stage, as the image alone
    yields) makes the batch compute exactly what each image computes alone.
    Costs one multiply per such convolution, and only when the batch mixes
    sizes.
    """

    def __init__(self, stem_pool: str = "pytorch") -> None:
        self.stem_pool = stem_pool
        self.by_shape: dict[tuple[int, int], list[tuple[int, int]]] | None = None
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def attach(self, backbone: nn.Module, rpn_head: nn.Module) -> None:
        for mod in list(backbone.modules()) + list(rpn_head.modules()):
            if isinstance(mod, nn.Conv2d) and (mod.kernel_size[0] > 1 or mod.kernel_size[1] > 1):
                mod.register_forward_pre_hook(self._pre)
        stem_conv = getattr(getattr(backbone, "stem", None), "conv1", None)
        if stem_conv is not None:
            stem_conv.register_forward_hook(self._post)

    def set(self, inputs: list[tuple[int, int]] | None, full: tuple[int, int]) -> list[dict[int, tuple[int, int]]]:
        """`inputs`: each image's input extent; `full`: the batch tensor's (h, w). Returns each image's
        extents by stride; masking is on only when they differ."""
        self._cache.clear()
        self.by_shape = None
        if not inputs:
            return []
        per_image = [stage_extents(h, w, self.stem_pool) for h, w in inputs]
        if len(set(inputs)) > 1 or tuple(inputs[0]) != tuple(full):
            whole = stage_extents(full[0], full[1], self.stem_pool)
            self.by_shape = {}
            for s, shape in whole.items():
                self.by_shape.setdefault(shape, [e[s] for e in per_image])
        return per_image

    def clear(self) -> None:
        self.by_shape = None
        self._cache.clear()

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[0], x.shape[-2], x.shape[-1], x.device, x.dtype)
        m = self._cache.get(key)
        if m is None:
            assert self.by_shape is not None
            h, w = int(x.shape[-2]), int(x.shape[-1])
            extents = self.by_shape.get((h, w))
            if extents is None:
                raise RuntimeError(f"PadMasker: no extents for a {h}x{w} feature map")
            m = torch.zeros((x.shape[0], 1, h, w), dtype=x.dtype, device=x.device)
            for i, (eh, ew) in enumerate(extents):
                m[i, :, :eh, :ew] = 1
            self._cache[key] = m
        return m

    def _pre(self, mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if self.by_shape is None:
            return None
        x = args[0]
        return (x * self._mask(x),) + tuple(args[1:])

    def _post(self, mod: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        if self.by_shape is None:
            return None
        return out * self._mask(out)
