"""Config -> opened stores and datasets; shared by the trainer, `mix show` and the bench.

Stores are opened once here (in the training process) and checked against
each other (one concept vocabulary, one word-piece vocabulary, the model's
feature size) before any worker starts; the reader objects then travel to
DataLoader workers and open their files there.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmixer.errors import ConfigError
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.trainer.cmc import CrossModalCutMix
from vlmixer.trainer.config import TrainConfig
from vlmixer.trainer.data import TavpDataset, TextCorpus, ValpDataset, WordPieceVocab, concept_wordpieces


@dataclass
class Stores:
    gallery: GalleryReader
    texts: list[TextStoreReader]
    tavp_galleries: list[GalleryReader]
    vocab: WordPieceVocab
    paired_texts: list[TextStoreReader] = field(default_factory=list)


def open_stores(cfg: TrainConfig) -> Stores:
    d = cfg.data
    gallery = GalleryReader(d.gallery)
    sha = gallery.concepts.sha256
    if gallery.feature_dim != cfg.model.feature_dim:
        raise ConfigError(f"model.feature_dim={cfg.model.feature_dim} but the gallery {d.gallery} stores "
                          f"{gallery.feature_dim}-d features")
    texts = [TextStoreReader(p, expect_concepts_sha256=sha) for p in d.text_stores]
    firsts = texts or [TextStoreReader(p) for p in d.paired_text_stores[:1]]
    vocab_file = d.vocab_file or (str(firsts[0].vocab_file) if firsts else "")
    if not vocab_file:
        raise ConfigError("no word-piece vocabulary: set data.vocab_file or data.text_stores")
    vocab = WordPieceVocab.read(vocab_file)
    ref = Path(vocab_file).read_bytes()
    paired = [TextStoreReader(p, expect_concepts_sha256=sha) for p in d.paired_text_stores]
    for t in texts + paired:
        if t.vocab_file.read_bytes() != ref:
            raise ConfigError(f"{t.root}: tokenised with another word-piece vocabulary than {vocab_file}; "
                              "all text stores must share the model's vocabulary")
    tavp = [GalleryReader(p, expect_concepts_sha256=sha) for p in d.tavp_galleries] or [gallery]
    for g in tavp:
        if g.feature_dim != gallery.feature_dim:
            raise ConfigError(f"{g.root}: {g.feature_dim}-d features, the CMC gallery has {gallery.feature_dim}")
    return Stores(gallery=gallery, texts=texts, tavp_galleries=tavp, vocab=vocab, paired_texts=paired)


def valp_dataset(cfg: TrainConfig, texts: list[TextStoreReader], gallery: GalleryReader, vocab: WordPieceVocab
                 ) -> ValpDataset:
    """VALP's dataset as `cfg` trains it; `vlmixer mix` builds it here too, so it shows the training input."""
    o, d = cfg.objective, cfg.data
    return ValpDataset(corpus=TextCorpus(texts, cache_shards=d.text_cache_shards),
                       cmc=CrossModalCutMix.from_config(gallery, cfg.cmc, seed=cfg.run.seed),
                       vocab=vocab, mask=vocab.mask_spec(o.mlm_prob, o.mlm_mask_frac, o.mlm_random_frac),
                       max_len=d.max_len_valp, seed=cfg.run.seed)


def build_datasets(cfg: TrainConfig, stores: Stores) -> dict[str, torch.utils.data.Dataset]:
    """The datasets of the tasks the config trains ("valp", "tavp", "paired")."""
    o, d = cfg.objective, cfg.data
    mask = stores.vocab.mask_spec(o.mlm_prob, o.mlm_mask_frac, o.mlm_random_frac)
    out: dict[str, torch.utils.data.Dataset] = {}
    if d.tavp_ratio < 1.0 and d.paired_ratio < 1.0:
        biggest = int(stores.gallery.concept_counts().max()) if len(stores.gallery.concepts) else 0
        if cfg.cmc.k_shot == 0 and biggest > 100_000:
            warnings.warn(f"cmc.k_shot=0 computes p_i over whole concept lists (up to {biggest:,} patches here) "
                          "for every replaced word; mixing will be slow. The paper uses 15-shot.", stacklevel=2)
        for t in stores.texts:
            if t.manifest.get("spans") == 0:
                raise ConfigError(f"{t.root}: text store has no grounded spans in {t.num_sentences} sentences; "
                                  "VALP mixes and predicts grounded words, so there is nothing to train: tag it "
                                  "with the gallery's concepts (`vlmixer text tag --concepts GALLERY`)")
        out["valp"] = valp_dataset(cfg, stores.texts, stores.gallery, stores.vocab)
    if d.tavp_ratio > 0.0 and d.paired_ratio < 1.0:
        pieces = concept_wordpieces(stores.vocab.path, stores.gallery.concepts.names)
        out["tavp"] = TavpDataset(galleries=stores.tavp_galleries, tag_pieces=pieces, vocab=stores.vocab, mask=mask,
                                  patch_mask_prob=o.patch_mask_prob, max_len=d.max_len_tavp,
                                  max_tag_tokens=d.max_tag_tokens, seed=cfg.run.seed)
    if d.paired_ratio > 0.0:
        from vlmixer.trainer.paired_data import PairedDataset, PairIndex

        out["paired"] = PairedDataset(
            corpus=TextCorpus(stores.paired_texts, cache_shards=d.text_cache_shards),
            index=PairIndex(stores.paired_texts, stores.gallery), gallery=stores.gallery, vocab=stores.vocab,
            tag_pieces=concept_wordpieces(stores.vocab.path, stores.gallery.concepts.names),
            max_caption_tokens=d.max_caption_tokens, max_patches=d.max_patches, seed=cfg.run.seed,
            mask=mask if o.paired.get("mlm", 0) > 0 else None)
    return out
