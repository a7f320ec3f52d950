"""Retrieval probe: text->image and image->text Recall@K over paired data with the model's [CLS] similarity.

Why: pre-training is slow and its losses say little about what the model
can do; recall on held-out (image, caption) pairs is the number users watch
to see whether pre-training helps. A caption and an image are each encoded
alone (`[CLS] caption [SEP]`, `[CLS] patches [SEP]`, the rows the paired
task trains ITC on), projected by the CMCL/ITC projection and compared by
cosine. Text->image: a caption hits at K when its image is among the K
most similar images. Image->text: an image hits at K when any of its
captions is among the K most similar captions (the COCO convention).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlmixer.errors import ConfigError, VlmixerError
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.trainer.checkpoint import latest_checkpoint, load_checkpoint
from vlmixer.trainer.config import TrainConfig, saved_config
from vlmixer.trainer.data import TextCorpus, WordPieceVocab, collate, read_patches
from vlmixer.trainer.model import VLMixerModel
from vlmixer.trainer.paired_data import PairIndex, image_row, text_row

KS = (1, 5, 10)


def recall_at_k(sim: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K both ways from a (captions, images) similarity matrix and each caption's image column.

    Ties are broken against the right answer (a constant model scores 0, not chance by luck of order).
    """
    sim = sim.float()
    C, N = sim.shape
    gt = sim[torch.arange(C), caption_image]
    t2i_rank = (sim >= gt[:, None]).sum(1) - 1  # images scoring at least the right one, minus itself
    s = sim.t()  # (images, captions)
    i2t_rank = torch.full((N,), C, dtype=torch.long)
    for i in range(N):
        own = (caption_image == i).nonzero()[:, 0]
        if len(own):
            best = s[i, own].max()
            i2t_rank[i] = (s[i] > best).sum() + ((s[i] == best).sum() - 1).clamp_min(0)
    has = torch.bincount(caption_image, minlength=N) > 0
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean()) if C else 0.0
        out[f"i2t_r{k}"] = float((i2t_rank[has] < k).float().mean()) if bool(has.any()) else 0.0
    return out


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                          ) -> tuple[VLMixerModel, TrainConfig, Path]:
    """The trained model of a checkpoint file or run directory (its latest checkpoint), in eval mode.

    The architecture comes from the checkpoint's config and the saved tensor
    shapes, so no BERT weights are downloaded; a `model.pretrained` run needs
    only its config.json (hub cache or local directory).
    """
    p = Path(path)
    if p.is_dir():
        ck = latest_checkpoint(p)
        if ck is None:
            raise VlmixerError(f"{p}: no checkpoint under {p / 'checkpoints'}")
        p = ck
    if not p.exists():
        raise VlmixerError(f"{p}: checkpoint does not exist")
    state = load_checkpoint(p)
    cfg = saved_config(state["config"])
    sd = state["model"]
    vocab_size = int(sd["bert.embeddings.word_embeddings.weight"].shape[0])
    num_concepts = int(sd["concept_head.3.weight"].shape[0])
    from transformers import BertConfig, BertForPreTraining

    if cfg.model.pretrained:
        try:
            bcfg = BertConfig.from_pretrained(cfg.model.pretrained)
        except (OSError, ValueError) as e:
            raise ConfigError(f"checkpoint's model.pretrained={cfg.model.pretrained!r}: cannot read its BERT config "
                              f"({e})") from None
    else:
        bcfg = BertConfig(**{**cfg.model.bert, "vocab_size": vocab_size})
    model = VLMixerModel(bert=BertForPreTraining(bcfg), feature_dim=cfg.model.feature_dim,
                         proj_dim=cfg.model.proj_dim, num_concepts=num_concepts, patch_dropout=cfg.model.patch_dropout)
    model.load_state_dict(sd)
    return model.to(device).eval(), cfg, p


@dataclass
class PairedSet:
    """Images (gallery indices) and captions (global sentence indices) with each caption's image column."""

    images: np.ndarray
    captions: np.ndarray
    caption_image: np.ndarray


def paired_set(texts: Sequence[TextStoreReader], gallery: GalleryReader, n_images: int | None = None) -> PairedSet:
    """The first `n_images` distinct images that have captions (in caption order), with all their captions."""
    idx = PairIndex(texts, gallery)
    if len(idx) == 0:
        raise VlmixerError(f"no caption has an image key found in the gallery: {idx.explain()}")
    order: dict[int, int] = {}
    for im in idx.image.tolist():
        if im not in order and (n_images is None or len(order) < n_images):
            order[im] = len(order)
    keep = np.array([im in order for im in idx.image.tolist()])
    return PairedSet(images=np.array(list(order), np.int64), captions=idx.sentence[keep],
                     caption_image=np.array([order[im] for im in idx.image[keep].tolist()], np.int64))


@torch.no_grad()
def _embed(model: VLMixerModel, rows: list, batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    for k in range(0, len(rows), batch_size):
        batch = {n: v.to(device) for n, v in collate([[r] for r in rows[k: k + batch_size]]).items()}
        out.append(F.normalize(model.project(model.encode(batch).cls).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.cmcl_proj.out_features)


def evaluate_retrieval(model: VLMixerModel, texts: Sequence[TextStoreReader], gallery: GalleryReader,
                       vocab: WordPieceVocab, *, n_images: int | None = None, max_caption_tokens: int = 40,
                       max_patches: int = 36, batch_size: int = 64, device: str | torch.device = "cpu"
                       ) -> dict[str, Any]:
    """Recall@1/5/10 both ways over the paired set; also its size and the chance level of t2i R@1."""
    dev = torch.device(device)
    ps = paired_set(texts, gallery, n_images)
    corpus = TextCorpus(texts)
    t_rows = []
    for s in ps.captions.tolist():
        tokens, _ = corpus.get(int(s))
        t_rows.append(text_row(np.concatenate([[vocab.cls], tokens[:max_caption_tokens], [vocab.sep]])))
    v_rows = []
    for im in ps.images.tolist():
        pr = gallery.image_patches(int(im))
        feats, spatial, _ = read_patches(gallery, np.arange(pr.start, pr.start + min(len(pr), max_patches)))
        v_rows.append(image_row(vocab, feats, spatial))
    model.eval()
    t = _embed(model, t_rows, batch_size, dev)
    v = _embed(model, v_rows, batch_size, dev)
    res: dict[str, Any] = recall_at_k(t @ v.t(), torch.from_numpy(ps.caption_image))
    res.update(images=len(ps.images), captions=len(ps.captions), chance_t2i_r1=1.0 / max(1, len(ps.images)))
    return res
