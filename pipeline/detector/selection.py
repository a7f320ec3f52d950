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
earlier extractors report. Here (`class_nms`) the per-class greedy NMS of
every class of every image in the batch runs at once: the loop goes over
score ranks, each (image, class) row keeps its suppressed boxes as a bitset,
and the box-box overlap matrix is computed once per image (the boxes are the
same for every class). Two passes keep it cheap and exact:

* first only (box, class) pairs with score >= t (t <= the score threshold)
  take part: a box is only ever suppressed by higher-scored boxes of its
  class, so their keep flags are exact, and every box found has its exact
  score; for a trained detector (peaked class scores) that is a few pairs
  per class;
* an image where fewer than `min_boxes` boxes were found (so the minimum
  would need boxes below t) is redone with all pairs (near-uniform scores,
  e.g. random weights).

Why not `torchvision.ops.batched_nms`: above 4,000 box coordinates on CPU
(20,000 on CUDA) it runs a Python loop over the classes, and its single-call
path is quadratic in the number of (box, class) pairs (478,200 for 300
proposals x 1594 classes); here NMS on the proposals is computed once.

`legacy=True` uses the maskrcnn-benchmark +1 convention in the IoU
(w = x2 - x1 + 1).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


_BITS = 32


def _pack_overlaps(boxes: torch.Tensor, iou_thresh: float, legacy: bool, words: int,
                   suppress_equal: bool = False) -> torch.Tensor:
    """(N, words) int64: bit k of word w is set when box 32w+k overlaps the row's box
    (IoU > t, or >= t with `suppress_equal`)."""
    n = boxes.shape[0]
    iou = pairwise_iou(boxes, boxes, legacy)
    if suppress_equal or legacy:  # maskrcnn-benchmark's kernels: float32 threshold
        overlap = iou >= iou_thresh if suppress_equal else iou > iou_thresh
    else:  # torchvision.ops.nms compares with the threshold as a double
        overlap = iou.double() > iou_thresh
    overlap.fill_diagonal_(True)
    overlap = F.pad(overlap, (0, words * _BITS - n)).view(n, words, _BITS).long()
    weights = torch.ones(_BITS, dtype=torch.long, device=boxes.device) << torch.arange(_BITS, device=boxes.device)
    return (overlap * weights).sum(-1)


