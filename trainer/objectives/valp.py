"""VALP losses: MLM on the multi-modal sentence, CMCL between its two masked views (VLMixer's VALP)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmixer.trainer.distributed import all_gather_with_grad, rank
from vlmixer.trainer.masking import IGNORE


def mlm_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor
             ) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over labelled positions; the vocabulary projection runs on those only.

    Returns (loss, number of labelled positions); a batch with none gives a zero
    loss that still depends on the head, so every process runs the same graph.
    """
    sel = labels != IGNORE
    n = int(sel.sum())
    if n == 0:
        return logits_fn(hidden[:1, 0]).float().sum() * 0.0, 0
    logits = logits_fn(hidden[sel]).float()
    return F.cross_entropy(logits, labels[sel]), n


def cmcl_loss(t_proj: torch.Tensor, s_proj: torch.Tensor, tau: float, global_negatives: bool = True
              ) -> tuple[torch.Tensor, int]:
    """L = -1/M_local * sum_m log( exp(f(T_m,S_m)/tau) / sum_l exp(f(T_m,S_l)/tau) ).

    f is the cosine similarity of the projected [CLS] vectors; l runs over the
    multi-modal views of the global batch (every process's, gathered with
    gradients) when `global_negatives`, else over this process's. The paper's
    sum over m is divided by the local batch size (a mean), which only scales
    the learning rate; DDP's gradient averaging then makes it the mean over
    the global batch. Returns (loss, number of candidates per row).
    """
    # at least fp32 (bf16 autocast outputs are promoted), never lower than the input's precision
    t = F.normalize(t_proj.to(torch.promote_types(t_proj.dtype, torch.float32)), dim=-1)
    s = F.normalize(s_proj.to(torch.promote_types(s_proj.dtype, torch.float32)), dim=-1)
    offset = 0
    if global_negatives:
        s_all = all_gather_with_grad(s)
        if s_all.shape[0] != s.shape[0]:
            offset = rank() * s.shape[0]
        s = s_all
    logits = t @ s.t() / tau
    target = torch.arange(t.shape[0], device=t.device) + offset
    return F.cross_entropy(logits, target), int(s.shape[0])
