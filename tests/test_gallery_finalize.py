"""Finalize under a memory budget: the external sort/merge path writes the same bytes as the
whole-array path at every chunk size, survives kill -9 anywhere, and readers see no difference."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vlmixer.cli import main
from vlmixer.errors import StoreError
from vlmixer.storage import external_sort
from vlmixer.storage import gallery_finalize as gf
from vlmixer.storage.finalize_budget import SortBudget
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.gallery_writer import GalleryWriter
from vlmixer.storage.synthetic import TINY_CONCEPTS, build_gallery, random_images
from vlmixer.storage.verify import verify_gallery

DIM = 8
# chunk sizes 1, 7 and 50 (several runs, several merge passes at fan-in 2 and 3), and one chunk for all
BUDGETS = {
    "chunk1": SortBudget(run_records=1, merge_records=2, fan_in=2, read_bytes=1),
    "chunk7": SortBudget(run_records=7, merge_records=21, fan_in=3, read_bytes=3000),
    "chunk50": SortBudget(run_records=50, merge_records=100, fan_in=2, read_bytes=40_000),
    "one_chunk": SortBudget.from_memory_mb(64),
}


def tied_shards(seed: int, n_shards: int = 4, per_shard: int = 12, nan: bool = False) -> dict[int, list[dict]]:
    """Few concepts and confidences rounded to one decimal: many ties within a concept and within
    an image, plus confidences 0.0, -0.0 and +inf (and NaN), and images without patches."""
    rng = np.random.default_rng(seed)
    shards = {i: random_images(seed * 100 + i, per_shard, DIM) for i in range(n_shards)}
    special = np.array([0.0, -0.0, np.inf] + [np.nan] * nan, np.float32)
    for s in shards.values():
        for im in s:
            n = len(im["confidences"])
            im["concepts"] = rng.integers(0, 3, n)
            conf = np.round(rng.uniform(0.2, 1.0, n), 1).astype(np.float32)
            swap = rng.random(n) < 0.2
            conf[swap] = rng.choice(special, int(swap.sum()))
            im["confidences"] = conf
    return shards


def index_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "index").iterdir())}


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A two-part gallery with ties, and the index bytes of the whole-array path."""
    root = build_gallery(tmp_path_factory.mktemp("tied") / "g", tied_shards(3), dim=DIM, parts=2)
    gf.finalize_gallery(root, None)
    return root, index_bytes(root)


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_budgeted_index_is_byte_identical(tied: tuple[Path, dict[str, bytes]], name: str) -> None:
    root, want = tied
    manifest = gf.finalize_gallery(root, budget=BUDGETS[name])
    assert index_bytes(root) == want
    assert sorted(p.name for p in root.iterdir()) == ["build.lock", "gallery.json", "index", "manifest.json", "parts"]
    assert manifest["patches"] == GalleryReader(root).num_patches > 100


def test_reader_sees_the_same_gallery(tied: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = tied
    gf.finalize_gallery(root, budget=BUDGETS["chunk7"])
    g = GalleryReader(root)
    assert verify_gallery(root) == []
    counts = g.concept_counts()
    assert counts.sum() == g.num_patches and len(counts) == len(TINY_CONCEPTS)
    for c in range(len(counts)):
        pids, confs = g.concept_patches(c)
        recs = [g.record(int(p)) for p in pids]
        assert all(int(r["concept"]) == c for r in recs)
        assert np.array_equal(confs, np.array([r["conf"] for r in recs], np.float32), equal_nan=True)
    g.close()


@pytest.mark.parametrize("name", ["chunk1", "chunk7", "one_chunk"])
def test_nan_confidences_order_as_in_the_whole_array_path(tmp_path: Path, name: str) -> None:
    root = build_gallery(tmp_path / "g", tied_shards(4, n_shards=2, nan=True), dim=DIM)
    assert np.isnan(np.load(root / "index" / "patch_conf.npy")).any()
    gf.finalize_gallery(root, None)
    want = index_bytes(root)
    gf.finalize_gallery(root, budget=BUDGETS[name])
    assert index_bytes(root) == want


@pytest.mark.parametrize("name", ["chunk1", "chunk7", "one_chunk"])
def test_edge_galleries(tmp_path: Path, name: str) -> None:
    """No patch at all; one image longer than a chunk; a single patch."""
    one = random_images(7, 1, DIM)[0]
    n = 40
    long_image = dict(one, key="long", boxes=np.tile([[1, 2, 3, 4]], (n, 1)).astype(np.float32),
                      features=np.zeros((n, DIM), np.float32), concepts=np.arange(n) % 4,
                      confidences=np.full(n, 0.5, np.float32), attr_ids=None, attr_scores=None)
    single = dict(long_image, key="single", boxes=long_image["boxes"][:1], features=long_image["features"][:1],
                  concepts=np.array([2]), confidences=np.array([0.25], np.float32))
    empty = dict(single, key="empty", boxes=np.zeros((0, 4), np.float32), features=np.zeros((0, DIM)),
                 concepts=np.zeros(0, int), confidences=np.zeros(0, np.float32))
    for i, shards in enumerate(({0: [empty]}, {0: [empty, long_image, dict(empty, key="empty2")]}, {0: [single]})):
        root = build_gallery(tmp_path / f"g{i}", shards, dim=DIM)
        gf.finalize_gallery(root, None)
        want = index_bytes(root)
        gf.finalize_gallery(root, budget=BUDGETS[name])
        assert index_bytes(root) == want


def test_concept_sort_key_orders_like_lexsort() -> None:
    rng = np.random.default_rng(0)
    conf = rng.choice(np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 0.5,
                                1e-45, -1e-45, 3.4e38], np.float32), 5000)
    concept = rng.integers(0, 4, 5000).astype(np.int32)
    want = np.lexsort((-conf, concept))
    got = np.argsort(gf.concept_sort_key(concept, conf), kind="stable")
    assert np.array_equal(got, want)


