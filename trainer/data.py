"""Training data: VALP sentences mixed by CMC, TAVP images with their tags, batches, samplers.

Datasets hold store readers that open lazily in each DataLoader worker, and
turn one (epoch, index) key into one example with the sample's own random
stream (`cmc.sample_rng`), so CMC, masking and therefore every batch depend
only on (seed, epoch, index): not on the number of workers, the rank count
or a resume. The batch sampler is infinite and resumable from a count of
consumed global micro-batches; the training process counts what it consumed
(the loader prefetches ahead), and a checkpoint stores that count.

Row layout shared by both tasks (one row = one input sequence):
  ids, position ids, token types (0 text/tag, 1 patch), patch flags, MLM labels,
  and per patch: feature, 6-d spatial (x1/w, y1/h, x2/w, y2/h, bw/w, bh/h), concept label.
A VALP example gives two rows (masked text view, masked multi-modal view);
a batch of B sentences is 2B rows: all text views first, then all
multi-modal views, in the same sentence order.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmixer.errors import ConfigError, VlmixerError
from vlmixer.files import read_lines
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.trainer.cmc import CrossModalCutMix, MixResult, SampleRandom
from vlmixer.trainer.masking import IGNORE, MaskSpec, mask_tokens

VALP_SALT = 0x56414C50  # "VALP": separates the random streams of the two tasks
TAVP_SALT = 0x54415650
SCHEDULE_SALT = 0x5343
_TASK_SALTS = {"valp": VALP_SALT, "tavp": TAVP_SALT, "paired": 0x50414952}  # paired: paired_data.PAIRED_SALT


# -- word-piece vocabulary -----------------------------------------------------------------
@dataclass(frozen=True)
class WordPieceVocab:
    """The ids the trainer needs from a BERT vocab.txt (store token ids exclude specials)."""

    path: str
    size: int
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def read(cls, path: str | Path) -> WordPieceVocab:
        p = Path(path)
        toks = read_lines(p, "word-piece vocabulary")
        index = {t: i for i, t in enumerate(toks)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in index]
        if missing:
            raise VlmixerError(f"{p}: word-piece vocabulary lacks {missing}")
        return cls(str(p), len(toks), index["[PAD]"], index["[UNK]"], index["[CLS]"], index["[SEP]"],
                   index["[MASK]"])

    def mask_spec(self, prob: float, mask_frac: float, random_frac: float) -> MaskSpec:
        return MaskSpec(prob=prob, mask_frac=mask_frac, random_frac=random_frac, mask_id=self.mask,
                        vocab_size=self.size)


def concept_wordpieces(vocab_file: str | Path, names: Sequence[str]) -> list[np.ndarray]:
    """Word-piece ids of each concept name (TAVP tags); tokenised once, in the main process."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
    return [np.asarray(tok.encode(n, add_special_tokens=False).ids, dtype=np.int64) for n in names]


# -- one row -------------------------------------------------------------------------------
@dataclass
class Row:
    ids: np.ndarray  # (L,) int64
    pos: np.ndarray  # (L,) int64 position ids
    types: np.ndarray  # (L,) int64
    is_patch: np.ndarray  # (L,) bool
    labels: np.ndarray  # (L,) int64 MLM labels, IGNORE where none
    feats: np.ndarray  # (P, D) float16, P = is_patch.sum()
    spatial: np.ndarray  # (P, 6) float32
    patch_labels: np.ndarray  # (P,) int64 concept to predict, IGNORE where none


