"""Gallery build parts that need neither Ray nor the real detector: sources, shards, image
validation, resume planning, retry, crash isolation (with the FakeDetector test double)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_gallery_build_support import (
    assert_same_gallery,
    fake_config,
    fake_factory,
    gallery_contents,
    synthetic,
    write_bad_images,
    write_images,
    write_labelmap,
)

from vlmixer.errors import VlmixerError
from vlmixer.pipeline.gallery.images import BadImage, DecodePolicy, decode_bytes, load_rgb
from vlmixer.pipeline.gallery.job import BuildOptions, build_gallery
from vlmixer.pipeline.gallery.sources import ImageItem, make_shards, read_source

# ------------------------------------------------------------------------------ sources


def test_folder_list_and_json_sources(tmp_path: Path) -> None:
    names = write_images(tmp_path / "imgs" / "sub", photos=0, synth=3)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image extension: ignored")
    items = read_source(tmp_path / "imgs")
    assert [it.key for it in items] == sorted(f"sub/{n}" for n in names)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\nimgs/sub/{names[0]}\n\nmykey\timgs/sub/{names[1]}\n")
    got = read_source(lst)
    assert [(i.key, Path(i.path).name) for i in got] == [(f"imgs/sub/{names[0]}", names[0]), ("mykey", names[1])]
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": names[0]}, {"id": 3, "file_name": names[1]}]}))
    got = read_source(coco, image_root=tmp_path / "imgs" / "sub")
    assert [(i.key, Path(i.path).name) for i in got] == [("3", names[1]), ("7", names[0])]
    vg = tmp_path / "image_data.json"
    vg.write_text(json.dumps([{"image_id": 1, "url": "https://x/VG_100K/1.jpg"}, {"image_id": 2}]))
    assert [(i.key, Path(i.path).name) for i in read_source(vg)] == [("1", "1.jpg"), ("2", "2.jpg")]
    lst.write_text("a.jpg\na.jpg\n")
    with pytest.raises(VlmixerError, match="twice"):
        read_source(lst)
    with pytest.raises(VlmixerError, match="does not exist"):
        read_source(tmp_path / "nope")


def test_shards_are_stable_and_complete() -> None:
    items = [ImageItem(key=f"k{i:03d}", path=f"/x/{i}.jpg") for i in range(50)]
    a = make_shards(items, 8, seed=1)
    b = make_shards(list(reversed(items)), 8, seed=1)
    assert [(s.shard_id, s.items) for s in a] == [(s.shard_id, s.items) for s in b]
    assert sorted(it.key for s in a for it in s.items) == [it.key for it in items]
    assert [len(s.items) for s in a] == [8] * 6 + [2]
    c = make_shards(items, 8, seed=2)
    assert [s.items for s in a] != [s.items for s in c]  # the seed decides membership
    assert len({s.keys_sha256 for s in a}) == len(a)


# ------------------------------------------------------------------------------ images


def test_bad_files_have_reasons_and_odd_modes_convert(tmp_path: Path) -> None:
    expected = write_bad_images(tmp_path)
    for name, want in expected.items():
        if want.startswith("fail:"):
            with pytest.raises(BadImage) as e:
                load_rgb(tmp_path / name)
            assert e.value.reason.startswith(want[5:]), (name, e.value.reason)
            with pytest.raises(BadImage):
                load_rgb(tmp_path / name, DecodePolicy(strict_modes=True))
        else:
            img = load_rgb(tmp_path / name, DecodePolicy(strict_modes=False))
            assert img.array.dtype == np.uint8 and img.array.shape == (96, 128, 3)
            assert img.note and "RGB" in img.note, name
            with pytest.raises(BadImage, match="unsupported mode"):
                load_rgb(tmp_path / name)  # by default: recorded and skipped
    with pytest.raises(BadImage, match="missing file"):
        load_rgb(tmp_path / "absent.jpg")
    # a smaller pixel budget refuses an ordinary image as too large
    with pytest.raises(BadImage, match="too large"):
        load_rgb(tmp_path / "rgba.png", DecodePolicy(max_pixels=1000, strict_modes=False))
    # RGBA with partial transparency is composited on white, not on black
    rgba = np.zeros((16, 16, 4), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    assert (decode_bytes(buf.getvalue(), DecodePolicy(strict_modes=False)).array == 255).all()


def test_exif_orientation_is_applied() -> None:
    img = Image.fromarray(synthetic(3, 40, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    d = decode_bytes(buf.getvalue())
    assert (d.height, d.width) == (80, 40)


# ------------------------------------------------------------------------------ builds with the double


@pytest.fixture
def fake_build(tmp_path: Path):
    imgs = tmp_path / "imgs"
    write_images(imgs, photos=1, synth=5)
    cfg = fake_config(tmp_path / "fake.yaml")
    lm = write_labelmap(tmp_path / "labelmap.json", 5, 3)

    def run(out: str = "g", **kw) -> tuple[BuildOptions, object]:
        kw.setdefault("ray_address", "none")
        opts = BuildOptions(images=str(imgs), detector=str(kw.pop("detector", cfg)), out=str(tmp_path / out),
                            labelmap=str(lm), detector_factory=fake_factory, progress=False, **kw)
        return opts, build_gallery(opts)

    return imgs, run


def test_resume_skips_committed_shards_and_equals_one_run(fake_build, tmp_path: Path, monkeypatch) -> None:
    _, run = fake_build
    _, ref = run("ref", shard_size=2, batch_size=2)
    assert ref.exit_code == 0 and ref.shards_done == 3
    # die right after the first shard is committed
    from vlmixer.pipeline.gallery import work

    original, calls = work.ShardCommitter.commit, []

    def commit_then_die(self, *a, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(work.ShardCommitter, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        run("part", shard_size=2, batch_size=2)
    monkeypatch.setattr(work.ShardCommitter, "commit", original)
    _, resumed = run("part", shard_size=2, batch_size=2)
    assert resumed.shards_skipped == 1 and resumed.shards_done == 2
    assert_same_gallery(tmp_path / "ref", tmp_path / "part")
    _, again = run("ref", shard_size=2, batch_size=2)
    assert again.shards_done == 0 and again.shards_skipped == 3
    with pytest.raises(VlmixerError, match="another build plan"):
        run("ref", shard_size=3, batch_size=2)


def test_changed_source_is_refused_on_resume(fake_build, tmp_path: Path) -> None:
    imgs, run = fake_build
    run("g", shard_size=100)
    Image.fromarray(synthetic(99)).save(imgs / "new.png")
    with pytest.raises(VlmixerError, match="collection changed"):
        run("g", shard_size=100)


def test_retry_failed_reruns_only_failures(fake_build, tmp_path: Path) -> None:
    imgs, run = fake_build
    (imgs / "later.jpg").write_bytes(b"")
    _, r1 = run("g", shard_size=3, batch_size=2)
    assert r1.exit_code == 3 and [f["key"] for f in r1.failed] == ["later.jpg"]
    before = gallery_contents(tmp_path / "g")
    Image.fromarray(synthetic(42)).save(imgs / "later.jpg", format="JPEG")
    _, r2 = run("g", shard_size=3, batch_size=2)  # without --retry-failed nothing is redone
    assert r2.shards_done == 0 and r2.exit_code == 3
    _, r3 = run("g", shard_size=3, batch_size=2, retry_failed=True)
    assert r3.exit_code == 0 and r3.shards_done == 1 and r3.images_done == 1 and not r3.failed
    after = gallery_contents(tmp_path / "g")
    assert set(after["images"]) == set(before["images"]) | {"later.jpg"}
    for k, v in before["images"].items():
        assert after["images"][k]["concepts"] == v["concepts"]
    # the retry went into a new part: the finalized part 0 (which readers may map) was not written
    parts = json.loads((tmp_path / "g" / "manifest.json").read_text())["parts"]
    assert [(p["name"], p["images"]) for p in parts] == [("part-00000", 6), ("part-00001", 1)]
    _, r4 = run("g", shard_size=3, batch_size=2, retry_failed=True)  # its failure record is not open any more
    assert r4.exit_code == 0 and r4.shards_done == 0 and not r4.failed


def test_a_second_build_into_the_same_out_is_refused_before_any_work(fake_build, tmp_path: Path) -> None:
    import subprocess
    import sys

    _, run = fake_build
    out = tmp_path / "g"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from vlmixer.storage.gallery_writer import build_lock\n"
         f"with build_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(VlmixerError, match=rf"another process is writing it \(pid {holder.pid} "):
            run("g")
        assert not (out / "parts").exists() and not (out / "gallery.json").exists()
    finally:
        holder.communicate("")
    _, r = run("g")  # released: the same build now runs
    assert r.exit_code == 0 and r.gallery_images == 6


def test_detector_error_on_one_image_fails_only_that_image(fake_build, tmp_path: Path) -> None:
    imgs, run = fake_build
    w = Image.open(next(iter(sorted(imgs.glob("syn*"))))).width
    bad_cfg = fake_config(tmp_path / "bad.yaml", fail_width=w)
    _, r = run("g", detector=bad_cfg, batch_size=4)
    broken = [f for f in r.failed if f["reason"].startswith("detector error")]
    assert broken and r.gallery_images == 6 - len(broken) and r.exit_code == 3


# ------------------------------------------------------------------------------ options


def test_cli_build_defaults_are_the_options_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gallery build` with only the required arguments builds exactly BuildOptions' defaults."""
    from vlmixer.cli import main
    from vlmixer.pipeline.gallery import job

    seen: list[BuildOptions] = []

    def fake_build(opts: BuildOptions) -> job.BuildReport:
        seen.append(opts)
        return job.BuildReport(out=opts.out)

    monkeypatch.setattr(job, "build_gallery", fake_build)
    from vlmixer.config import resolve_config

    assert main(["gallery", "build", "--images", "imgs", "--detector", "tiny", "--out", "g"]) == 0
    assert seen == [BuildOptions(images="imgs", detector=str(resolve_config("tiny", "detector")), out="g")]


def test_load_rgb_refuses_special_files_without_blocking(tmp_path: Path) -> None:
    """`gallery show` and the report decode through load_rgb: a FIFO named .jpg is a BadImage at once
    (reading it would block forever), as it is for the build's sources."""
    import os

    from vlmixer.pipeline.gallery.images import BadImage, load_rgb

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(BadImage, match=r"not a regular file \(FIFO\)"):
        load_rgb(fifo)
    with pytest.raises(BadImage, match="missing file"):
        load_rgb(tmp_path / "none.jpg")
