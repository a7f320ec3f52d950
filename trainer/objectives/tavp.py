"""TAVP losses: masked tag modelling and masked-patch concept prediction (VLMixer's TAVP, after U-VisualBERT)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmixer.trainer.masking import IGNORE


def patch_concept_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], patch_hidden: torch.Tensor,
                       patch_labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy of masked patches' concepts from their output states (P, H) -> labels (P,)."""
    sel = patch_labels != IGNORE
    n = int(sel.sum())
    if n == 0:
        if patch_hidden.shape[0] == 0:
            return patch_hidden.sum() * 0.0, 0
        return logits_fn(patch_hidden[:1]).float().sum() * 0.0, 0
    return F.cross_entropy(logits_fn(patch_hidden[sel]).float(), patch_labels[sel]), n
