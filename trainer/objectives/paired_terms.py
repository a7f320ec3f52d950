"""The related systems' objectives as a name -> class registry: one class per term of `objective.paired`
(and of `objective.views`).

A term holds its loss weight, says which rows of the batch it reads
(`rows`: the caption and image rows of each pair, the concept text and
concept patch rows, or fused inputs it builds itself) and which shared parts
it needs (`needs`: the momentum model, feature queues, the learnt
temperature, the distillation ramp counter, the ITM or box head). Parts are
shared because the papers share them: ALBEF's ITC, TCL's IMC and LMI read
one momentum model and one temperature, ITM and concept ITM one match head.
`PairedObjectives` builds the union of the parts its terms need, encodes
each row subset once per step into a `PairedStep`, and sums weight x loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vlmixer.trainer.masking import IGNORE
from vlmixer.trainer.model import Encoded, VLMixerModel
from vlmixer.trainer.objectives.albef import distilled_mlm_loss, itc_loss, itm_loss, sample_hard_negatives
from vlmixer.trainer.objectives.tcl import imc_loss, lmi_loss
from vlmixer.trainer.objectives.valp import mlm_loss
from vlmixer.trainer.objectives.xvlm import box_loss
from vlmixer.trainer.paired_data import N_VIEWS, fuse, hide_patches

# the parts a term may need; PairedObjectives builds each one at most once
MOMENTUM, QUEUES, TEMP, ALPHA, ITM_HEAD, BOX_HEAD = "momentum", "queues", "temp", "alpha", "itm_head", "box_head"
PAIR_ROWS, CONCEPT_ROWS, OWN_ROWS = "pairs", "concepts", "own"


@dataclass
class PairedStep:
    """What one paired forward computed once and every term may read.

    Rows of the batch (view-major): T captions, V images, CT concept texts,
    CV concept patches. `txt`/`img` are the online unit features of the pair
    rows, `ct`/`cv` those of the concept rows that have a box (`has`);
    `txt_m`/`img_m`/`enc_m`/`mb` the momentum model's on the pair rows, when
    there is one. `owner` holds the shared parts (heads, queues, counters).
    """

    owner: Any
    model: VLMixerModel
    batch: dict[str, torch.Tensor]
    B: int
    T: torch.Tensor
    V: torch.Tensor
    CT: torch.Tensor
    CV: torch.Tensor
    has: torch.Tensor
    txt: torch.Tensor
    img: torch.Tensor
    ct: torch.Tensor
    cv: torch.Tensor
    proj: torch.Tensor
    tau: torch.Tensor | None
    hard_tau: float | torch.Tensor
    txt_m: torch.Tensor | None = None
    img_m: torch.Tensor | None = None
    enc_m: Encoded | None = None
    mb: dict[str, torch.Tensor] | None = None
    _alpha: float | None = field(default=None, repr=False)

    def alpha(self) -> float:
        """The distillation weight of this step, counted once however many terms distil."""
        if self._alpha is None:
            self._alpha = self.owner.alpha(self.owner.paired_batches, "paired")
        return self._alpha


class PairedTerm:
    """One objective of the paired task; subclasses set `name`, `rows`, `needs` and `loss`."""

    name: ClassVar[str] = ""
    rows: ClassVar[str] = OWN_ROWS
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def loss(self, s: PairedStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss, extra figures to log)."""
        raise NotImplementedError


def itm_on_hard_negatives(model: VLMixerModel, head: torch.nn.Module, batch: dict[str, torch.Tensor],
                          t_rows: torch.Tensor, v_rows: torch.Tensor, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                          same: torch.Tensor) -> torch.Tensor:
    """ALBEF's ITM: B positives, then for each image a hard negative text drawn by softmax of its row of
    `sim_i2t` and for each text a hard negative image by its row of `sim_t2i`, the (detached)
    contrastive logits (cosine / tau); `same` (images x texts) marks pairs that are no negatives."""
    neg_t, ok_t = sample_hard_negatives(sim_i2t, same)  # row i: an image, column: a text
    neg_v, ok_v = sample_hard_negatives(sim_t2i, same.t())
    t = [t_rows, t_rows[neg_t[ok_t]], t_rows[ok_v]]
    v = [v_rows, v_rows[ok_t], v_rows[neg_v[ok_v]]]
    t_all, v_all = torch.cat(t).tolist(), torch.cat(v).tolist()
    labels = torch.zeros(len(t_all), dtype=torch.long, device=sim_i2t.device)
    labels[: len(t_rows)] = 1
    cls = model.encode(fuse(batch, t_all, v_all)).cls
    return itm_loss(head(cls), labels)


