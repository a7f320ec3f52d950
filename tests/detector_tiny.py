"""Tiny variants of the bundled detector configs for tests (random weights, seconds on a CPU)."""
from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detector"
TINY = CONFIGS / "tiny.yaml"
BUTD = CONFIGS / "butd_r101c4.yaml"

# bottom-up attention's settings (Caffe stem, dilated res5, RoIPool, its RPN order) at tiny width
TINY_BUTD = [
    "VLMIXER.RESNET_BLOCKS=[1,1,1,1]", "MODEL.RESNETS.WIDTH_PER_GROUP=8", "MODEL.RESNETS.STEM_OUT_CHANNELS=16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS=32", "MODEL.RPN.CONV_DIMS=[32]", "MODEL.ROI_HEADS.NUM_CLASSES=80",
    "VLMIXER.ATTRIBUTE.NUM_ATTRIBUTES=20", "VLMIXER.ATTRIBUTE.CLS_EMBED_DIM=32", "VLMIXER.ATTRIBUTE.HIDDEN_DIM=64",
    "INPUT.MIN_SIZE_TEST=224", "INPUT.MAX_SIZE_TEST=320", "MODEL.RPN.PRE_NMS_TOPK_TEST=600",
    "MODEL.RPN.POST_NMS_TOPK_TEST=64", "VLMIXER.RANDOM_INIT.IMAGE_SIZE=[224,320]",
]
