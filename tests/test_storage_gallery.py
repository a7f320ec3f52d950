from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from vlmixer.errors import StoreError
from vlmixer.storage import gallery_format as fmt
from vlmixer.storage.gallery import GalleryReader, finalize_gallery
from vlmixer.storage.gallery_writer import GalleryWriter, committed_shards
from vlmixer.storage.synthetic import TINY_CONCEPTS, build_gallery, random_images
from vlmixer.storage.verify import verify_gallery
from vlmixer.storage.vocab import Vocabulary

DIM = 48


def _expected(shards: dict[int, list[dict]]) -> dict[str, dict]:
    """What the store must return per image key: patches sorted by confidence descending."""
    out = {}
    for images in shards.values():
        for im in images:
            order = np.argsort(-im["confidences"], kind="stable")
            out[im["key"]] = {**im, "order": order}
    return out


def test_round_trip_every_field(tmp_path: Path) -> None:
    shards = {i: random_images(i, 7, DIM) for i in range(5)}  # spans several 128-patch blocks? no: small
    shards[9] = random_images(9, 60, DIM)  # > BLOCK patches: blocks are appended across shard commits
    root = build_gallery(tmp_path / "g", shards, dim=DIM, parts=2)
    g = GalleryReader(root)
    exp = _expected(shards)
    assert g.num_images == len(exp)
    assert g.num_patches == sum(len(im["confidences"]) for im in exp.values())
    assert g.concepts == TINY_CONCEPTS
    assert g.attributes is not None and g.attributes.names == ("red", "small", "wooden")
    seen = set()
    for i in range(g.num_images):
        rec = g.image(i)
        e = exp[rec.key]
        assert (rec.path, rec.width, rec.height) == (e["path"], e["width"], e["height"])
        assert rec.patch_count == len(e["confidences"])
        assert g.image_patches(i) == range(rec.patch_start, rec.patch_start + rec.patch_count)
        assert g.image_index(rec.key) == i
        for j, pid in enumerate(g.image_patches(i)):
            src = e["order"][j]
            p = g.patch(pid)
            # fp16 features bit-exact with what was written
            want = e["features"][src].astype(np.float16)
            assert p.feature.dtype == np.float16
            assert p.feature.tobytes() == want.tobytes()
            assert np.array_equal(p.box, e["boxes"][src])
            assert (p.width, p.height, p.image) == (e["width"], e["height"], i)
            assert p.concept == int(e["concepts"][src])
            assert p.confidence == float(e["confidences"][src])
            if e["attr_ids"] is None:
                assert len(p.attr_ids) == 0
            else:
                sc = e["attr_scores"][src]
                o = np.argsort(-sc, kind="stable")
                assert p.attr_ids.tolist() == e["attr_ids"][src][o].tolist()
                assert np.array_equal(p.attr_scores, sc[o].astype(np.float16).astype(np.float32))
        confs = [g.patch(pid).confidence for pid in g.image_patches(i)]
        assert confs == sorted(confs, reverse=True)  # a threshold or cap is a prefix
        seen.add(rec.key)
    assert seen == set(exp)
    assert g.features([0, g.num_patches - 1]).shape == (2, DIM)
    with pytest.raises(IndexError):
        g.feature(g.num_patches)
    assert verify_gallery(root) == []


