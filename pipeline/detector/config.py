"""Detector configs: detectron2's CfgNode (`get_cfg()`) plus the product's keys under `VLMIXER`.

Every key the product adds is declared and commented here, once; a yaml file
or an override naming an unknown key is a `ConfigError` (detectron2's merge
refuses unknown keys, and we turn its KeyError into our message).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vlmixer.config import resolve_config
from vlmixer.errors import ConfigError
from vlmixer.pipeline.detector._compat import ensure_detectron2


def add_vlmixer_config(cfg: Any) -> None:
    """Declare the product's detector keys (with defaults) on a detectron2 CfgNode."""
    from detectron2.config import CfgNode as CN

    cfg.VLMIXER = CN()
    # Short name recorded in provenance (e.g. "vinvl_x152c4").
    cfg.VLMIXER.NAME = ""
    # Blocks per stage res2, res3, res4, res5. Empty: from MODEL.RESNETS.DEPTH
    # (50/101/152). Lets tiny test configs use e.g. [1, 1, 1, 1].
    cfg.VLMIXER.RESNET_BLOCKS = []
    # Stem max pool: "pytorch" (3x3/2, pad 1; maskrcnn-benchmark, VinVL) or
    # "caffe" (3x3/2, pad 0, ceil mode; the Caffe bottom-up-attention model).
    cfg.VLMIXER.STEM_POOL = "pytorch"
    # maskrcnn-benchmark box conventions: anchors of Detectron's generate_anchors
    # (centred at (stride-1)/2, +1 widths), +1 widths in RPN box decoding and
    # clipping to (w-1, h-1). false: detectron2's conventions.
    cfg.VLMIXER.LEGACY_BOXES = True
    # End of a decoded box (with LEGACY_BOXES): "detectron" x2 = ctr + w/2 - 1
    # (Detectron, maskrcnn-benchmark, VinVL) or "py_faster_rcnn" x2 = ctr + w/2
    # (py-faster-rcnn, kept by the Caffe bottom-up attention model and its ports).
    cfg.VLMIXER.BOX_DECODE = "detectron"
    # IoU of the RPN NMS and the box selection: "plus_one" (areas and overlaps
    # with +1 widths: maskrcnn-benchmark's kernels, as in the first release of
    # VinVL's code, which produced the released features) or "torchvision"
    # (exact areas: torchvision.ops.nms, which VinVL's later code calls).
    cfg.VLMIXER.NMS_IOU = "plus_one"
    # Suppress at IoU >= threshold (maskrcnn-benchmark's CPU kernel, which
    # bottom-up-attention.pytorch runs) instead of IoU > threshold (its CUDA
    # kernel and torchvision).
    cfg.VLMIXER.NMS_SUPPRESS_EQUAL = False
    # RPN order of bottom-up-attention.pytorch: decode every anchor, clip, drop
    # empty boxes and boxes not larger than MODEL.PROPOSAL_GENERATOR.MIN_SIZE
    # pixels of the original image, then the pre-NMS top-k. false:
    # maskrcnn-benchmark's (top-k, decode, clip, MIN_SIZE in network pixels).
    cfg.VLMIXER.RPN_FILTER_BEFORE_TOPK = False
    # Proposals narrower or lower than this many pixels of the ORIGINAL image
    # (scaled back and clipped, as the gallery stores boxes) are dropped before
    # the box selection: a box of zero height is no picture. An image left with
    # none gives no detections (the gallery records it with a reason).
    cfg.VLMIXER.MIN_BOX_PIXELS = 1.0
    # eps of the frozen BatchNorm layers. maskrcnn-benchmark uses none (0.0);
    # detectron2 uses 1e-5.
    cfg.VLMIXER.FROZEN_BN_EPS = 0.0
    # An image alone is padded to a multiple of this (0: not padded, as VinVL's
    # and bottom-up attention's extractors run); a batch gives each image
    # exactly that result (model.PadMasker).
    cfg.VLMIXER.SIZE_DIVISIBILITY = 0
    # Test-time resize: "maskrcnn" (maskrcnn-benchmark's sizes, PIL bilinear as
    # torchvision does on PIL images; VinVL) or "caffe" (py-faster-rcnn's scale,
    # OpenCV linear resize of the float image; bottom-up attention).
    cfg.VLMIXER.RESIZE = "maskrcnn"
    # Images per forward pass in Detector.__call__.
    cfg.VLMIXER.BATCH_SIZE = 4
    # "none", "bf16" or "fp16": autocast of the forward pass on CUDA (ignored on CPU).
    cfg.VLMIXER.AMP = "none"
    # Use channels_last memory format on CUDA.
    cfg.VLMIXER.CHANNELS_LAST = False

    # Box selection "NMS filter 1" (bottom-up attention's, as VinVL extracts). The per-class NMS IoU is
    # MODEL.ROI_HEADS.NMS_THRESH_TEST, the score threshold
    # MODEL.ROI_HEADS.SCORE_THRESH_TEST and the maximum TEST.DETECTIONS_PER_IMAGE.
    cfg.VLMIXER.SELECTION = CN()
    # At least this many boxes per image (when the image has that many proposals
    # with a surviving class).
    cfg.VLMIXER.SELECTION.MIN_DETECTIONS = 10
    # First-pass pair threshold of the exact two-pass selection (see selection.py);
    # speed only, never the result. 0 = all pairs in one pass.
    cfg.VLMIXER.SELECTION.PREFILTER = 0.01
    # Label and confidence reported per kept box: "surviving" (the class whose
    # score survived NMS, highest; VinVL's filter_results_peter) or "argmax"
    # (the box's most probable class and its probability, as
    # bottom-up-attention.pytorch's extractor writes objects_id / objects_conf).
    cfg.VLMIXER.SELECTION.LABEL = "surviving"
    # Run the selection's NMS on boxes in original-image pixels (the +1 IoU is
    # not scale-free): bottom-up-attention.pytorch divides by the image scale
    # first; VinVL selects in network-input pixels.
    cfg.VLMIXER.SELECTION.IN_ORIGINAL_PIXELS = False

    # Attribute head: class embedding (num_classes + 1 -> CLS_EMBED_DIM)
    # concatenated with the pooled feature -> fc HIDDEN_DIM -> ReLU ->
    # NUM_ATTRIBUTES + 1 scores (index 0 = "no attribute").
    cfg.VLMIXER.ATTRIBUTE = CN()
    cfg.VLMIXER.ATTRIBUTE.ENABLED = True
    # Attributes without the "no attribute" entry (VinVL 524, bottom-up attention 400).
    cfg.VLMIXER.ATTRIBUTE.NUM_ATTRIBUTES = 524
    cfg.VLMIXER.ATTRIBUTE.CLS_EMBED_DIM = 256
    cfg.VLMIXER.ATTRIBUTE.HIDDEN_DIM = 512
    # Keep attributes with softmax score strictly above this (VinVL: > 0.05).
    cfg.VLMIXER.ATTRIBUTE.SCORE_THRESH = 0.05
    # Class fed to the attribute head's embedding: "selected" (the box's
    # reported class; VinVL) or "argmax_with_background" (argmax of all class
    # logits, background included; bottom-up attention).
    cfg.VLMIXER.ATTRIBUTE.LABEL_INPUT = "selected"
    # At most this many attributes per box (arrays are padded to it with -1 / 0).
    cfg.VLMIXER.ATTRIBUTE.MAX_PER_BOX = 16

    # Vocabularies, given by the user (never read from a fixed location). A
    # label map json (`label_to_idx`, `attribute_to_idx`, 1-based) or
    # vocabulary txt files; a converted checkpoint carries its own.
    cfg.VLMIXER.LABELMAP = ""
    cfg.VLMIXER.CONCEPT_VOCAB = ""
    cfg.VLMIXER.ATTRIBUTE_VOCAB = ""

    # Random weights (no checkpoint): seeded init, then the frozen BN statistics
    # are set from one synthetic image so activations stay in range.
    cfg.VLMIXER.RANDOM_INIT = CN()
    cfg.VLMIXER.RANDOM_INIT.SEED = 0
    cfg.VLMIXER.RANDOM_INIT.CALIBRATE = True
    # (height, width) of the synthetic calibration image; multiples of 32.
    cfg.VLMIXER.RANDOM_INIT.IMAGE_SIZE = [320, 480]


