"""Tiny stores with known contents, written through the real storage writers: the one set of
builders for tests, benchmarks and smoke runs.

They need a gallery and a text store in seconds without a detector or spaCy. Two kinds:
random stores (`random_images`, `random_rows`: every field exercised, for round-trip tests of
the formats) and meaningful ones (`write_gallery`, `write_text_store`, `tiny_stores`,
`paired_stores`), whose features carry a per-concept signal plus noise, so a model can learn
that a patch of "dog" means the word "dog" (a tiny training run's loss goes down for a reason).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmixer.storage.gallery import finalize_gallery
from vlmixer.storage.gallery_writer import GalleryWriter
from vlmixer.storage.textstore import TextStoreWriter
from vlmixer.storage.vocab import Vocabulary

TINY_CONCEPTS = Vocabulary(names=("dog", "cat", "man", "traffic light", "car"),
                           variants=(("dog",), ("cat", "kitty"), ("man",), ("traffic light",), ("car", "auto")))
TINY_ATTRS = Vocabulary(names=("red", "small", "wooden"))
TINY_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "dog", "cat", "man", "traffic",
              "light", "car", "runs", "sits", "near", "##s", "on", "street", "red"]


def random_images(seed: int, n_images: int, dim: int, n_concepts: int = 5, key_prefix: str = "img"
                  ) -> list[dict[str, Any]]:
    """Deterministic image dicts for GalleryWriter.add_image (patch counts 0..6)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_images):
        n = int(rng.integers(0, 7))
        w, h = int(rng.integers(50, 400)), int(rng.integers(50, 400))
        x1 = rng.uniform(0, w / 2, n)
        y1 = rng.uniform(0, h / 2, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1)
        k = int(rng.integers(0, 4))
        out.append(dict(
            key=f"{key_prefix}-{seed}-{i}", path=f"/data/{key_prefix}/{seed}/{i}.jpg", width=w, height=h,
            boxes=boxes.astype(np.float32),
            features=rng.standard_normal((n, dim)).astype(np.float32) * 3,
            concepts=rng.integers(0, n_concepts, n),
            confidences=rng.uniform(0.2, 1.0, n).astype(np.float32),
            attr_ids=rng.integers(0, 3, (n, k)) if k else None,
            attr_scores=rng.uniform(0.05, 1, (n, k)).astype(np.float32) if k else None,
        ))
    return out


def build_gallery(root: str | Path, shards: Mapping[int | str, Sequence[dict]], dim: int = 32, parts: int = 1,
                  concepts: Vocabulary = TINY_CONCEPTS, attributes: Vocabulary | None = TINY_ATTRS,
                  provenance: Mapping[str, Any] | None = None, map_size: int = 1 << 24) -> Path:
    """Write shards (image dicts of `GalleryWriter.add_image`) round-robin over `parts` writers, then
    finalize. Integer shard ids are named `shard-NNNN`."""
    root = Path(root)
    writers = [GalleryWriter(root, part=p, feature_dim=dim, concepts=concepts, attributes=attributes,
                             provenance={"test": True} if provenance is None else dict(provenance),
                             map_size=map_size) for p in range(parts)]
    for j, (sid, images) in enumerate(sorted(shards.items())):
        with writers[j % parts].shard(sid if isinstance(sid, str) else f"shard-{sid:04d}") as s:
            for im in images:
                s.add_image(**im)
    for w in writers:
        w.close()
    finalize_gallery(root)
    return root


def random_rows(seed: int, n: int, n_concepts: int = 5, vocab_size: int = len(TINY_WORDS)
                ) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = [str(w) for w in rng.choice(["a", "dog", "sits", "near", "café", "the", "man", "🙂"],
                                            int(rng.integers(1, 9)))]
        text = " ".join(words)
        m = int(rng.integers(1, 12))
        tokens = rng.integers(5, vocab_size, m)
        tc = np.sort(rng.integers(0, len(text) + 1, (m, 2)), axis=1)
        spans = []
        for _ in range(int(rng.integers(0, 3))):
            a = int(rng.integers(0, m))
            b = int(rng.integers(a + 1, m + 1))
            c0 = int(rng.integers(0, len(text)))
            spans.append((c0, int(rng.integers(c0 + 1, len(text) + 1)), a, b, int(rng.integers(0, n_concepts))))
        out.append(dict(id=f"s{seed}-{i}", text=text, tokens=tokens, token_chars=tc, spans=spans,
                        image_key=f"img-{i}" if i % 2 else ""))
    return out


