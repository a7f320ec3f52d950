from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from vlmixer.errors import StoreError
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.synthetic import (
    TINY_CONCEPTS,
    build_gallery,
    build_text_store,
    random_images,
    random_rows,
)
from vlmixer.storage.textstore import TextStoreReader, TextStoreWriter, finalize_text_store
from vlmixer.storage.verify import verify_text
from vlmixer.storage.vocab import Vocabulary


def test_round_trip_every_field(tmp_path: Path, tiny_vocab_file: Path) -> None:
    shards = {"a-000": random_rows(1, 30), "a-001": random_rows(2, 1), "b-000": random_rows(3, 17)}
    root = build_text_store(tmp_path / "t", tiny_vocab_file, shards)
    t = TextStoreReader(root)
    flat = [s for name in sorted(shards) for s in shards[name]]
    assert len(t) == len(flat) == 48
    assert t.concepts == TINY_CONCEPTS
    assert (root / "vocab.txt").read_bytes() == tiny_vocab_file.read_bytes()
    for i, want in enumerate(flat):
        got = t.sentence(i)
        assert got.id == want["id"] and got.text == want["text"] and got.image_key == want["image_key"]
        assert got.tokens.dtype == np.int32 and got.tokens.tolist() == want["tokens"].tolist()
        assert got.token_chars.tolist() == want["token_chars"].tolist()
        assert [tuple(vars(s).values()) for s in got.spans] == [tuple(s) for s in want["spans"]]
        assert t.tokens(i).tolist() == want["tokens"].tolist()
        assert t.span_array(i).tolist() == [list(s) for s in want["spans"]]
        assert t.text(i) == want["text"]
    with pytest.raises(IndexError):
        t.sentence(48)
    assert verify_text(root) == []
    m = json.loads((root / "manifest.json").read_text())
    assert [s["sentences"] for s in m["shards"]] == [30, 1, 17]
    assert m["spans"] == sum(len(s["spans"]) for s in flat)


def test_empty_store_and_sentence_without_span(tmp_path: Path, tiny_vocab_file: Path) -> None:
    s = random_rows(4, 1)[0]
    s["spans"] = []
    t = TextStoreReader(build_text_store(tmp_path / "t", tiny_vocab_file, {"x": [s]}))
    assert t.sentence(0).spans == ()
    e = TextStoreReader(build_text_store(tmp_path / "e", tiny_vocab_file, {}))
    assert len(e) == 0


def test_writer_rejects_bad_spans_and_mismatched_resume(tmp_path: Path, tiny_vocab_file: Path) -> None:
    w = TextStoreWriter(tmp_path / "t", concepts=TINY_CONCEPTS, tokenizer_name="x", vocab_file=tiny_vocab_file)
    s = random_rows(5, 1)[0]
    with pytest.raises(StoreError, match="invalid span"):
        w.write_shard("x", [{**s, "spans": [(0, 1, 0, 1, 99)]}])
    with pytest.raises(StoreError, match="invalid span"):
        w.write_shard("x", [{**s, "spans": [(0, 1, 0, len(s["tokens"]) + 1, 0)]}])
    w.write_shard("x", [s])
    with pytest.raises(StoreError, match="already committed"):
        w.write_shard("x", [s])
    with pytest.raises(StoreError, match="concepts_sha256"):
        TextStoreWriter(tmp_path / "t", concepts=Vocabulary(names=("z",)), tokenizer_name="x",
                        vocab_file=tiny_vocab_file)


def test_format_version_corruption_and_vocabulary_mismatch(tmp_path: Path, tiny_vocab_file: Path) -> None:
    root = build_text_store(tmp_path / "t", tiny_vocab_file, {"a": random_rows(6, 5)})
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, "version": 7}))
    with pytest.raises(StoreError, match="format version 7"):
        TextStoreReader(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupted text store manifest"):
        TextStoreReader(root)
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="another concept vocabulary"):
        TextStoreReader(root, expect_concepts_sha256="f" * 64)
    # a damaged shard is reported by verify, naming the shard
    with h5py.File(root / "shards" / "a.h5", "r+") as f:
        f["token_offsets"][-1] = 10_000
    assert any("a.h5: token_offsets inconsistent" in p for p in verify_text(root))


def test_killed_writer_leaves_no_half_shard(tmp_path: Path, tiny_vocab_file: Path) -> None:
    root = tmp_path / "t"
    w = TextStoreWriter(root, concepts=TINY_CONCEPTS, tokenizer_name="x", vocab_file=tiny_vocab_file)
    w.write_shard("s0", random_rows(7, 3))
    (root / "shards" / "s1.h5.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
    assert w.committed_shards() == ["s0"]
    m = finalize_text_store(root)
    assert [s["name"] for s in m["shards"]] == ["s0.h5"] and m["sentences"] == 3
    assert not (root / "shards" / "s1.h5.tmp").exists()
    assert verify_text(root) == []


class _Both(Dataset):
    """Reads a gallery and a text store from DataLoader workers (fork): readers open lazily per process."""

    def __init__(self, g: GalleryReader, t: TextStoreReader) -> None:
        self.g, self.t = g, t

    def __len__(self) -> int:
        return max(self.g.num_patches, len(self.t))

    def __getitem__(self, i: int):
        p = i % self.g.num_patches
        s = i % len(self.t)
        return {"i": i, "feature": torch.from_numpy(self.g.feature(p).astype(np.float32)),
                "concept": self.g.patch(p).concept, "tokens": self.t.tokens(s).tolist(),
                "spans": self.t.span_array(s).tolist()}


def test_dataloader_two_fork_workers_read_both_stores(tmp_path: Path, tiny_vocab_file: Path) -> None:
    groot = build_gallery(tmp_path / "g", {i: random_images(20 + i, 10, 64) for i in range(3)}, dim=64)
    troot = build_text_store(tmp_path / "t", tiny_vocab_file, {"a": random_rows(8, 40),
                                                               "b": random_rows(9, 25)})
    g, t = GalleryReader(groot), TextStoreReader(troot)
    g.feature(0), t.tokens(0)  # the parent has open handles before the fork: workers must not reuse them
    ds = _Both(g, t)
    dl = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork", shuffle=False)
    got = {item["i"]: item for item in dl}
    assert sorted(got) == list(range(len(ds)))
    for i, item in got.items():
        p, s = i % g.num_patches, i % len(t)
        assert torch.equal(item["feature"], torch.from_numpy(g.feature(p).astype(np.float32)))
        assert item["concept"] == g.patch(p).concept
        assert item["tokens"] == t.tokens(s).tolist()
        assert item["spans"] == t.span_array(s).tolist()