def test_concept_index_and_context(tmp_path: Path) -> None:
    def im(key, concepts, confs):
        n = len(concepts)
        return dict(key=key, path=f"/x/{key}.jpg", width=100, height=80,
                    boxes=np.tile(np.array([[1, 2, 30, 40]], np.float32), (n, 1)),
                    features=np.full((n, DIM), 0.5, np.float32), concepts=np.array(concepts),
                    confidences=np.array(confs, np.float32))
    shards = {0: [im("a", [0, 1, 0], [0.9, 0.8, 0.3]), im("b", [1, 2], [0.7, 0.6])], 1: [im("c", [0], [0.95])]}
    g = GalleryReader(build_gallery(tmp_path / "g", shards, dim=DIM, parts=2))
    key_of = {g.image(g.patch(p).image).key: None for p in range(g.num_patches)}
    assert set(key_of) == {"a", "b", "c"}
    pids, confs = g.concept_patches(0)
    assert confs.tolist() == pytest.approx([0.95, 0.9, 0.3])
    assert [g.patch(int(p)).concept for p in pids] == [0, 0, 0]
    assert [g.image(g.patch(int(p)).image).key for p in pids] == ["c", "a", "a"]
    assert g.concept_patches(3)[0].size == 0  # a concept with no patch
    assert g.concept_counts().tolist() == [3, 2, 1, 0, 0]
    # contextual concepts: the other concepts of the patch's image, each with its best confidence
    dog_a = int(pids[1])
    c, f = g.context(dog_a)
    assert c.tolist() == [1] and f.tolist() == pytest.approx([0.8])
    cat_b = [int(p) for p in g.concept_patches(1)[0] if g.image(g.patch(int(p)).image).key == "b"][0]
    c, f = g.context(cat_b)
    assert c.tolist() == [2] and f.tolist() == pytest.approx([0.6])
    assert g.context(int(pids[0]))[0].size == 0  # image "c" has only dogs
    ic, icf = g.image_context(g.image_index("a"))
    assert ic.tolist() == [0, 1] and icf.tolist() == pytest.approx([0.9, 0.8])


def test_map_grows_from_tiny_map_size(tmp_path: Path) -> None:
    shards = {i: random_images(100 + i, 20, 256) for i in range(3)}
    root = build_gallery(tmp_path / "g", shards, dim=256, map_size=64 * 1024)
    g = GalleryReader(root)
    assert g.num_patches == sum(len(im["confidences"]) for s in shards.values() for im in s)
    assert g.num_patches * 256 * 2 > 64 * 1024  # needed more than the initial map
    assert verify_gallery(root) == []


def test_empty_image_and_empty_gallery(tmp_path: Path) -> None:
    img = random_images(1, 1, DIM)[0]
    for k in ("boxes", "features", "concepts", "confidences"):
        img[k] = img[k][:0]
    img["attr_ids"] = img["attr_scores"] = None
    g = GalleryReader(build_gallery(tmp_path / "g", {0: [img]}, dim=DIM))
    assert (g.num_images, g.num_patches) == (1, 0)
    assert g.image_patches(0) == range(0, 0)
    assert verify_gallery(tmp_path / "g") == []
    e = GalleryReader(build_gallery(tmp_path / "e", {}, dim=DIM))
    assert (e.num_images, e.num_patches) == (0, 0)


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    w = GalleryWriter(tmp_path / "g", feature_dim=DIM, concepts=TINY_CONCEPTS)
    img = random_images(3, 1, DIM)[0]
    with pytest.raises(StoreError, match="features shape"):
        with w.shard("s") as s:
            s.add_image(**{**img, "features": np.zeros((len(img["boxes"]), DIM + 1))})
    with pytest.raises(StoreError, match="added twice"):
        with w.shard("s") as s:
            s.add_image(**img)
            s.add_image(**img)
    with w.shard("s") as s:
        s.add_image(**img)
    with pytest.raises(StoreError, match="already committed"):
        with w.shard("s") as s:
            pass
    with pytest.raises(StoreError, match="already in part"):
        with w.shard("t") as s:
            s.add_image(**img)
    w.close()
    # a resumed build must describe the same gallery
    with pytest.raises(StoreError, match="feature_dim"):
        GalleryWriter(tmp_path / "g", feature_dim=DIM * 2, concepts=TINY_CONCEPTS)
    with pytest.raises(StoreError, match="concepts_sha256"):
        GalleryWriter(tmp_path / "g", feature_dim=DIM, concepts=Vocabulary(names=("x",)))


def test_failures_are_recorded_and_cleared_by_retry(tmp_path: Path) -> None:
    root = tmp_path / "g"
    w = GalleryWriter(root, feature_dim=DIM, concepts=TINY_CONCEPTS)
    good = random_images(4, 2, DIM)
    with w.shard("s0") as s:
        s.add_image(**good[0])
        s.add_failure("bad-1", "/x/bad-1.jpg", "truncated JPEG")
        s.add_failure(good[1]["key"], good[1]["path"], "unreadable")
    with w.shard("retry-1") as s:
        s.add_image(**good[1])
    w.close()
    finalize_gallery(root)
    g = GalleryReader(root)
    assert [(f["key"], f["reason"]) for f in g.failures()] == [("bad-1", "truncated JPEG")]
    assert set(g.shards()) == {"s0", "retry-1"}
    assert g.shards()["s0"]["failures"] == 2


