"""Cross-Modal CutMix (VLMixer, Wang et al., ICML 2022): which grounded words become which gallery patches.

For each grounded word of a sentence, with probability r_cmc, one patch of
the word's concept is drawn from a candidate pool (K patches of the concept
drawn uniformly without replacement, or the whole concept list when K = 0 or
the concept has no more than K patches; a fresh pool for each word, or with
`cmc.pool: per_concept_epoch` one pool per concept for a whole epoch) with
probability proportional to

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

import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np

from vlmixer.storage.gallery import GalleryReader
from vlmixer.trainer.config import CMCConfig

_DEFAULTS = CMCConfig()  # the defaults live in the config schema only
POOL_SALT = 0x504F4F4C  # "POOL": the per-concept-epoch pools' streams, apart from the samples'


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

    def __init__(self, *, gallery: GalleryReader, r_cmc: float = _DEFAULTS.r_cmc, r_ctx: float = _DEFAULTS.r_ctx,
                 k_shot: int = _DEFAULTS.k_shot, pool: str = _DEFAULTS.pool, seed: int = 0) -> None:
        self.gallery = gallery
        self.r_cmc = float(r_cmc)
        self.r_ctx = float(r_ctx)
        self.k_shot = int(k_shot)
        self.pool, self.seed = pool, int(seed)
        self._pid = -1
        self._a: dict[str, np.ndarray] = {}
        self._pools: dict[tuple[int, int], np.ndarray] = {}  # (epoch, concept) -> pool, the current epoch's

    @classmethod
    def from_config(cls, gallery: GalleryReader, cfg: CMCConfig, seed: int = 0) -> CrossModalCutMix:
        return cls(gallery=gallery, r_cmc=cfg.r_cmc, r_ctx=cfg.r_ctx, k_shot=cfg.k_shot, pool=cfg.pool, seed=seed)

    def __getstate__(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["_pid"], d["_a"], d["_pools"] = -1, {}, {}
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
        off = a["concept_offsets"]
        lo, hi = int(off[concept]), int(off[concept + 1])
        n, k = hi - lo, self.k_shot
        if not k or n <= k:
            return a["concept_patches"][lo:hi]
        return a["concept_patches"][lo + uniform_subset(n, k, rng)]

    def epoch_pool(self, concept: int, epoch: int) -> np.ndarray:
        """The concept's pool for a whole epoch (`cmc.pool: per_concept_epoch`).

        Drawn as `draw_pool` draws, from a stream of (seed, epoch, concept)
        alone, so every word of the concept in the epoch, in any worker and
        after a resume, gets the same K candidates.
        """
        key = (epoch, concept)
        pool = self._pools.get(key)
        if pool is None:
            if any(e != epoch for e, _ in self._pools):  # a new epoch: the old pools are done with
                self._pools.clear()
            pool = self._pools[key] = self.draw_pool(concept, sample_rng(self.seed, POOL_SALT, epoch, concept))
        return pool

    def weights(self, pool: np.ndarray, sentence_concepts: np.ndarray) -> np.ndarray:
        """p_i of each patch in `pool` (float64), for a sentence grounding `sentence_concepts`."""
        a = self.arrays
        pool = np.asarray(pool, dtype=np.int64)
        sent = np.asarray(sentence_concepts, dtype=np.int64)
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
        flat = np.arange(total) + np.repeat(starts - (np.cumsum(lens) - lens), lens)
        cc = a["image_ctx_concepts"][flat]
        # few grounded concepts per sentence: a broadcast compare beats np.isin here
        keep = (cc[:, None] == sent[None, :]).any(axis=1) & (cc != np.repeat(own, lens))
        ok = owner[keep]
        cnt = np.bincount(ok, minlength=len(pool))
        sm = np.bincount(ok, weights=a["image_ctx_confs"][flat[keep]], minlength=len(pool))
        return conf + self.r_ctx * sm / np.maximum(cnt, 1)  # sm is 0 where G_i is empty

    # -- one sentence -----------------------------------------------------------------------
    def sample(self, span_concepts: np.ndarray, rng: np.random.Generator, epoch: int = 0) -> MixResult:
        """Mix one sentence whose grounded words have concepts `span_concepts` (in span order).

        Random stream order (fixed, for reproducibility): N replacement coins,
        then each replaced word's pool draw in span order (`per_word` pools
        only; `per_concept_epoch` pools come from their own stream), then one uniform per
        word with a non-empty pool for the inverse-CDF picks. The weights of all
        pools are computed in one vectorised call. A pool whose weights sum to 0
        picks uniformly.
        """
        sc = np.asarray(span_concepts, dtype=np.int64).reshape(-1)
        n = len(sc)
        nan = float("nan")
        patch_ids, weight, prob = [-1] * n, [nan] * n, [nan] * n
        pools, owners = [], []
        if n:
            # a sentence has a handful of words: Python scalars beat tiny numpy arrays here
            r_cmc, concepts = self.r_cmc, sc.tolist()
            for w, u in enumerate(rng.random(n).tolist()):
                if u < r_cmc:
                    pool = (self.draw_pool(concepts[w], rng) if self.pool == "per_word"
                            else self.epoch_pool(concepts[w], epoch))
                    if len(pool):  # else no patch of this concept: the word stays text
                        pools.append(pool)
                        owners.append(w)
        if pools:
            flat = np.concatenate(pools) if len(pools) > 1 else pools[0]
            p = self.weights(flat, sc)  # G_i uses every grounded concept of the sentence
            lo = 0
            for w, pool, u in zip(owners, pools, rng.random(len(pools)).tolist()):
                m = len(pool)
                cs = np.cumsum(p[lo: lo + m])
                tot = float(cs[-1])
                if tot > 0:
                    i = min(int(cs.searchsorted(u * tot, side="right")), m - 1)
                    prob[w] = float(p[lo + i]) / tot
                else:
                    i = min(int(u * m), m - 1)
                    prob[w] = 1.0 / m
                patch_ids[w], weight[w] = int(pool[i]), float(p[lo + i])
                lo += m
        ids = np.array(patch_ids, dtype=np.int64)
        return MixResult(ids >= 0, ids, np.array(weight), np.array(prob))


def uniform_subset(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct integers of [0, n), every k-subset equally likely (in random order).

    Sequential draws with rejection of repeats are uniform without replacement;
    for k much smaller than n that costs k-and-a-bit uniforms, where
    `Generator.choice(replace=False)` costs several times more per call. When k
    is a large part of n, a random key sort of the n candidates is used instead.
    """
    if 2 * k >= n:
        return np.argsort(rng.random(n), kind="stable")[:k]
    out: dict[int, None] = {}
    while len(out) < k:
        for v in (rng.random(k + 4) * n).astype(np.int64).tolist():
            if v not in out:
                out[v] = None
                if len(out) == k:
                    break
    return np.fromiter(out, dtype=np.int64, count=k)


