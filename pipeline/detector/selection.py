"""Box selection "NMS filter 1" (bottom-up attention / VinVL), vectorised over all classes.

The reference (maskrcnn-benchmark `PostProcessor.filter_results_peter`, used
by the VinVL extraction with `TEST.IGNORE_BOX_REGRESSION True`) does, per image:

1. for every foreground class j: greedy NMS at 0.3 over *all* proposal boxes
   scored by their class-j probability (the boxes are the proposals: no box
   regression, so a feature describes exactly its box);
2. each box keeps its maximal surviving class score (and that class);
   boxes with no surviving class are dropped;
3. sort by that score, keep those >= the score threshold, but at least
   `min_boxes` and at most `max_boxes`.

Step 1 is a Python loop over 1594 classes in the reference, the bottleneck
earlier extractors report. Here it has no loop over classes, with two exact
strategies:

* sparse: only (box, class) pairs with score >= t (t <= the score threshold)
  can decide a box whose result is >= t, because a box is only ever
  suppressed by higher-scored boxes of its class. Those pairs go through ONE
  `torchvision.ops.nms` call for the whole batch, each (image, class) group
  shifted to its own coordinate range (the coordinate trick of
  `torchvision.ops.batched_nms`, done here in float64 so shifted coordinates
  keep their precision; `batched_nms` itself switches to a Python loop over
  classes above 4,000 boxes on CPU). The result is exact whenever at least
  `min_boxes` boxes end with a score >= t, which is checked;
* dense (fallback, and for near-uniform scores such as random weights):
  greedy NMS of all classes at once, iterating over score *ranks* (one step
  per proposal, each step a (classes x proposals) tensor operation) with the
  proposal-proposal IoU matrix computed once.

`legacy=True` uses the maskrcnn-benchmark +1 convention in IoU
(w = x2 - x1 + 1): for torchvision's NMS that is the IoU of boxes with x2, y2
shifted by +1, so it is exact, not approximate.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import nms as tv_nms


@dataclass
class Selection:
    """Selected boxes of one image: indices into its proposals, 0-based class ids, scores (desc)."""

    indices: torch.Tensor  # (k,) int64
    labels: torch.Tensor  # (k,) int64
    scores: torch.Tensor  # (k,) float


def pairwise_iou(a: torch.Tensor, b: torch.Tensor, legacy: bool) -> torch.Tensor:
    """IoU matrix (len(a), len(b)); `legacy` adds 1 to widths and heights (maskrcnn-benchmark)."""
    one = 1.0 if legacy else 0.0
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + one).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def dense_class_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thresh: float, legacy: bool) -> torch.Tensor:
    """Greedy NMS of every class column of `scores` (N, C) over the same N boxes at once.

    Returns keep (N, C) bool, identical to running greedy NMS per class. The
    loop runs over the N score ranks, never over the C classes.
    """
    n, c = scores.shape
    keep = torch.zeros((c, n), dtype=torch.bool, device=scores.device)
    if n == 0 or c == 0:
        return keep.t()
    overlap = pairwise_iou(boxes, boxes, legacy) > iou_thresh  # (N, N)
    order = torch.argsort(scores.t(), dim=1, descending=True, stable=True)  # (C, N) box at each rank
    suppressed = torch.zeros((c, n), dtype=torch.bool, device=scores.device)
    for r in range(n):
        b = order[:, r : r + 1]  # (C, 1)
        alive = ~suppressed.gather(1, b)  # (C, 1)
        keep.scatter_(1, b, alive)
        suppressed |= alive & overlap[b[:, 0]]
    return keep.t()


def _sparse_class_nms(
    boxes: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], t: float, iou_thresh: float, legacy: bool
) -> list[torch.Tensor]:
    """Per-class NMS of the pairs with score >= t of all images in one NMS call.

    Returns, per image, the (N, C) matrix of surviving scores (0 elsewhere).
    """
    device = scores[0].device
    c = scores[0].shape[1]
    all_boxes, all_scores, groups, owners = [], [], [], []
    for i, (bx, sc) in enumerate(zip(boxes, scores)):
        box_idx, cls_idx = torch.nonzero(sc >= t, as_tuple=True)
        all_boxes.append(bx[box_idx].double())
        all_scores.append(sc[box_idx, cls_idx])
        groups.append(cls_idx + i * c)
        owners.append(torch.stack([box_idx, cls_idx]))
    cat_boxes = torch.cat(all_boxes)
    out = [torch.zeros_like(sc) for sc in scores]
    if cat_boxes.numel() == 0:
        return out
    if legacy:
        cat_boxes = cat_boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=cat_boxes.dtype, device=device)
    span = cat_boxes.max() - cat_boxes.min() + 2.0
    offsets = torch.cat(groups).to(cat_boxes.dtype) * span
    kept = tv_nms(cat_boxes + offsets[:, None], torch.cat(all_scores).double(), iou_thresh)
    flags = torch.zeros(cat_boxes.shape[0], dtype=torch.bool, device=device)
    flags[kept] = True
    start = 0
    for i, own in enumerate(owners):
        m = own.shape[1]
        f = flags[start : start + m]
        sc = scores[i]
        out[i][own[0][f], own[1][f]] = sc[own[0][f], own[1][f]]
        start += m
    return out


def _finish(kept_scores: torch.Tensor, score_thresh: float, min_boxes: int, max_boxes: int) -> Selection:
    best, labels = kept_scores.max(dim=1)
    nz = torch.nonzero(best > 0, as_tuple=True)[0]
    best, labels = best[nz], labels[nz]
    order = torch.argsort(best, descending=True, stable=True)
    n_thr = int((best >= score_thresh).sum())
    k = min(max(n_thr, min_boxes), max_boxes) if max_boxes > 0 else max(n_thr, min_boxes)
    order = order[:k]
    return Selection(indices=nz[order], labels=labels[order], scores=best[order])


def select_boxes(
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    *,
    iou_thresh: float = 0.3,
    score_thresh: float = 0.2,
    min_boxes: int = 10,
    max_boxes: int = 100,
    legacy: bool = True,
    prefilter: float = 0.01,
    max_pairs: int = 32768,
) -> list[Selection]:
    """NMS filter 1 for a batch: `boxes[i]` (N_i, 4) proposals, `scores[i]` (N_i, C) foreground
    class probabilities (background column removed). Returns one `Selection` per image.

    `prefilter` is the pair threshold t of the sparse strategy (min(prefilter,
    score_thresh) is used; 0 forces the dense strategy); `max_pairs` bounds the
    pairs one sparse NMS call may take before the dense strategy is used.
    The result does not depend on either: both strategies are exact.
    """
    if len(boxes) != len(scores):
        raise ValueError("select_boxes: boxes and scores differ in length")
    if not boxes:
        return []
    t = min(prefilter, score_thresh)
    need_dense = [True] * len(boxes)
    results: list[Selection | None] = [None] * len(boxes)
    if t > 0:
        n_pairs = [int((sc >= t).sum()) for sc in scores]
        sparse_ids = [i for i, n in enumerate(n_pairs) if n > 0]
        if sparse_ids and sum(n_pairs[i] for i in sparse_ids) <= max_pairs:
            kept = _sparse_class_nms([boxes[i] for i in sparse_ids], [scores[i] for i in sparse_ids],
                                     t, iou_thresh, legacy)
            for i, ks in zip(sparse_ids, kept):
                sel = _finish(ks, score_thresh, min_boxes, max_boxes)
                # Every box found here has its exact score (>= t); boxes not found score < t.
                # So the result is exact unless the minimum asks for boxes below t.
                if int(sel.scores.numel()) >= min(min_boxes, scores[i].shape[0]):
                    results[i] = sel
                    need_dense[i] = False
    for i, dense in enumerate(need_dense):
        if dense:
            keep = dense_class_nms(boxes[i], scores[i], iou_thresh, legacy)
            results[i] = _finish(scores[i] * keep, score_thresh, min_boxes, max_boxes)
    return [r for r in results if r is not None]
