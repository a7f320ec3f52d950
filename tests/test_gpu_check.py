"""The GPU check without a GPU: its dry run, the wheel-folder rules, the import coverage, the report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
import imports as gpu_imports  # noqa: E402
import report as gpu_report  # noqa: E402
import wheels as gpu_wheels  # noqa: E402


def run_script(*args: str, tmp: Path, wheels: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp), "GPU_WHEELS": str(wheels)}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_dry_run_is_ready_for_a_gpu_machine(tmp_path: Path) -> None:
    res = run_script("--dry-run", tmp=tmp_path, wheels=tmp_path / "no_wheel_folder_here")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "list ok: 9 wheels" in out
    assert "load without Ray" in out and "the rest carried: antlr4-python3-runtime, fvcore" in out
    assert "test selection ok (7 gpu tests, all skip without CUDA)" in out
    assert "dry run: ready for a GPU machine" in out
    md = (tmp_path / "dry_run" / "gpu_report.md").read_text()
    assert md.startswith("# GPU check: DRY RUN (no GPU)")
    assert "| detector bf16, batch 8: images/s | 1.000 | >= 100 on an H100; peak 1.000 GiB |" in md
    assert "| trainer valp: largest micro-batch tried that fits | 64 (1.000 GiB) | out of memory at [128] |" in md


def test_wheel_check_command_fails_on_a_bad_folder(tmp_path: Path) -> None:
    folder = tmp_path / "whl"
    folder.mkdir()
    (folder / "lmdb-2.0.0-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"x")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "wheels.py"), "check", "--dir", str(folder)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "lmdb-2.0.0-cp312-cp312-manylinux_2_17_x86_64.whl: version 2.0.0, wheels.txt pins 3.0.0" in res.stderr
    assert "yacs==0.1.8: no wheel in" in res.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "wheels.py"), "check", "--need-folder",
                              "--dir", str(tmp_path / "absent")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no wheel folder (run `make gpu-wheels`)" in missing.stderr


def fake_folder(folder: Path, entries: list, skip: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for e in entries:
        if e.name != skip:
            tags = "cp312-cp312-manylinux_2_17_x86_64" if e.how == "binary" else "py3-none-any"
            (folder / f"{e.name.replace('-', '_')}-{e.version}-{tags}.whl").write_bytes(b"w" * 10)


def test_wheel_folder_rules(tmp_path: Path) -> None:
    entries = gpu_wheels.read_list()
    assert [e.name for e in entries if e.how == "prepare"] == ["pb1-detectron2"]
    assert {"lmdb", "fvcore", "iopath", "yacs", "omegaconf", "pycocotools"} <= {e.key for e in entries}
    good = tmp_path / "good"
    fake_folder(good, entries)
    assert gpu_wheels.check_folder(good, entries) == []
    assert gpu_wheels.check_folder(good, entries, limit=50) == [
        f"{good}: 0.0 MiB, over the 0 MiB that may travel"]

    bad = tmp_path / "bad"
    fake_folder(bad, entries, skip="yacs")
    (bad / "lmdb-2.0.0-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"")
    (bad / "termcolor-3.3.0-cp312-cp312-manylinux_2_17_x86_64.whl").rename(bad / "termcolor-3.3.0-cp312-cp312-win_amd64.whl")
    problems = gpu_wheels.check_folder(bad, entries)
    assert "yacs==0.1.8: no wheel in " + str(bad) + " (run `make gpu-wheels`)" in problems
    assert "lmdb-2.0.0-cp312-cp312-manylinux_2_17_x86_64.whl: version 2.0.0, wheels.txt pins 3.0.0" in problems
    assert f"lmdb: 2 wheels in {bad}; keep one" in problems
    assert "termcolor-3.3.0-cp312-cp312-win_amd64.whl: tags cp312-cp312-win_amd64 do not install on " \
           "CPython 3.12 x86-64" in problems
    assert len(problems) == 4


@pytest.mark.parametrize("tags,ok", [(("py3", "none", "any"), True), (("cp312", "abi3", "manylinux_2_17_x86_64"), True),
                                     (("cp310", "abi3", "manylinux2014_x86_64"), True),
                                     (("cp313", "cp313", "manylinux_2_17_x86_64"), False),
                                     (("cp312", "cp312", "manylinux_2_17_aarch64"), False),
                                     (("cp312", "cp312", "macosx_11_0_arm64"), False)])
def test_wheel_tags_for_the_gpu_machine(tags: tuple[str, str, str], ok: bool) -> None:
    assert gpu_wheels.runs_on_gpu_machine(*tags) is ok


def test_wheel_list_errors_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "w.txt"
    p.write_text("lmdb==3.0.0 binary\nlmdb==3.0.1 binary\n")
    with pytest.raises(ValueError, match=r"w.txt:2: lmdb is listed twice"):
        gpu_wheels.read_list(p)
    p.write_text("# only a comment\nyacs>=0.1 binary\n")
    with pytest.raises(ValueError, match=r"w.txt:2: expected 'NAME==VERSION"):
        gpu_wheels.read_list(p)


def test_needed_distributions_follow_only_what_the_image_lacks() -> None:
    """fvcore (carried) pulls yacs in; requests (in the image) pulls charset_normalizer: the image's business."""
    edges = {"vlmixer": "__main__", "fvcore": "detectron2", "detectron2": "vlmixer", "yacs": "fvcore",
             "requests": "vlmixer", "charset_normalizer": "requests", "json": "vlmixer"}
    image = {"requests", "charset-normalizer"}
    dists = {"fvcore": ["fvcore"], "detectron2": ["pb1-detectron2"], "yacs": ["yacs"], "requests": ["requests"],
             "charset_normalizer": ["charset-normalizer"], "vlmixer": ["vlmixer"]}
    import importlib.metadata as md

    real = md.packages_distributions
    md.packages_distributions = lambda: dists  # type: ignore[assignment]
    try:
        needed = gpu_imports.needed_distributions(edges, image)
    finally:
        md.packages_distributions = real  # type: ignore[assignment]
    assert needed == {"pb1-detectron2": "detectron2 (imported by vlmixer)",
                      "fvcore": "fvcore (imported by detectron2)", "yacs": "yacs (imported by fvcore)",
                      "requests": "requests (imported by vlmixer)"}


