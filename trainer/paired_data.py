"""Paired data for the related systems' objectives: (image patches, caption) pairs linked by image key.

`vlmixer text tag --format coco` stores each caption with its image key; a
gallery built from the same images finds the image by that key
(`GalleryReader.image_index`). `PairIndex` keeps the sentences whose key is
in the gallery; `PairedDataset` turns a key (epoch, index) into four rows,
view-major in the batch like VALP's two:

  0 caption      [CLS] caption [SEP]
  1 image        [CLS] patches [SEP]           (the image's first max_patches patches)
  2 concept text [CLS] grounded word or tag [SEP]
  3 concept      [CLS] its patch [SEP]         (X-VLM's visual concept)
  4 masked caption, with MLM labels (only when the paired task trains `mlm`)

plus per pair the concept patch's normalised box (cx, cy, w, h), whether
there is one, the image index and the concept id. Fused inputs
(`[CLS] text [SEP] patches [SEP]`) for ITM and box regression are built
from these rows on the fly by `fuse`, because ALBEF's hard negatives are
chosen only once the batch's similarities are known.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmixer.errors import ConfigError
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.trainer.cmc import SampleRandom
from vlmixer.trainer.data import Row, TextCorpus, WordPieceVocab, clean_spans, collate, read_patches
from vlmixer.trainer.masking import IGNORE, MaskSpec, mask_tokens

PAIRED_SALT = 0x50414952  # "PAIR"
N_VIEWS = 4


class PairIndex:
    """Global sentence index -> gallery image index, for sentences whose image key the gallery holds."""

    def __init__(self, readers: Sequence[TextStoreReader], gallery: GalleryReader) -> None:
        sent, image = [], []
        self.skipped = 0
        self.without_key = 0
        self.unmatched: list[str] = []  # a few caption keys the gallery lacks, for error messages
        self.gallery = gallery
        cache: dict[str, int] = {}
        base = 0
        for r in readers:
            for k in range(r.num_shards):
                arr = r.shard_arrays(k)
                data, off = arr["image_keys"].tobytes(), arr["image_key_offsets"]
                for i in range(len(off) - 1):
                    key = data[int(off[i]): int(off[i + 1])].decode("utf-8")
                    idx = cache.get(key)
                    if idx is None and key:
                        try:
                            idx = gallery.image_index(key)
                        except KeyError:
                            idx = -1
                        cache[key] = idx
                    if key and idx is not None and idx >= 0:
                        sent.append(base + r.shard_offset(k) + i)
                        image.append(idx)
                    else:
                        self.skipped += 1
                        if not key:
                            self.without_key += 1
                        elif len(self.unmatched) < 3 and key not in self.unmatched:
                            self.unmatched.append(key)
            base += len(r)
        self.sentence = np.asarray(sent, dtype=np.int64)
        self.image = np.asarray(image, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sentence)

    def explain(self) -> str:
        """Why captions found no image: counts, example keys of both sides and the usual cause."""
        g = self.gallery
        gallery_keys = [g.image(i).key for i in range(min(3, g.num_images))]
        return (f"{self.skipped} sentences unpaired ({self.without_key} without an image key); caption keys "
                f"such as {self.unmatched} vs gallery {g.root} keys such as {gallery_keys}. A gallery built "
                "from a folder keys images by relative path (= COCO file_name, the default of `vlmixer text "
                "tag --image-key`); one built from a COCO json keys them by image id: tag with `--image-key id`")


def text_row(ids: np.ndarray) -> Row:
    n = len(ids)
    return Row(ids.astype(np.int64), np.arange(n, dtype=np.int64), np.zeros(n, np.int64), np.zeros(n, bool),
               np.full(n, IGNORE, np.int64), np.zeros((0, 0), np.float16), np.zeros((0, 6), np.float32),
               np.zeros(0, np.int64))


def image_row(v: WordPieceVocab, feats: np.ndarray, spatial: np.ndarray) -> Row:
    p = len(feats)
    ids = np.concatenate([[v.cls], np.full(p, v.pad), [v.sep]]).astype(np.int64)
    is_patch = np.zeros(p + 2, bool)
    is_patch[1: p + 1] = True
    return Row(ids, np.arange(p + 2, dtype=np.int64), is_patch.astype(np.int64), is_patch,
               np.full(p + 2, IGNORE, np.int64), feats, spatial, np.full(p, IGNORE, np.int64))


def normalised_box(spatial: np.ndarray) -> np.ndarray:
    """(cx, cy, w, h) in [0, 1] from the 6-d spatial vector (x1/w, y1/h, x2/w, y2/h, bw/w, bh/h)."""
    s = np.clip(np.asarray(spatial, np.float32), 0.0, 1.0)
    return np.array([(s[0] + s[2]) / 2, (s[1] + s[3]) / 2, s[2] - s[0], s[3] - s[1]], np.float32)


@dataclass
class PairedExample:
    rows: list[Row]
    box: np.ndarray  # (4,) cx, cy, w, h of the concept patch
    has_box: bool
    image: int
    concept: int
    patch: int = -1  # the concept patch's place among the image row's patches (-1: none)


def collate_paired(examples: Sequence[PairedExample]) -> dict[str, torch.Tensor]:
    """`collate` of the four rows (view-major), plus per-pair box, has_box, image, concept and box patch."""
    out = collate([e.rows for e in examples])
    out["box_targets"] = torch.from_numpy(np.stack([e.box for e in examples]).astype(np.float32))
    out["has_box"] = torch.tensor([e.has_box for e in examples], dtype=torch.bool)
    out["image_ids"] = torch.tensor([e.image for e in examples], dtype=torch.long)
    out["concept_ids"] = torch.tensor([e.concept for e in examples], dtype=torch.long)
    out["box_patch"] = torch.tensor([e.patch for e in examples], dtype=torch.long)
    return out


class PairedDataset(torch.utils.data.Dataset):
    """Key (epoch, pair) -> PairedExample; the concept is drawn from the pair's own random stream."""

    collate_fn = staticmethod(collate_paired)

    def __init__(self, *, corpus: TextCorpus, index: PairIndex, gallery: GalleryReader, vocab: WordPieceVocab,
                 tag_pieces: Sequence[np.ndarray], max_caption_tokens: int, max_patches: int, seed: int,
                 mask: MaskSpec | None = None) -> None:
        if len(index) == 0:
            raise ConfigError("no caption of data.paired_text_stores has an image key found in the gallery: "
                              f"{index.explain()}")
        self.corpus, self.index, self.gallery, self.vocab = corpus, index, gallery, vocab
        self.tag_pieces = list(tag_pieces)
        self.max_caption_tokens, self.max_patches = max_caption_tokens, max_patches
        self.mask = mask
        self._rand = SampleRandom(seed, PAIRED_SALT)

    def __len__(self) -> int:
        return len(self.index)

    def release_handles(self) -> None:
        self.gallery.close()
        for r in self.corpus.readers:
            r.close()

    def __getitem__(self, key: tuple[int, int]) -> PairedExample:
        epoch, i = key
        rng = self._rand.for_sample(epoch, i)
        v = self.vocab
        tokens, spans = self.corpus.get(int(self.index.sentence[i]))
        tokens = tokens[: self.max_caption_tokens]
        spans = clean_spans(spans, len(tokens))
        img = int(self.index.image[i])
        prange = self.gallery.image_patches(img)
        pids = np.arange(prange.start, prange.start + min(len(prange), self.max_patches), dtype=np.int64)
        feats, spatial, concepts = read_patches(self.gallery, pids)
        rows = [text_row(np.concatenate([[v.cls], tokens, [v.sep]])), image_row(v, feats, spatial)]
        # the concept: a grounded word whose concept the image shows, else one of the image's patches (a tag)
        grounded = [k for k in range(len(spans)) if int(spans[k, 4]) in set(concepts.tolist())]
        if grounded:
            k = grounded[int(rng.integers(len(grounded)))]
            c = int(spans[k, 4])
            words = tokens[int(spans[k, 2]): int(spans[k, 3])]
            j = int(np.flatnonzero(concepts == c)[0])  # the image's first (most confident) patch of it
        elif len(pids):
            j = int(rng.integers(len(pids)))
            c = int(concepts[j])
            words = self.tag_pieces[c][: self.max_caption_tokens]
        else:
            rows += [text_row(np.array([v.cls, v.sep])), image_row(v, feats[:0], spatial[:0])]
            return PairedExample(self._masked(rows, rng), np.zeros(4, np.float32), False, img, -1)
        rows += [text_row(np.concatenate([[v.cls], words, [v.sep]])), image_row(v, feats[j: j + 1],
                                                                               spatial[j: j + 1])]
        return PairedExample(self._masked(rows, rng), normalised_box(spatial[j]), True, img, c, j)

    def _masked(self, rows: list[Row], rng: np.random.Generator) -> list[Row]:
        """Append the caption masked for MLM (drawn last, so the other rows do not depend on it)."""
        if self.mask is None:
            return rows
        cap = rows[0]
        eligible = np.ones(len(cap.ids), bool)
        eligible[[0, -1]] = False
        ids, labels = mask_tokens(cap.ids, eligible, self.mask, rng)
        m = text_row(ids)
        m.labels = labels
        return rows + [m]


