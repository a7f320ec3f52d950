"""Damaged and shared stores, as a user meets them: a reader beside a writer, two writers, a
truncated data.mdb, flipped bits in features and records, a reordered text manifest, a damaged
gzip chunk. Each case is either read exactly or refused with one message naming the file."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest

from vlmixer.cli import main
from vlmixer.errors import StoreError
from vlmixer.storage import gallery_format as fmt
from vlmixer.storage.gallery import GalleryReader, finalize_gallery
from vlmixer.storage.gallery_writer import GalleryWriter, build_lock
from vlmixer.storage.synthetic import (
    TINY_ATTRS,
    TINY_CONCEPTS,
    build_gallery,
    build_text_store,
    random_images,
    random_rows,
)
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.storage.verify import verify_gallery, verify_text

DIM = 48
PART0 = "parts/part-00000/data.mdb"


def one_shard_gallery(root: Path, n_images: int = 30, seed: int = 3) -> Path:
    """One shard, one transaction: every block is written once, so its bytes occur once in data.mdb."""
    return build_gallery(root, {seed: random_images(seed, n_images, DIM)}, dim=DIM)


def writer(root: Path, **kw: object) -> GalleryWriter:
    return GalleryWriter(root, feature_dim=DIM, concepts=TINY_CONCEPTS, attributes=TINY_ATTRS, **kw)


def all_features(root: Path) -> np.ndarray:
    g = GalleryReader(root)
    out = g.features(np.arange(g.num_patches))
    g.close()
    return out


# ------------------------------------------------------------------------ readers beside a writer

READER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from vlmixer.storage.gallery import GalleryReader
    root, expect, stop = sys.argv[1:4]
    want = np.load(expect)
    g = GalleryReader(root)
    rng = np.random.default_rng(0)
    reads = failed = wrong = 0
    errors = []
    print("ready", flush=True)
    while not os.path.exists(stop) or reads + failed < 3000:
        for pid in rng.integers(0, len(want), 100):
            try:
                f = g.feature(int(pid))
                c = int(g.record(int(pid))["concept"])
            except Exception as e:
                failed += 1
                errors.append(repr(e)[:200])
                continue
            reads += 1
            wrong += int(not np.array_equal(f, want[pid]) or c != int(g.patch_arrays()["patch_concept"][pid]))
    print(json.dumps({"reads": reads, "failed": failed, "wrong": wrong, "n": g.num_patches, "errors": errors[:3]}))
""")


def test_reader_in_a_subprocess_while_a_writer_appends(tmp_path: Path) -> None:
    root = build_gallery(tmp_path / "g", {i: random_images(i, 40, DIM) for i in range(4)}, dim=DIM)
    want = all_features(root)
    np.save(tmp_path / "want.npy", want)
    stop = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-c", READER, str(root), str(tmp_path / "want.npy"), str(stop)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # the append a `--retry-failed` pass makes: many commits, blocks rewritten, finalize twice
        w = writer(root)
        assert w.part == 1  # part 0 is finalized: readers map it, nobody writes it again
        for i in range(4, 40):
            with w.shard(f"more-{i}") as s:
                for im in random_images(i, 12, DIM, key_prefix="more"):
                    s.add_image(**im)
            if i == 20:
                finalize_gallery(root)
        w.close()
        manifest = finalize_gallery(root)
    finally:
        stop.touch()
        out, _ = proc.communicate(timeout=300)
    res = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0
    assert res["failed"] == 0 and res["wrong"] == 0 and res["reads"] >= 3000, res  # the old protocol: thousands
    assert res["n"] == len(want)  # the reader kept the generation it opened
    # a reader opened now sees the new generation; the old patches are unchanged
    g = GalleryReader(root)
    assert g.num_patches == manifest["patches"] > len(want)
    np.testing.assert_array_equal(g.features(np.arange(len(want))), want)
    added = [im for i in range(4, 40) for im in random_images(i, 12, DIM, key_prefix="more")]
    im = next(x for x in added if len(x["confidences"]))
    rec = g.image(g.image_index(im["key"]))
    first = int(np.argmax(im["confidences"]))
    np.testing.assert_array_equal(g.feature(rec.patch_start), im["features"][first].astype(np.float16))
    assert verify_gallery(root) == []


