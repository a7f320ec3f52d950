"""The paired task: the related systems' objectives on (image, caption) pairs, in one module's forward.

Which terms run is `objective.paired` (name -> weight). The momentum model
and the feature queues exist only when a term needs them (itc, imc, lmi);
they are buffers and frozen parameters of this module, so the checkpoint
carries them (`Pretrainer.extra_state`) and a resume continues exactly.
The EMA update happens at the start of each training forward, as ALBEF does.
The contrastive terms share one learnt temperature (ALBEF's `temp`), and
the distillation weight ramps up over the first epoch of each task's data
(`objective.distill_rampup`), counted by buffers so a resume continues it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmixer.trainer.config import MOMENTUM_OBJECTIVES, ObjectiveConfig
from vlmixer.trainer.model import Encoded, VLMixerModel
from vlmixer.trainer.objectives.albef import (
    FeatureQueue,
    ITMHead,
    Temperature,
    ema_update,
    itc_loss,
    itm_loss,
    make_momentum_copy,
    ramped_alpha,
    sample_hard_negatives,
)
from vlmixer.trainer.objectives.tcl import augment_patches, infonce, lmi_loss
from vlmixer.trainer.objectives.valp import mlm_loss
from vlmixer.trainer.objectives.xvlm import BoxHead, box_loss
from vlmixer.trainer.paired_data import N_VIEWS, fuse, select_rows


class PairedObjectives(nn.Module):
    def __init__(self, *, model: VLMixerModel, objective: ObjectiveConfig) -> None:
        super().__init__()
        self.obj = objective
        self.weights = {k: float(w) for k, w in objective.paired.items() if w > 0}
        self.view_weights = {k: float(w) for k, w in objective.views.items() if w > 0}
        H = model.config.hidden_size
        on = set(self.weights)
        self.momentum = make_momentum_copy(model) if on & set(MOMENTUM_OBJECTIVES) or self.view_weights else None
        d = model.cmcl_proj.out_features
        if on & {"itc", "imc"}:
            self.img_queue = FeatureQueue(objective.queue_size, d)
            self.txt_queue = FeatureQueue(objective.queue_size, d)
        if "itc" in self.view_weights:  # the views' features live apart from real images' and captions'
            self.view_s_queue = FeatureQueue(objective.queue_size, d)
            self.view_t_queue = FeatureQueue(objective.queue_size, d)
        self.itm_head = ITMHead(H) if on & {"itm", "concept_itm"} else None
        self.box_head = BoxHead(H, eps=model.config.layer_norm_eps) if "box" in on else None
        # one temperature for the paired contrastive terms, as ALBEF/TCL/X-VLM's `temp`; the CMC-view terms
        # (VALP steps: other data, other feature spread) learn their own
        lo, hi = objective.itc_tau_range

        def temperature(needed: bool) -> Temperature | None:
            return Temperature(objective.itc_tau, lo, hi, objective.itc_tau_learnable) if needed else None

        self.temp = temperature(bool(on & {"itc", "imc", "lmi", "concept_itc"}))
        self.view_temp = temperature(bool(self.view_weights))
        # batches trained so far per task, for the distillation ramp-up (paired steps and VALP view steps)
        if "itc" in on:
            self.register_buffer("paired_batches", torch.zeros((), dtype=torch.long))
        if "itc" in self.view_weights:
            self.register_buffer("view_batches", torch.zeros((), dtype=torch.long))
        self.epoch_batches: dict[str, int] = {}

    def set_epoch_batches(self, per_epoch: dict[str, int]) -> None:
        """Micro-batches per epoch of each task's data on one process (the loop's samplers know them).

        With `objective.distill_rampup` -1 the distillation weight ramps up over
        one epoch, ALBEF's `len(data_loader)`; until this is called (a module
        used outside the training loop) there is no ramp.
        """
        self.epoch_batches = {k: int(v) for k, v in per_epoch.items()}

    def _alpha(self, counter: torch.Tensor, task: str) -> float:
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

    def _itm(self, model: VLMixerModel, batch: dict[str, torch.Tensor], t_rows: torch.Tensor,
             v_rows: torch.Tensor, sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """ALBEF's ITM: B positives, then for each image a hard negative text and for each text a hard
        negative image, drawn by softmax of `sim`, the (detached) contrastive logits (cosine / tau)."""
        assert self.itm_head is not None
        neg_t, ok_t = sample_hard_negatives(sim, same)  # row i: an image, column: a text
        neg_v, ok_v = sample_hard_negatives(sim.t(), same.t())
        t = [t_rows, t_rows[neg_t[ok_t]], t_rows[ok_v]]
        v = [v_rows, v_rows[ok_t], v_rows[neg_v[ok_v]]]
        t_all, v_all = torch.cat(t).tolist(), torch.cat(v).tolist()
        labels = torch.zeros(len(t_all), dtype=torch.long, device=sim.device)
        labels[: len(t_rows)] = 1
        cls = model.encode(fuse(batch, t_all, v_all)).cls
        return itm_loss(self.itm_head(cls), labels)

    def views(self, model: VLMixerModel, batch: dict[str, torch.Tensor], enc: Encoded) -> dict[str, torch.Tensor]:
        """`objective.views` on a VALP batch (B text views, then B multi-modal views), given its encoding.

        The multi-modal view plays the image and the text view the caption:
        ITC is CMCL with ALBEF's momentum candidates, queues and soft targets;
        LMI asks each view's [CLS] to predict the other view's tokens (the
        momentum model's), words and patches but not [CLS]/[SEP].
        """
        assert self.momentum is not None
        o, w = self.obj, self.view_weights
        tau = self._tau(self.view_temp)
        B = batch["input_ids"].shape[0] // 2
        proj = F.normalize(model.project(enc.cls).float(), dim=-1)
        t, s = proj[:B], proj[B:]
        with torch.no_grad():
            if self.training:
                ema_update(model, self.momentum, o.momentum)
            enc_m = self.momentum.encode(batch)
            proj_m = F.normalize(self.momentum.project(enc_m.cls).float(), dim=-1)
            t_m, s_m = proj_m[:B], proj_m[B:]
        terms: dict[str, torch.Tensor] = {}
        if "itc" in w:
            terms["view_itc"] = itc_loss(s, t, s_m, t_m, self.view_s_queue.feats, self.view_t_queue.feats,
                                         tau, self._alpha(self.view_batches, "valp"))
        if "lmi" in w:
            with torch.no_grad():
                local = F.normalize(self.momentum.project(enc_m.hidden).float(), dim=-1)
                attn = batch["attention_mask"].bool()
                n = batch["attention_mask"].sum(1, keepdim=True)
                slot = torch.arange(attn.shape[1], device=attn.device)[None, :]
                inner = attn & (slot > 0) & (slot < n - 1)
            terms["view_lmi"] = (lmi_loss(t, local[B:], inner[B:], tau)
                                 + lmi_loss(s, local[:B], inner[:B], tau)) / 2
        if self.training and "itc" in w:
            self.view_s_queue.enqueue(s_m)
            self.view_t_queue.enqueue(t_m)
        terms["temp"] = tau.detach()  # logged, not a loss: Pretrainer leaves it out of the total
        return terms

    def forward(self, model: VLMixerModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        o, w = self.obj, self.weights
        tau = self._tau(self.temp) if self.temp is not None else None
        # ITM's hard negatives are drawn by softmax(similarity / temperature), as ALBEF's `sim_i2t`
        hard_tau = tau.detach() if tau is not None else o.itc_tau
        dev = batch["input_ids"].device
        B = batch["input_ids"].shape[0] // int(batch["n_views"])
        ar = torch.arange(B, device=dev)
        T, V, CT, CV = ar, ar + B, ar + 2 * B, ar + 3 * B
        need_pairs = bool(set(w) & {"itc", "itm", "imc", "lmi"})
        need_concepts = bool(set(w) & {"concept_itc", "concept_itm"})
        rows = (list(range(2 * B)) if need_pairs else []) + (list(range(2 * B, 4 * B)) if need_concepts else [])
        online = self._augment(batch, V) if set(w) & set(MOMENTUM_OBJECTIVES) else batch
        terms: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        proj = torch.zeros(0)
        if rows:
            enc = model.encode(select_rows(online, rows))
            proj = F.normalize(model.project(enc.cls).float(), dim=-1)
        txt, img = (proj[:B], proj[B: 2 * B]) if need_pairs else (proj[:0], proj[:0])
        if self.momentum is not None:
            with torch.no_grad():
                if self.training:
                    ema_update(model, self.momentum, o.momentum)
                mb = self._augment(select_rows(batch, range(2 * B)), V)
                enc_m = self.momentum.encode(mb)
                proj_m = F.normalize(self.momentum.project(enc_m.cls).float(), dim=-1)
                txt_m, img_m = proj_m[:B], proj_m[B:]
        if "itc" in w:
            terms["itc"] = itc_loss(img, txt, img_m, txt_m, self.img_queue.feats, self.txt_queue.feats, tau,
                                    self._alpha(self.paired_batches, "paired"))
        if "imc" in w:
            terms["imc"] = (infonce(img, img_m, self.img_queue.feats, tau)
                            + infonce(txt, txt_m, self.txt_queue.feats, tau)) / 2
        if "lmi" in w:
            with torch.no_grad():
                local = F.normalize(self.momentum.project(enc_m.hidden).float(), dim=-1)
                attn = mb["attention_mask"].bool()
                n = mb["attention_mask"].sum(1, keepdim=True)
                slot = torch.arange(attn.shape[1], device=dev)[None, :]
                words = attn & (slot > 0) & (slot < n - 1) & ~mb["is_patch"]  # caption word-pieces
                patches = attn & mb["is_patch"]
            terms["lmi"] = (lmi_loss(img, local[B:], patches[B:], tau)
                            + lmi_loss(txt, local[:B], words[:B], tau)) / 2
        if "itm" in w:
            same = batch["image_ids"][:, None] == batch["image_ids"][None, :]
            terms["itm"] = self._itm(model, batch, T, V, (img @ txt.t()).detach() / hard_tau, same)
        if "mlm" in w:  # ALBEF's MLM: the masked caption fused with its image
            fused = fuse(batch, (ar + N_VIEWS * B).tolist(), V.tolist())
            terms["mlm"], n_mlm = mlm_loss(model.mlm_logits, model.encode(fused).hidden, fused["mlm_labels"])
            extra["mlm_tokens"] = torch.tensor(float(n_mlm))
        has = batch["has_box"].nonzero(as_tuple=False)[:, 0]
        if "box" in w:
            assert self.box_head is not None
            if len(has):
                pred = self.box_head(model.encode(fuse(batch, CT[has].tolist(), V[has].tolist())).cls)
                l1, g = box_loss(pred, batch["box_targets"][has])
            else:
                l1 = g = sum(p.sum() for p in self.box_head.parameters()) * 0.0
            terms["box"] = l1 + g
            extra.update(box_l1=l1.detach(), box_giou=g.detach(), box_targets=torch.tensor(float(len(has))))
        if need_concepts:
            k = 2 * B if need_pairs else 0
            ct, cv = proj[k: k + B][has], proj[k + B: k + 2 * B][has]
            cid = batch["concept_ids"][has]
            if "concept_itc" in w:
                if len(has):
                    logits = ct @ cv.t() / tau
                    tgt = torch.arange(len(has), device=dev)
                    terms["concept_itc"] = (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.t(), tgt)) / 2
                else:
                    terms["concept_itc"] = proj.sum() * 0.0
            if "concept_itm" in w:
                if len(has):
                    same = cid[:, None] == cid[None, :]
                    terms["concept_itm"] = self._itm(model, batch, CT[has], CV[has], (cv @ ct.t()).detach() / hard_tau,
                                                     same)
                else:
                    terms["concept_itm"] = proj.sum() * 0.0
        if self.training and hasattr(self, "img_queue"):
            self.img_queue.enqueue(img_m)
            self.txt_queue.enqueue(txt_m)
        total = sum(w[k] * terms[k] for k in terms)
        out = {"loss": total, **{k: v.detach() for k, v in terms.items()}, **extra}
        out["pairs"] = torch.tensor(float(B))
        if tau is not None:
            out["temp"] = tau.detach()
        return out
