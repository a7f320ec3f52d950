"""Losses against plain computations, TAVP targets, the model's input embedding."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.synthetic import CONCEPTS, write_gallery, write_vocab
from vlmixer.trainer.config import ModelConfig, ObjectiveConfig
from vlmixer.trainer.data import TavpDataset, WordPieceVocab, collate, concept_wordpieces
from vlmixer.trainer.masking import IGNORE
from vlmixer.trainer.model import VLMixerModel
from vlmixer.trainer.objectives import Pretrainer
from vlmixer.trainer.objectives.valp import cmcl_loss, mlm_loss

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64, "vocab_size": 0, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0}





def plain_cmcl(t: torch.Tensor, s: torch.Tensor, tau: float) -> float:
    """VLMixer's CMCL written out: -sum_m log(exp(f(T_m,S_m)/tau) / sum_l exp(f(T_m,S_l)/tau)), f = cosine."""
    M = t.shape[0]
    total = 0.0
    for m in range(M):
        def f(a: torch.Tensor, b: torch.Tensor) -> float:
            return float(torch.dot(a, b) / (a.norm() * b.norm()))
        num = math.exp(f(t[m], s[m]) / tau)
        den = sum(math.exp(f(t[m], s[j]) / tau) for j in range(M))
        total += -math.log(num / den)
    return total


def test_cmcl_equals_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    for M, d in ((1, 4), (5, 8), (16, 3)):
        t, s = torch.randn(M, d, generator=g, dtype=torch.float64), torch.randn(M, d, generator=g, dtype=torch.float64)
        loss, n = cmcl_loss(t, s, tau=0.1)
        assert n == M
        # our loss is the paper's sum over m divided by the batch size
        assert float(loss) * M == pytest.approx(plain_cmcl(t, s, 0.1), rel=1e-5)
    # aligned views give a lower loss than shuffled ones
    t = torch.randn(8, 6, generator=g)
    assert float(cmcl_loss(t, t + 0.01, 0.1)[0]) < float(cmcl_loss(t, t.roll(1, 0), 0.1)[0])


def test_mlm_loss_only_on_labelled_positions() -> None:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 4, generator=g)
    head = torch.nn.Linear(4, 11)
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1], labels[1, 3] = 7, 2
    loss, n = mlm_loss(head, hidden, labels)
    ref = F.cross_entropy(head(torch.stack([hidden[0, 1], hidden[1, 3]])), torch.tensor([7, 2]))
    assert n == 2 and loss.item() == pytest.approx(ref.item(), rel=1e-6)
    zero, n0 = mlm_loss(head, hidden, torch.full((2, 5), IGNORE))
    assert n0 == 0 and zero.item() == 0.0 and zero.requires_grad


@pytest.fixture(scope="module")
def tavp_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[GalleryReader, WordPieceVocab]:
    root = tmp_path_factory.mktemp("tavp")
    dog, cat, tl, fr = (CONCEPTS.index(c) for c in ("dog", "cat", "traffic light", "frisbee"))
    images = [[(dog, 0.9), (tl, 0.8), (dog, 0.7), (fr, 0.6), (cat, 0.3)], [], [(cat, 0.5)]]
    g = GalleryReader(write_gallery(root / "g", CONCEPTS, images, feature_dim=16))
    return g, WordPieceVocab.read(write_vocab(root / "vocab.txt"))


def tavp_dataset(g: GalleryReader, vocab: WordPieceVocab, *, tag_prob: float, patch_prob: float,
                 max_len: int = 100) -> TavpDataset:
    return TavpDataset(galleries=[g], tag_pieces=concept_wordpieces(vocab.path, CONCEPTS), vocab=vocab,
                       mask=vocab.mask_spec(tag_prob, 1.0, 0.0), patch_mask_prob=patch_prob, max_len=max_len,
                       max_tag_tokens=20, seed=0)


