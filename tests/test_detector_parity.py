"""The detector gives, per image, what the reference extractors give for that image alone, unpadded."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from detector_tiny import BUTD, TINY, TINY_BUTD

from vlmixer.pipeline.detector import Detector
from vlmixer.pipeline.detector.model import attribute_topk, nms_keep, stage_extents
from vlmixer.pipeline.detector.selection import dense_class_nms, pairwise_iou, select_boxes


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    # sizes chosen so the resized inputs are not multiples of 16 or 32 (odd extents at every stride)
    return [skimage.data.astronaut(), skimage.data.chelsea(), rng.integers(0, 255, size=(180, 250, 3), dtype=np.uint8),
            rng.integers(0, 255, size=(151, 421, 3), dtype=np.uint8)]


@pytest.mark.parametrize("stem", ["pytorch", "caffe"])
def test_stage_extents_are_the_unpadded_feature_sizes(stem):
    overrides = [] if stem == "pytorch" else TINY_BUTD
    det = Detector.from_config(TINY if stem == "pytorch" else BUTD, overrides=overrides)
    backbone = det.model.backbone
    for h, w in [(224, 301), (213, 320), (77, 320), (224, 224), (95, 33)]:
        x = torch.zeros((1, 3, h, w))
        with torch.no_grad():
            s2 = backbone.stem.conv1(x)
            s4 = backbone.stem(x)
            s16 = backbone(x)["res4"]
        ext = stage_extents(h, w, stem)
        assert ext[2] == tuple(s2.shape[-2:]) and ext[4] == tuple(s4.shape[-2:]), (h, w)
        assert ext[16] == tuple(s16.shape[-2:]), (h, w)
        assert ext[16] == (-(-ext[8][0] // 2), -(-ext[8][1] // 2))


def _same(got, alone) -> None:
    assert len(got) == len(alone) and len(got) >= 10
    np.testing.assert_array_equal(got.concepts, alone.concepts)
    np.testing.assert_allclose(got.boxes, alone.boxes, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(got.confidences, alone.confidences, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.features, alone.features, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.attr_ids, alone.attr_ids)
    np.testing.assert_allclose(got.attr_scores, alone.attr_scores, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config,overrides", [(TINY, []), (BUTD, TINY_BUTD)], ids=["vinvl", "butd"])
def test_padded_batch_equals_each_image_alone_unpadded(images, config, overrides):
    det = Detector.from_config(config, overrides=overrides)
    assert int(det.cfg.VLMIXER.SIZE_DIVISIBILITY) == 0  # the references pad nothing at batch size 1
    items = [(*det.preprocess(im), im.shape[:2]) for im in images]
    assert len({tuple(t.shape) for t, _, _ in items}) == len(items)  # mixed sizes: the batch pads
    batch = det.detect_preprocessed(items)
    for item, got in zip(items, batch):
        (alone,) = det.detect_preprocessed([item])
        _same(got, alone)


def test_batch_padding_would_change_border_results(images):
    """Control: the per-image extents matter. Padding each image to 32 alone (the old behaviour)
    changes the features of some image whose size is not a multiple of 32."""
    det0 = Detector.from_config(TINY)
    det32 = Detector.from_config(TINY, overrides=["VLMIXER.SIZE_DIVISIBILITY=32"])
    item = (*det0.preprocess(images[3]), images[3].shape[:2])
    (a,) = det0.detect_preprocessed([item])
    (b,) = det32.detect_preprocessed([item])
    diff = len(a) != len(b) or not np.allclose(a.features, b.features, atol=1e-4)
    assert diff


# ------------------------------------------------------------------ NMS IoU convention
def test_nms_convention_constructed_case():
    # 10x10 boxes shifted by 6: exact IoU 40/160 = 0.25; with +1 widths 11*5/(2*121-55) = 0.294...
    # and shifted by 5.5: exact 45/155 = 0.290, +1: 60.5/181.5 = 0.333 > 0.3
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.5, 0.0, 15.5, 10.0]])
    s = torch.tensor([0.9, 0.8])
    assert pairwise_iou(a[:1], a[1:], legacy=False).item() < 0.3 < pairwise_iou(a[:1], a[1:], legacy=True).item()
    assert nms_keep(a, s, 0.3, plus_one=True).tolist() == [0]  # +1 areas: suppressed
    assert nms_keep(a, s, 0.3, plus_one=False).tolist() == [0, 1]  # torchvision: kept
    probs = torch.tensor([[0.9, 0.05], [0.8, 0.1]])
    (plus,) = select_boxes([a], [probs], legacy=True, min_boxes=0, score_thresh=0.05)
    (tv,) = select_boxes([a], [probs], legacy=False, min_boxes=0, score_thresh=0.05)
    assert plus.indices.tolist() == [0, 1] and plus.labels.tolist() == [0, 1]  # box 1 survives only in class 1
    assert tv.indices.tolist() == [0, 1] and tv.labels.tolist() == [0, 0]
    # IoU exactly at the threshold: suppressed only with suppress_equal (maskrcnn-benchmark's CPU kernel)
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])  # exact IoU 0.5
    assert nms_keep(b, s, 0.5, plus_one=False).tolist() == [0, 1]
    assert nms_keep(b, s, 0.5, plus_one=False, suppress_equal=True).tolist() == [0]
    # IoU 3/10 is float32(0.3) = 0.300000012: above torchvision's double 0.3, not above the CUDA kernel's float
    c = torch.tensor([[0.0, 0.0, 6.5, 1.0], [3.5, 0.0, 10.0, 1.0]])
    assert pairwise_iou(c[:1], c[1:], legacy=False).item() == np.float32(0.3)
    assert nms_keep(c, s, 0.3, plus_one=False).tolist() == [0]
    assert dense_class_nms(c, s[:, None], 0.3, legacy=False)[:, 0].tolist() == [True, False]


def test_nms_convention_changes_only_near_threshold():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand((200, 2), generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand((200, 2), generator=g) * 80 + 2], dim=1)
    scores = torch.softmax(torch.randn((200, 40), generator=g) * 3, dim=1)
    plus = dense_class_nms(boxes, scores, 0.3, legacy=True)
    exact = dense_class_nms(boxes, scores, 0.3, legacy=False)
    differ = torch.nonzero((plus != exact).any(dim=0)).flatten().tolist()
    assert differ  # the switch matters on this case
    straddle = (pairwise_iou(boxes, boxes, True) > 0.3) != (pairwise_iou(boxes, boxes, False) > 0.3)
    near = (pairwise_iou(boxes, boxes, False) - 0.3).abs() < 0.05
    assert bool((near | ~straddle).all())  # the conventions disagree only within 0.05 of the threshold
    for c in differ:  # every changed class has a kept box with a pair whose IoU straddles the threshold
        rows = torch.nonzero(plus[:, c] | exact[:, c]).flatten()
        assert bool(straddle[rows][:, rows].any()), c


# ------------------------------------------------------------------ attributes
def test_attribute_threshold_is_strict():
    p = torch.tensor([[0.5, 0.05, 0.2, 0.0500001, 0.1999999]], dtype=torch.float32)
    ids, scores = attribute_topk(p, 0.05, 4)
    assert ids.tolist() == [[1, 3, 2, -1]]  # 0.05 exactly is dropped; index 0 ("no attribute") never kept
    assert scores[0, 3].item() == 0.0 and scores[0, 0].item() == pytest.approx(0.2)


# ------------------------------------------------------------------ ties and the prefilter
def stable_reference(boxes, probs, iou=0.3, thr=0.2, min_boxes=10, max_boxes=100):
    """filter_results_peter with a stable greedy NMS written as plainly as possible."""
    n, c = probs.shape
    overlap = (pairwise_iou(boxes, boxes, True) > iou).tolist()
    keep = torch.zeros((n, c), dtype=torch.bool)
    for j in range(c):
        col = probs[:, j].tolist()
        order = sorted(range(n), key=lambda i: -col[i])  # Python's sort is stable
        dead = [False] * n
        for i in order:
            if dead[i]:
                continue
            keep[i, j] = True
            for k in range(n):
                if overlap[i][k]:
                    dead[k] = True
    best, labels = (probs * keep).max(dim=1)
    nz = torch.nonzero(best > 0).flatten()
    order = sorted(range(len(nz)), key=lambda i: -best[nz[i]].item())
    n_thr = int((best[nz] >= thr).sum())
    k = min(max(n_thr, min_boxes), max_boxes)
    idx = nz[order[:k]]
    return idx, labels[idx], best[idx]


def tie_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    n, c = 60, 30
    base = torch.rand((n // 3, 2), generator=g) * 100
    xy = base.repeat(3, 1) + torch.randint(0, 3, (n, 2), generator=g).float() * 4  # near-duplicates
    boxes = torch.cat([xy, xy + 30], dim=1)
    levels = torch.tensor([0.0, 0.004, 0.01, 0.03, 0.2, 0.3])  # few values: many exact ties, some at 0.01
    probs = levels[torch.randint(0, len(levels), (n, c), generator=g)]
    return boxes, probs


def test_selection_does_not_depend_on_the_prefilter_with_ties():
    changed = 0
    for seed in range(40):
        boxes, probs = tie_case(seed)
        ref = stable_reference(boxes, probs)
        for pre in (0.01, 0.0, 0.2):
            (sel,) = select_boxes([boxes], [probs], prefilter=pre)
            assert sel.indices.tolist() == ref[0].tolist(), (seed, pre)
            assert sel.labels.tolist() == ref[1].tolist(), (seed, pre)
            assert torch.equal(sel.scores, ref[2]), (seed, pre)
        (a,) = select_boxes([boxes], [probs], prefilter=0.01)
        (b,) = select_boxes([boxes], [probs], prefilter=0.0)
        changed += int(not torch.equal(a.indices, b.indices))
    assert changed == 0


# ------------------------------------------------------------------ degenerate boxes
def test_very_flat_image_keeps_no_degenerate_box():
    det = Detector.from_config(TINY)
    img = np.random.default_rng(1).integers(0, 255, size=(20, 10000, 3), dtype=np.uint8)
    (d,) = det([img])  # resized to 1 x 320: every proposal is under a pixel high in the original
    assert len(d) == 0 and d.features.shape == (0, det.feature_dim)
    assert d.empty_reason and "minimum box size of 1 px" in d.empty_reason and "10000x20" in d.empty_reason
    (loose,) = Detector.from_config(TINY, overrides=["VLMIXER.MIN_BOX_PIXELS=0.0"])([img])
    assert len(loose) >= 10 and np.all(loose.boxes[:, 3] - loose.boxes[:, 1] == 0)  # what the filter removes
    (ok,) = det([np.random.default_rng(2).integers(0, 255, size=(200, 10000, 3), dtype=np.uint8)])
    assert len(ok) >= 10 and np.all(ok.boxes[:, 3] - ok.boxes[:, 1] >= 1) and np.all(ok.boxes[:, 2] - ok.boxes[:, 0] >= 1)


def test_caffe_resize_is_opencv_linear():
    from vlmixer.pipeline.detector.api import caffe_resize, caffe_scale, preprocess_image

    ramp = np.array([[0, 40, 80, 200]], np.uint8)[:, :, None].repeat(3, axis=2)  # 1 x 4
    out = caffe_resize(ramp, 2.0)[0].numpy()  # 2 x 8: source x = (x + 0.5) / 2 - 0.5, edges replicated
    np.testing.assert_allclose(out[0], [0, 10, 30, 50, 70, 110, 170, 200])
    np.testing.assert_allclose(out[1], out[0])
    assert caffe_scale(300, 451, 600, 1000) == 2.0
    assert caffe_scale(151, 421, 600, 1000) == pytest.approx(1000 / 421)  # round(600/151*421) > 1000
    t, s = preprocess_image(skimage.data.chelsea(), 600, 1000, rule="caffe")
    assert t.dtype == torch.float32 and tuple(t.shape) == (3, 600, 902) and s == 2.0
    assert float(t[0, 0, 0]) == float(skimage.data.chelsea()[0, 0, 2])  # BGR, at the corner the pixel itself


def test_one_image_runs_unpadded():
    det = Detector.from_config(TINY)
    seen = []
    h = det.model.backbone.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    try:
        det([skimage.data.chelsea()])  # resized to 213 x 320: not a multiple of 32
    finally:
        h.remove()
    assert seen == [(1, 3, 213, 320)]
