"""The single-stream transformer: BERT over text, tag and patch tokens in one sequence.

Text and tag tokens use BERT's word embeddings; a patch token is
LayerNorm(W_f feature + W_s spatial) with dropout, put where the word it
replaced was. BERT's embedding module then adds a position embedding and the
segment embedding (0 text, 1 patch) to both. VLMixer encodes a patch by its
feature and box alone, so by default (`model.patch_position: shared`) every
patch takes one shared position embedding, the last index: no 1-D order
(in TAVP that order would be the confidence rank) reaches the input. The encoder and the MLM head are
transformers' `BertForPreTraining` (tied word embeddings; pretrained weights
load by hub name or local directory); the CMCL projection and the patch
concept head are ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForPreTraining

from vlmixer.errors import ConfigError
from vlmixer.trainer.config import ModelConfig


class PatchEmbedding(nn.Module):
    """Region feature + 6-d box geometry -> one token embedding."""

    def __init__(self, *, feature_dim: int, hidden: int, dropout: float, eps: float = 1e-12) -> None:
        super().__init__()
        self.feature = nn.Linear(feature_dim, hidden)
        self.spatial = nn.Linear(6, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
        dt = self.feature.weight.dtype
        return self.dropout(self.norm(self.feature(feats.to(dt)) + self.spatial(spatial.to(dt))))


@dataclass
class Encoded:
    hidden: torch.Tensor  # (R, L, H) last layer
    cls: torch.Tensor  # (R, H)


class VLMixerModel(nn.Module):
    def __init__(self, *, bert: BertForPreTraining, feature_dim: int, proj_dim: int, num_concepts: int,
                 patch_dropout: float, patch_position: str = "shared") -> None:
        super().__init__()
        cfg = bert.config
        self.patch_position = patch_position
        self.bert = bert.bert
        self.mlm_head = bert.cls.predictions
        H = cfg.hidden_size
        self.patch_embed = PatchEmbedding(feature_dim=feature_dim, hidden=H, dropout=patch_dropout,
                                          eps=cfg.layer_norm_eps)
        self.cmcl_proj = nn.Linear(H, proj_dim)
        self.concept_head = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.LayerNorm(H, eps=cfg.layer_norm_eps),
                                          nn.Linear(H, num_concepts))
        std = cfg.initializer_range
        for m in (self.patch_embed, self.cmcl_proj, self.concept_head):
            for mod in m.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.normal_(mod.weight, std=std)
                    nn.init.zeros_(mod.bias)
        self.config = cfg

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, vocab_size: int, num_concepts: int) -> VLMixerModel:
        """Pretrained BERT when `cfg.pretrained` names one, else a random init from `cfg.bert`."""
        if cfg.pretrained:
            try:
                bert = BertForPreTraining.from_pretrained(cfg.pretrained)
            except (OSError, ValueError) as e:
                raise ConfigError(f"model.pretrained={cfg.pretrained!r}: cannot load BERT ({e})") from None
            if bert.config.vocab_size != vocab_size:
                raise ConfigError(f"model.pretrained has a vocabulary of {bert.config.vocab_size} word-pieces, the "
                                  f"data's vocab.txt {vocab_size}: tokenise the text with the model's vocabulary")
        else:
            fields: dict[str, Any] = dict(cfg.bert)
            if not fields.get("vocab_size"):
                fields["vocab_size"] = vocab_size
            elif fields["vocab_size"] != vocab_size:
                raise ConfigError(f"model.bert.vocab_size={fields['vocab_size']} but the vocab file has {vocab_size}")
            try:
                bert = BertForPreTraining(BertConfig(**fields))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"model.bert: {e}") from None
        return cls(bert=bert, feature_dim=cfg.feature_dim, proj_dim=cfg.proj_dim, num_concepts=num_concepts,
                   patch_dropout=cfg.patch_dropout, patch_position=cfg.patch_position)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Word embeddings, with patch slots overwritten by patch embeddings."""
        words = self.bert.embeddings.word_embeddings(batch["input_ids"])
        is_patch = batch["is_patch"]
        if batch["patch_feats"].shape[0]:
            patches = self.patch_embed(batch["patch_feats"], batch["patch_spatial"]).to(words.dtype)
            words = words.masked_scatter(is_patch.unsqueeze(-1), patches)
        return words

    def position_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The rows' position ids, patch slots set to the shared patch position unless `patch_position` is word."""
        pos = batch["position_ids"]
        if self.patch_position == "shared":
            pos = pos.masked_fill(batch["is_patch"], self.config.max_position_embeddings - 1)
        return pos

    def encode(self, batch: dict[str, torch.Tensor]) -> Encoded:
        out = self.bert(inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"], position_ids=self.position_ids(batch))
        hidden = out.last_hidden_state
        return Encoded(hidden=hidden, cls=hidden[:, 0])

    def forward(self, batch: dict[str, torch.Tensor]) -> Encoded:
        return self.encode(batch)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of selected hidden states (N, H) -> (N, V)."""
        return self.mlm_head(hidden)

    def project(self, cls: torch.Tensor) -> torch.Tensor:
        return self.cmcl_proj(cls)

    def concept_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.concept_head(hidden)
