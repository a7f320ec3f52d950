"""Cross-Modal CutMix (SPEC 4): which grounded words become which gallery patches.

For each grounded word of a sentence, with probability r_cmc, one patch of
the word's concept is drawn from a candidate pool (K patches of the concept
drawn uniformly without replacement, or the whole concept list when K = 0 or
the concept has no more than K patches) with probability proportional to

    p_i = c_i^con + r_ctx / |G_i| * sum_{j in G_i} c_ij^ctx

where G_i is the set of the patch's contextual concepts (the *other*
concepts detected in its source image, each with its best confidence there,
as the gallery's index stores them) that are also grounded concepts of the
sentence. A concept without patches leaves its word as text.

Everything here works on the gallery's memory-mapped index (concept lists,
per-patch confidence/image, per-image context), vectorised with numpy: one
sentence is a handful of small gathers, not a Python loop over patches. The
random stream is the caller's `numpy.random.Generator`, seeded per (seed,
epoch, sample index) by the dataset, so a sample mixes identically in any
worker, on any rank, before and after a resume.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from storage.gallery import GalleryReader
from trainer.config import CMCConfig


@dataclass(frozen=True)
class MixResult:
    """One sentence's CMC outcome, aligned with its grounded-word spans."""

    replaced: np.ndarray  # (N,) bool: the word became a patch
    patch_ids: np.ndarray  # (N,) int64 global patch id, -1 where the word stays text
    weight: np.ndarray  # (N,) float64 p_i of the chosen patch (unnormalised), nan where text
    prob: np.ndarray  # (N,) float64 probability the chosen patch had within its pool, nan where text