def test_format_version_and_corrupted_manifest(tmp_path: Path) -> None:
    root = build_gallery(tmp_path / "g", {0: random_images(5, 3, DIM)}, dim=DIM)
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(StoreError, match="format version 99"):
        GalleryReader(root)
    (root / "manifest.json").write_text(json.dumps(m)[:-20])
    with pytest.raises(StoreError, match="corrupted gallery manifest"):
        GalleryReader(root)
    (root / "manifest.json").unlink()
    with pytest.raises(StoreError, match="was the build finished"):
        GalleryReader(root)
    finalize_gallery(root)
    assert GalleryReader(root).num_images == 3
    with pytest.raises(StoreError, match="differs from the expected"):
        GalleryReader(root, expect_concepts_sha256="0" * 64)


def test_decoder_refuses_pickle(tmp_path: Path) -> None:
    root = build_gallery(tmp_path / "g", {0: random_images(6, 2, DIM)}, dim=DIM)
    part = root / "parts" / fmt.part_name(0)
    env = lmdb.open(str(part), max_dbs=16)
    db = env.open_db(b"image")

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with env.begin(write=True) as txn:
        txn.put(fmt.ukey(0), pickle.dumps({"key": "x", "evil": Boom()}), db=db)
    env.close()
    g = GalleryReader(root)
    with pytest.raises(StoreError, match="not valid msgpack"):
        g.image(0)
    assert not (tmp_path / "pwned").exists()
    assert any("not valid msgpack" in p for p in verify_gallery(root))
    # index arrays are plain npy: an object array (pickled) is refused too
    np.save(root / "index" / "patch_conf.npy", np.array([Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(StoreError, match="unreadable index array"):
        GalleryReader(root).context(0)
    assert not (tmp_path / "pwned").exists()


def test_verify_finds_damage(tmp_path: Path) -> None:
    root = build_gallery(tmp_path / "g", {0: random_images(7, 6, DIM)}, dim=DIM)
    env = lmdb.open(str(root / "parts" / fmt.part_name(0)), max_dbs=16)
    feat = env.open_db(b"feat")  # before the write txn: open_db inside one deadlocks
    with env.begin(write=True) as txn:
        txn.put(fmt.ukey(0), b"\x00" * 10, db=feat)
    env.close()
    problems = verify_gallery(root)
    assert any("block 0 has 10 feature bytes" in p for p in problems)


WRITER_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from vlmixer.storage.synthetic import TINY_CONCEPTS, random_images
    from vlmixer.storage.gallery_writer import GalleryWriter
    w = GalleryWriter({root!r}, feature_dim=512, concepts=TINY_CONCEPTS, map_size=1 << 20)
    done = w.committed_shards()
    for i in range(10_000):
        sid = f"shard-{{i:04d}}"
        if sid in done:
            continue
        with w.shard(sid) as s:
            for im in random_images(i, 40, 512):
                s.add_image(**im)
        print(sid, flush=True)
""")


def test_sigkill_mid_shard_keeps_committed_shards_only(tmp_path: Path) -> None:
    root = tmp_path / "g"
    script = WRITER_SCRIPT.format(tests=str(Path(__file__).parent), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    printed = []
    try:
        for line in proc.stdout:  # wait for a few commits, then kill while the next is being written
            printed.append(line.strip())
            if len(printed) == 3:
                time.sleep(0.05)
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = committed_shards(root)
    assert set(printed) <= set(done)
    n_done = len(done)
    assert set(done) == {f"shard-{i:04d}" for i in range(n_done)}
    manifest = finalize_gallery(root)
    g = GalleryReader(root)
    want_keys = {im["key"] for i in range(n_done) for im in random_images(i, 40, 512)}
    got_keys = {g.image(i).key for i in range(g.num_images)}
    assert got_keys == want_keys  # every committed shard whole, nothing of the uncommitted one
    assert manifest["patches"] == sum(len(im["confidences"]) for i in range(n_done)
                                      for im in random_images(i, 40, 512))
    assert verify_gallery(root) == []
    g.close()  # LMDB allows one handle per process: readers go before a writer opens
    # resume with the same writer code: redoes only the uncommitted shards, no duplicates
    w = GalleryWriter(root, feature_dim=512, concepts=TINY_CONCEPTS)
    assert set(w.committed_shards()) == set(done)
    with w.shard(f"shard-{n_done:04d}") as s:
        for im in random_images(n_done, 40, 512):
            s.add_image(**im)
    w.close()
    finalize_gallery(root)
    assert GalleryReader(root).num_images == 40 * (n_done + 1)
    assert verify_gallery(root) == []


def test_retry_in_another_part_clears_the_failure(tmp_path: Path) -> None:
    root = tmp_path / "g"
    good = random_images(8, 1, DIM)[0]
    w0 = GalleryWriter(root, part=0, feature_dim=DIM, concepts=TINY_CONCEPTS)
    with w0.shard("s0") as s:
        s.add_failure(good["key"], good["path"], "unreadable")
        s.add_failure("other", "/x/other.jpg", "truncated JPEG")
    w0.close()
    w1 = GalleryWriter(root, part=1, feature_dim=DIM, concepts=TINY_CONCEPTS)
    with w1.shard("retry") as s:
        s.add_image(**good)
    w1.close()
    assert finalize_gallery(root)["failed"] == 1
    assert [f["key"] for f in GalleryReader(root).failures()] == ["other"]


def test_features_beyond_float16_are_refused(tmp_path: Path) -> None:
    img = random_images(9, 1, DIM)[0]
    while len(img["boxes"]) == 0:
        img = random_images(10, 1, DIM)[0]
    img["features"] = img["features"].copy()
    img["features"][0, 0] = 1e6  # finite in float32, inf in float16
    w = GalleryWriter(tmp_path / "g", feature_dim=DIM, concepts=TINY_CONCEPTS)
    with pytest.raises(StoreError, match="float16 range"):
        with w.shard("s") as s:
            s.add_image(**img)
    w.close()


def test_finalize_streams_in_chunks_with_the_same_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The concept index and contexts do not depend on finalize's chunk size, and equal a plain
    computation: per concept, patches by confidence descending then id; per image, each concept once
    with its best confidence."""
    import vlmixer.storage.gallery_finalize as gallery_mod

    rng = np.random.default_rng(5)
    shards = {i: random_images(200 + i, 6, DIM) for i in range(3)}
    for s in shards.values():
        for im in s:  # few concepts and rounded confidences: many ties and repeats per image
            im["concepts"] = rng.integers(0, 3, len(im["confidences"]))
            im["confidences"] = np.round(rng.uniform(0.2, 1.0, len(im["confidences"])), 1).astype(np.float32)
    root = build_gallery(tmp_path / "g", shards, dim=DIM, parts=2)
    index = root / "index"

    def arrays() -> dict[str, np.ndarray]:
        return {p.stem: np.load(p) for p in sorted(index.glob("*.npy"))}

    whole = arrays()
    monkeypatch.setattr(gallery_mod, "_CHUNK", 7)
    finalize_gallery(root, None)  # the whole-array path, in chunks of 7 where it streams
    chunked = arrays()
    assert whole.keys() == chunked.keys() and all(np.array_equal(whole[k], chunked[k]) for k in whole)

    g = GalleryReader(root)
    recs = [g.patch(p) for p in range(g.num_patches)]
    n_concepts = len(g.concept_counts())
    for c in range(n_concepts):
        want = sorted((p for p in range(g.num_patches) if recs[p].concept == c),
                      key=lambda p: (-recs[p].confidence, p))
        pids, confs = g.concept_patches(c)
        assert pids.tolist() == want and confs.tolist() == [recs[p].confidence for p in want]
    for i in range(g.num_images):
        best: dict[int, float] = {}
        for p in g.image_patches(i):
            best[recs[p].concept] = max(best.get(recs[p].concept, -1.0), recs[p].confidence)
        ic, icf = g.image_context(i)
        assert ic.tolist() == sorted(best) and icf.tolist() == [best[c] for c in sorted(best)]
    g.close()