def _lmi_masks(mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption word-pieces, image patches) of the momentum rows: the local tokens LMI contrasts."""
    attn = mb["attention_mask"].bool()
    n = mb["attention_mask"].sum(1, keepdim=True)
    slot = torch.arange(attn.shape[1], device=attn.device)[None, :]
    words = attn & (slot > 0) & (slot < n - 1) & ~mb["is_patch"]
    return words, attn & mb["is_patch"]


class ITC(PairedTerm):
    """ALBEF's image-text contrast with momentum candidates, queues and distillation."""

    name, rows, needs = "itc", PAIR_ROWS, frozenset({MOMENTUM, QUEUES, TEMP, ALPHA})

    def loss(self, s: PairedStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = s.owner
        return itc_loss(s.img, s.txt, s.img_m, s.txt_m, o.img_queue.feats, o.txt_queue.feats, s.tau, s.alpha()), {}


class IMC(PairedTerm):
    """TCL's intra-modal contrast: each modality's online view against its momentum view and queue, with
    the momentum model's soft targets as ITC's."""

    name, rows, needs = "imc", PAIR_ROWS, frozenset({MOMENTUM, QUEUES, TEMP, ALPHA})

    def loss(self, s: PairedStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o, alpha = s.owner, s.alpha()
        return (imc_loss(s.img, s.img_m, o.img_queue.feats, s.tau, alpha)
                + imc_loss(s.txt, s.txt_m, o.txt_queue.feats, s.tau, alpha)) / 2, {}


class LMI(PairedTerm):
    """TCL's local mutual information: a [CLS] against the momentum view's local tokens, per modality."""

    name, rows, needs = "lmi", PAIR_ROWS, frozenset({MOMENTUM, TEMP})

    def loss(self, s: PairedStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert s.enc_m is not None and s.mb is not None
        B, mom = s.B, s.owner.momentum
        with torch.no_grad():
            local = F.normalize(mom.project(s.enc_m.hidden).float(), dim=-1)
            words, patches = _lmi_masks(s.mb)
        return (lmi_loss(s.img, local[B:], patches[B:], s.tau) + lmi_loss(s.txt, local[:B], words[:B], s.tau)) / 2, {}


class ITM(PairedTerm):
    """ALBEF's image-text matching on fused pairs, negatives drawn by contrastive similarity.

    As ALBEF's `sim_i2t[:, :bs]`, the similarities are the online features
    against the momentum model's of the batch (online against online when
    no term keeps a momentum model).
    """

    name, rows, needs = "itm", PAIR_ROWS, frozenset({ITM_HEAD})

    def loss(self, s: PairedStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        same = s.batch["image_ids"][:, None] == s.batch["image_ids"][None, :]
        txt_k, img_k = (s.txt_m, s.img_m) if s.txt_m is not None and s.img_m is not None else (s.txt, s.img)
        sim_i2t = (s.img @ txt_k.t()).detach() / s.hard_tau
        sim_t2i = (s.txt @ img_k.t()).detach() / s.hard_tau
        return itm_on_hard_negatives(s.model, s.owner.itm_head, s.batch, s.T, s.V, sim_i2t, sim_t2i, same), {}


class MLM(PairedTerm):
    """ALBEF's masked language modelling: the masked caption fused with its image, distilled from the
    momentum model's predictions on the same input when a term keeps one (ALBEF's `soft_labels`)."""

    name, needs = "mlm", frozenset({ALPHA})

    def loss(self, s: PairedStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ar = torch.arange(s.B, device=s.T.device)
        fused = fuse(s.batch, (ar + N_VIEWS * s.B).tolist(), s.V.tolist())
        hidden, labels, mom = s.model.encode(fused).hidden, fused["mlm_labels"], s.owner.momentum
        sel = labels != IGNORE
        n = int(sel.sum())
        if mom is None or s.owner.obj.distill_alpha <= 0 or n == 0:
            loss, n = mlm_loss(s.model.mlm_logits, hidden, labels)
            return loss, {"mlm_tokens": torch.tensor(float(n))}
        with torch.no_grad():
            logits_m = mom.mlm_logits(mom.encode(fused).hidden[sel])
        loss = distilled_mlm_loss(s.model.mlm_logits(hidden[sel]), labels[sel], logits_m, s.alpha())
        return loss, {"mlm_tokens": torch.tensor(float(n))}


class Box(PairedTerm):
    """X-VLM's box regression of the concept's patch from the fused (concept text, image) [CLS].

    The target patch is one of the image's patches, so its own box is in the
    input; `objective.box_hide` zeroes that patch's 6 box values (and its
    feature) in this task's input, so the head must find the concept rather
    than copy a box.
    """

    name, needs = "box", frozenset({BOX_HEAD})

    def loss(self, s: PairedStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        head, has, hide = s.owner.box_head, s.has, s.owner.obj.box_hide
        if len(has):
            fused = fuse(s.batch, s.CT[has].tolist(), s.V[has].tolist())
            if hide != "none":
                fused = hide_patches(fused, s.batch["box_patch"][has], feature=hide == "geometry_and_feature")
            pred = head(s.model.encode(fused).cls)
            l1, g = box_loss(pred, s.batch["box_targets"][has])
        else:
            l1 = g = sum(p.sum() for p in head.parameters()) * 0.0
        return l1 + g, {"box_l1": l1.detach(), "box_giou": g.detach(), "box_targets": torch.tensor(float(len(has)))}


class ConceptITC(PairedTerm):
    """X-VLM's contrast at concept granularity: a concept's text against its patch, both ways."""

    name, rows, needs = "concept_itc", CONCEPT_ROWS, frozenset({TEMP})

    def loss(self, s: PairedStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not len(s.has):
            return s.proj.sum() * 0.0, {}
        logits = s.ct @ s.cv.t() / s.tau
        tgt = torch.arange(len(s.has), device=logits.device)
        return (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.t(), tgt)) / 2, {}


class ConceptITM(PairedTerm):
    """X-VLM's matching at concept granularity; negatives of another concept, drawn by similarity."""

    name, rows, needs = "concept_itm", CONCEPT_ROWS, frozenset({ITM_HEAD})

    def loss(self, s: PairedStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not len(s.has):
            return s.proj.sum() * 0.0, {}
        cid = s.batch["concept_ids"][s.has]
        same = cid[:, None] == cid[None, :]
        sim = (s.cv @ s.ct.t()).detach() / s.hard_tau  # X-VLM has no momentum model: online against online
        return itm_on_hard_negatives(s.model, s.owner.itm_head, s.batch, s.CT[s.has], s.CV[s.has], sim, sim.t(),
                                     same), {}


# in computing order: terms that draw random numbers (dropout, negatives) keep their order across configs
PAIRED_TERMS: dict[str, type[PairedTerm]] = {c.name: c for c in (ITC, IMC, LMI, ITM, MLM, Box, ConceptITC,
                                                                    ConceptITM)}


# -- the same objectives on VALP's two CMC views ------------------------------------------------
@dataclass
class ViewStep:
    """A VALP batch's views: `t` text views and `s` multi-modal views (online unit features), and the
    momentum model's (`t_m`, `s_m`, `enc_m`) on the same rows."""

    owner: Any
    batch: dict[str, torch.Tensor]
    B: int
    t: torch.Tensor
    s: torch.Tensor
    t_m: torch.Tensor
    s_m: torch.Tensor
    enc_m: Encoded
    tau: torch.Tensor


class ViewTerm(PairedTerm):
    """An objective of `objective.views`; logged as `view_<name>`."""

    def view_loss(self, v: ViewStep) -> torch.Tensor:
        raise NotImplementedError


class ViewITC(ViewTerm):
    """ITC over the views: CMCL with ALBEF's momentum candidates, queues and soft targets."""

    name, needs = "itc", frozenset({MOMENTUM, QUEUES, TEMP, ALPHA})

    def view_loss(self, v: ViewStep) -> torch.Tensor:
        o = v.owner
        return itc_loss(v.s, v.t, v.s_m, v.t_m, o.view_s_queue.feats, o.view_t_queue.feats, v.tau,
                        o.alpha(o.view_batches, "valp"))


class ViewLMI(ViewTerm):
    """LMI over the views: each view's [CLS] predicts the other view's tokens (the momentum model's)."""

    name, needs = "lmi", frozenset({MOMENTUM, TEMP})

    def view_loss(self, v: ViewStep) -> torch.Tensor:
        B = v.B
        with torch.no_grad():
            local = F.normalize(v.owner.momentum.project(v.enc_m.hidden).float(), dim=-1)
            attn = v.batch["attention_mask"].bool()
            n = v.batch["attention_mask"].sum(1, keepdim=True)
            slot = torch.arange(attn.shape[1], device=attn.device)[None, :]
            inner = attn & (slot > 0) & (slot < n - 1)
        return (lmi_loss(v.t, local[B:], inner[B:], v.tau) + lmi_loss(v.s, local[:B], inner[:B], v.tau)) / 2


VIEW_TERMS: dict[str, type[ViewTerm]] = {c.name: c for c in (ViewITC, ViewLMI)}


def terms_of(weights: dict[str, float], registry: dict[str, type[PairedTerm]]) -> list[Any]:
    """The terms with a weight > 0, in the registry's (computing) order."""
    return [cls(weights[name]) for name, cls in registry.items() if weights.get(name, 0) > 0]


def needs_of(terms: list[PairedTerm]) -> frozenset[str]:
    out: frozenset[str] = frozenset()
    for t in terms:
        out |= t.needs
    return out