def build_text_store(root: str | Path, vocab_file: str | Path, shards: Mapping[str, Sequence[dict]],
                     concepts: Vocabulary = TINY_CONCEPTS, tokenizer_name: str = "tiny-test") -> Path:
    """Write rows (dicts of `TextStoreWriter.write_shard`) shard by shard, then finalize."""
    root = Path(root)
    w = TextStoreWriter(root, concepts=concepts, tokenizer_name=tokenizer_name, vocab_file=vocab_file,
                        provenance={"test": True})
    for name, sents in sorted(shards.items()):
        w.write_shard(name, sents, stats={"lines": len(sents)})
    w.finalize()
    return root


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONCEPTS = ["dog", "cat", "ball", "tree", "car", "traffic light", "man", "frisbee", "bench", "zebra"]
WORDS = ["a", "the", "runs", "with", "near", "in", "park", "sits", "on", "street", "and", "next", "to", "big",
         "small", "red", "plays", "under", ".", "dog", "cat", "ball", "tree", "car", "traffic", "light", "man",
         "fr", "##is", "##bee", "bench", "zebra", "##s"]
# grounded words in the templates and their concept names; "frisbee" splits into three word-pieces
_TEMPLATES = [
    "a {0} runs with a {1} .", "the {0} sits near the {1} in the park .", "a big {0} plays with a small {1} .",
    "the red {0} is next to the {1} and the {2} .", "a {0} on the street .", "the {0} under a {1} .",
]
_FILLERS = ["is"]


def write_vocab(path: str | Path, words: Sequence[str] = WORDS) -> Path:
    """A BERT-style vocab.txt: the five specials, then `words` (plus fillers) in order."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    toks = SPECIALS + [w for w in list(words) + _FILLERS if w not in SPECIALS]
    p.write_text("\n".join(dict.fromkeys(toks)) + "\n", encoding="utf-8")
    return p


def concept_signal(n_concepts: int, dim: int, seed: int = 1234) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_concepts, dim)).astype(np.float32)


def write_gallery(root: str | Path, concepts: Sequence[str], images: Sequence[Sequence[tuple[int, float]]], *,
                  feature_dim: int = 2048, seed: int = 0, size: tuple[int, int] = (640, 480),
                  paths: Sequence[str] | None = None, noise: float = 0.5) -> Path:
    """One part, one shard; image `imgI` has patches [(concept, confidence), ...] with random boxes."""
    rng = np.random.default_rng(seed)
    sig = concept_signal(len(concepts), feature_dim)
    w, h = size
    dicts = []
    for i, patches in enumerate(images):
        n = len(patches)
        c = np.array([p[0] for p in patches], dtype=np.int64).reshape(n)
        conf = np.array([p[1] for p in patches], dtype=np.float32).reshape(n)
        x1 = rng.uniform(0, w * 0.6, n)
        y1 = rng.uniform(0, h * 0.6, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(8, w * 0.4, n), y1 + rng.uniform(8, h * 0.4, n)], 1)
        feats = sig[c] + noise * rng.standard_normal((n, feature_dim)).astype(np.float32)
        dicts.append(dict(key=f"img{i}", path=paths[i] if paths is not None else f"/nonexistent/img{i}.jpg",
                          width=w, height=h, boxes=boxes.reshape(n, 4), features=feats.reshape(n, feature_dim),
                          concepts=c, confidences=conf))
    return build_gallery(root, {"s0": dicts}, dim=feature_dim, concepts=Vocabulary(names=tuple(concepts)),
                         attributes=None, provenance={}, map_size=1 << 26)


def write_text_store(root: str | Path, concepts: Sequence[str], vocab_file: str | Path,
                     sentences: Sequence[tuple[str, Sequence[tuple[int, int, int]]]], shard_size: int = 0,
                     image_keys: Sequence[str] | None = None) -> Path:
    """Sentences as (text, [(char_start, char_end, concept), ...]); word-pieces by the vocab's tokenizer.

    `image_keys` (one per sentence) pairs sentences with gallery images, as `--format coco` does."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
    rows = []
    for i, (text, grounded) in enumerate(sentences):
        enc = tok.encode(text, add_special_tokens=False)
        offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        spans = []
        for cs, ce, concept in grounded:
            inside = np.flatnonzero((offs[:, 0] >= cs) & (offs[:, 1] <= ce))
            spans.append((cs, ce, int(inside[0]), int(inside[-1]) + 1, concept))
        rows.append({"id": f"s{i}", "text": text, "tokens": enc.ids, "token_chars": offs, "spans": spans,
                     "image_key": image_keys[i] if image_keys is not None else ""})
    step = shard_size or len(rows) or 1
    shards = {f"shard{k // step:05d}": rows[k: k + step] for k in range(0, max(len(rows), 1), step)}
    return build_text_store(root, vocab_file, shards, concepts=Vocabulary(names=tuple(concepts)),
                            tokenizer_name="synthetic")


