"""TCL objectives (Yang et al., CVPR 2022): intra-modal contrast (IMC) between two augmented views of one modality, and
local mutual information (LMI) between one view's global [CLS] and the other view's local tokens.

The two views: the online model on augmentation 1 and the momentum model on
augmentation 2 (for images, feature noise and patch dropout; for text the
dropout of two different forward passes). Both are InfoNCE losses on unit
vectors; the momentum side never gets a gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, tau: float | torch.Tensor
            ) -> torch.Tensor:
    """-mean_i log softmax_j(q_i . c_j / tau)[i], candidates c = [k (B, d); queue (Q, d)]; k_i is q_i's positive."""
    cand = k.detach() if queue is None else torch.cat([k.detach(), queue.detach()])
    logits = q @ cand.t() / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def lmi_loss(glob: torch.Tensor, local: torch.Tensor, local_mask: torch.Tensor, tau: float | torch.Tensor
             ) -> torch.Tensor:
    """Global-local InfoNCE: each global g_i against every valid local token of the batch.

    glob (B, d) and local (B, T, d) are unit vectors, local_mask (B, T) marks
    real tokens. The positives of g_i are the local tokens of sample i; the
    loss is -mean over i (with at least one local) of the mean over its
    positives t of log softmax over all valid locals. Why: it asks the global
    summary to be predictive of each of its own parts rather than of a few.
    """
    B, T, d = local.shape
    flat = local.reshape(B * T, d)
    valid = local_mask.reshape(B * T)
    logits = (glob @ flat.t() / tau).masked_fill(~valid[None, :], float("-inf"))
    logp = F.log_softmax(logits, dim=1).reshape(B, B, T)
    own = logp[torch.arange(B), torch.arange(B)]  # (B, T): row i's log-probs of its own tokens
    own = own.masked_fill(~local_mask, 0.0)
    n = local_mask.sum(1)
    has = n > 0
    if not bool(has.any()):
        return glob.sum() * 0.0
    per = -(own.sum(1)[has] / n[has])
    return per.mean()


def augment_patches(feats: torch.Tensor, patch_rows: torch.Tensor, attention: torch.Tensor,
                    is_patch: torch.Tensor, *, noise: float, drop: float, rows: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A visual view: Gaussian noise on patch features (scaled by each feature's std) and patch dropout.

    `patch_rows` (P,) is the batch row of each patch in `feats` (P, D); only
    rows in `rows` are augmented. Dropped patches leave the attention mask;
    every row keeps at least one patch. Draws from torch's global generator,
    which checkpoints restore, so a resumed run draws the same views.
    """
    sel = torch.isin(patch_rows, rows)
    out = feats
    if noise > 0 and feats.shape[0]:
        f = feats.float()
        std = f.std(dim=1, keepdim=True).clamp_min(1e-6) if f.shape[1] > 1 else torch.ones_like(f[:, :1])
        out = torch.where(sel[:, None], f + noise * std * torch.randn_like(f), f).to(feats.dtype)
    attn = attention
    if drop > 0 and feats.shape[0]:
        keep = torch.rand(feats.shape[0], device=feats.device) >= drop
        keep |= ~sel
        # every augmented row keeps its first patch at least
        first = torch.ones_like(keep)
        first[1:] = patch_rows[1:] != patch_rows[:-1]
        keep |= first
        attn = attention.clone()
        pos = is_patch.nonzero(as_tuple=False)  # (P, 2) row-major, same order as feats
        attn[pos[~keep, 0], pos[~keep, 1]] = 0
    return out, attn
