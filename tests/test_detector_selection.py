"""NMS filter 1: the vectorised selection equals a plain per-class loop (bottom-up attention's box selection)."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

from vlmixer.pipeline.detector.selection import dense_class_nms, pairwise_iou, select_boxes

NUM_CLASSES_WITH_BG = 1595


def reference_nms_filter_1(boxes, scores, iou=0.3, thr=0.2, min_boxes=10, max_boxes=100):
    """maskrcnn-benchmark filter_results_peter, written plainly: a loop over every class."""
    n, c = scores.shape
    mask = torch.zeros_like(scores)
    legacy_boxes = boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])  # +1 convention
    for j in range(c):
        keep = nms(legacy_boxes, scores[:, j], iou)
        mask[keep, j] = 1
    best, labels = (mask * scores).max(dim=1)
    nz = torch.nonzero(best).squeeze(1)
    best, labels = best[nz], labels[nz]
    order = torch.argsort(best, descending=True, stable=True)
    n_thr = int((best >= thr).sum())
    if n_thr < min_boxes:
        order = order[:min_boxes]
    elif n_thr > max_boxes:
        order = order[:max_boxes]
    else:
        order = order[:n_thr]
    return nz[order], labels[order], best[order]


def random_case(seed: int, n: int = 300, temperature: float = 4.0, size: float = 600.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand((n, 2), generator=g) * size
    wh = torch.rand((n, 2), generator=g) * size / 2 + 4
    boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
    logits = torch.randn((n, NUM_CLASSES_WITH_BG), generator=g) * temperature
    probs = torch.softmax(logits, dim=1)[:, 1:]  # background (row 0 in maskrcnn-benchmark) removed
    return boxes, probs


@pytest.mark.parametrize("seed,temperature,prefilter", [
    (0, 4.0, 0.01),   # peaked scores: sparse strategy
    (1, 6.0, 0.01),
    (2, 0.5, 0.01),   # near-uniform scores: falls back to the dense strategy
    (3, 4.0, 0.0),    # dense strategy forced
])
def test_vectorised_selection_equals_per_class_loop(seed, temperature, prefilter):
    boxes, probs = random_case(seed, temperature=temperature)
    ref_idx, ref_lab, ref_sc = reference_nms_filter_1(boxes, probs)
    (sel,) = select_boxes([boxes], [probs], prefilter=prefilter)
    assert torch.equal(sel.indices, ref_idx)
    assert torch.equal(sel.labels, ref_lab)
    assert torch.equal(sel.scores, ref_sc)
    assert 10 <= sel.indices.numel() <= 100
    assert torch.all(sel.scores[:-1] >= sel.scores[1:])


def test_batch_selection_equals_single_images():
    cases = [random_case(s, n=n, temperature=t) for s, n, t in [(5, 300, 4.0), (6, 120, 0.5), (7, 40, 8.0)]]
    batch = select_boxes([b for b, _ in cases], [p for _, p in cases])
    for (b, p), got in zip(cases, batch):
        (one,) = select_boxes([b], [p])
        assert torch.equal(got.indices, one.indices) and torch.equal(got.scores, one.scores)


def test_dense_class_nms_equals_torchvision_per_class():
    boxes, probs = random_case(11, n=80, temperature=1.0)
    probs = probs[:, :50]
    keep = dense_class_nms(boxes, probs, 0.3, legacy=False)
    for j in range(probs.shape[1]):
        ref = torch.zeros(80, dtype=torch.bool)
        ref[nms(boxes, probs[:, j], 0.3)] = True
        assert torch.equal(keep[:, j], ref), j


def test_minimum_and_maximum_boxes():
    boxes, probs = random_case(3, temperature=4.0)
    (few,) = select_boxes([boxes], [probs], score_thresh=0.999)  # nothing above: the minimum
    assert few.indices.numel() == 10
    (many,) = select_boxes([boxes], [probs], score_thresh=0.0, max_boxes=100)
    assert many.indices.numel() == 100
    (empty,) = select_boxes([boxes[:0]], [probs[:0]])
    assert empty.indices.numel() == 0


def test_legacy_iou_adds_one():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    b = torch.tensor([[5.0, 0.0, 14.0, 9.0]])
    assert pairwise_iou(a, b, legacy=True).item() == pytest.approx(50 / 150)
    assert pairwise_iou(a, b, legacy=False).item() == pytest.approx(36 / 126)