# -- batch surgery -------------------------------------------------------------------------
def _patch_slices(batch: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    counts = batch["is_patch"].sum(1)
    starts = torch.cumsum(counts, 0) - counts
    return starts.tolist(), counts.tolist()


def select_rows(batch: dict[str, torch.Tensor], rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """The sub-batch of the given rows (patch features follow their rows)."""
    starts, counts = _patch_slices(batch)
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=batch["input_ids"].device)
    out = {k: batch[k][idx] for k in ("input_ids", "position_ids", "token_type_ids", "attention_mask", "is_patch",
                                      "mlm_labels")}
    feats = [batch["patch_feats"][starts[r]: starts[r] + counts[r]] for r in rows]
    spatial = [batch["patch_spatial"][starts[r]: starts[r] + counts[r]] for r in rows]
    out["patch_feats"] = torch.cat(feats) if feats else batch["patch_feats"][:0]
    out["patch_spatial"] = torch.cat(spatial) if spatial else batch["patch_spatial"][:0]
    return out


def fuse(batch: dict[str, torch.Tensor], text_rows: Sequence[int], image_rows: Sequence[int]
         ) -> dict[str, torch.Tensor]:
    """Fused inputs `[CLS] text [SEP] patches [SEP]` of (text row, image row) pairs of a collated batch.

    MLM labels follow their tokens (a masked caption row gives ALBEF's MLM input).
    The text keeps its positions and segment 0; the image part (its row minus
    [CLS]) continues the positions and takes segment 1. Patch features follow,
    so the model's masked_scatter puts them in the right slots.
    """
    dev = batch["input_ids"].device
    starts, counts = _patch_slices(batch)
    n = batch["attention_mask"].sum(1).tolist()
    ids, isp, pos, types, labels, feats, spatial = [], [], [], [], [], [], []
    for a, b in zip(text_rows, image_rows, strict=True):
        na, nb = int(n[a]), int(n[b])
        ids.append(torch.cat([batch["input_ids"][a, :na], batch["input_ids"][b, 1:nb]]))
        labels.append(torch.cat([batch["mlm_labels"][a, :na], batch["mlm_labels"][b, 1:nb]]))
        isp.append(torch.cat([batch["is_patch"][a, :na], batch["is_patch"][b, 1:nb]]))
        pos.append(torch.arange(na + nb - 1, device=dev))
        types.append(torch.cat([torch.zeros(na, dtype=torch.long, device=dev),
                                torch.ones(nb - 1, dtype=torch.long, device=dev)]))
        feats.append(batch["patch_feats"][starts[a]: starts[a] + counts[a]])
        feats.append(batch["patch_feats"][starts[b]: starts[b] + counts[b]])
        spatial.append(batch["patch_spatial"][starts[a]: starts[a] + counts[a]])
        spatial.append(batch["patch_spatial"][starts[b]: starts[b] + counts[b]])
    pad = torch.nn.utils.rnn.pad_sequence
    out = {"input_ids": pad(ids, batch_first=True), "is_patch": pad(isp, batch_first=True),
           "position_ids": pad(pos, batch_first=True), "token_type_ids": pad(types, batch_first=True)}
    out["attention_mask"] = pad([torch.ones(len(t), dtype=torch.long, device=dev) for t in ids], batch_first=True)
    out["mlm_labels"] = pad(labels, batch_first=True, padding_value=IGNORE)
    out["patch_feats"] = torch.cat(feats) if feats else batch["patch_feats"][:0]
    out["patch_spatial"] = torch.cat(spatial) if spatial else batch["patch_spatial"][:0]
    return out


def hide_patches(fused: dict[str, torch.Tensor], which: torch.Tensor, *, feature: bool) -> dict[str, torch.Tensor]:
    """Fused rows with the `which[r]`-th patch of row r given a zero box (and a zero feature if `feature`).

    For X-VLM's box task: the patch whose box is the target must not show
    that box. The text half of these rows carries no patches, so the k-th
    patch of a row is the k-th of its image.
    """
    counts = fused["is_patch"].sum(1)
    idx = (torch.cumsum(counts, 0) - counts) + which.to(counts.device)
    spatial = fused["patch_spatial"].clone()
    spatial[idx] = 0
    out = {**fused, "patch_spatial": spatial}
    if feature:
        feats = fused["patch_feats"].clone()
        feats[idx] = 0
        out["patch_feats"] = feats
    return out