def class_nms(boxes: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], iou_thresh: float, legacy: bool,
              min_score: float | None = None, suppress_equal: bool = False) -> list[torch.Tensor]:
    """Greedy NMS of every class column of every image at once, over that image's boxes.

    `scores[i]` is (N_i, C). Only (box, class) pairs with score >= `min_score`
    take part (all pairs when None); their keep flags are exactly those of
    per-class greedy NMS over all boxes, because a box is only ever suppressed
    by higher-scored boxes of its class. Returns per image (N_i, C) bool keep
    flags (False for pairs that did not take part).

    Boxes of equal score are visited in index order (a stable sort), in both
    the sparse and the dense pass, so ties resolve the same way whatever
    `min_score` is.

    The loop runs over score ranks (at most the largest number of pairs of one
    class), never over classes or images; each (image, class) row keeps its
    suppressed boxes as a bitset (32 boxes per int64 word), so a step touches
    rows x N/32 words.
    """
    device = scores[0].device if scores else torch.device("cpu")
    out = [torch.zeros(sc.shape, dtype=torch.bool, device=sc.device) for sc in scores]
    n_max = max((int(b.shape[0]) for b in boxes), default=0)
    if n_max == 0:
        return out
    words = (n_max + _BITS - 1) // _BITS
    packed, orders, counts, rows_img, rows_cls, offsets = [], [], [], [], [], []
    start = 0
    for i, (bx, sc) in enumerate(zip(boxes, scores)):
        n = int(bx.shape[0])
        if n == 0:
            continue
        packed.append(_pack_overlaps(bx, iou_thresh, legacy, words, suppress_equal))
        if min_score is None:
            cls = torch.arange(sc.shape[1], device=device)
            order = torch.argsort(sc.t(), dim=1, descending=True, stable=True)  # (C, n) box at each rank
            count = torch.full((sc.shape[1],), n, dtype=torch.long, device=device)
        else:
            mask = sc >= min_score
            count = mask.sum(dim=0)
            cls = torch.nonzero(count, as_tuple=True)[0]
            count = count[cls]
            k = int(count.max()) if cls.numel() else 0
            part = sc[:, cls].t()
            # the k best of each row hold every pair >= min_score (k >= its count); among them,
            # equal scores in index order (stable), exactly as the dense pass visits them
            top = part.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
            order = top.gather(1, torch.argsort(part.gather(1, top), dim=1, descending=True, stable=True))
        orders.append(order)
        counts.append(count)
        rows_img.append(torch.full_like(cls, i))
        rows_cls.append(cls)
        offsets.append(torch.full_like(cls, start))
        start += n
    if not orders:
        return out
    r_max = max(int(o.shape[1]) for o in orders)
    order = torch.cat([F.pad(o, (0, r_max - o.shape[1])) for o in orders])  # (rows, R) local box indices
    count = torch.cat(counts)
    if order.shape[0] == 0 or r_max == 0:
        return out
    valid = torch.arange(r_max, device=device)[None, :] < count[:, None]
    packed_all = torch.cat(packed)
    order_t = order.t().contiguous()  # (R, rows)
    global_t = order_t + torch.cat(offsets)[None, :]
    word_t = (order_t // _BITS).unsqueeze(-1)
    bit_t = (order_t % _BITS).unsqueeze(-1)
    valid_t = valid.t().contiguous().unsqueeze(-1)
    suppressed = torch.zeros((order.shape[0], words), dtype=torch.long, device=device)
    keep_rank = torch.empty((r_max, order.shape[0]), dtype=torch.bool, device=device)
    for r in range(r_max):
        alive = (((suppressed.gather(1, word_t[r]) >> bit_t[r]) & 1) == 0) & valid_t[r]  # (rows, 1)
        keep_rank[r] = alive[:, 0]
        suppressed |= packed_all.index_select(0, global_t[r]) * alive
    row_img, row_cls = torch.cat(rows_img), torch.cat(rows_cls)
    r_idx, row = torch.nonzero(keep_rank, as_tuple=True)
    img, cls, box = row_img[row], row_cls[row], order[row, r_idx]
    for i in range(len(scores)):
        sel = torch.nonzero(img == i, as_tuple=True)[0]
        if sel.numel():
            out[i][box[sel], cls[sel]] = True
    return out


def dense_class_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thresh: float, legacy: bool,
                    suppress_equal: bool = False) -> torch.Tensor:
    """Keep flags (N, C) of greedy NMS of every class column of `scores` over the same N boxes."""
    return class_nms([boxes], [scores], iou_thresh, legacy, suppress_equal=suppress_equal)[0]


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
    suppress_equal: bool = False,
) -> list[Selection]:
    """NMS filter 1 for a batch: `boxes[i]` (N_i, 4) proposals, `scores[i]` (N_i, C) foreground
    class probabilities (background column removed). Returns one `Selection` per image.

    The first pass takes the pairs with score >= t = min(prefilter, score_thresh);
    images that need more are redone with all pairs (see the module docstring).
    Both passes are exact and visit equal scores in index order, so the
    result does not depend on `prefilter` (0 = all pairs at once), ties
    included. `legacy`: +1 widths in the IoU; `suppress_equal`: IoU >= t
    suppresses (maskrcnn-benchmark's CPU kernel) instead of IoU > t.
    """
    if len(boxes) != len(scores):
        raise ValueError("select_boxes: boxes and scores differ in length")
    results: list[Selection | None] = [None] * len(boxes)
    todo = list(range(len(boxes)))
    t = min(prefilter, score_thresh)
    if t > 0 and todo:
        keeps = class_nms(boxes, scores, iou_thresh, legacy, min_score=t, suppress_equal=suppress_equal)
        redo = []
        for i, keep in zip(todo, keeps):
            sel = _finish(scores[i] * keep, score_thresh, min_boxes, max_boxes)
            # boxes found here have their exact score (>= t); boxes not found score < t
            if sel.indices.numel() >= min(min_boxes, int(scores[i].shape[0])):
                results[i] = sel
            else:
                redo.append(i)
        todo = redo
    if todo:
        keeps = class_nms([boxes[i] for i in todo], [scores[i] for i in todo], iou_thresh, legacy,
                          suppress_equal=suppress_equal)
        for i, keep in zip(todo, keeps):
            results[i] = _finish(scores[i] * keep, score_thresh, min_boxes, max_boxes)
    return [r for r in results if r is not None]
