"""Faster R-CNN C4 region detector with attribute head, on detectron2 as VinVL's extractor.

`Detector.from_config(config_path, weights=None, device="cpu")` returns a
callable: list of HxWx3 uint8 RGB images -> list of `Detections`. Without
weights the model is randomly initialised (tests, demo). See README.md here.
"""
from vlmixer.pipeline.detector._compat import ensure_detectron2

ensure_detectron2(load=False)  # cheap: makes a later `import detectron2...` work on this install

from vlmixer.pipeline.detector.api import Detections, Detector, preprocess_image  # noqa: E402

__all__ = ["Detections", "Detector", "preprocess_image"]
