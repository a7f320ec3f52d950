"""Cross-Modal CutMix against the VLMixer paper's p_i, with p_i computed here from the hand-set gallery."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.synthetic import write_gallery
from vlmixer.trainer.cmc import CrossModalCutMix

CONCEPTS = ["dog", "cat", "ball", "tree", "zebra"]
DOG, CAT, BALL, TREE, ZEBRA = range(5)
# image -> [(concept, confidence)]; zebra has no patch
IMAGES = [
    [(DOG, 0.9), (CAT, 0.8), (BALL, 0.3)],
    [(DOG, 0.5), (TREE, 0.7)],
    [(DOG, 0.2)],
    [(DOG, 0.6), (CAT, 0.4), (CAT, 0.9), (BALL, 0.5)],
    [(CAT, 0.5), (BALL, 0.6)],
    [(DOG, 0.35), (BALL, 0.95), (DOG, 0.1)],
]


def expected_p(concept: int, sentence: set[int], r_ctx: float) -> dict[tuple[int, float], float]:
    """p_i of every patch of `concept`, keyed (image, confidence), straight from the paper's formula."""
    out = {}
    for img, patches in enumerate(IMAGES):
        best: dict[int, float] = {}
        for c, f in patches:
            best[c] = max(best.get(c, 0.0), f)
        for c, f in patches:
            if c != concept:
                continue
            G = [j for j in best if j != concept and j in sentence]  # contextual concepts ∩ grounded ones
            ctx = r_ctx / len(G) * sum(best[j] for j in G) if G else 0.0
            out[(img, round(f, 4))] = f + ctx
    return out


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> GalleryReader:
    root = write_gallery(tmp_path_factory.mktemp("cmc") / "g", CONCEPTS, IMAGES, feature_dim=8)
    return GalleryReader(root)


def key_of(g: GalleryReader, pid: int) -> tuple[int, float]:
    p = g.patch(int(pid))
    return p.image, round(p.confidence, 4)


def within_sampling_error(counts: Counter, n: int, probs: dict, z: float = 5.0) -> None:
    assert set(counts) <= set(probs)
    for k, p in probs.items():
        f = counts.get(k, 0) / n
        assert abs(f - p) <= z * np.sqrt(p * (1 - p) / n) + 1e-12, (k, f, p)


def test_k0_draws_follow_p_i(gallery: GalleryReader) -> None:
    cmc = CrossModalCutMix(gallery=gallery, r_cmc=1.0, r_ctx=0.5, k_shot=0)
    sentence = np.array([DOG, CAT, BALL])
    n = 100_000
    rng = np.random.default_rng(7)
    draws = np.array([cmc.sample(sentence, rng).patch_ids for _ in range(n)])
    for w, concept in enumerate(sentence):
        p = expected_p(int(concept), set(sentence.tolist()), 0.5)
        tot = sum(p.values())
        pid_to_key = {pid: key_of(gallery, pid) for pid in np.unique(draws[:, w])}
        counts = Counter(pid_to_key[pid] for pid in draws[:, w])
        within_sampling_error(counts, n, {k: v / tot for k, v in p.items()})
        assert chisquare([counts.get(k, 0) for k in p], [n * v / tot for v in p.values()]).pvalue > 1e-4


def test_weights_equal_formula_and_r_ctx_zero_is_confidence(gallery: GalleryReader) -> None:
    pids, _ = gallery.concept_patches(DOG)
    for r_ctx in (0.0, 0.5, 1.0):
        cmc = CrossModalCutMix(gallery=gallery, r_cmc=1.0, r_ctx=r_ctx, k_shot=0)
        for sent in ({DOG}, {DOG, CAT}, {DOG, CAT, BALL, TREE}):
            exp = expected_p(DOG, sent, r_ctx)
            got = cmc.weights(np.asarray(pids), np.array(sorted(sent)))
            for pid, w in zip(pids, got):
                assert w == pytest.approx(exp[key_of(gallery, pid)], rel=1e-6)