def test_report_of_a_run_stopped_at_a_cap(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    rows = [{"section": "device", "device": "NVIDIA H200", "date": "2026-12-01 10:00 UTC", "torch": "2.11.0"},
            {"section": "detector", "precision": "bf16", "batch": 8, "images": 16, "images_per_s": 212.5,
             "ms_per_image": 4.7, "peak_gib": 9.25},
            {"section": "detector", "precision": "fp32", "batch": 8, "error": "RuntimeError: no kernel"},
            {"section": "trainer", "task": "valp", "micro_batch": 256, "seq": 80, "compiled": True,
             "error": "BackendCompilerFailed: inductor"},
            {"section": "status", "part": "trainer", "rc": 124, "seconds": 150, "cap_s": 150,
             "note": "stopped at its cap"}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"section": "trainer", "task": "va')
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuite><testcase name="test_x" time="1.5"><failure message="boom&#10;more"/></testcase>'
                     '<testcase name="test_y" time="0.2"/></testsuite>')
    plain, md = gpu_report.render(gpu_report.read_results(results), gpu_report.read_junit(junit))
    assert plain.splitlines()[0] == "GPU check on NVIDIA H200 (2026-12-01 10:00 UTC, torch 2.11.0)"
    assert "| gpu-marked tests | 1 passed, 1 failed, 0 skipped | all pass; failed: test_x |" in md
    assert "| detector bf16, batch 8: images/s | 212.5 | >= 100 on an H100; peak 9.250 GiB |" in md
    assert "| trainer valp seq 80: MFU | not measured | >= 45% of the datasheet bf16 peak |" in md
    assert "| detector fp32, batch 8: images/s | not measured (error: RuntimeError: no kernel) | >= 100 on an H100 |" \
        in md
    assert "| trainer valp seq 80 compiled: MFU | not measured (error: BackendCompilerFailed: inductor) |" in md
    assert "| trainer | 124 | 150 | 150 | stopped at its cap |" in md
    assert "| test_x | FAILED: boom | 1.500 |" in md


@pytest.mark.slow
def test_smoke_run_of_the_whole_script_on_the_cpu(tmp_path: Path) -> None:
    """Every part end to end with tiny models: the script and the parts agree on what they write."""
    res = run_script("--smoke", tmp=tmp_path, wheels=tmp_path / "none")
    assert res.returncode == 0, res.stdout[-3000:]
    rows = gpu_report.read_results(tmp_path / "results.jsonl")
    status = {r["part"]: r for r in rows if r["section"] == "status"}
    assert {p: s["rc"] for p, s in status.items()} == {"detector": 0, "gallery": 0, "trainer": 0}, \
        (tmp_path / "gpu_check.log").read_text()[-3000:]
    sections = {r["section"] for r in rows}
    assert {"detector", "detector_stages", "gallery", "gallery_verdict", "trainer", "loader", "loop"} <= sections
    det = [r for r in rows if r["section"] == "detector"]
    assert [(r["precision"], r["batch"]) for r in det] == [("fp32", 1), ("fp32", 2)]
    assert all(r["images_per_s"] > 0 for r in det)
    stages = [r for r in rows if r["section"] == "detector_stages"]
    assert sum(r["share"] for r in stages) == pytest.approx(1.0, abs=0.01)
    md = (tmp_path / "gpu_report.md").read_text()
    assert "| detector fp32, batch 2: images/s |" in md and "smoke run, no GPU figure" in md
