"""`gallery import / export / report`: files of each released format, written here after their public
layouts, imported and checked field by field; round trips; bad rows; a hostile pickle; kill -9 and resume;
verify, train and the report page on an imported gallery."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from import_formats import (
    ATTRS,
    OBJECTS,
    b64,
    butd_line,
    lxmert_line,
    synthetic_rows,
    write_lineidx,
    write_npz,
    write_tsv,
    write_vinvl,
    write_vocabs,
)
from test_gallery_build_support import assert_same_gallery, gallery_contents

from vlmixer.cli import main
from vlmixer.errors import VlmixerError
from vlmixer.pipeline.gallery.exports import export_gallery
from vlmixer.pipeline.gallery.imports import (
    EXIT_SOME_FAILED,
    UNLABELLED,
    ImportOptions,
    import_gallery,
    scan_tsv,
)
from vlmixer.pipeline.safe_pickle import UnsafePickle, loads_numpy_only
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.verify import verify_gallery

DIM = 16


def _opts(fmt: str, inputs, out: Path, vocab_dir: Path | None = None, **kw) -> ImportOptions:
    if vocab_dir is not None:
        kw.setdefault("vocab", str(vocab_dir / "objects_vocab.txt"))
        kw.setdefault("attribute_vocab", str(vocab_dir / "attributes_vocab.txt"))
    kw.setdefault("ray_address", "none")
    kw.setdefault("progress", False)
    kw.setdefault("shard_size", 3)
    return ImportOptions(format=fmt, inputs=tuple(str(p) for p in inputs), out=str(out), **kw)


def _by_conf(r: dict) -> np.ndarray:
    return np.argsort(-r["confs"], kind="stable")


def _check_image(g: GalleryReader, r: dict, attrs_top: int) -> None:
    """Every field of one written row against what the gallery holds (patches sorted by confidence)."""
    i = g.image_index(r["key"])
    rec = g.image(i)
    assert (rec.width, rec.height) == (r["width"], r["height"])
    order = _by_conf(r)
    pids = list(g.image_patches(i))
    assert len(pids) == len(order)
    for pid, j in zip(pids, order):
        p = g.patch(pid)
        np.testing.assert_array_equal(p.feature, r["features"][j].astype(np.float16))  # fp16 rounding only
        np.testing.assert_array_equal(p.box, r["boxes"][j])
        assert g.concepts.names[p.concept] == OBJECTS[int(r["concepts"][j])]
        assert p.confidence == pytest.approx(float(r["confs"][j]), abs=0)
        a_order = np.argsort(-r["attr_scores"][j], kind="stable")[:attrs_top]
        assert [g.attributes.names[a] for a in p.attr_ids] == [ATTRS[int(r["attrs"][j][k])] for k in a_order]
        np.testing.assert_array_equal(p.attr_scores, r["attr_scores"][j][a_order].astype(np.float16))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("import")
    write_vocabs(root)
    rows = synthetic_rows(0, 11, DIM)
    rows3 = synthetic_rows(1, 9, DIM, attrs_per_box=3)
    lx = write_tsv(root / "lxmert.tsv", [lxmert_line(r) for r in rows])
    butd = write_tsv(root / "butd.tsv", [butd_line(r) for r in rows])
    feats, preds = write_vinvl(root / "vinvl", rows3)
    for r in rows:
        write_npz(root / "npz", r)
    return {"root": root, "rows": rows, "rows3": rows3, "lxmert": lx, "butd": butd, "vinvl": (feats, preds),
            "npz": root / "npz"}


def test_lxmert_tsv_every_field(files, tmp_path: Path) -> None:
    rep = import_gallery(_opts("butd-tsv", [files["lxmert"]], tmp_path / "g", files["root"]))
    assert rep.exit_code == 0 and rep.failed == []
    g = GalleryReader(tmp_path / "g")
    assert (g.num_images, g.feature_dim) == (11, DIM)
    assert g.num_patches == sum(len(r["boxes"]) for r in files["rows"])
    for r in files["rows"]:
        _check_image(g, r, attrs_top=1)
    prov = g.header["provenance"]["import"]
    assert prov["format"] == "butd-tsv" and prov["inputs"][0]["rows"] == 11
    import hashlib
    assert prov["inputs"][0]["sha256"] == hashlib.sha256(files["lxmert"].read_bytes()).hexdigest()
    g.close()
    assert verify_gallery(tmp_path / "g") == []


def test_vinvl_tsv_every_field_with_names_and_lineidx(files, tmp_path: Path) -> None:
    feats, preds = files["vinvl"]
    assert feats.with_suffix(".lineidx").exists()
    rep = import_gallery(_opts("vinvl-tsv", [preds, feats], tmp_path / "g", files["root"]))  # any order
    assert rep.exit_code == 0
    g = GalleryReader(tmp_path / "g")
    assert g.feature_dim == DIM  # the 6 box-position values VinVL appends are dropped
    for r in files["rows3"]:
        _check_image(g, r, attrs_top=3)
    assert g.header["provenance"]["import"]["dropped_position_dims"] == 6
    assert all(i["lineidx"] for i in g.header["provenance"]["import"]["inputs"])
    g.close()
    assert verify_gallery(tmp_path / "g") == []


def test_npz_every_field_ids_are_one_based(files, tmp_path: Path) -> None:
    rep = import_gallery(_opts("npz", [files["npz"]], tmp_path / "g", files["root"]))
    assert rep.exit_code == 0
    g = GalleryReader(tmp_path / "g")
    assert g.num_images == 11
    for r in files["rows"]:
        _check_image(g, r, attrs_top=1)
    g.close()
    assert verify_gallery(tmp_path / "g") == []


def test_unlabelled_butd_needs_concepts_none(files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(VlmixerError, match="holds no labels.*--concepts none"):
        import_gallery(_opts("butd-tsv", [files["butd"]], tmp_path / "x", files["root"]))
    assert main(["gallery", "import", "--format", "butd-tsv", "--input", str(files["butd"]), "--out",
                 str(tmp_path / "x")]) == 2  # no vocabulary and no --concepts none
    assert "--concepts none" in capsys.readouterr().err
    rep = import_gallery(_opts("butd-tsv", [files["butd"]], tmp_path / "g", concepts="none"))
    assert any("Cross-Modal CutMix cannot use this gallery" in n for n in rep.notes)
    assert "Cross-Modal CutMix cannot use" in rep.summary()
    g = GalleryReader(tmp_path / "g")
    assert g.concepts.names == (UNLABELLED,)
    r = files["rows"][3]
    i = g.image_index(r["key"])
    ps = [g.patch(p) for p in g.image_patches(i)]
    assert [p.confidence for p in ps] == [1.0] * len(r["boxes"])
    np.testing.assert_array_equal(np.array([p.box for p in ps]).reshape(-1, 4), r["boxes"])  # file order kept
    g.close()


@pytest.mark.parametrize("fmt", ["butd-tsv", "npz"])
def test_import_export_import_is_the_same_gallery(files, tmp_path: Path, fmt: str) -> None:
    src = files["lxmert"] if fmt == "butd-tsv" else files["npz"]
    import_gallery(_opts(fmt, [src], tmp_path / "a", files["root"]))
    out = tmp_path / ("x.tsv" if fmt == "butd-tsv" else "x")
    assert main(["gallery", "export", str(tmp_path / "a"), "--format", fmt, "--out", str(out)]) == 0
    vocab_dir = out.parent if fmt == "butd-tsv" else out
    assert (vocab_dir / "objects_vocab.txt").read_text().split("\n")[:len(OBJECTS)] == OBJECTS
    import_gallery(_opts(fmt, [out], tmp_path / "b", vocab_dir))
    assert_same_gallery(tmp_path / "a", tmp_path / "b")
    if fmt == "npz":  # fp32 as MILVLG writes it, readable by numpy alone for the arrays
        with np.load(out / f"{files['rows'][0]['key']}.npz", allow_pickle=False) as z:
            assert z["x"].dtype == np.float32 and z["bbox"].dtype == np.float32


def test_butd_columns_export_reads_as_unlabelled(files, tmp_path: Path) -> None:
    import_gallery(_opts("butd-tsv", [files["lxmert"]], tmp_path / "a", files["root"]))
    export_gallery(tmp_path / "a", tmp_path / "b.tsv", "butd-tsv", columns="butd")
    first = (tmp_path / "b.tsv").read_bytes().split(b"\n")[0].split(b"\t")
    assert len(first) == 6
    rep = import_gallery(_opts("butd-tsv", [tmp_path / "b.tsv"], tmp_path / "c", concepts="none"))
    assert rep.gallery_patches == sum(len(r["boxes"]) for r in files["rows"])


def test_bad_rows_are_recorded_with_reasons_and_good_rows_kept(files, tmp_path: Path) -> None:
    rows = files["rows"]
    good = [lxmert_line(r) for r in rows[:4]]
    bad_b64 = lxmert_line(rows[5]).split("\t")
    bad_b64[-1] = bad_b64[-1][:40] + "!!" + bad_b64[-1][42:]
    short = lxmert_line(rows[6]).split("\t")
    short[-1] = b64(rows[6]["features"][:, :-1])  # 15 values per box
    count = lxmert_line(rows[7]).split("\t")
    count[7] = str(len(rows[7]["boxes"]) + 1)
    unknown = dict(rows[8])
    unknown["concepts"] = rows[8]["concepts"].copy()
    unknown["concepts"][0] = 99
    big = dict(rows[9])
    big["features"] = rows[9]["features"].copy()
    big["features"][0, 0] = 1e6
    lines = good + ["\t".join(bad_b64), "\t".join(short), "\t".join(count), lxmert_line(unknown),
                    lxmert_line(big), "just-a-key\tonly two fields"]
    tsv = write_tsv(tmp_path / "bad.tsv", lines)
    rep = import_gallery(_opts("butd-tsv", [tsv], tmp_path / "g", files["root"]))
    assert rep.exit_code == EXIT_SOME_FAILED
    reasons = {f["key"]: f["reason"] for f in rep.failed}
    assert reasons[rows[5]["key"]].startswith("bad base64 in features")
    assert reasons[rows[6]["key"]].startswith("wrong feature length")
    assert reasons[rows[7]["key"]].startswith("count mismatch")
    assert reasons[rows[8]["key"]] == "unknown label (concept id 99 not in the vocabulary)"
    assert reasons[rows[9]["key"]].startswith("feature values beyond float16 range")
    assert reasons["just-a-key"].startswith("wrong field count (2 tab-separated fields")
    assert {f["path"] for f in rep.failed} >= {"bad.tsv:5", "bad.tsv:10"}  # where: file and line
    assert rep.unknown_labels == {"concept id 99": 1}
    g = GalleryReader(tmp_path / "g")
    assert sorted(g.image(i).key for i in range(g.num_images)) == sorted(r["key"] for r in rows[:4])
    for r in rows[:4]:
        _check_image(g, r, attrs_top=1)
    assert {f["key"]: f["reason"] for f in g.failures()} == reasons  # in the store too
    g.close()
    # the CLI says the same and exits 3; a resumed run redoes nothing and still reports them
    assert main(["gallery", "import", "--format", "butd-tsv", "--input", str(tsv), "--out", str(tmp_path / "g"),
                 "--vocab", str(files["root"] / "objects_vocab.txt"), "--shard-size", "3", "--ray-address",
                 "none", "--no-progress"]) == EXIT_SOME_FAILED


def test_unknown_names_and_duplicate_keys(files, tmp_path: Path) -> None:
    feats, preds = files["vinvl"]
    plines = preds.read_text().splitlines()
    plines[2] = plines[2].replace('"class": "', '"class": "unicorn', 1)
    p2 = write_tsv(tmp_path / "v" / "predictions.tsv", plines)
    f2 = write_tsv(tmp_path / "v" / "features.tsv", feats.read_text().splitlines())
    rep = import_gallery(_opts("vinvl-tsv", [f2, p2], tmp_path / "g", files["root"]))
    key = files["rows3"][2]["key"]
    name = [k for k in rep.unknown_labels][0]
    assert name.startswith("concept 'unicorn") and rep.unknown_labels[name] == 1
    assert {f["key"] for f in rep.failed} == {key}
    # a key listed twice (across shards) is a bad row, not a failed transaction
    lines = [lxmert_line(r) for r in files["rows"][:4]] + [lxmert_line(files["rows"][0])]
    rep = import_gallery(_opts("butd-tsv", [write_tsv(tmp_path / "dup.tsv", lines)], tmp_path / "d", files["root"]))
    assert rep.gallery_images == 4
    assert [f["reason"] for f in rep.failed] == ["duplicate key (already imported from shard i3-0-000000000)"]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_npz_whose_info_pickle_carries_code_is_refused_and_runs_nothing(files, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "npz"
    r = files["rows"][0]
    write_npz(folder, files["rows"][1])
    buf = io.BytesIO()
    np.save(buf, np.array(_Evil(marker), dtype=object), allow_pickle=True)
    with zipfile.ZipFile(folder / "evil.npz", "w") as zf:
        for name, arr in (("x", r["features"]), ("bbox", r["boxes"]), ("num_bbox", np.int64(len(r["boxes"]))),
                          ("image_h", np.int64(5)), ("image_w", np.int64(5))):
            b = io.BytesIO()
            np.save(b, arr, allow_pickle=False)
            zf.writestr(f"{name}.npy", b.getvalue())
        zf.writestr("info.npy", buf.getvalue())
    rep = import_gallery(_opts("npz", [folder], tmp_path / "g", files["root"]))
    assert not marker.exists()
    reasons = {f["key"]: f["reason"] for f in rep.failed}
    assert reasons["evil"].startswith("unsafe pickle in info (refused global posix.system")
    assert rep.gallery_images == 1
    # the unpickler itself: code is refused, MILVLG's info (arrays, numbers, strings, dict) is read
    for payload in (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
                    b"cbuiltins\neval\n(S'1'\ntR."):
        with pytest.raises(UnsafePickle, match="refused"):
            loads_numpy_only(payload, unwrap=True)
    assert not marker.exists()
    import pickle
    info = {"image_id": "x", "image_h": 3, "objects_id": np.arange(3), "objects_conf": np.ones(3, np.float32)}
    got = loads_numpy_only(pickle.dumps(np.array(info, dtype=object), protocol=3), unwrap=True)
    assert got["image_id"] == "x" and got["objects_id"].tolist() == [0, 1, 2]


_KILLER = """
import os, signal, sys
from vlmixer.storage import gallery_writer
real, n = gallery_writer.GalleryWriter._write, [0]
def write(self, txn, buf):
    real(self, txn, buf)  # everything of the shard, its commit marker included, is in the open transaction
    n[0] += 1
    if n[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 before the transaction commits
gallery_writer.GalleryWriter._write = write
from vlmixer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_import_then_resume_gives_the_same_gallery(files, tmp_path: Path) -> None:
    args = ["gallery", "import", "--format", "butd-tsv", "--input", str(files["lxmert"]), "--vocab",
            str(files["root"] / "objects_vocab.txt"), "--attribute-vocab", str(files["root"] / "attributes_vocab.txt"),
            "--shard-size", "2", "--ray-address", "none", "--no-progress"]
    killed = tmp_path / "killed"
    p = subprocess.run([sys.executable, "-c", _KILLER, *args, "--out", str(killed)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -9, p.stderr
    from vlmixer.storage.gallery_writer import committed_shards
    assert len(committed_shards(killed)) == 2  # the third shard's transaction never committed
    rep = import_gallery(_opts("butd-tsv", [files["lxmert"]], killed, files["root"], shard_size=2))
    assert (rep.shards_skipped, rep.shards_done) == (2, 4)
    import_gallery(_opts("butd-tsv", [files["lxmert"]], tmp_path / "clean", files["root"], shard_size=2))
    assert_same_gallery(killed, tmp_path / "clean")
    assert verify_gallery(killed) == []


def test_resume_refuses_changed_input_or_plan(files, tmp_path: Path) -> None:
    tsv = write_tsv(tmp_path / "in.tsv", [lxmert_line(r) for r in files["rows"]])
    import_gallery(_opts("butd-tsv", [tsv], tmp_path / "g", files["root"]))
    with pytest.raises(VlmixerError, match="another import plan"):
        import_gallery(_opts("butd-tsv", [tsv], tmp_path / "g", files["root"], shard_size=4))
    write_tsv(tsv, [lxmert_line(r) for r in files["rows"][::-1]])
    with pytest.raises(VlmixerError, match="sha256 differs"):
        import_gallery(_opts("butd-tsv", [tsv], tmp_path / "g", files["root"]))


def test_scan_finds_rows_and_checks_lineidx(tmp_path: Path) -> None:
    tsv = tmp_path / "a.tsv"
    tsv.write_bytes(b"r1\tx\n\nr2\ty\nr3\tz")  # a blank line and no final newline
    s = scan_tsv(tsv)
    assert s.rows.tolist() == [[0, 5], [6, 11], [11, 15]] and not s.lineidx
    tsv.write_bytes(b"r1\tx\nr2\ty\n")
    write_lineidx(tsv)
    assert scan_tsv(tsv).lineidx
    tsv.write_bytes(b"r1\tlonger\nr2\ty\n")  # stale index
    with pytest.raises(VlmixerError, match="stale .lineidx"):
        scan_tsv(tsv)


def test_verify_passes_and_train_runs_on_an_imported_gallery(tmp_path: Path) -> None:
    try:  # the tiny store builders live in storage/ on main, in trainer/ on this branch's base
        from vlmixer.storage.synthetic import CONCEPTS, tiny_stores
    except ImportError:
        from vlmixer.storage.synthetic import CONCEPTS, tiny_stores

    _, text = tiny_stores(tmp_path / "stores", n_images=4, n_sentences=64, feature_dim=64)
    (tmp_path / "concepts.txt").write_text("\n".join(CONCEPTS) + "\n")
    rng = np.random.default_rng(3)
    lines = []
    for i in range(24):
        n = 4
        r = {"key": f"im{i}", "width": 320, "height": 240,
             "boxes": np.tile(np.array([[10, 10, 200, 150]], np.float32), (n, 1)),
             "features": rng.standard_normal((n, 64)).astype(np.float32),
             "concepts": rng.integers(0, len(CONCEPTS) - 1, n), "confs": rng.uniform(0.3, 1, n).astype(np.float32),
             "attrs": np.zeros((n, 1), np.int64), "attr_scores": np.zeros((n, 1), np.float32)}
        lines.append(lxmert_line(r))
    tsv = write_tsv(tmp_path / "feats.tsv", lines)
    g = tmp_path / "gallery"
    assert main(["gallery", "import", "--format", "butd-tsv", "--input", str(tsv), "--vocab",
                 str(tmp_path / "concepts.txt"), "--out", str(g), "--ray-address", "none", "--no-progress"]) == 0
    assert main(["verify", str(g), str(text)]) == 0
    TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"
    out = tmp_path / "run"
    assert main(["train", "--config", str(TINY), f"data.gallery={g}", f"data.text_stores=[{text}]",
                 f"run.out_dir={out}", "model.feature_dim=64", "run.progress=false", "optim.total_steps=3",
                 "data.tavp_ratio=0"]) == 0
    assert (out / "checkpoints" / "step_00000003.pt").exists()


def _write_images(folder: Path, rows: list[dict]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, r in enumerate(rows):
        a = np.zeros((r["height"], r["width"], 3), np.uint8)
        a[..., k % 3] = 200
        a[::8] = 255
        Image.fromarray(a).save(folder / f"{r['key']}.png")


def test_report_page_is_self_contained(files, tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", files["rows"][:6])  # half the images reachable
    lines = [lxmert_line(r) for r in files["rows"]] + ["broken\tx"]
    tsv = write_tsv(tmp_path / "r.tsv", lines)
    import_gallery(_opts("butd-tsv", [tsv], tmp_path / "g", files["root"],
                         image_pattern=str(tmp_path / "imgs" / "{key}.png")))
    out = tmp_path / "report.html"
    assert main(["gallery", "report", str(tmp_path / "g"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "imported from butd-tsv" in page and "wrong field count" in page and "broken" in page
    assert page.count('src="data:image/png;base64,') >= 2 + 6  # two histograms, patch strips
    assert "source images are not reachable" in page.lower() or "not reachable" in page
    for external in ('src="http', "href=", "<script", "url("):
        assert external not in page
    g = GalleryReader(tmp_path / "g")
    assert f"<td class=\"n\">{g.num_patches:,}</td>" in page
    g.close()


@pytest.mark.slow
def test_report_renders_in_headless_chromium(files, tmp_path: Path) -> None:
    import shutil

    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from screenshot_mix import screenshot

    _write_images(tmp_path / "imgs", files["rows"])
    import_gallery(_opts("butd-tsv", [files["lxmert"]], tmp_path / "g", files["root"],
                         image_pattern=str(tmp_path / "imgs" / "{key}.png")))
    from vlmixer.pipeline.gallery.report import write_report
    write_report(tmp_path / "g", tmp_path / "r.html")
    png = screenshot(tmp_path / "r.html", tmp_path / "r.png", width=1000, height=1400)
    from PIL import Image
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    busy = (np.abs(img - np.median(img.reshape(-1, 3), 0)).sum(-1) > 30).mean()
    assert busy > 0.03  # text, plots and strips drawn, not a blank page


@pytest.mark.slow
def test_ray_import_matches_in_process(files, tmp_path: Path) -> None:
    import_gallery(_opts("vinvl-tsv", list(files["vinvl"]), tmp_path / "a", files["root"]))
    import_gallery(_opts("vinvl-tsv", list(files["vinvl"]), tmp_path / "b", files["root"], ray_address="local",
                         num_cpus=2))
    assert_same_gallery(tmp_path / "a", tmp_path / "b")
    assert gallery_contents(tmp_path / "b")["counts"][0] == len(files["rows3"])