def test_merge_equals_one_sort(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rec = np.zeros(1000, external_sort.RUN_DTYPE)
    rec["key"] = rng.integers(0, 20, 1000)  # many equal keys: the id decides
    rec["id"] = np.arange(1000)  # runs are cut in id order, as finalize cuts them
    rec["conf"] = rng.random(1000)
    runs = []
    for i, a in enumerate(range(0, 1000, 130)):
        path = tmp_path / f"r{i}.bin"
        external_sort.order_records(rec[a: a + 130]).tofile(path)
        runs.append((path, len(rec[a: a + 130])))
    out: list[np.ndarray] = []
    external_sort.merge_all(runs, SortBudget(run_records=130, merge_records=9, fan_in=3, read_bytes=1),
                            tmp_path, out.append)
    assert np.concatenate(out).tobytes() == rec[np.lexsort((rec["id"], rec["key"]))].tobytes()
    assert list(tmp_path.iterdir()) == []  # every run and intermediate merge deleted


def test_memory_budget_is_checked(tied: tuple[Path, dict[str, bytes]], capsys: pytest.CaptureFixture) -> None:
    root, want = tied
    with pytest.raises(StoreError, match="at least 64 MB"):
        gf.finalize_gallery(root, 16)
    assert main(["gallery", "finalize", str(root), "--memory-mb", "16"]) == 2
    assert "at least 64 MB" in capsys.readouterr().err
    assert main(["gallery", "finalize", str(root), "--memory-mb", "64"]) == 0
    assert index_bytes(root) == want


def test_a_damaged_part_is_an_error_not_an_index(tmp_path: Path) -> None:
    import lmdb

    from vlmixer.storage import gallery_format as fmt

    root = build_gallery(tmp_path / "g", {0: random_images(11, 60, DIM)}, dim=DIM)
    env = lmdb.open(str(root / "parts" / fmt.part_name(0)), max_dbs=16)
    pmeta = env.open_db(b"pmeta")
    with env.begin(write=True) as txn:
        txn.delete(fmt.ukey(1), db=pmeta)
    env.close()
    with pytest.raises(StoreError, match="block 1 missing"):
        gf.finalize_gallery(root, budget=BUDGETS["chunk7"])


KILLER = textwrap.dedent("""
    import os, signal, sys
    from vlmixer.storage import gallery_finalize as gf
    from vlmixer.storage.finalize_budget import SortBudget
    where, at = sys.argv[2], int(sys.argv[3])
    calls = [0]

    def wrap(fn):
        def inner(*a, **k):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return inner

    if where == "append":
        gf.NpyWriter.append = wrap(gf.NpyWriter.append)
    elif where == "replace":
        gf.os.replace = wrap(gf.os.replace)
    elif where == "manifest":
        gf.atomic_write_json = wrap(gf.atomic_write_json)
    gf.finalize_gallery(sys.argv[1], budget=SortBudget(run_records=7, merge_records=14, fan_in=2, read_bytes=3000))
    print("finished")
""")


def test_kill_9_anywhere_then_rerun_gives_the_same_index(tied: tuple[Path, dict[str, bytes]],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, want = tied
    appends = [0]
    real = gf.NpyWriter.append

    def count(self: gf.NpyWriter, values: np.ndarray) -> None:
        appends[0] += 1
        real(self, values)

    monkeypatch.setattr(gf.NpyWriter, "append", count)
    gf.finalize_gallery(src, budget=SortBudget(run_records=7, merge_records=14, fan_in=2, read_bytes=3000))
    monkeypatch.undo()
    n = appends[0]
    assert n > 100
    points = [("append", 3), ("append", n // 3), ("append", 2 * n // 3), ("append", n - 1),
              ("replace", 1), ("manifest", 1)]
    for finished_before in (True, False):
        for where, at in points:
            root = tmp_path / f"{where}-{at}-{finished_before}"
            shutil.copytree(src, root)
            if not finished_before:
                (root / "manifest.json").unlink()
            proc = subprocess.run([sys.executable, "-c", KILLER, str(root), where, str(at)],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == -signal.SIGKILL, (where, at, proc.stderr)
            if (root / "manifest.json").exists():  # killed before the old index was touched
                assert finished_before and index_bytes(root) == want
                GalleryReader(root).close()
            else:
                with pytest.raises(StoreError, match="was the build finished"):
                    GalleryReader(root)
            gf.finalize_gallery(root, budget=BUDGETS["chunk7"])
            assert index_bytes(root) == want, (where, at)
            assert sorted(os.listdir(root)) == ["build.lock", "gallery.json", "index", "manifest.json", "parts"]
            assert verify_gallery(root) == []


def test_the_build_finalizes_under_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A default build passes its `finalize_memory_mb` to finalize: the budgeted path."""
    from vlmixer.pipeline.gallery import job
    from vlmixer.pipeline.gallery.options import BuildOptions

    w = GalleryWriter(tmp_path / "g", feature_dim=DIM, concepts=TINY_CONCEPTS)
    w.close()
    seen: list[tuple[object, ...]] = []
    real = gf.finalize_gallery
    monkeypatch.setattr(gf, "finalize_gallery", lambda *a, **k: seen.append(a) or real(*a, **k))
    monkeypatch.setattr(job, "_run_in_process", lambda *a, **k: None)  # nothing is detected or committed
    cfg = tmp_path / "d.yaml"
    cfg.write_text("x: 1\n")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"")
    report = job.build_gallery(BuildOptions(images=str(tmp_path / "imgs"), detector=str(cfg), out=str(tmp_path / "g"),
                                            ray_address="none"))
    assert seen == [(tmp_path / "g", BuildOptions.finalize_memory_mb)] and report.gallery_patches == 0


def test_failures_counted_once_per_image_over_parts(tmp_path: Path) -> None:
    """A key failed in two parts is one failed image; one added since in any part is none."""
    from vlmixer.storage.gallery_failures import count_failed_images, failed_images

    good = random_images(8, 1, DIM)[0]
    for part, fails in ((0, ["twice", "fixed", "only0"]), (1, ["twice"]), (2, [])):
        w = GalleryWriter(tmp_path / "g", part=part, feature_dim=DIM, concepts=TINY_CONCEPTS)
        with w.shard(f"s{part}") as s:
            for key in fails:
                s.add_failure(key, f"/x/{key}.jpg", f"bad in part {part}")
            if part == 2:
                s.add_image(**dict(good, key="fixed"))
        w.close()
    listed = failed_images(tmp_path / "g")
    assert [(f["key"], f["part"], f["reason"]) for f in listed] == [
        ("only0", "part-00000", "bad in part 0"), ("twice", "part-00001", "bad in part 1")]
    assert count_failed_images(tmp_path / "g") == 2
    assert gf.finalize_gallery(tmp_path / "g", budget=BUDGETS["chunk7"])["failed"] == 2


def test_a_full_disk_is_one_clear_error_and_the_old_index_stays(tied: tuple[Path, dict[str, bytes]],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    root, want = tied
    gf.finalize_gallery(root, budget=BUDGETS["chunk7"])
    calls = [0]
    real = gf.NpyWriter.append

    def append(self: gf.NpyWriter, values: np.ndarray) -> None:
        calls[0] += 1
        if calls[0] == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, values)

    monkeypatch.setattr(gf.NpyWriter, "append", append)
    with pytest.raises(StoreError, match=r"could not write its index .*No space left on device.*bytes per patch"):
        gf.finalize_gallery(root, budget=BUDGETS["chunk7"])
    assert sorted(p.name for p in root.iterdir()) == ["build.lock", "gallery.json", "index", "manifest.json", "parts"]
    assert index_bytes(root) == want
    GalleryReader(root).close()
