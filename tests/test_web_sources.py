"""Web-scale inputs: webdataset tars and parquet as img2dataset writes them, streaming plans,
and folders with symlink loops and special files. Builds use the FakeDetector TEST DOUBLE
(the plumbing is under test, not the detector) in-process; one slow test runs Ray."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_gallery_build_support import (
    fake_config,
    fake_factory,
    gallery_contents,
    ray_env,
    write_images,
    write_labelmap,
)

from vlmixer.errors import VlmixerError
from vlmixer.pipeline import containers
from vlmixer.pipeline.gallery.images import DecodePolicy
from vlmixer.pipeline.gallery.job import BuildOptions, build_gallery
from vlmixer.pipeline.gallery.plan import ExternalSorter, listing_plan, retry_shards
from vlmixer.pipeline.gallery.sources import ImageItem, load_item, make_shards, read_source

CAPTIONS = ["a dog on the beach", "a man rides a bike", "two cats sleep", "a red car", "a horse runs",
            "a woman waits", "a traffic light"]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


@pytest.fixture
def collection(tmp_path: Path) -> dict:
    """The same photos three ways: a list file of a folder, webdataset tars, a parquet file.

    Real skimage photos and synthetic ones, a corrupt member (HTML saved as .jpg) and a
    member cut short with its tar (the folder holds the same cut bytes)."""
    folder = tmp_path / "folder"
    names = write_images(folder, photos=2, synth=5)
    (folder / "broken.jpg").write_text("<html>404</html>", encoding="utf-8")
    names.append("broken.jpg")
    keys = [Path(n).stem for n in names]
    data = {k: (folder / n).read_bytes() for k, n in zip(keys, names)}
    # the last sample of the last tar is cut short: the folder gets the same surviving bytes
    last = keys[-2]
    shards = tmp_path / "shards"
    shards.mkdir()
    split = [keys[:4], keys[4:]]
    for t, group in enumerate(split):
        with tarfile.open(shards / f"{t:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            order = [k for k in group if k != last] + ([last] if last in group else [])
            for k in order:
                ext = names[keys.index(k)].rsplit(".", 1)[1]
                i = keys.index(k)
                _add(tf, f"{k}.txt", CAPTIONS[i % len(CAPTIONS)].encode())
                _add(tf, f"{k}.json", json.dumps({"key": k, "caption": CAPTIONS[i % len(CAPTIONS)]}).encode())
                _add(tf, f"{k}.{ext}", data[k])
    tar1 = shards / "00001.tar"
    raw = tar1.read_bytes()
    with tarfile.open(tar1) as tf:
        m = tf.getmember(f"{last}.{names[keys.index(last)].rsplit('.', 1)[1]}")
    cut = m.offset_data + m.size // 2
    tar1.write_bytes(raw[:cut])
    kept = raw[m.offset_data:cut]
    (folder / names[keys.index(last)]).write_bytes(kept)
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{k}\tfolder/{n}\n" for k, n in zip(keys, names)), encoding="utf-8")
    return {"tmp": tmp_path, "folder": folder, "list": lst, "shards": shards, "keys": keys, "names": names,
            "data": data, "truncated": last, "cfg": fake_config(tmp_path / "fake.yaml"),
            "labelmap": write_labelmap(tmp_path / "labelmap.json", 5, 3)}


def _build(c: dict, images, out: str, **kw):
    kw.setdefault("ray_address", "none")
    opts = BuildOptions(images=images, detector=str(c["cfg"]), out=str(c["tmp"] / out), labelmap=str(c["labelmap"]),
                        detector_factory=fake_factory, progress=False, **kw)
    return build_gallery(opts)


def _same_images(a: dict, b: dict) -> None:
    assert a["counts"] == b["counts"]
    assert sorted(a["images"]) == sorted(b["images"])
    for k, x in a["images"].items():
        y = b["images"][k]
        assert x["size"] == y["size"] and x["concepts"] == y["concepts"], k
        for f in ("boxes", "features", "confidences"):
            assert np.array_equal(x[f], y[f]), (k, f)
    assert sorted(a["failures"]) == sorted(b["failures"])


def test_brace_glob_and_list_expansion(tmp_path: Path) -> None:
    assert containers.expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in (8, 9, 10, 11)]
    assert containers.expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    for i in range(3):
        (tmp_path / f"{i:03d}.tar").write_bytes(b"")
    got = containers.expand_inputs([str(tmp_path / "*.tar"), str(tmp_path / "{000..001}.tar")])
    assert [p.name for p in got] == ["000.tar", "001.tar", "002.tar"]  # each once, in order
    with pytest.raises(VlmixerError, match="003.tar: input shard does not exist"):
        containers.expand_inputs(str(tmp_path / "{000..003}.tar"))
    with pytest.raises(VlmixerError, match="matches no file"):
        containers.expand_inputs(str(tmp_path / "x*.tar"))
    assert containers.split_member_name("d/000123.seg.PNG") == ("d/000123", "seg.png")


def test_webdataset_builds_the_same_gallery_as_the_folder(collection: dict) -> None:
    c = collection
    _build(c, str(c["list"]), "ref", shard_size=3, batch_size=2)
    wds = _build(c, str(c["shards"] / "{00000..00001}.tar"), "wds", shard_size=3, batch_size=2)
    a, b = gallery_contents(c["tmp"] / "ref"), gallery_contents(c["tmp"] / "wds")
    _same_images(a, b)
    assert sorted(b["failures"]) == sorted(["broken", c["truncated"]])
    assert b["failures"]["broken"].startswith("not an image")
    assert b["failures"][c["truncated"]].startswith("truncated tar member") and "cut short" in \
        b["failures"][c["truncated"]]
    assert a["failures"][c["truncated"]].startswith("truncated")
    assert wds.exit_code == 3 and wds.failed_count == 2 and wds.images_planned == len(c["keys"])
    # the tar is the unit of the plan: shards are named after it, in archive order
    from vlmixer.storage.gallery import GalleryReader

    r = GalleryReader(c["tmp"] / "wds")
    assert sorted(r.shards()) == ["t3-00000.tar-00000", "t3-00000.tar-00001", "t3-00001.tar-00000",
                                  "t3-00001.tar-00001"]
    rec = r.image(r.image_index(c["keys"][0]))
    assert rec.path.endswith(f"00000.tar#{c['names'][0]}")
    # the recorded locator reads back (what `gallery show` crops from), without the planner's offsets
    img = load_item(ImageItem(key=rec.key, path=rec.path), DecodePolicy())
    assert (img.width, img.height) == (rec.width, rec.height)
    r.close()
    # resume: nothing to redo; another shard size is another plan
    again = _build(c, str(c["shards"] / "*.tar"), "wds", shard_size=3, batch_size=2)
    assert again.shards_done == 0 and again.shards_skipped == 4
    with pytest.raises(VlmixerError, match="another build plan"):
        _build(c, str(c["shards"] / "*.tar"), "wds", shard_size=2)
    # retry re-reads the failed members straight from the tars (no listing kept anywhere)
    retry = _build(c, str(c["shards"] / "*.tar"), "wds", shard_size=3, batch_size=2, retry_failed=True)
    assert retry.shards_done == 2 and retry.failed_count == 2


def test_killed_webdataset_build_resumes_to_the_same_gallery(collection: dict, monkeypatch) -> None:
    c = collection
    _build(c, str(c["shards"] / "*.tar"), "one", shard_size=2, batch_size=2)
    from vlmixer.pipeline.gallery import work

    original, calls = work.ShardCommitter.commit, []

    def commit_then_die(self, *a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(work.ShardCommitter, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        _build(c, str(c["shards"] / "*.tar"), "two", shard_size=2, batch_size=2)
    monkeypatch.setattr(work.ShardCommitter, "commit", original)
    resumed = _build(c, str(c["shards"] / "*.tar"), "two", shard_size=2, batch_size=2)
    assert resumed.shards_skipped == 2
    one, two = gallery_contents(c["tmp"] / "one"), gallery_contents(c["tmp"] / "two")
    _same_images(one, two)
    assert one["failures"] == two["failures"]


def _write_parquet(path: Path, rows: list[dict], row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": [r["key"] for r in rows], "caption": [r["caption"] for r in rows],
                      "jpg": pa.array([r["jpg"] for r in rows], pa.binary())})
    pq.write_table(table, path, row_group_size=row_group)


def test_parquet_builds_the_same_gallery_as_the_folder(collection: dict) -> None:
    c = collection
    keys = [k for k in c["keys"] if k != c["truncated"]]
    rows = [{"key": k, "caption": CAPTIONS[i % 7], "jpg": c["data"][k]} for i, k in enumerate(keys)]
    rows.append({"key": "missing", "caption": "no picture", "jpg": None})  # a failed download
    _write_parquet(c["tmp"] / "a.parquet", rows[:4], row_group=3)
    _write_parquet(c["tmp"] / "b.parquet", rows[4:], row_group=3)
    lst = c["tmp"] / "list2.txt"
    lst.write_text("".join(f"{k}\tfolder/{n}\n" for k, n in zip(c["keys"], c["names"]) if k in keys))
    _build(c, str(lst), "ref", shard_size=3, batch_size=2)
    pq_report = _build(c, [str(c["tmp"] / "a.parquet"), str(c["tmp"] / "b.parquet")], "pq", shard_size=3,
                       batch_size=2)
    a, b = gallery_contents(c["tmp"] / "ref"), gallery_contents(c["tmp"] / "pq")
    assert b["failures"].pop("missing").startswith("no image bytes (null jpg")
    _same_images(a, b)
    assert b["failures"]["broken"].startswith("not an image")
    assert pq_report.images_planned == len(rows)
    from vlmixer.storage.gallery import GalleryReader

    r = GalleryReader(c["tmp"] / "pq")
    rec = r.image(r.image_index(keys[4]))
    assert rec.path == f"{c['tmp'] / 'b.parquet'}#jpg/0"
    assert load_item(ImageItem(key=rec.key, path=rec.path), DecodePolicy()).width == rec.width
    r.close()
    with pytest.raises(VlmixerError, match="no column 'png' for --image-column"):
        _build(c, str(c["tmp"] / "a.parquet"), "pq2", image_column="png")


def test_gallery_and_captions_from_the_same_tars_pair_by_key(collection: dict, tmp_path: Path) -> None:
    from vlmixer.pipeline.text.corpus import decode_items, open_corpus_files, plan_shards

    c = collection
    _build(c, str(c["shards"] / "*.tar"), "wds", shard_size=3)
    files = open_corpus_files([str(c["shards"] / "{00000..00001}.tar")])
    assert [f.fmt for f in files] == ["webdataset"] * 2 and not files[0].split
    recs = [r for t in plan_shards(files, 4, max_line_bytes=1 << 20) for r in decode_items(t, max_record_chars=999)[0]]
    by_json = [r for t in plan_shards(open_corpus_files([str(c["shards"] / "*.tar")], field="caption"), 4,
                                      max_line_bytes=1 << 20) for r in decode_items(t, max_record_chars=999)[0]]
    assert [(r.base_id, r.text) for r in recs] == [(r.base_id, r.text) for r in by_json]
    from vlmixer.storage.gallery import GalleryReader

    g = GalleryReader(c["tmp"] / "wds")
    for r in recs:
        assert r.image_key == r.base_id
        if r.image_key in ("broken", c["truncated"]):
            continue
        assert g.image(g.image_index(r.image_key)).key == r.image_key
    assert len(recs) == len(c["keys"])  # the caption of the cut sample survived before its image
    assert {r.image_key for r in recs} - {"broken", c["truncated"]} == {g.image(i).key for i in range(g.num_images)}
    g.close()
    # parquet captions line up the same way
    rows = [{"key": k, "caption": CAPTIONS[i % 7], "jpg": b""} for i, k in enumerate(c["keys"])]
    _write_parquet(tmp_path / "cap.parquet", rows, row_group=2)
    pf = open_corpus_files([tmp_path / "cap.parquet"])
    got = [r for t in plan_shards(pf, 3, max_line_bytes=1 << 20) for r in decode_items(t, max_record_chars=999)[0]]
    assert [(r.image_key, r.text) for r in got] == [(k, CAPTIONS[i % 7]) for i, k in enumerate(c["keys"])]


# ------------------------------------------------------------------------------ streaming plans


def test_listing_plan_on_disk_equals_the_in_memory_shards(tmp_path: Path) -> None:
    lst = tmp_path / "l.txt"
    keys = [f"k{(i * 7919) % 1000:04d}" for i in range(203)]
    lst.write_text("".join(f"{k}\t/x/{k}.jpg\n" for k in keys))
    want = make_shards(read_source(lst), 16, seed=3)
    for run in (1, 7, 100_000):
        spill = tmp_path / f"spill{run}"
        spill.mkdir()
        plan = listing_plan(lst, shard_size=16, seed=3, spill_dir=spill, run_size=run)
        got = list(plan)
        assert [(s.shard_id, s.items) for s in got] == [(s.shard_id, s.items) for s in want]
        assert plan.images == 203 and plan.shards == len(want)
    lst.write_text("a\t/1.jpg\nb\t/2.jpg\na\t/3.jpg\n")
    spill = tmp_path / "dup"
    spill.mkdir()
    with pytest.raises(VlmixerError, match="'a' appears twice"):
        listing_plan(lst, shard_size=2, seed=0, spill_dir=spill, run_size=1)


def test_external_sorter_and_retry_groups(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    recs = [[int(a), f"k{b}"] for a, b in rng.integers(0, 50, (500, 2))]
    s = ExternalSorter(tmp_path, run_size=13)
    for r in recs:
        s.add(r)
    assert list(s) == sorted(recs) and len(s.runs) == 39
    fails = [{"key": f"k{i}", "path": f"/p{i}", "shard": f"s-{i % 3}", "part": "part-00000"} for i in range(10)]
    n, shards = retry_shards(reversed(fails), 2, tmp_path, run_size=4)
    got = list(shards)
    assert n == 10 and [s.shard_id for s in got] == ["r2-s-0", "r2-s-1", "r2-s-2"]
    assert [it.key for it in got[0].items] == ["k0", "k3", "k6", "k9"]
    assert got[0].items[0] == ImageItem(key="k0", path="/p0")


# ------------------------------------------------------------------------------ folders


@pytest.mark.timeout(60)
def test_symlink_loops_and_a_fifo_are_walked_once_and_recorded(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    write_images(imgs / "sub", photos=0, synth=3)
    os.symlink(".", imgs / "self")  # a loop to itself
    os.symlink("..", imgs / "sub" / "up")  # and a loop through a parent
    (imgs / "other").mkdir()
    os.symlink("../other", imgs / "sub" / "back")  # two ways into one directory
    os.symlink(imgs / "sub" / "up", imgs / "other" / "again")
    os.mkfifo(imgs / "sub" / "pipe.jpg")
    got = read_source(imgs)
    assert [it.key for it in got] == ["sub/pipe.jpg", "sub/syn000.jpg", "sub/syn001.png", "sub/syn002.jpg"]
    cfg = fake_config(tmp_path / "fake.yaml")
    lm = write_labelmap(tmp_path / "lm.json", 5, 3)
    report = build_gallery(BuildOptions(images=str(imgs), detector=str(cfg), out=str(tmp_path / "g"),
                                        labelmap=str(lm), detector_factory=fake_factory, progress=False,
                                        ray_address="none"))
    assert report.gallery_images == 3 and [f["key"] for f in report.failed] == ["sub/pipe.jpg"]
    assert report.failed[0]["reason"] == "not a regular file (FIFO)"
    skipped = dict(report.not_planned)
    assert set(skipped) == {"self", "sub/up", "sub/back", "other/again"}
    assert all("already walked" in why for why in skipped.values())
    assert "left out while listing (4)" in report.summary()
    os.mkfifo(tmp_path / "list.txt")  # a FIFO given as the list file is refused, not read
    with pytest.raises(VlmixerError, match="not a regular file or a folder"):
        read_source(tmp_path / "list.txt")


@pytest.mark.slow
def test_ray_build_of_webdataset_equals_in_process(collection: dict, monkeypatch) -> None:
    c = collection
    for k, v in ray_env().items():
        monkeypatch.setenv(k, v)
    _build(c, str(c["shards"] / "*.tar"), "inproc", shard_size=3, batch_size=2)
    _build(c, str(c["shards"] / "*.tar"), "ray", shard_size=3, batch_size=2, ray_address="local", num_cpus=2,
           cpu_workers=1, threads=1, max_inflight_batches=2)
    a, b = gallery_contents(c["tmp"] / "inproc"), gallery_contents(c["tmp"] / "ray")
    _same_images(a, b)
    assert a["failures"] == b["failures"]


def test_text_tag_on_the_tars_writes_captions_keyed_like_the_gallery(collection: dict, capsys) -> None:
    """The whole `text tag` job (spaCy, word-pieces, store) on the same tars as the gallery."""
    from test_text_job import CONCEPTS

    from vlmixer.pipeline.text.corpus import open_corpus_files
    from vlmixer.pipeline.text.job import TagJobConfig, run_tag_job
    from vlmixer.pipeline.text.resolve import build_mapping
    from vlmixer.pipeline.text.spacy_model import load_spacy, model_label, resolve_model_name
    from vlmixer.pipeline.text.wordpiece import resolve_tokenizer
    from vlmixer.storage.gallery import GalleryReader
    from vlmixer.storage.textstore import TextStoreReader

    c = collection
    _build(c, str(c["shards"] / "*.tar"), "wds", shard_size=3)
    nlp = load_spacy(resolve_model_name(None))
    out = c["tmp"] / "text"
    config = TagJobConfig(out=str(out), inputs=open_corpus_files([str(c["shards"] / "{00000..00001}.tar")]),
                          concepts=CONCEPTS, mapping=build_mapping(CONCEPTS, nlp),
                          spacy_model=resolve_model_name(None), tokenizer=resolve_tokenizer(None, cache_dir=c["tmp"]),
                          spacy_label=model_label(nlp), shard_size=3)
    m = run_tag_job(config, progress=True, nlp=nlp, log_every=0)
    assert m["summary"]["records"] == len(c["keys"]) and m["summary"]["skipped_total"] == 0
    # not a terminal: progress lines with rate and ETA, the total estimated from the tars read
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[text]")]
    assert len(lines) == 4 and lines[0].startswith("[text] 3/? records") and lines[0].endswith("ETA ?")
    assert lines[2].startswith(f"[text] 7/{len(c['keys'])} records")  # once the first tar is read
    assert lines[-1].startswith(f"[text] {len(c['keys'])}/{len(c['keys'])} records") and "ETA 0 s" in lines[-1]
    t, g = TextStoreReader(out), GalleryReader(c["tmp"] / "wds")
    pairs = [(t.sentence(i).image_key, t.sentence(i).text) for i in range(len(t))]
    assert sorted(pairs) == sorted((k, CAPTIONS[i % 7]) for i, k in enumerate(c["keys"]))
    paired = [k for k, _ in pairs if k not in ("broken", c["truncated"])]
    assert sorted(paired) == sorted(g.image(i).key for i in range(g.num_images))
    for k in paired:
        assert g.image(g.image_index(k)).key == k
    g.close()


def test_cli_names_a_missing_shard_and_a_missing_column_in_one_line(collection: dict, capsys) -> None:
    from test_gallery_build_support import TINY_CONFIG

    from vlmixer.cli import main

    c = collection
    code = main(["gallery", "build", "--images", str(c["shards"] / "{00000..00002}.tar"), "--detector",
                 str(TINY_CONFIG), "--out", str(c["tmp"] / "g"), "--ray-address", "none", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "00002.tar: input shard does not exist" in err[0]
    _write_parquet(c["tmp"] / "cap.parquet", [{"key": "a", "caption": "a dog", "jpg": b""}], row_group=1)
    code = main(["text", "tag", "--input", str(c["tmp"] / "cap.parquet"), "--caption-column", "text_en",
                 "--concepts", str(c["labelmap"]), "--out", str(c["tmp"] / "t"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no column 'text_en' for --caption-column" in err[0]


def test_a_tar_cut_inside_a_header_and_a_sample_without_image_are_recorded(tmp_path: Path) -> None:
    from vlmixer.pipeline.gallery.plan import container_plan

    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "a.jpg", b"x" * 600)
        _add(tf, "b.txt", b"caption only")
        _add(tf, "c.jpg", b"y" * 10)
    raw = tar.read_bytes()
    with tarfile.open(tar) as tf:
        c_header = tf.getmember("c.jpg").offset
    tar.write_bytes(raw[:c_header + 100])  # c's header is cut: c is lost, and the gallery must say so
    plan = container_plan(str(tar), shard_size=10)
    (shard,) = list(plan)
    assert [(it.key, bool(it.problem)) for it in shard.items] == [("a", False), ("00000.tar#", True)]
    assert shard.items[0].offset == 512 and shard.items[0].size == 600
    assert shard.items[1].problem.startswith("tar archive unreadable after 2 members")
    assert plan.skipped_entries == [("00000.tar#b", "no image member (has txt)")]
    tar.write_bytes(b"not a tar at all" * 40)
    (shard,) = list(container_plan(str(tar), shard_size=10))
    assert [it.key for it in shard.items] == ["00000.tar#"]
    assert shard.items[0].problem.startswith("not a readable tar archive")


def test_gallery_progress_estimates_the_total_of_container_inputs() -> None:
    from vlmixer.pipeline.gallery.job import Progress

    known: list[int | None] = [None]
    p = Progress(None, enabled=False, estimate=lambda: known[0])
    p.update({"keys": 8, "patches": 30, "failures": 1})
    assert p.line().startswith("[gallery] 8/? images,") and p.line().endswith("ETA ?")
    known[0] = 40  # the first tar was read: 20 samples, 2 tars in all
    p.update({"keys": 12, "patches": 10, "failures": 0})
    line = p.line()
    assert line.startswith("[gallery] 20/40 images,") and "40 patches, 1 failed, ETA " in line and "ETA ?" not in line


def test_a_repeated_commit_finds_its_own_marker(tmp_path: Path) -> None:
    """An actor retried after it committed: the marker is looked up alone, and the shard is not written twice."""
    from vlmixer.pipeline.gallery.sources import keys_digest
    from vlmixer.pipeline.gallery.work import ShardCommitter, failure_piece

    items = [ImageItem(key=k, path=f"/x/{k}.jpg") for k in ("a", "b")]
    c = ShardCommitter(str(tmp_path / "g"), 16, [["thing"]], None, {})
    first = c.commit("s0-2-000000", keys_digest(["a", "b"]), {"size": 2}, failure_piece(items, "missing file"))
    again = c.commit("s0-2-000000", keys_digest(["a", "b"]), {"size": 2}, failure_piece(items, "missing file"))
    assert first["failures"] == 2 and "already_committed" not in first
    assert again["already_committed"] and again["keys_sha256"] == first["keys_sha256"]
    with pytest.raises(VlmixerError, match="committed with other images"):
        c.commit("s0-2-000000", keys_digest(["a"]), {"size": 1}, failure_piece(items[:1], "missing file"))
    c.close()