def spatial6(boxes: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """(x1/w, y1/h, x2/w, y2/h, bw/w, bh/h) of pixel boxes."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    w = np.asarray(width, dtype=np.float32).reshape(-1)
    h = np.asarray(height, dtype=np.float32).reshape(-1)
    out = np.empty((len(b), 6), dtype=np.float32)
    out[:, 0], out[:, 2], out[:, 4] = b[:, 0] / w, b[:, 2] / w, (b[:, 2] - b[:, 0]) / w
    out[:, 1], out[:, 3], out[:, 5] = b[:, 1] / h, b[:, 3] / h, (b[:, 3] - b[:, 1]) / h
    return out


def read_patches(gallery: GalleryReader, pids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (P, D) fp16, spatial (P, 6), concepts (P,)) of patch ids, in order."""
    pids = np.asarray(pids, dtype=np.int64)
    feats = gallery.features(pids)
    if len(pids) == 0:
        return feats, np.zeros((0, 6), np.float32), np.zeros(0, np.int64)
    recs = np.stack([gallery.record(int(p)) for p in pids])
    return feats, spatial6(recs["box"], recs["width"], recs["height"]), recs["concept"].astype(np.int64)


def clean_spans(spans: np.ndarray, n_tokens: int) -> np.ndarray:
    """Spans sorted by token start, inside the first `n_tokens`, non-overlapping (first wins)."""
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 5)
    sp = sp[(sp[:, 3] <= n_tokens) & (sp[:, 2] < sp[:, 3])]
    if len(sp) > 1 and not np.all(sp[1:, 2] >= sp[:-1, 3]):  # the tagger's usual output skips this
        sp = sp[np.argsort(sp[:, 2], kind="stable")]
        keep = np.ones(len(sp), bool)
        end = -1
        for i, (s, e) in enumerate(sp[:, 2:4].tolist()):
            if s < end:
                keep[i] = False
            else:
                end = e
        sp = sp[keep]
    return sp


def mix_views(tokens: np.ndarray, spans: np.ndarray, mix: MixResult, sp: WordPieceVocab
              ) -> tuple[Row, np.ndarray, np.ndarray]:
    """The unmasked text view and multi-modal view of a sentence (no features yet).

    Returns (text row, mm ids/pos/is_patch packed in a Row without features, patch ids).
    Every word-piece of a replaced word goes and one patch slot takes the
    position id of the word's first word-piece; the other tokens keep the
    position ids they have in the text view, so both views of a token share
    its position.
    """
    m = len(tokens)
    t_ids = np.concatenate([[sp.cls], tokens, [sp.sep]]).astype(np.int64)
    t_pos = np.arange(m + 2, dtype=np.int64)
    keep = np.ones(m + 2, dtype=bool)
    is_patch = np.zeros(m + 2, dtype=bool)
    rep = np.flatnonzero(mix.replaced)
    for k in rep:
        s, e = int(spans[k, 2]) + 1, int(spans[k, 3]) + 1  # +1: [CLS]
        keep[s + 1: e] = False
        is_patch[s] = True
    s_ids = np.where(is_patch, sp.pad, t_ids)[keep]
    text = Row(t_ids, t_pos, np.zeros(m + 2, np.int64), np.zeros(m + 2, bool), np.full(m + 2, IGNORE),
               np.zeros((0, 0), np.float16), np.zeros((0, 6), np.float32), np.zeros(0, np.int64))
    mm = Row(s_ids, t_pos[keep], is_patch[keep].astype(np.int64), is_patch[keep], np.full(int(keep.sum()), IGNORE),
             np.zeros((0, 0), np.float16), np.zeros((0, 6), np.float32), np.zeros(0, np.int64))
    return text, mm, mix.patch_ids[rep]