def test_finalized_parts_are_never_written_and_old_readers_say_reopen(tmp_path: Path) -> None:
    root = one_shard_gallery(tmp_path / "g")
    with pytest.raises(StoreError, match=r"part part-00000 is finalized .* write part 1 instead"):
        writer(root, part=0)
    before = (root / PART0).read_bytes()
    stale = GalleryReader(root)  # not opened yet: like a reader handed to a DataLoader worker later
    with writer(root) as w:
        with w.shard("late") as s:
            for im in random_images(77, 5, DIM, key_prefix="late"):
                s.add_image(**im)
    finalize_gallery(root)
    assert (root / PART0).read_bytes() == before
    with pytest.raises(StoreError, match="finalized again since; reopen it"):
        stale.feature(0)
    assert GalleryReader(root).num_images == 35


HOLDER = textwrap.dedent("""
    import sys
    from vlmixer.storage.gallery_writer import GalleryWriter
    sys.path.insert(0, {tests!r})
    from vlmixer.storage.synthetic import TINY_ATTRS, TINY_CONCEPTS
    w = GalleryWriter({root!r}, feature_dim=48, concepts=TINY_CONCEPTS, attributes=TINY_ATTRS)
    print("holding", flush=True)
    sys.stdin.read()
""")


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_one_leaves_no_lock(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = one_shard_gallery(tmp_path / "g")
    script = HOLDER.format(tests=str(Path(__file__).parent), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(StoreError, match=rf"gallery .*g: another process is writing it \(pid {proc.pid} on "):
            writer(root)
        with pytest.raises(StoreError, match="another process is writing it"):
            with build_lock(root):
                pass
        assert main(["gallery", "finalize", str(root)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {proc.pid}" in err[0]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with writer(root) as w:  # the kernel dropped the lock
        assert w.part == 1


# ------------------------------------------------------------------------ a truncated data.mdb

TRUNCATED = textwrap.dedent("""
    import sys
    from vlmixer.cli import main
    from vlmixer.errors import StoreError
    from vlmixer.storage.gallery import GalleryReader
    for root in sys.argv[1:]:
        print("verify", main(["verify", root]), flush=True)
        print("info", main(["gallery", "info", root]), flush=True)
        try:
            GalleryReader(root).feature(0)
            print("reader read", flush=True)
        except StoreError as e:
            print("reader", e, flush=True)
""")


def test_truncated_data_mdb_is_refused_at_several_sizes(tmp_path: Path) -> None:
    src = one_shard_gallery(tmp_path / "g")
    with lmdb.open(str(src / "parts" / "part-00000"), readonly=True, lock=False, max_dbs=16) as env:
        psize, need = env.stat()["psize"], (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    assert os.path.getsize(src / PART0) >= need > 4 * psize
    sizes = [0, 100, 2 * psize, need // 2, need - psize, need - 1]
    roots = []
    for n in sizes:
        r = tmp_path / f"cut{n}"
        shutil.copytree(src, r)
        os.truncate(r / PART0, n)
        roots.append(str(r))
    p = subprocess.run([sys.executable, "-c", TRUNCATED, *roots], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])  # -7 would be the SIGBUS this prevents
    out = [ln for ln in p.stdout.splitlines() if ln.split(" ", 1)[0] in ("verify", "info", "reader")]
    assert len(out) == 3 * len(sizes)
    assert sum("data.mdb: truncated" in ln for ln in p.stdout.splitlines()) == 2 * len(sizes)  # verify lists it
    errs = p.stderr.strip().splitlines()
    assert len(errs) == len(sizes)  # `gallery info`: one line each, exit 2
    for k, (n, root) in enumerate(zip(sizes, roots)):
        verify, info, reader = out[3 * k: 3 * k + 3]
        assert verify == "verify 1" and info == "info 2"
        name = f"{root}/{PART0}"
        if n < psize:
            expect = f"{name}: truncated to {n} bytes, smaller than one LMDB page"
        else:
            expect = f"{name}: truncated: {n:,} bytes, its last transaction needs {need:,} bytes"
        assert reader.startswith("reader ") and expect in reader, reader
        assert expect in errs[k]


# ------------------------------------------------------------------------ flipped bits

def flip_bit(path: Path, needle: bytes, byte: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    assert data.count(needle) == 1  # the one live copy: nothing stale to flip by mistake
    data[data.index(needle) + byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_a_flipped_feature_bit_is_caught_by_verify_and_by_checked_reads(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    root = one_shard_gallery(tmp_path / "g")
    want = all_features(root)
    assert verify_gallery(root) == []
    flip_bit(root / PART0, want[:3].tobytes(), byte=2 * DIM + 4)  # low mantissa bit of patch 1: still finite
    assert verify_gallery(root) == ["part part-00000: block 0: feature bytes do not match their CRC-32"]
    assert verify_gallery(root, quick=True) == []
    plain = GalleryReader(root)
    assert not np.array_equal(plain.feature(1), want[1])  # what went unseen before
    checked = GalleryReader(root, check_blocks=True)
    with pytest.raises(StoreError, match="part-00000 block 0: feature bytes do not match their CRC-32"):
        checked.feature(7)
    assert main(["verify", str(root)]) == 1
    assert "feature bytes do not match their CRC-32" in capsys.readouterr().out
    assert main(["verify", "--quick", str(root)]) == 0


def test_a_flipped_patch_record_bit_is_caught_by_verify(tmp_path: Path) -> None:
    root = one_shard_gallery(tmp_path / "g")
    g = GalleryReader(root)
    recs = np.stack([g.record(i) for i in range(3)])
    g.close()
    flip_bit(root / PART0, recs.tobytes(), byte=fmt.PATCH_DTYPE.itemsize + 8)  # patch 1's box x1, low bit
    assert verify_gallery(root) == ["part part-00000: block 0: patch records do not match their CRC-32"]
    with pytest.raises(StoreError, match="patch records do not match"):
        GalleryReader(root, check_blocks=True).record(0)


def test_every_block_of_a_multi_block_gallery_is_checked(tmp_path: Path) -> None:
    root = build_gallery(tmp_path / "g", {i: random_images(i, 60, DIM) for i in range(3)}, dim=DIM, parts=2)
    g = GalleryReader(root, check_blocks=True)
    assert g.num_patches > 3 * fmt.BLOCK
    np.testing.assert_array_equal(g.features(np.arange(g.num_patches)), all_features(root))
    assert len(g._open()["checked"]) == sum(-(-p["patches"] // fmt.BLOCK) for p in g.manifest["parts"])
    assert verify_gallery(root) == []


def test_a_gallery_of_the_previous_format_version_is_a_clear_error(tmp_path: Path) -> None:
    root = one_shard_gallery(tmp_path / "g")
    for name in ("gallery.json", "manifest.json"):
        m = json.loads((root / name).read_text())
        (root / name).write_text(json.dumps({**m, "version": 1}))
    with pytest.raises(StoreError, match="gallery format version 1, this vlmixer reads version 2; rebuild"):
        GalleryReader(root)
    with pytest.raises(StoreError, match="format version 1"):
        writer(root)


# ------------------------------------------------------------------------ the text store

def test_swapped_manifest_entries_are_caught(tmp_path: Path, tiny_vocab_file: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    root = build_text_store(tmp_path / "t", tiny_vocab_file, {
        "a": random_rows(1, 5), "b": random_rows(2, 7), "c": random_rows(3, 7)})
    good = json.loads((root / "manifest.json").read_text())
    assert verify_text(root) == []
    swapped = dict(good, shards=[good["shards"][1], good["shards"][0], good["shards"][2]])
    (root / "manifest.json").write_text(json.dumps(swapped))
    with pytest.raises(StoreError, match=r"shard entry 0 \(b.h5\) has offset 5 .* expected offset 0 "
                                         r"\(entries reordered or edited\)"):
        TextStoreReader(root)
    assert main(["verify", str(root)]) == 1
    assert "entries reordered or edited" in capsys.readouterr().out
    # equal-sized shards with their names swapped: offsets add up, the order does not
    sh = [dict(s) for s in good["shards"]]
    sh[1]["name"], sh[2]["name"] = sh[2]["name"], sh[1]["name"]
    (root / "manifest.json").write_text(json.dumps(dict(good, shards=sh)))
    with pytest.raises(StoreError, match="out of name order at 2"):
        TextStoreReader(root)
    assert any("out of name order" in p for p in verify_text(root))


def test_shard_bytes_are_checked_against_the_manifest(tmp_path: Path, tiny_vocab_file: Path) -> None:
    root = build_text_store(tmp_path / "t", tiny_vocab_file, {"a": random_rows(1, 20)})
    with h5py.File(root / "shards" / "a.h5", "r+") as f:  # a value changed in place, structure intact
        f["tokens"][0] = f["tokens"][0] + 1
    assert verify_text(root) == ["shards/a.h5: bytes do not match the sha256 finalize recorded"]
    assert verify_text(root, quick=True) == []


def test_a_corrupt_gzip_chunk_is_one_line_in_text_dump(tmp_path: Path, tiny_vocab_file: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    root = build_text_store(tmp_path / "t", tiny_vocab_file, {"a": random_rows(1, 200)})
    shard = root / "shards" / "a.h5"
    with h5py.File(shard, "r") as f:
        info = f["text"].id.get_chunk_info(0)
    data = bytearray(shard.read_bytes())
    mid = info.byte_offset + info.size // 2
    data[mid: mid + 16] = b"\xa5" * 16
    shard.write_bytes(bytes(data))
    out = tmp_path / "dump.jsonl"
    assert main(["text", "dump", str(root), "--jsonl", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{shard}: cannot read text" in err[0] and "the shard is damaged" in err[0], err
    with pytest.raises(StoreError, match="cannot read text of sentence 0"):
        TextStoreReader(root).text(0)
    assert any("a.h5" in p for p in verify_text(root))


def test_a_feature_turned_inf_is_reported_as_non_finite_and_by_its_checksum(tmp_path: Path) -> None:
    root = one_shard_gallery(tmp_path / "g")
    want = all_features(root)
    data = bytearray((root / PART0).read_bytes())
    at = data.index(want[:3].tobytes()) + 2 * (2 * DIM + 5)  # patch 2, value 5
    data[at: at + 2] = np.array([np.inf], np.float16).tobytes()
    (root / PART0).write_bytes(bytes(data))
    assert verify_gallery(root) == ["part part-00000: block 0: feature bytes do not match their CRC-32",
                                    "part part-00000: block 0 has non-finite features"]
    assert verify_gallery(root, quick=True) == ["part part-00000: block 0 has non-finite features"]


def test_verify_finds_unsorted_patches_and_a_wrong_patch_image(tmp_path: Path) -> None:
    root = one_shard_gallery(tmp_path / "g")
    g = GalleryReader(root)
    big = next(i for i in range(g.num_images) if g.image(i).patch_count >= 2)
    rec, key = g.image(big), g.image(big).key
    g.close()
    conf = np.load(root / "index" / "patch_conf.npy")
    conf[rec.patch_start + 1] = conf[rec.patch_start] + 0.01
    np.save(root / "index" / "patch_conf.npy", conf)
    image = np.load(root / "index" / "patch_image.npy")
    image[rec.patch_start] = big + 1
    np.save(root / "index" / "patch_image.npy", image)
    problems = verify_gallery(root)
    assert f"image {key!r}: patches not sorted by confidence" in problems
    assert f"image {key!r}: index/patch_image disagrees with the image record" in problems
    assert sum("not sorted" in p or "patch_image disagrees" in p for p in problems) == 2


def test_a_lock_file_this_process_cannot_open_is_a_clear_error_and_the_gallery_still_reads(tmp_path: Path) -> None:
    root = one_shard_gallery(tmp_path / "g")
    (root / "build.lock").unlink()
    (root / "build.lock").mkdir()  # stands for another account's file or a read-only medium (root ignores modes)
    with pytest.raises(StoreError, match=r"gallery .*g: cannot write here \(.*build.lock: Is a directory\)"):
        writer(root)
    assert GalleryReader(root).num_images == 30  # readers need no lock
