"""The paired task: the related systems' objectives on (image, caption) pairs, in one module's forward.

Which terms run is `objective.paired` (name -> weight), each a class of
`paired_terms.PAIRED_TERMS`. The momentum model and the feature queues
exist only when a term needs them (itc, imc, lmi); they are buffers and
frozen parameters of this module, so the checkpoint carries them
(`Pretrainer.extra_state`) and a resume continues exactly. The EMA update
happens at the start of each training forward, as ALBEF does. The
contrastive terms share one learnt temperature (ALBEF's `temp`), and the
distillation weight ramps up over the first epoch of each task's data
(`objective.distill_rampup`), counted by buffers so a resume continues it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmixer.trainer.config import ObjectiveConfig
from vlmixer.trainer.model import Encoded, VLMixerModel
from vlmixer.trainer.objectives.albef import (
    FeatureQueue,
    ITMHead,
    Temperature,
    ema_update,
    make_momentum_copy,
    ramped_alpha,
)
from vlmixer.trainer.objectives.paired_terms import (
    ALPHA,
    BOX_HEAD,
    CONCEPT_ROWS,
    ITM_HEAD,
    MOMENTUM,
    PAIR_ROWS,
    PAIRED_TERMS,
    QUEUES,
    TEMP,
    VIEW_TERMS,
    PairedStep,
    ViewStep,
    needs_of,
    terms_of,
)
from vlmixer.trainer.objectives.tcl import augment_patches
from vlmixer.trainer.objectives.xvlm import BoxHead
from vlmixer.trainer.paired_data import select_rows


class PairedObjectives(nn.Module):
    """The terms of `objective.paired` and `objective.views`, and the parts they share, as one module so a
    checkpoint carries the momentum model, queues, temperatures and ramp counters with the heads."""

    def __init__(self, *, model: VLMixerModel, objective: ObjectiveConfig) -> None:
        super().__init__()
        self.obj = objective
        self.terms = terms_of(objective.paired, PAIRED_TERMS)
        self.view_terms = terms_of(objective.views, VIEW_TERMS)
        need, view_need = needs_of(self.terms), needs_of(self.view_terms)
        H = model.config.hidden_size
        self.momentum = make_momentum_copy(model) if MOMENTUM in need | view_need else None
        d = model.cmcl_proj.out_features
        if QUEUES in need:
            self.img_queue = FeatureQueue(objective.queue_size, d)
            self.txt_queue = FeatureQueue(objective.queue_size, d)
        if QUEUES in view_need:  # the views' features live apart from real images' and captions'
            self.view_s_queue = FeatureQueue(objective.queue_size, d)
            self.view_t_queue = FeatureQueue(objective.queue_size, d)
        self.itm_head = ITMHead(H) if ITM_HEAD in need else None
        self.box_head = BoxHead(H, eps=model.config.layer_norm_eps) if BOX_HEAD in need else None
        # one temperature for the paired contrastive terms, as ALBEF/TCL/X-VLM's `temp`; the CMC-view terms
        # (VALP steps: other data, other feature spread) learn their own
        lo, hi = objective.itc_tau_range

        def temperature(needed: bool) -> Temperature | None:
            return Temperature(objective.itc_tau, lo, hi, objective.itc_tau_learnable) if needed else None

        self.temp = temperature(TEMP in need)
        self.view_temp = temperature(bool(self.view_terms))
        # batches trained so far per task, for the distillation ramp-up (paired steps and VALP view steps)
        if ALPHA in need:
            self.register_buffer("paired_batches", torch.zeros((), dtype=torch.long))
        if ALPHA in view_need:
            self.register_buffer("view_batches", torch.zeros((), dtype=torch.long))
        self.epoch_batches: dict[str, int] = {}

    def set_epoch_batches(self, per_epoch: dict[str, int]) -> None:
        """Micro-batches per epoch of each task's data on one process (the loop's samplers know them).

        With `objective.distill_rampup` -1 the distillation weight ramps up over
        one epoch, ALBEF's `len(data_loader)`; until this is called (a module
        used outside the training loop) there is no ramp.
        """
        self.epoch_batches = {k: int(v) for k, v in per_epoch.items()}

    def alpha(self, counter: torch.Tensor, task: str) -> float:
        """The distillation weight for this batch, and one batch more counted when training."""
        o = self.obj
        rampup = o.distill_rampup if o.distill_rampup >= 0 else self.epoch_batches.get(task, 0)
        alpha = ramped_alpha(o.distill_alpha, int(counter), rampup)
        if self.training:
            counter.add_(1)
        return alpha

    @staticmethod
    def _tau(temp: Temperature | None) -> torch.Tensor:
        assert temp is not None
        temp.clamp_()
        return temp()

    def _augment(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.obj
        if o.aug_feature_noise <= 0 and o.aug_patch_drop <= 0:
            return batch
        patch_rows = batch["is_patch"].nonzero(as_tuple=False)[:, 0]
        feats, attn = augment_patches(batch["patch_feats"], patch_rows, batch["attention_mask"], batch["is_patch"],
                                      noise=o.aug_feature_noise, drop=o.aug_patch_drop, rows=rows)
        return {**batch, "patch_feats": feats, "attention_mask": attn}

    def views(self, model: VLMixerModel, batch: dict[str, torch.Tensor], enc: Encoded) -> dict[str, torch.Tensor]:
        """`objective.views` on a VALP batch (B text views, then B multi-modal views), given its encoding.

        The multi-modal view plays the image and the text view the caption.
        Returns each term as `view_<name>` and the temperature as `temp`.
        """
        assert self.momentum is not None
        tau = self._tau(self.view_temp)
        B = batch["input_ids"].shape[0] // 2
        proj = F.normalize(model.project(enc.cls).float(), dim=-1)
        with torch.no_grad():
            if self.training:
                ema_update(model, self.momentum, self.obj.momentum)
            enc_m = self.momentum.encode(batch)
            proj_m = F.normalize(self.momentum.project(enc_m.cls).float(), dim=-1)
        v = ViewStep(owner=self, batch=batch, B=B, t=proj[:B], s=proj[B:], t_m=proj_m[:B], s_m=proj_m[B:],
                     enc_m=enc_m, tau=tau)
        terms = {f"view_{t.name}": t.view_loss(v) for t in self.view_terms}
        if self.training and hasattr(self, "view_s_queue"):
            self.view_s_queue.enqueue(v.s_m)
            self.view_t_queue.enqueue(v.t_m)
        terms["temp"] = tau.detach()  # logged, not a loss: Pretrainer leaves it out of the total
        return terms

    def forward(self, model: VLMixerModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        o = self.obj
        tau = self._tau(self.temp) if self.temp is not None else None
        # ITM's hard negatives are drawn by softmax(similarity / temperature), as ALBEF's `sim_i2t`
        hard_tau = tau.detach() if tau is not None else o.itc_tau
        dev = batch["input_ids"].device
        B = batch["input_ids"].shape[0] // int(batch["n_views"])
        ar = torch.arange(B, device=dev)
        T, V, CT, CV = ar, ar + B, ar + 2 * B, ar + 3 * B
        reads = {t.rows for t in self.terms}
        need_pairs, need_concepts = PAIR_ROWS in reads, CONCEPT_ROWS in reads
        rows = (list(range(2 * B)) if need_pairs else []) + (list(range(2 * B, 4 * B)) if need_concepts else [])
        online = self._augment(batch, V) if MOMENTUM in needs_of(self.terms) else batch
        proj = torch.zeros(0)
        if rows:
            enc = model.encode(select_rows(online, rows))
            proj = F.normalize(model.project(enc.cls).float(), dim=-1)
        txt, img = (proj[:B], proj[B: 2 * B]) if need_pairs else (proj[:0], proj[:0])
        has = batch["has_box"].nonzero(as_tuple=False)[:, 0]
        k = 2 * B if need_pairs else 0
        ct, cv = (proj[k: k + B][has], proj[k + B: k + 2 * B][has]) if need_concepts else (proj[:0], proj[:0])
        s = PairedStep(owner=self, model=model, batch=batch, B=B, T=T, V=V, CT=CT, CV=CV, has=has, txt=txt, img=img,
                       ct=ct, cv=cv, proj=proj, tau=tau, hard_tau=hard_tau)
        if self.momentum is not None:
            with torch.no_grad():
                if self.training:
                    ema_update(model, self.momentum, o.momentum)
                s.mb = self._augment(select_rows(batch, range(2 * B)), V)
                s.enc_m = self.momentum.encode(s.mb)
                proj_m = F.normalize(self.momentum.project(s.enc_m.cls).float(), dim=-1)
                s.txt_m, s.img_m = proj_m[:B], proj_m[B:]
        terms: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        total: torch.Tensor | float = 0.0
        for t in self.terms:
            terms[t.name], more = t.loss(s)
            extra.update(more)
            total = total + t.weight * terms[t.name]
        if self.training and hasattr(self, "img_queue"):
            self.img_queue.enqueue(s.img_m)
            self.txt_queue.enqueue(s.txt_m)
        out = {"loss": total, **{k: v.detach() for k, v in terms.items()}, **extra}
        out["pairs"] = torch.tensor(float(B))
        if tau is not None:
            out["temp"] = tau.detach()
        return out