# -- datasets ------------------------------------------------------------------------------
class TextCorpus:
    """Several text stores as one indexable corpus of (tokens, spans).

    The per-sentence HDF5 slices are gzip chunks, far too slow to read one
    sentence at a time at thousands of samples a second, so each process
    caches whole shards' token and span arrays (4 bytes a token) on first use.
    """

    def __init__(self, readers: Sequence[TextStoreReader], cache_shards: int = 0) -> None:
        self.readers = list(readers)
        self.cache_shards = cache_shards
        sizes = [len(r) for r in self.readers]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._shard_starts = [np.array([r.shard_offset(k) for k in range(r.num_shards)], np.int64)
                              for r in self.readers]
        self._pid = -1
        self._cache: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_pid"], d["_cache"] = -1, OrderedDict()
        return d

    def _shard(self, r: int, k: int) -> dict[str, np.ndarray]:
        if self._pid != os.getpid():
            self._cache, self._pid = OrderedDict(), os.getpid()
        c = self._cache.get((r, k))
        if c is None:
            arr = self.readers[r].shard_arrays(k)
            c = {n: arr[n] for n in ("tokens", "token_offsets", "spans", "span_offsets")}
            self._cache[(r, k)] = c
            if self.cache_shards and len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end((r, k))
        return c

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (m,) int64, spans (k, 5) int64) of global sentence `index`."""
        r = int(np.searchsorted(self.offsets, index, side="right")) - 1
        local = index - int(self.offsets[r])
        starts = self._shard_starts[r]
        k = int(np.searchsorted(starts, local, side="right")) - 1
        i = local - int(starts[k])
        c = self._shard(r, k)
        to, so = c["token_offsets"], c["span_offsets"]
        return (c["tokens"][to[i]: to[i + 1]].astype(np.int64), c["spans"][so[i]: so[i + 1]].astype(np.int64))


class ValpDataset(torch.utils.data.Dataset):
    """Key (epoch, index) -> two rows: masked text view, masked multi-modal view (CMC)."""

    def __init__(self, *, corpus: TextCorpus, cmc: CrossModalCutMix, vocab: WordPieceVocab, mask: MaskSpec,
                 max_len: int, seed: int) -> None:
        self.corpus, self.cmc, self.vocab, self.mask = corpus, cmc, vocab, mask
        self.max_len, self.seed = max_len, seed
        self._rand = SampleRandom(seed, VALP_SALT)

    def __len__(self) -> int:
        return len(self.corpus)

    def release_handles(self) -> None:
        """Close this process's store handles; they reopen lazily (see TaskLoaders.next)."""
        self.cmc.gallery.close()
        for r in self.corpus.readers:
            r.close()

    def mixed(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, MixResult, np.random.Generator]:
        """Truncated tokens, their clean spans and the CMC outcome (for `mix show` and tests)."""
        rng = self._rand.for_sample(epoch, index)  # valid until the next sample
        tokens, spans = self.corpus.get(index)
        tokens = tokens[: self.max_len - 2]
        spans = clean_spans(spans, len(tokens))
        return tokens, spans, self.cmc.sample(spans[:, 4], rng, epoch), rng

    def __getitem__(self, key: tuple[int, int]) -> list[Row]:
        epoch, index = key
        tokens, spans, mix, rng = self.mixed(epoch, index)
        text, mm, pids = mix_views(tokens, spans, mix, self.vocab)
        special_t = np.zeros(len(text.ids), bool)
        special_t[[0, -1]] = True
        text.ids, _ = mask_tokens(text.ids, ~special_t, self.mask, rng)  # CMCL view: masked, no MLM loss
        eligible = ~mm.is_patch
        eligible[[0, -1]] = False
        mm.ids, mm.labels = mask_tokens(mm.ids, eligible, self.mask, rng)
        mm.feats, mm.spatial, _ = read_patches(self.cmc.gallery, pids)
        mm.patch_labels = np.full(len(pids), IGNORE, dtype=np.int64)
        return [text, mm]