def test_tavp_targets(tavp_setup: tuple[GalleryReader, WordPieceVocab]) -> None:
    g, vocab = tavp_setup
    pieces = concept_wordpieces(vocab.path, CONCEPTS)
    # nothing masked: the tags are the image's concepts, most confident first, each once
    (row,) = tavp_dataset(g, vocab, tag_prob=1e-9, patch_prob=0.0)[(0, 0)]
    order = [CONCEPTS.index(c) for c in ("dog", "traffic light", "frisbee", "cat")]
    tags = np.concatenate([pieces[c] for c in order])
    n_tag = len(tags)
    assert np.array_equal(row.ids[: n_tag + 2], np.concatenate([[vocab.cls], tags, [vocab.sep]]))
    assert row.ids[-1] == vocab.sep and int(row.is_patch.sum()) == 5
    assert np.array_equal(row.feats, g.features(list(g.image_patches(0))))
    assert np.all(row.labels == IGNORE) and np.all(row.patch_labels == IGNORE)
    # everything masked: tag labels are the tag word-pieces, patch labels the patch concepts, features zeroed
    (row,) = tavp_dataset(g, vocab, tag_prob=0.999999, patch_prob=0.999999)[(0, 0)]
    assert np.array_equal(row.labels[1: n_tag + 1], tags) and np.all(row.ids[1: n_tag + 1] == vocab.mask)
    assert np.all(row.labels[n_tag + 1:] == IGNORE) and row.labels[0] == IGNORE
    concepts = [g.patch(p).concept for p in g.image_patches(0)]
    assert row.patch_labels.tolist() == concepts and not row.feats.any()
    # an image with zero patches is a valid (tag-less, patch-less) input
    (empty,) = tavp_dataset(g, vocab, tag_prob=0.15, patch_prob=0.15)[(0, 1)]
    assert empty.ids.tolist() == [vocab.cls, vocab.sep, vocab.sep] and not empty.is_patch.any()
    # the length cap is respected: fewer patches when tags take room
    (short,) = tavp_dataset(g, vocab, tag_prob=0.15, patch_prob=0.15, max_len=n_tag + 5)[(0, 0)]
    assert len(short.ids) == n_tag + 5 and int(short.is_patch.sum()) == 2


def test_model_places_patches_and_runs_tavp(tavp_setup: tuple[GalleryReader, WordPieceVocab]) -> None:
    g, vocab = tavp_setup
    torch.manual_seed(0)
    model = VLMixerModel.from_config(ModelConfig(bert=dict(TINY_BERT), feature_dim=16, proj_dim=8),
                                     vocab_size=vocab.size, num_concepts=len(CONCEPTS))
    ds = tavp_dataset(g, vocab, tag_prob=0.5, patch_prob=0.5)
    batch = collate([ds[(0, i)] for i in range(3)])
    model.eval()  # no dropout: compare embeddings exactly
    emb = model.embed(batch)
    patch = model.patch_embed(batch["patch_feats"], batch["patch_spatial"])
    assert torch.allclose(emb[batch["is_patch"]], patch)
    words = model.bert.embeddings.word_embeddings(batch["input_ids"])
    assert torch.allclose(emb[~batch["is_patch"]], words[~batch["is_patch"]])
    pre = Pretrainer(model=model, objective=ObjectiveConfig())
    model.train()
    out = pre(batch, "tavp")
    assert torch.isfinite(out["loss"]) and out["patch_targets"] > 0
    out["loss"].backward()
    assert model.concept_head[-1].weight.grad is not None
    # the MLM decoder is tied to the word embeddings
    assert model.mlm_head.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_pretrained_from_local_dir(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForPreTraining

    BertForPreTraining(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)).save_pretrained(tmp_path / "bert")
    m = VLMixerModel.from_config(ModelConfig(pretrained=str(tmp_path / "bert"), feature_dim=8, proj_dim=4),
                                 vocab_size=40, num_concepts=3)
    assert m.config.hidden_size == 16
    from vlmixer.errors import ConfigError

    with pytest.raises(ConfigError, match="vocabulary"):
        VLMixerModel.from_config(ModelConfig(pretrained=str(tmp_path / "bert")), vocab_size=41, num_concepts=3)
    with pytest.raises(ConfigError, match="cannot load"):
        VLMixerModel.from_config(ModelConfig(pretrained=str(tmp_path / "nope")), vocab_size=40, num_concepts=3)