def test_k_shot_conditional_on_fixed_pool(gallery: GalleryReader) -> None:
    cmc = CrossModalCutMix(gallery=gallery, r_cmc=1.0, r_ctx=0.5, k_shot=3)
    all_dogs = np.asarray(gallery.concept_patches(DOG)[0])
    assert len(all_dogs) == 6
    pool = all_dogs[[4, 0, 2]]
    real_draw = cmc.draw_pool
    # condition the dog word on one drawn pool; the cat word keeps its own K-shot draws
    cmc.draw_pool = lambda concept, rng: pool if concept == DOG else real_draw(concept, rng)
    sentence = np.array([DOG, CAT])
    p = expected_p(DOG, {DOG, CAT}, 0.5)
    keys = [key_of(gallery, pid) for pid in pool]
    tot = sum(p[k] for k in keys)
    n = 100_000
    rng = np.random.default_rng(11)
    res = [cmc.sample(sentence, rng) for _ in range(n)]
    picked = Counter(int(r.patch_ids[0]) for r in res)
    counts = Counter({key_of(gallery, pid): c for pid, c in picked.items()})
    within_sampling_error(counts, n, {k: p[k] / tot for k in keys})
    # the reported probability is p_i normalised over the pool
    r0 = res[0]
    assert r0.prob[0] == pytest.approx(p[key_of(gallery, r0.patch_ids[0])] / tot)
    assert r0.weight[0] == pytest.approx(p[key_of(gallery, r0.patch_ids[0])])


def test_pools_are_uniform_without_replacement(gallery: GalleryReader) -> None:
    cmc = CrossModalCutMix(gallery=gallery, r_cmc=1.0, r_ctx=0.5, k_shot=3)
    dogs = set(np.asarray(gallery.concept_patches(DOG)[0]).tolist())
    rng = np.random.default_rng(3)
    n = 60_000
    subsets: Counter = Counter()
    for _ in range(n):
        pool = cmc.draw_pool(DOG, rng)
        assert len(pool) == 3 and len(set(pool.tolist())) == 3 and set(pool.tolist()) <= dogs
        subsets[frozenset(pool.tolist())] += 1
    all_subsets = [frozenset(s) for s in itertools.combinations(sorted(dogs), 3)]
    assert set(subsets) == set(all_subsets)
    assert chisquare([subsets[s] for s in all_subsets]).pvalue > 1e-4
    # fewer patches than K: the whole list
    assert sorted(cmc.draw_pool(TREE, rng).tolist()) == sorted(np.asarray(gallery.concept_patches(TREE)[0]).tolist())


def test_r_cmc_frequency_and_concept_without_patch(gallery: GalleryReader) -> None:
    cmc = CrossModalCutMix(gallery=gallery, r_cmc=0.5, r_ctx=0.5, k_shot=15)
    sentence = np.array([DOG, ZEBRA, CAT, BALL])
    rng = np.random.default_rng(5)
    n = 20_000
    rep = np.array([cmc.sample(sentence, rng).replaced for _ in range(n)])
    assert not rep[:, 1].any()  # zebra has no patch: stays text
    for w in (0, 2, 3):
        f = rep[:, w].mean()
        assert abs(f - 0.5) < 5 * np.sqrt(0.25 / n), f
    assert cmc.sample(np.zeros(0, np.int64), rng).replaced.shape == (0,)
    none = CrossModalCutMix(gallery=gallery, r_cmc=0.0, r_ctx=0.5, k_shot=15)
    assert not none.sample(sentence, rng).replaced.any()


def test_chosen_patch_has_the_word_concept(gallery: GalleryReader) -> None:
    cmc = CrossModalCutMix(gallery=gallery, r_cmc=1.0, r_ctx=0.5, k_shot=2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        r = cmc.sample(np.array([BALL, CAT, TREE]), rng)
        for c, pid in zip((BALL, CAT, TREE), r.patch_ids):
            assert gallery.patch(int(pid)).concept == c