def _state_for(seed: int, salt: int, epoch: int, index: int) -> dict[str, object]:
    h = hashlib.blake2b(struct.pack("<4q", seed, salt, epoch, index), digest_size=32).digest()
    return {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
            "state": {"state": int.from_bytes(h[:16], "little"), "inc": int.from_bytes(h[16:], "little") | 1}}


def sample_rng(seed: int, salt: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample: independent of worker, rank and resume.

    The PCG64 state is a hash of (seed, salt, epoch, index); building it this
    way costs a few microseconds, against ~40 for a SeedSequence.
    """
    g = np.random.Generator(np.random.PCG64(0))
    g.bit_generator.state = _state_for(seed, salt, epoch, index)
    return g


class SampleRandom:
    """Reseeds one generator per sample (same streams as `sample_rng`, without the allocation).

    The generator returned by `for_sample` is valid until the next call.
    """

    def __init__(self, seed: int, salt: int) -> None:
        self.seed, self.salt = seed, salt
        self._g: np.random.Generator | None = None

    def __getstate__(self) -> dict[str, object]:
        return {"seed": self.seed, "salt": self.salt, "_g": None}

    def for_sample(self, epoch: int, index: int) -> np.random.Generator:
        if self._g is None:
            self._g = np.random.Generator(np.random.PCG64(0))
        self._g.bit_generator.state = _state_for(self.seed, self.salt, epoch, index)
        return self._g
