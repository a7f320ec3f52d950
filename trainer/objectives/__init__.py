"""Pre-training objectives, computed inside one module's forward so DDP sees one graph.

`Pretrainer(batch, task)` encodes a batch and returns the weighted total
and each term, for the task of the step ("valp", "tavp", or "paired": the
related systems' objectives of `objective.paired`, see `paired_losses.py`).
"""
from __future__ import annotations

import torch
from torch import nn

from vlmixer.trainer.config import ObjectiveConfig
from vlmixer.trainer.model import VLMixerModel
from vlmixer.trainer.objectives.paired_losses import PairedObjectives
from vlmixer.trainer.objectives.tavp import patch_concept_loss
from vlmixer.trainer.objectives.valp import cmcl_loss, mlm_loss

TASKS = ("valp", "tavp", "paired")


class Pretrainer(nn.Module):
    def __init__(self, *, model: VLMixerModel, objective: ObjectiveConfig) -> None:
        super().__init__()
        self.model = model
        self.obj = objective
        # registered only when used, so VALP/TAVP-only runs keep their parameter list and checkpoints
        used = any(w > 0 for w in objective.paired.values()) or any(w > 0 for w in objective.views.values())
        self.paired = PairedObjectives(model=model, objective=objective) if used else None

    def extra_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs beyond the model: paired heads, momentum model, queues."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.extra_state()
        if set(state) != set(mine):
            from vlmixer.errors import VlmixerError

            raise VlmixerError(f"checkpoint objective state has {sorted(set(state) ^ set(mine))[:3]} that this "
                               "config does not (or the reverse): resume with the checkpoint's objective.paired")
        for k, v in state.items():
            mine[k].copy_(v)

    def forward(self, batch: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
        if task == "paired" and self.paired is not None:  # encodes its own row subsets
            return self.paired(self.model, batch)
        enc = self.model.encode(batch)
        o, m = self.obj, self.model
        if task == "valp":
            B = enc.hidden.shape[0] // 2  # rows: B masked text views, then B masked multi-modal views
            mlm, n_mlm = mlm_loss(m.mlm_logits, enc.hidden[B:], batch["mlm_labels"][B:])
            proj = m.project(enc.cls)
            cl, n_neg = cmcl_loss(proj[:B], proj[B:], o.tau, o.cmcl_global_negatives)
            total = o.mlm_weight * mlm + o.cmcl_weight * cl
            res = {"mlm": mlm.detach(), "cmcl": cl.detach(),
                   "mlm_tokens": torch.tensor(float(n_mlm)), "cmcl_candidates": torch.tensor(float(n_neg)),
                   # under gradient accumulation these are the global micro-batch's, not the optimiser batch's
                   "cmcl_negatives": torch.tensor(float(n_neg - 1))}
            if self.paired is not None and self.paired.view_terms:  # objective.views on the CMC views
                views = self.paired.views(m, batch, enc)
                for t in self.paired.view_terms:  # the rest (the temperature) is logged only
                    total = total + t.weight * views[f"view_{t.name}"]
                res.update({name: term.detach() for name, term in views.items()})
            return {"loss": total, **res}
        if task == "tavp":
            tag, n_tag = mlm_loss(m.mlm_logits, enc.hidden, batch["mlm_labels"])
            patch_hidden = enc.hidden[batch["is_patch"]]
            pc, n_pc = patch_concept_loss(m.concept_logits, patch_hidden, batch["patch_labels"])
            total = o.tag_weight * tag + o.patch_weight * pc
            return {"loss": total, "tag": tag.detach(), "patch": pc.detach(),
                    "tag_tokens": torch.tensor(float(n_tag)), "patch_targets": torch.tensor(float(n_pc))}
        raise ValueError(f"unknown task {task!r} (expected one of {TASKS})")