class TavpDataset(torch.utils.data.Dataset):
    """Key (epoch, image) -> one row: [CLS] tags [SEP] patches [SEP], tags and patches masked.

    Tags are the image's detected concepts (most confident first, each once)
    as word-pieces; patches are the image's most confident patches (a
    prefix). Masked tag modelling predicts tag word-pieces; a masked patch has
    its feature zeroed (box kept) and predicts its concept. As in
    U-VisualBERT, where a tag and its region are one object, the answer of a
    masked patch must not stand in the input: the tag of its concept is
    masked too (every word-piece [MASK], predicted by the tag loss).
    """

    def __init__(self, *, galleries: Sequence[GalleryReader], tag_pieces: Sequence[np.ndarray], vocab: WordPieceVocab,
                 mask: MaskSpec, patch_mask_prob: float, max_len: int, max_tag_tokens: int, seed: int) -> None:
        self.galleries = list(galleries)
        self.offsets = np.concatenate([[0], np.cumsum([g.num_images for g in self.galleries])]).astype(np.int64)
        self.tag_pieces = list(tag_pieces)
        self.vocab, self.mask, self.patch_mask_prob = vocab, mask, patch_mask_prob
        self.max_len, self.max_tag_tokens, self.seed = max_len, max_tag_tokens, seed
        self._rand = SampleRandom(seed, TAVP_SALT)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def release_handles(self) -> None:
        for g in self.galleries:
            g.close()

    def __getitem__(self, key: tuple[int, int]) -> list[Row]:
        epoch, index = key
        rng = self._rand.for_sample(epoch, index)
        g = int(np.searchsorted(self.offsets, index, side="right")) - 1
        gal = self.galleries[g]
        img = index - int(self.offsets[g])
        concepts, confs = gal.image_context(img)
        order = np.argsort(-np.asarray(confs), kind="stable")
        tags: list[np.ndarray] = []
        tag_of: list[int] = []  # the concept of each tag word-piece
        n_tag = 0
        for c in np.asarray(concepts)[order]:
            pieces = self.tag_pieces[int(c)]
            if n_tag + len(pieces) > self.max_tag_tokens:
                break
            tags.append(pieces)
            tag_of.extend([int(c)] * len(pieces))
            n_tag += len(pieces)
        tag_ids = np.concatenate(tags) if tags else np.zeros(0, np.int64)
        prange = gal.image_patches(img)
        n_p = min(len(prange), self.max_len - 3 - n_tag)
        pids = np.arange(prange.start, prange.start + n_p, dtype=np.int64)
        v = self.vocab
        ids = np.concatenate([[v.cls], tag_ids, [v.sep], np.full(n_p, v.pad), [v.sep]]).astype(np.int64)
        L = len(ids)
        is_patch = np.zeros(L, bool)
        is_patch[n_tag + 2: n_tag + 2 + n_p] = True
        eligible = np.zeros(L, bool)
        eligible[1: 1 + n_tag] = True
        ids, labels = mask_tokens(ids, eligible, self.mask, rng)
        feats, spatial, pconcepts = read_patches(gal, pids)
        pm = rng.random(n_p) < self.patch_mask_prob
        feats[pm] = 0
        patch_labels = np.where(pm, pconcepts, IGNORE).astype(np.int64)
        if pm.any() and n_tag:  # hide the tags that name a masked patch's concept
            hide = 1 + np.flatnonzero(np.isin(np.asarray(tag_of), pconcepts[pm]))
            labels[hide] = np.concatenate([[v.cls], tag_ids])[hide]
            ids[hide] = v.mask
        return [Row(ids, np.arange(L, dtype=np.int64), is_patch.astype(np.int64), is_patch, labels, feats, spatial,
                    patch_labels)]


# -- batches -------------------------------------------------------------------------------
def collate(examples: Sequence[list[Row]]) -> dict[str, torch.Tensor]:
    """Pad rows to the longest; rows ordered view-major (all first views, then all second views)."""
    n_views = len(examples[0])
    rows = [ex[v] for v in range(n_views) for ex in examples]
    R, L = len(rows), max(len(r.ids) for r in rows)
    ids = np.zeros((R, L), np.int64)
    pos = np.zeros((R, L), np.int64)
    types = np.zeros((R, L), np.int64)
    attn = np.zeros((R, L), np.int64)
    is_patch = np.zeros((R, L), bool)
    labels = np.full((R, L), IGNORE, np.int64)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n], pos[i, :n], types[i, :n], attn[i, :n] = r.ids, r.pos, r.types, 1
        is_patch[i, :n], labels[i, :n] = r.is_patch, r.labels
    with_patches = [r for r in rows if len(r.patch_labels)]
    D = with_patches[0].feats.shape[1] if with_patches else 0
    feats = np.concatenate([r.feats for r in with_patches]) if with_patches else np.zeros((0, D), np.float16)
    spatial = np.concatenate([r.spatial for r in with_patches]) if with_patches else np.zeros((0, 6), np.float32)
    plabels = np.concatenate([r.patch_labels for r in with_patches]) if with_patches else np.zeros(0, np.int64)
    return {
        "input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
        "token_type_ids": torch.from_numpy(types), "attention_mask": torch.from_numpy(attn),
        "is_patch": torch.from_numpy(is_patch), "mlm_labels": torch.from_numpy(labels),
        "patch_feats": torch.from_numpy(np.ascontiguousarray(feats)), "patch_spatial": torch.from_numpy(spatial),
        "patch_labels": torch.from_numpy(plabels), "n_views": torch.tensor(n_views),
    }


