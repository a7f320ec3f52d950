"""Shared test helpers: tiny stores with known contents, built through the real writers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmixer.storage.gallery import finalize_gallery  # noqa: E402
from vlmixer.storage.gallery_writer import GalleryWriter  # noqa: E402
from vlmixer.storage.textstore import TextStoreWriter  # noqa: E402
from vlmixer.storage.vocab import Vocabulary  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():  # noqa: ANN201
    """Tests compute on small tensors on a 2-core machine shared by several processes (Ray actors,
    DataLoader workers, torchrun ranks): one intra-op thread each is faster than OpenMP threads
    spinning against each other, and keeps in-process results bitwise equal to 1-thread actors'."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY_CONCEPTS = Vocabulary(names=("dog", "cat", "man", "traffic light", "car"),
                           variants=(("dog",), ("cat", "kitty"), ("man",), ("traffic light",), ("car", "auto")))
TINY_ATTRS = Vocabulary(names=("red", "small", "wooden"))
TINY_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "dog", "cat", "man", "traffic",
              "light", "car", "runs", "sits", "near", "##s", "on", "street", "red"]


def synthetic_images(seed: int, n_images: int, dim: int, n_concepts: int = 5, key_prefix: str = "img"):
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


def build_gallery(root: Path, shards: dict[int, list[dict]], dim: int = 32, parts: int = 1,
                  concepts: Vocabulary = TINY_CONCEPTS, map_size: int = 1 << 24) -> Path:
    """Write shards round-robin over `parts` writers, then finalize."""
    writers = [GalleryWriter(root, part=p, feature_dim=dim, concepts=concepts, attributes=TINY_ATTRS,
                             provenance={"test": True}, map_size=map_size) for p in range(parts)]
    for j, (sid, images) in enumerate(sorted(shards.items())):
        with writers[j % parts].shard(f"shard-{sid:04d}") as s:
            for im in images:
                s.add_image(**im)
    for w in writers:
        w.close()
    finalize_gallery(root)
    return root


@pytest.fixture
def tiny_vocab_file(tmp_path: Path) -> Path:
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(TINY_WORDS) + "\n", encoding="utf-8")
    return p


def synthetic_sentences(seed: int, n: int, n_concepts: int = 5, vocab_size: int = len(TINY_WORDS)):
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


def build_text_store(root: Path, vocab_file: Path, shards: dict[str, list[dict]],
                     concepts: Vocabulary = TINY_CONCEPTS) -> Path:
    w = TextStoreWriter(root, concepts=concepts, tokenizer_name="tiny-test", vocab_file=vocab_file,
                        provenance={"test": True})
    for name, sents in sorted(shards.items()):
        w.write_shard(name, sents, stats={"lines": len(sents)})
    w.finalize()
    return root
