"""ALBEF objectives (Li et al., NeurIPS 2021): ITC with momentum encoders, queues and momentum distillation; ITM with
hard negatives sampled in-batch by contrastive similarity.

Our model is single-stream, so ALBEF's "unimodal encoders" are the shared
encoder run on a caption alone (`[CLS] caption [SEP]`) and on an image alone
(`[CLS] patches [SEP]`), both through the CMCL projection; the "fusion
encoder" is the same encoder on `[CLS] caption [SEP] patches [SEP]`. The
momentum model is an EMA copy of the whole model that never receives a
gradient; its features fill the queues and give the distillation targets.
Functions here are plain tensor maths so tests can check them against a
written-out computation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmixer.trainer.distributed import all_gather_with_grad


@torch.no_grad()
def ema_update(online: nn.Module, momentum: nn.Module, m: float) -> None:
    """theta_m <- m * theta_m + (1 - m) * theta, parameter by parameter (ALBEF's `_momentum_update`)."""
    for p, q in zip(online.parameters(), momentum.parameters(), strict=True):
        q.data.mul_(m).add_(p.data.detach().to(q.dtype), alpha=1.0 - m)


def make_momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy: same weights now, never in an optimiser, never given a gradient."""
    import copy

    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class FeatureQueue(nn.Module):
    """A FIFO of normalised momentum features (ALBEF/MoCo); buffers, so checkpoints carry it.

    Starts as random unit vectors like ALBEF's; `enqueue` gathers every
    process's batch first so all ranks hold the same queue.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("feats", F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        size = self.feats.shape[0]
        if size == 0:  # queue_size 0: in-batch negatives only
            return
        x = all_gather_with_grad(x.detach().float())
        n = x.shape[0]
        if n >= size:
            self.feats.copy_(x[-size:])
            self.ptr.zero_()
            return
        idx = (int(self.ptr) + torch.arange(n, device=x.device)) % size
        self.feats[idx] = x
        self.ptr.fill_((int(self.ptr) + n) % size)


def soft_contrastive(sim: torch.Tensor, sim_m: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Mean over rows of -sum_j target_ij log softmax(sim)_ij, target = alpha softmax(sim_m) + (1-alpha) onehot.

    The positive of row i is column i (the batch comes first, the queue after).
    With `sim_m` None or alpha 0 this is plain cross-entropy on the diagonal.
    """
    B = sim.shape[0]
    onehot = torch.zeros_like(sim)
    onehot[torch.arange(B), torch.arange(B)] = 1.0
    target = onehot
    if sim_m is not None and alpha > 0:
        target = alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * onehot
    return -(F.log_softmax(sim, dim=1) * target).sum(1).mean()


class Temperature(nn.Module):
    """ALBEF's learnt contrastive temperature: `nn.Parameter(tau)`, clamped into [low, high] before use.

    Why learnt: the right sharpness depends on how spread the features are,
    which changes during training (ALBEF, TCL and X-VLM all learn it). The
    clamp runs under no_grad on the parameter itself, as ALBEF's
    `self.temp.clamp_(0.001, 0.5)`, so the optimiser sees the clamped value;
    a fixed temperature is the same parameter with requires_grad off, so
    checkpoints hold it either way.
    """

    def __init__(self, tau: float, low: float, high: float, learnable: bool = True) -> None:
        super().__init__()
        self.low, self.high = float(low), float(high)
        self.tau = nn.Parameter(torch.tensor(float(tau)), requires_grad=learnable)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.tau.clamp_(self.low, self.high)

    def forward(self) -> torch.Tensor:
        """The temperature as a 0-d tensor that carries the gradient when learnt."""
        return self.tau


def ramped_alpha(alpha: float, seen: int, rampup: int) -> float:
    """ALBEF's distillation weight on batch `seen` (0-based): alpha * min(1, seen / rampup); rampup <= 0 = alpha.

    Why: in the first epoch the momentum model is barely trained, so its soft
    targets are close to uniform; ALBEF lets them in gradually
    (`alpha * min(1, i / len(data_loader))` in epoch 0).
    """
    if rampup <= 0:
        return float(alpha)
    return float(alpha) * min(1.0, seen / rampup)


def itc_loss(img: torch.Tensor, txt: torch.Tensor, img_m: torch.Tensor, txt_m: torch.Tensor,
             img_queue: torch.Tensor, txt_queue: torch.Tensor, tau: float | torch.Tensor, alpha: float
             ) -> torch.Tensor:
    """ALBEF's ITC: (L_i2t + L_t2i) / 2 against momentum features of the batch and the queues.

    All inputs are unit vectors: online (B, d) with gradients, momentum (B, d)
    and queues (Q, d) without. Candidates of an image are the momentum texts
    of the batch then the text queue; distillation targets come from the
    momentum image's similarities to the same candidates. `tau` may be a
    learnt 0-d tensor: the online similarities pass its gradient, the
    targets use its value only.
    """
    txt_all = torch.cat([txt_m, txt_queue]).detach()
    img_all = torch.cat([img_m, img_queue]).detach()
    sim_i2t, sim_t2i = img @ txt_all.t() / tau, txt @ img_all.t() / tau
    with torch.no_grad():
        tau_m = tau.detach() if isinstance(tau, torch.Tensor) else tau
        sim_i2t_m, sim_t2i_m = img_m @ txt_all.t() / tau_m, txt_m @ img_all.t() / tau_m
    return (soft_contrastive(sim_i2t, sim_i2t_m, alpha) + soft_contrastive(sim_t2i, sim_t2i_m, alpha)) / 2


def distilled_mlm_loss(logits: torch.Tensor, labels: torch.Tensor, logits_m: torch.Tensor | None, alpha: float
                       ) -> torch.Tensor:
    """ALBEF's MLM with momentum distillation over the N masked positions (logits (N, V), labels (N,)):

    (1 - alpha) CE(logits, labels) + alpha * mean_n -sum_v softmax(logits_m)_nv log softmax(logits)_nv.
    Why: the momentum model's soft targets also credit plausible words other
    than the one masked out (ALBEF's `soft_labels`); `logits_m` None or
    alpha 0 is plain cross-entropy.
    """
    ce = F.cross_entropy(logits.float(), labels)
    if logits_m is None or alpha <= 0:
        return ce
    soft = F.softmax(logits_m.float(), dim=-1)
    distill = -(F.log_softmax(logits.float(), dim=-1) * soft).sum(-1).mean()
    return (1 - alpha) * ce + alpha * distill


def sample_hard_negatives(sim: torch.Tensor, same: torch.Tensor, generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, a column drawn with probability softmax(sim) over columns that are not `same`.

    Returns (indices (B,), valid (B,)): a row whose every column is `same`
    (a batch of one image) has no negative and is marked invalid.
    """
    with torch.no_grad():
        w = F.softmax(sim.float(), dim=1).masked_fill(same, 0.0)
        valid = w.sum(1) > 0
        w = torch.where(valid[:, None], w + (~same).float() * 1e-8, torch.ones_like(w))
        idx = torch.multinomial(w, 1, generator=generator).squeeze(1)
    return idx, valid


class ITMHead(nn.Module):
    """Matched / not matched from the fused [CLS] (ALBEF's itm_head)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.fc(cls)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (N, 2) match logits; label 1 = the pair belongs together."""
    return F.cross_entropy(logits.float(), labels)