def _parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.3")
    key, value = item.split("=", 1)
    return key.strip(), value


def load_detector_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """get_cfg() + VLMIXER keys <- yaml file <- KEY=VALUE overrides; frozen CfgNode.

    Unknown keys (in the file or an override) raise ConfigError naming them.
    """
    ensure_detectron2()
    from detectron2.config import get_cfg

    p = resolve_config(path, "detector")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: cannot parse yaml ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a detector config must hold a mapping")
    if "_BASE_" in data:
        raise ConfigError(f"{p}: _BASE_ is not supported; write the full config")
    cfg = get_cfg()
    add_vlmixer_config(cfg)
    try:
        cfg.merge_from_other_cfg(type(cfg)(data))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"{p}: {e}") from None
    pairs: list[str] = []
    for item in overrides:
        k, v = _parse_override(item)
        pairs += [k, v]
    try:
        cfg.merge_from_list(pairs)
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"override: {e}") from None
    if not cfg.VLMIXER.NAME:
        cfg.VLMIXER.NAME = p.stem
    validate_config(cfg, where=str(p))
    cfg.freeze()
    return cfg


def validate_config(cfg: Any, where: str = "config") -> None:
    """Refuse configs the product cannot run, before any model is built."""
    def bad(msg: str) -> None:
        raise ConfigError(f"{where}: {msg}")

    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        bad("MODEL.META_ARCHITECTURE must be GeneralizedRCNN (Faster R-CNN C4)")
    if cfg.MODEL.ROI_HEADS.NAME != "VLMixerRes5ROIHeads":
        bad("MODEL.ROI_HEADS.NAME must be VLMixerRes5ROIHeads (the product's C4 heads)")
    if list(cfg.MODEL.RPN.IN_FEATURES) != list(cfg.MODEL.ROI_HEADS.IN_FEATURES) or len(cfg.MODEL.RPN.IN_FEATURES) != 1:
        bad("C4 models use one feature map for RPN and ROI heads (e.g. ['res4'])")
    if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
        bad("mask and keypoint heads are not supported")
    blocks = list(cfg.VLMIXER.RESNET_BLOCKS)
    if blocks and (len(blocks) != 4 or any(int(b) < 1 for b in blocks)):
        bad("VLMIXER.RESNET_BLOCKS needs 4 positive block counts (res2..res5)")
    if not blocks and cfg.MODEL.RESNETS.DEPTH not in (50, 101, 152):
        bad("MODEL.RESNETS.DEPTH must be 50, 101 or 152 (or set VLMIXER.RESNET_BLOCKS)")
    if cfg.VLMIXER.STEM_POOL not in ("pytorch", "caffe"):
        bad("VLMIXER.STEM_POOL must be 'pytorch' or 'caffe'")
    if cfg.VLMIXER.AMP not in ("none", "bf16", "fp16"):
        bad("VLMIXER.AMP must be none, bf16 or fp16")
    sel = cfg.VLMIXER.SELECTION
    if sel.MIN_DETECTIONS < 0 or cfg.TEST.DETECTIONS_PER_IMAGE < sel.MIN_DETECTIONS:
        bad("need 0 <= VLMIXER.SELECTION.MIN_DETECTIONS <= TEST.DETECTIONS_PER_IMAGE")
    if not 0.0 < cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST <= 1.0:
        bad("MODEL.ROI_HEADS.NMS_THRESH_TEST must be in (0, 1]")
    if cfg.INPUT.FORMAT != "BGR":
        bad("INPUT.FORMAT must be BGR (the reference detectors take BGR 0-255)")
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES < 1:
        bad("MODEL.ROI_HEADS.NUM_CLASSES must be >= 1")
    if cfg.VLMIXER.SIZE_DIVISIBILITY < 0 or cfg.VLMIXER.SIZE_DIVISIBILITY % 16 != 0:
        bad("VLMIXER.SIZE_DIVISIBILITY must be 0 (no padding) or a multiple of the stride 16")
    choices = {
        "VLMIXER.BOX_DECODE": (cfg.VLMIXER.BOX_DECODE, ("detectron", "py_faster_rcnn")),
        "VLMIXER.NMS_IOU": (cfg.VLMIXER.NMS_IOU, ("plus_one", "torchvision")),
        "VLMIXER.RESIZE": (cfg.VLMIXER.RESIZE, ("maskrcnn", "caffe")),
        "VLMIXER.SELECTION.LABEL": (cfg.VLMIXER.SELECTION.LABEL, ("surviving", "argmax")),
        "VLMIXER.ATTRIBUTE.LABEL_INPUT": (cfg.VLMIXER.ATTRIBUTE.LABEL_INPUT, ("selected", "argmax_with_background")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            bad(f"{key} must be one of {', '.join(allowed)} (got {value!r})")
    if cfg.VLMIXER.MIN_BOX_PIXELS < 0:
        bad("VLMIXER.MIN_BOX_PIXELS must be >= 0")
    if cfg.MODEL.RESNETS.RES5_DILATION not in (1, 2):
        bad("MODEL.RESNETS.RES5_DILATION must be 1 or 2")
    h, w = cfg.VLMIXER.RANDOM_INIT.IMAGE_SIZE
    if h % 32 or w % 32:
        bad("VLMIXER.RANDOM_INIT.IMAGE_SIZE must be multiples of 32")


def config_sha256(cfg: Any) -> str:
    """Hash of the resolved config text (file + overrides), recorded in provenance."""
    return hashlib.sha256(cfg.dump().encode("utf-8")).hexdigest()
