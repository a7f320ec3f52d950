"""X-VLM objectives (Zeng et al., ICML 2022): locate a visual concept from its text (box regression, L1 + GIoU on
normalised (cx, cy, w, h)), and ITC/ITM at concept (patch) granularity.

A visual concept here is one gallery patch: its box is the detector's, its
visual input `[CLS] patch [SEP]`; its text is the grounded word of the
caption that names it, or the concept's name (a tag) when the caption names
none of the image's concepts. The box is predicted from the fused [CLS] of
`[CLS] concept text [SEP] image patches [SEP]` by an MLP with a sigmoid.
"""
from __future__ import annotations

import torch
from torch import nn


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matching rows of two (N, 4) x1y1x2y2 box sets (Rezatofighi et al. 2019).

    GIoU = IoU - |C \\ (A u B)| / |C|, C the smallest box enclosing both.
    """
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp_min(1e-7)
    c_lt, c_rb = torch.min(a[:, :2], b[:, :2]), torch.max(a[:, 2:], b[:, 2:])
    area_c = (c_rb - c_lt).clamp_min(0).prod(-1)
    return iou - (area_c - union) / area_c.clamp_min(1e-7)


def box_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X-VLM's (L1, GIoU) box losses on (N, 4) normalised cx,cy,w,h: the L1 summed over the 4
    coordinates and 1 - GIoU, each averaged over the N boxes."""
    pred, target = pred.float(), target.float()
    if pred.shape[0] == 0:
        z = pred.sum() * 0.0
        return z, z
    l1 = (pred - target).abs().sum(1).mean()
    g = (1 - giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))).mean()
    return l1, g


class BoxHead(nn.Module):
    """Fused [CLS] -> (cx, cy, w, h) in [0, 1]: X-VLM's bbox_head (Linear, GELU, LayerNorm, Linear, sigmoid)."""

    def __init__(self, hidden: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps),
                                 nn.Linear(hidden, 4))

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(cls).float())