def random_sentences(n: int, concepts: Sequence[str] = CONCEPTS, seed: int = 0,
                     among: Sequence[Sequence[int]] | None = None) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """Template sentences grounding 1-3 concepts each (never the same concept twice in one).

    With `among`, sentence i names only concepts of among[i] (a paired image's), using a template
    with at most that many slots."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pool = np.arange(len(concepts)) if among is None else np.asarray(among[i], dtype=np.int64)
        fits = [t for t in _TEMPLATES if t.count("{") <= len(pool)]
        t = fits[int(rng.integers(len(fits)))]
        k = t.count("{")
        cs = pool[rng.choice(len(pool), size=k, replace=False)]
        text, spans = "", []
        parts = t.split("{")
        text = parts[0]
        for j, part in enumerate(parts[1:]):
            idx, rest = part.split("}", 1)
            name = concepts[int(cs[int(idx)])]
            spans.append((len(text), len(text) + len(name), int(cs[int(idx)])))
            text += name + rest
            del j
        out.append((text, spans))
    return out


def tiny_stores(root: str | Path, *, n_images: int = 48, n_sentences: int = 256, feature_dim: int = 2048,
                seed: int = 0, shard_size: int = 0) -> tuple[Path, Path]:
    """(gallery dir, text store dir) under `root`; "zebra" (last concept) has no patch."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    with_patches = len(CONCEPTS) - 1
    images = []
    for _ in range(n_images):
        n = int(rng.integers(2, 7))
        images.append([(int(rng.integers(with_patches)), float(rng.uniform(0.2, 1.0))) for _ in range(n)])
    gallery = write_gallery(root / "gallery", CONCEPTS, images, feature_dim=feature_dim, seed=seed)
    vocab = write_vocab(root / "vocab.txt")
    text = write_text_store(root / "text", CONCEPTS, vocab, random_sentences(n_sentences, seed=seed),
                            shard_size=shard_size)
    return gallery, text


def paired_stores(root: str | Path, *, n_images: int = 32, captions_per_image: int = 3, feature_dim: int = 64,
                  seed: int = 0, noise: float = 0.5) -> tuple[Path, Path]:
    """(gallery, caption store) for the paired task: image `imgI` shows 3 distinct concepts (one patch
    each) and its captions, keyed `imgI`, name 1-3 of them. So a caption identifies its image up to the
    other images sharing those concepts: retrieval has a known right answer and a known ceiling."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    with_patches = len(CONCEPTS) - 1
    images, shows = [], []
    for _ in range(n_images):
        cs = rng.choice(with_patches, size=3, replace=False)
        shows.append([int(c) for c in cs])
        images.append([(int(c), float(rng.uniform(0.5, 1.0))) for c in cs])
    gallery = write_gallery(root / "gallery", CONCEPTS, images, feature_dim=feature_dim, seed=seed, noise=noise)
    vocab = write_vocab(root / "vocab.txt")
    among = [shows[i] for i in range(n_images) for _ in range(captions_per_image)]
    keys = [f"img{i}" for i in range(n_images) for _ in range(captions_per_image)]
    text = write_text_store(root / "captions", CONCEPTS, vocab,
                            random_sentences(len(keys), seed=seed + 1, among=among), image_keys=keys)
    return gallery, text