class ResumableBatchSampler:
    """Infinite micro-batches of (epoch, index) keys for one rank, resumable from a count.

    The corpus is permuted per epoch from (seed, salt, epoch); global
    micro-batch k of the run is epoch k // per_epoch, slice k % per_epoch of
    that permutation, and this rank takes its contiguous part of the slice. The
    incomplete tail of an epoch is dropped so every rank sees equal batches.
    """

    def __init__(self, *, size: int, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 salt: int = 0, start: int = 0) -> None:
        self.size, self.micro, self.rank, self.world = size, micro_batch, rank, world_size
        self.seed, self.salt, self.start = seed, salt, start
        self.per_epoch = size // (micro_batch * world_size)
        if self.per_epoch == 0:
            raise ConfigError(f"the data holds {size} items, fewer than one global micro-batch "
                              f"({micro_batch} x {world_size} processes); lower optim.batch_size")
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.salt, epoch])))
            self._perm = (epoch, rng.permutation(self.size))
        return self._perm[1]

    def batch(self, k: int) -> list[tuple[int, int]]:
        epoch, pos = divmod(k, self.per_epoch)
        lo = (pos * self.world + self.rank) * self.micro
        return [(epoch, int(i)) for i in self.permutation(epoch)[lo: lo + self.micro]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


PAIRED_SCHEDULE_SALT = 0x5350


def task_for_step(seed: int, step: int, tavp_ratio: float, paired_ratio: float = 0.0) -> str:
    """Which task optimiser step `step` trains; the same on every rank and after a resume.

    A fraction `paired_ratio` of steps train the paired task (its own draw,
    so with 0 the VALP/TAVP schedule is exactly what it was without it);
    of the others `tavp_ratio` train TAVP.
    """
    if paired_ratio > 0.0:
        u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, PAIRED_SCHEDULE_SALT, step]))).random()
        if paired_ratio >= 1.0 or u < paired_ratio:
            return "paired"
    if tavp_ratio <= 0.0:
        return "valp"
    if tavp_ratio >= 1.0:
        return "tavp"
    u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SCHEDULE_SALT, step]))).random()
    return "tavp" if u < tavp_ratio else "valp"


class TaskLoaders:
    """One infinite DataLoader per task, and the consumed count a checkpoint needs."""

    def __init__(self, datasets: dict[str, torch.utils.data.Dataset], *, micro_batch: int, rank: int,
                 world_size: int, seed: int, num_workers: int, prefetch_factor: int, pin_memory: bool,
                 consumed: dict[str, int] | None = None) -> None:
        self.datasets = datasets
        self.consumed = {t: int((consumed or {}).get(t, 0)) for t in datasets}
        self.samplers = {
            t: ResumableBatchSampler(size=len(ds), micro_batch=micro_batch, rank=rank, world_size=world_size,
                                     seed=seed, salt=_TASK_SALTS.get(t, TAVP_SALT),
                                     start=self.consumed[t])
            for t, ds in datasets.items()
        }
        self._kw = dict(num_workers=num_workers, pin_memory=pin_memory)
        if num_workers:
            self._kw.update(prefetch_factor=prefetch_factor, persistent_workers=True)
        self._iters: dict[str, Iterator[dict[str, torch.Tensor]]] = {}

    def next(self, task: str) -> dict[str, torch.Tensor]:
        it = self._iters.get(task)
        if it is None:
            if self._kw["num_workers"]:
                # py-lmdb refuses to open in a forked child an environment its parent holds open,
                # so the parent lets go of its handles before the workers fork
                for ds in self.datasets.values():
                    release = getattr(ds, "release_handles", None)
                    if release is not None:
                        release()
            # a private generator: creating the iterator must not draw from torch's global RNG,
            # or a resumed run's dropout stream would differ from an uninterrupted one
            ds = self.datasets[task]
            loader = torch.utils.data.DataLoader(ds, batch_sampler=self.samplers[task], generator=torch.Generator(),
                                                 collate_fn=getattr(ds, "collate_fn", collate), **self._kw)
            it = self._iters[task] = iter(loader)
        batch = next(it)
        self.consumed[task] += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return dict(self.consumed)
