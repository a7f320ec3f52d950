"""Multi-modal sentences and batches built from tiny stores: spans, positions, determinism."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.synthetic import CONCEPTS, tiny_stores, write_text_store, write_vocab
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.trainer.cmc import CrossModalCutMix
from vlmixer.trainer.data import (
    ResumableBatchSampler,
    TaskLoaders,
    TextCorpus,
    ValpDataset,
    WordPieceVocab,
    collate,
    mix_views,
)
from vlmixer.trainer.masking import IGNORE, MaskSpec


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_stores(tmp_path_factory.mktemp("stores"), n_images=24, n_sentences=64, feature_dim=16, shard_size=20)


def dataset(stores: tuple[Path, Path], *, r_cmc: float = 0.5, seed: int = 0, mask_prob: float = 0.15,
            max_len: int = 80) -> ValpDataset:
    g, t = stores
    gallery = GalleryReader(g)
    text = TextStoreReader(t, expect_concepts_sha256=gallery.concepts.sha256)
    vocab = WordPieceVocab.read(text.vocab_file)
    mask = vocab.mask_spec(mask_prob, 0.8, 0.1)
    return ValpDataset(corpus=TextCorpus([text]), cmc=CrossModalCutMix(gallery=gallery, r_cmc=r_cmc, k_shot=4),
                       vocab=vocab, mask=mask, max_len=max_len, seed=seed)


def test_each_replaced_word_becomes_exactly_one_patch_slot(stores: tuple[Path, Path]) -> None:
    ds = dataset(stores, r_cmc=1.0)
    vocab, gallery = ds.vocab, ds.cmc.gallery
    frisbee = CONCEPTS.index("frisbee")
    seen_multi_piece = 0
    for i in range(len(ds)):
        tokens, spans, mix, _ = ds.mixed(0, i)
        text, mm, pids = mix_views(tokens, spans, mix, vocab)
        rep = spans[mix.replaced]
        assert len(mm.ids) == len(text.ids) - int(np.sum(rep[:, 3] - rep[:, 2] - 1))
        assert int(mm.is_patch.sum()) == len(rep) == len(pids)
        # a patch takes its word's first word-piece position; every other token keeps its text-view position
        assert np.array_equal(mm.pos[mm.is_patch], rep[:, 2] + 1)
        kept = ~mm.is_patch
        assert np.array_equal(mm.ids[kept], text.ids[mm.pos[kept]])
        for (s, e, c), pid in zip(rep[:, 2:5].tolist(), pids):
            assert gallery.patch(int(pid)).concept == c
            seen_multi_piece += (e - s > 1) and c == frisbee
        # zebra has no patch: always text
        assert not np.any(mix.replaced & (spans[:, 4] == CONCEPTS.index("zebra")))
    assert seen_multi_piece > 0  # "frisbee" is fr ##is ##bee: three pieces became one patch


def test_example_rows_masking_and_features(stores: tuple[Path, Path]) -> None:
    ds = dataset(stores, r_cmc=1.0, mask_prob=0.5)
    text, mm = ds[(0, 3)]
    _, _, mix, _ = ds.mixed(0, 3)
    assert text.ids[0] == ds.vocab.cls and text.ids[-1] == ds.vocab.sep
    assert np.all(text.labels == IGNORE)  # text view: CMCL only
    assert np.all(mm.labels[mm.is_patch] == IGNORE) and mm.labels[0] == IGNORE and mm.labels[-1] == IGNORE
    pids = mix.patch_ids[mix.replaced]
    assert np.array_equal(mm.feats, ds.cmc.gallery.features(pids))
    assert mm.spatial.shape == (len(pids), 6) and np.all((mm.spatial >= 0) & (mm.spatial <= 1.0001))
    assert np.all(mm.types[mm.is_patch] == 1) and np.all(mm.types[~mm.is_patch] == 0)


def test_truncation_drops_spans_past_the_limit(stores: tuple[Path, Path]) -> None:
    ds = dataset(stores, r_cmc=1.0, max_len=6)
    for i in range(len(ds)):
        tokens, spans, _, _ = ds.mixed(0, i)
        assert len(tokens) <= 4 and (len(spans) == 0 or spans[:, 3].max() <= len(tokens))
        text, mm = ds[(0, i)]
        assert len(text.ids) <= 6


def test_sentence_without_grounded_words(tmp_path: Path, stores: tuple[Path, Path]) -> None:
    vocab_file = write_vocab(tmp_path / "vocab.txt")
    t = write_text_store(tmp_path / "t", CONCEPTS, vocab_file, [("the park .", []), ("a dog runs .", [(2, 5, 0)])])
    gallery = GalleryReader(stores[0])
    vocab = WordPieceVocab.read(vocab_file)
    ds = ValpDataset(corpus=TextCorpus([TextStoreReader(t)]), cmc=CrossModalCutMix(gallery=gallery, r_cmc=1.0),
                     vocab=vocab, mask=vocab.mask_spec(0.15, 0.8, 0.1), max_len=80, seed=0)
    batch = collate([ds[(0, 0)], ds[(0, 1)]])
    assert batch["input_ids"].shape[0] == 4 and int(batch["is_patch"].sum()) == 1
    assert batch["patch_feats"].shape == (1, 16)


def test_same_seed_same_batch_any_worker_count(stores: tuple[Path, Path]) -> None:
    def batches(num_workers: int, seed: int = 0, start: int = 0) -> list[dict[str, torch.Tensor]]:
        ds = dataset(stores, seed=seed)
        loaders = TaskLoaders({"valp": ds}, micro_batch=8, rank=0, world_size=1, seed=seed, num_workers=num_workers,
                              prefetch_factor=2, pin_memory=False, consumed={"valp": start})
        return [loaders.next("valp") for _ in range(3)]

    a, b = batches(0), batches(2)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    # resuming the sampler at batch 1 yields batches 1, 2 of the uninterrupted sequence
    c = batches(0, start=1)
    for x, y in zip(a[1:], c):
        assert all(torch.equal(x[k], y[k]) for k in x)
    d = batches(0, seed=1)
    assert not torch.equal(a[0]["input_ids"], d[0]["input_ids"]) or not torch.equal(
        a[0]["patch_feats"], d[0]["patch_feats"])


def test_sampler_epochs_and_ranks_partition_the_data() -> None:
    size, micro, world = 50, 4, 3
    per_epoch = size // (micro * world)
    seen: list[int] = []
    for r in range(world):
        s = ResumableBatchSampler(size=size, micro_batch=micro, rank=r, world_size=world, seed=1, salt=2)
        it = iter(s)
        keys = [k for _ in range(per_epoch) for k in next(it)]
        assert all(e == 0 for e, _ in keys)
        seen += [i for _, i in keys]
        assert next(it)[0][0] == 1  # then epoch 1
    assert len(seen) == len(set(seen)) == per_epoch * micro * world


def test_mask_tokens_ratios() -> None:
    from vlmixer.trainer.masking import mask_tokens

    rng = np.random.default_rng(0)
    n = 200_000
    ids = rng.integers(5, 1000, n)
    eligible = rng.random(n) < 0.7
    spec = MaskSpec(prob=0.15, mask_frac=0.8, random_frac=0.1, mask_id=4, vocab_size=1000)
    out, labels = mask_tokens(ids, eligible, spec, rng)
    sel = labels != IGNORE
    assert not np.any(sel & ~eligible) and np.array_equal(out[~eligible], ids[~eligible])
    assert np.array_equal(labels[sel], ids[sel])
    m = eligible.sum()
    assert abs(sel.sum() / m - 0.15) < 5 * np.sqrt(0.15 * 0.85 / m)
    k = sel.sum()
    masked = (out[sel] == 4).mean()
    same = (out[sel] == ids[sel]).mean()
    changed = 1 - masked - same
    assert abs(masked - 0.8) < 5 * np.sqrt(0.16 / k)
    # random replacements land on the original id with probability 1/1000
    assert abs(changed - 0.1 * 0.999) < 5 * np.sqrt(0.09 / k)
    assert abs(same - (0.1 + 0.1 * 0.001)) < 5 * np.sqrt(0.09 / k)


def test_text_cache_keeps_at_most_n_shards(stores: tuple[Path, Path]) -> None:
    text = TextStoreReader(stores[1])
    assert text.num_shards > 2
    full, small = TextCorpus([text]), TextCorpus([text], cache_shards=1)
    for i in list(range(len(full))) + [0, len(full) - 1, 0]:
        a, b = full.get(i), small.get(i)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert len(small._cache) == 1
    assert len(full._cache) == text.num_shards