class CrossModalCutMix:
    """Draws patches for grounded words from a gallery's concept index. Fork-safe.

    The index arrays are fetched lazily from the `GalleryReader` in each
    process (the reader reopens its memory maps after a fork), so the object
    can be handed to DataLoader workers by fork or by pickling.
    """

    def __init__(self, *, gallery: GalleryReader, r_cmc: float = 0.5, r_ctx: float = 0.5, k_shot: int = 15) -> None:
        self.gallery = gallery
        self.r_cmc = float(r_cmc)
        self.r_ctx = float(r_ctx)
        self.k_shot = int(k_shot)
        self._pid = -1
        self._a: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, gallery: GalleryReader, cfg: CMCConfig) -> CrossModalCutMix:
        return cls(gallery=gallery, r_cmc=cfg.r_cmc, r_ctx=cfg.r_ctx, k_shot=cfg.k_shot)

    def __getstate__(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["_pid"], d["_a"] = -1, {}
        return d

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        # plain ndarray views of the memmaps: indexing an np.memmap subclass costs several times more
        if self._pid != os.getpid():
            self._a = {k: np.asarray(v) for k, v in self.gallery.patch_arrays().items()}
            self._pid = os.getpid()
        return self._a

    # -- the three steps, public so tests and `mix show` can use each alone ----------------
    def draw_pool(self, concept: int, rng: np.random.Generator) -> np.ndarray:
        """Patch ids of the word's candidate pool: K uniform without replacement, or all."""
        a = self.arrays
        lo, hi = int(a["concept_offsets"][concept]), int(a["concept_offsets"][concept + 1])
        n = hi - lo
        if self.k_shot and n > self.k_shot:
            return a["concept_patches"][lo + rng.choice(n, self.k_shot, replace=False)]
        return a["concept_patches"][lo:hi]

    def weights(self, pool: np.ndarray, sentence_concepts: np.ndarray) -> np.ndarray:
        """p_i of each patch in `pool` (float64), for a sentence grounding `sentence_concepts`."""
        a = self.arrays
        pool = np.asarray(pool, dtype=np.int64)
        sent = np.unique(np.asarray(sentence_concepts, dtype=np.int64))
        conf = a["patch_conf"][pool].astype(np.float64)
        if self.r_ctx == 0.0 or len(pool) == 0:
            return conf
        img = a["patch_image"][pool]
        own = a["patch_concept"][pool]
        off = a["image_ctx_offsets"]
        starts, ends = off[img], off[img + 1]
        lens = ends - starts
        total = int(lens.sum())
        if total == 0:
            return conf
        owner = np.repeat(np.arange(len(pool)), lens)
        first = np.cumsum(lens) - lens
        flat = np.arange(total) - np.repeat(first, lens) + np.repeat(starts, lens)
        cc = a["image_ctx_concepts"][flat]
        cf = a["image_ctx_confs"][flat].astype(np.float64)
        # few grounded concepts per sentence: a broadcast compare beats np.isin here
        keep = (cc[:, None] == sent[None, :]).any(axis=1) & (cc != own[owner])
        cnt = np.bincount(owner[keep], minlength=len(pool))
        sm = np.bincount(owner[keep], weights=cf[keep], minlength=len(pool))
        return conf + np.where(cnt > 0, self.r_ctx * sm / np.maximum(cnt, 1), 0.0)

    @staticmethod
    def choose(weights: np.ndarray, segments: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Inverse-CDF pick of one index per segment, proportional to `weights`.

        `segments` holds each segment's start (len = n_segments + 1, last = len(weights));
        `u` one uniform [0, 1) per segment. A segment whose weights sum to 0 picks uniformly.
        Returns indices into `weights`.
        """
        w = np.asarray(weights, dtype=np.float64)
        lo, hi = segments[:-1], segments[1:]
        cs = np.concatenate([[0.0], np.cumsum(w)])
        base, tot = cs[lo], cs[hi] - cs[lo]
        flat = tot <= 0
        target = base + u * tot
        idx = np.searchsorted(cs, target, side="right") - 1
        idx = np.clip(idx, lo, hi - 1)
        if flat.any():
            idx[flat] = lo[flat] + np.minimum((u[flat] * (hi[flat] - lo[flat])).astype(np.int64),
                                              hi[flat] - lo[flat] - 1)
        return idx

    # -- one sentence -----------------------------------------------------------------------
    def sample(self, span_concepts: np.ndarray, rng: np.random.Generator) -> MixResult:
        """Mix one sentence whose grounded words have concepts `span_concepts` (in span order).

        Random stream order (fixed, for reproducibility): N replacement coins, then each
        replaced word's pool draw (in span order), then one uniform per word that has patches.
        """
        span_concepts = np.asarray(span_concepts, dtype=np.int64).reshape(-1)
        n = len(span_concepts)
        patch_ids = np.full(n, -1, dtype=np.int64)
        weight = np.full(n, np.nan)
        prob = np.full(n, np.nan)
        if n == 0:
            return MixResult(np.zeros(0, bool), patch_ids, weight, prob)
        coins = rng.random(n) < self.r_cmc
        words = np.flatnonzero(coins)
        pools, owners = [], []
        for w in words:
            pool = self.draw_pool(int(span_concepts[w]), rng)
            if len(pool):
                pools.append(pool)
                owners.append(w)
        if not pools:
            return MixResult(np.zeros(n, bool), patch_ids, weight, prob)
        lens = np.array([len(p) for p in pools], dtype=np.int64)
        flat_pool = np.concatenate(pools)
        seg = np.concatenate([[0], np.cumsum(lens)])
        # G_i needs only the sentence's grounded concepts; pools of several words share one call
        p = self.weights(flat_pool, span_concepts)
        u = rng.random(len(pools))
        pick = self.choose(p, seg, u)
        owners_a = np.asarray(owners, dtype=np.int64)
        patch_ids[owners_a] = flat_pool[pick]
        weight[owners_a] = p[pick]
        tot = np.add.reduceat(p, seg[:-1])
        prob[owners_a] = np.where(tot > 0, p[pick] / np.where(tot > 0, tot, 1), 1.0 / lens)
        return MixResult(patch_ids >= 0, patch_ids, weight, prob)


def sample_rng(seed: int, salt: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample: independent of worker, rank and resume."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, salt, epoch, index])))
