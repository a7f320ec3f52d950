"""TCL objectives (Yang et al., CVPR 2022): intra-modal contrast (IMC) between two augmented views of one modality,
with momentum distillation, and local mutual information (LMI) between one view's global [CLS] and the other view's
local tokens, the other samples' tokens as negatives.

The two views: the online model on augmentation 1 and the momentum model on
augmentation 2 (for images, feature noise and patch dropout; for text the
dropout of two different forward passes). Both are InfoNCE losses on unit
vectors; the momentum side never gets a gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmixer.trainer.objectives.albef import soft_contrastive


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, tau: float | torch.Tensor
            ) -> torch.Tensor:
    """-mean_i log softmax_j(q_i . c_j / tau)[i], candidates c = [k (B, d); queue (Q, d)]; k_i is q_i's positive."""
    cand = k.detach() if queue is None else torch.cat([k.detach(), queue.detach()])
    logits = q @ cand.t() / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def imc_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, tau: float | torch.Tensor,
             alpha: float) -> torch.Tensor:
    """TCL's IMC with momentum distillation: soft-target contrast of q against c = [k; queue].

    The target of row i is alpha softmax(k_i . c / tau) + (1 - alpha) onehot(i)
    (TCL distils IMC as ALBEF distils ITC); alpha 0 is `infonce`.
    """
    cand = k.detach() if queue is None else torch.cat([k.detach(), queue.detach()])
    tau_m = tau.detach() if isinstance(tau, torch.Tensor) else tau
    with torch.no_grad():
        sim_m = k.detach() @ cand.t() / tau_m
    return soft_contrastive(q @ cand.t() / tau, sim_m, alpha)


def lmi_loss(glob: torch.Tensor, local: torch.Tensor, local_mask: torch.Tensor, tau: float | torch.Tensor
             ) -> torch.Tensor:
    """TCL's global-local InfoNCE: each local token of sample i against the other samples' local tokens.

    glob (B, d) and local (B, T, d) are unit vectors, local_mask (B, T) marks
    real tokens. For sample i and each of its valid tokens t,
    l_it = -log( e^{g_i.x_it/tau} / (e^{g_i.x_it/tau} + sum_{j != i, s valid} e^{g_i.x_js/tau}) );
    the loss is the mean over i (with at least one token) of the mean over
    its t. The negatives are the other samples' tokens only, as TCL's
    `in_batch_g2l_loss` masks the sample's own: its other tokens are parts of
    the same whole, not evidence against t.
    """
    B, T, d = local.shape
    flat = local.reshape(B * T, d)
    logits = (glob @ flat.t() / tau).reshape(B, B, T)  # [i, j, t] = g_i . x_jt / tau
    own = logits[torch.arange(B), torch.arange(B)]  # (B, T)
    others = local_mask[None, :, :] & ~torch.eye(B, dtype=torch.bool, device=local.device)[:, :, None]
    neg = torch.logsumexp(logits.masked_fill(~others, float("-inf")).reshape(B, B * T), dim=1)  # (B,)
    per_token = -(own - torch.logaddexp(own, neg[:, None]))
    per_token = per_token.masked_fill(~local_mask, 0.0)
    n = local_mask.sum(1)
    has = n > 0
    if not bool(has.any()):
        return glob.sum() * 0.0
    return (per_token.sum(1)[has] / n[has]).mean()


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
