"""Gallery build with the REAL tiny detector (configs/detector/tiny.yaml, random weights):
in-process vs local Ray vs a 2-node Ray cluster, bad inputs, SIGKILL and resume, show.

One module so that the in-process reference gallery is built once; tests run in
file order and each Ray test starts and stops its own Ray.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_gallery_build_support import (
    TINY_CONFIG,
    assert_same_gallery,
    gallery_contents,
    ray_env,
    write_bad_images,
    write_images,
    write_labelmap,
)

from vlmixer.cli import main
from vlmixer.pipeline.gallery.job import EXIT_SOME_FAILED, BuildOptions, build_gallery
from vlmixer.storage.gallery import GalleryReader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gallery_build")
    imgs = root / "images"
    write_images(imgs, photos=2, synth=2)
    bad = write_bad_images(imgs)
    lm = write_labelmap(root / "labelmap.json", 80, 20)
    return {"root": root, "images": imgs, "labelmap": lm, "bad": bad}


@pytest.fixture(scope="module")
def reference(data) -> tuple[Path, object]:
    """The plain in-process run everything else is compared with. One torch thread, as in the
    Ray actors here: results are then bitwise equal (more threads may change the last float bit)."""
    out = data["root"] / "ref"
    report = build_gallery(BuildOptions(images=str(data["images"]), detector=str(TINY_CONFIG), out=str(out),
                                        labelmap=str(data["labelmap"]), ray_address="none", device="cpu",
                                        threads=1, shard_size=3, batch_size=2, progress=False))
    return out, report


def _cli_args(data, out: Path, *extra: str) -> list[str]:
    return ["gallery", "build", "--images", str(data["images"]), "--detector", str(TINY_CONFIG),
            "--labelmap", str(data["labelmap"]), "--out", str(out), "--no-progress", *extra]


def test_inprocess_build_lists_bad_inputs(data, reference) -> None:
    out, report = reference
    assert report.exit_code == EXIT_SOME_FAILED
    failed = {f["key"]: f["reason"] for f in report.failed}
    # CMYK, 16-bit and alpha fail too by default; --convert-modes converts them
    want_fail = {k: v[5:] if v.startswith("fail:") else "unsupported mode" for k, v in data["bad"].items()}
    assert set(failed) == set(want_fail)
    for k, start in want_fail.items():
        assert failed[k].startswith(start), (k, failed[k])
    assert report.converted == {}
    r = GalleryReader(out)
    keys = {r.image(i).key for i in range(r.num_images)}
    assert keys == {"astronaut.jpg", "chelsea.jpg", "syn000.jpg", "syn001.png"}
    assert {f["key"]: f["reason"] for f in r.failures()} == failed  # in the store too
    assert r.num_patches >= 10 * len(keys)  # the tiny config keeps at least 10 boxes per image
    for i in range(r.num_images):  # patches of an image: contiguous, confidence descending
        confs = [r.patch(p).confidence for p in r.image_patches(i)]
        assert confs == sorted(confs, reverse=True)
    stats = r.shards()
    assert sum(s["images"] for s in stats.values()) == len(keys)
    one = next(iter(stats.values()))
    for k in ("read_s", "infer_s", "write_s", "failure_reasons", "keys_sha256", "converted", "workers"):
        assert k in one
    assert sum(sum(s["failure_reasons"].values()) for s in stats.values()) == len(failed)
    r.close()


def test_ray_local_cli_equals_inprocess(data, reference, capsys) -> None:
    out = data["root"] / "ray_local"
    rc = main(_cli_args(data, out, "--ray-address", "local", "--num-cpus", "2", "--shard-size", "2",
                        "--batch-size", "3"))
    text = capsys.readouterr().out
    assert rc == EXIT_SOME_FAILED
    for name in data["bad"]:
        assert name in text, name
    assert "FAILED images (7;" in text and "converted to RGB" not in text
    assert_same_gallery(reference[0], out)


def test_two_node_cluster_with_fake_gpu_equals_inprocess(data, reference) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    try:
        ray.init(address=cluster.address)
        out = data["root"] / "cluster"
        report = build_gallery(BuildOptions(images=str(data["images"]), detector=str(TINY_CONFIG), out=str(out),
                                            labelmap=str(data["labelmap"]), ray_address="auto",
                                            shard_size=4, batch_size=4, progress=False))
        assert report.workers == 1 and report.exit_code == EXIT_SOME_FAILED
    finally:
        ray.shutdown()
        cluster.shutdown()
    # batches of 4 here, of 3 in the reference: with no padding to a size multiple (as VinVL's extractor),
    # a batch's tensor shape follows its largest image and convolutions block differently, so an image's
    # floats agree across batchings within fp32 tolerance, not bit for bit (the same batching is exact)
    assert_same_gallery(reference[0], out, exact=False)
    r = GalleryReader(out)
    workers = {w for s in r.shards().values() for w in s["workers"]}
    r.close()
    # the detector actor ran where the (fake) GPU is, and fell back to the CPU there
    assert workers and all(f"node={gpu_node.node_id[:12]}" in w and ":cpu:" in w for w in workers), workers


def test_a_crashing_decode_worker_fails_only_its_image(data, reference, tmp_path) -> None:
    """A decode worker that dies on one image (segfault, OOM kill) costs that image only: its batch is
    split and re-run image by image, the culprit is recorded as failed and every other image is kept."""
    import shutil

    import ray

    images = tmp_path / "images"
    shutil.copytree(data["images"], images)
    shutil.copy(images / "astronaut.jpg", images / "crash-me.jpg")
    env = ray_env()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={
        "worker_process_setup_hook": "crash_hooks.crash_on_decode",
        "env_vars": {"PYTHONPATH": env["PYTHONPATH"], "RAY_AUTH_MODE": "disabled"}})
    try:
        out = tmp_path / "crash"
        report = build_gallery(BuildOptions(images=str(images), detector=str(TINY_CONFIG), out=str(out),
                                            labelmap=str(data["labelmap"]), ray_address="auto", threads=1,
                                            shard_size=3, batch_size=3, progress=False))
    finally:
        ray.shutdown()
    assert report.exit_code == EXIT_SOME_FAILED
    got, ref = gallery_contents(out), gallery_contents(reference[0])
    reason = got["failures"].pop("crash-me.jpg")
    assert reason.startswith("worker crashed"), reason
    assert got["failures"] == ref["failures"]
    assert got["counts"] == ref["counts"] and sorted(got["images"]) == sorted(ref["images"])
    # the crashed batch's other images were re-run one by one: equal within fp32 tolerance, as any
    # other batching (bit for bit only under the same batching; see the two-node test)
    for key, x in ref["images"].items():
        y = got["images"][key]
        assert x["concepts"] == y["concepts"], key
        np.testing.assert_allclose(x["boxes"], y["boxes"], atol=1e-3, err_msg=key)
        np.testing.assert_allclose(x["confidences"], y["confidences"], atol=1e-4, err_msg=key)
        np.testing.assert_allclose(x["features"].astype(np.float32), y["features"].astype(np.float32),
                                   rtol=2e-3, atol=2e-3, err_msg=key)


def _process_tree(root_pid: int) -> set[int]:
    """`root_pid`, its descendants, and everything in its session (it was started with a new one)."""
    children: dict[int, list[int]] = {}
    session: set[int] = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ppid, sid = int(fields[1]), int(fields[3])
        children.setdefault(ppid, []).append(int(d))
        if sid == root_pid:
            session.add(int(d))
    out, todo = set(), [root_pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(children.get(p, []))
    return (out | session) - {os.getpid()}


def _committed(out: Path) -> int:
    from vlmixer.storage.gallery_writer import committed_shards

    try:
        return len(committed_shards(out))
    except Exception:  # noqa: BLE001  the writer may be mid-transaction or not started yet
        return 0


def test_sigkill_mid_run_then_resume_equals_uninterrupted(data, reference) -> None:
    out = data["root"] / "killed"
    cmd = [sys.executable, "-m", "vlmixer", *_cli_args(data, out, "--ray-address", "local", "--num-cpus", "2",
                                                       "--shard-size", "1", "--batch-size", "1")]
    total = len(list(data["images"].iterdir()))
    log = open(data["root"] / "killed.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and _committed(out) < 3:
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be killed"
        at_kill = _committed(out)
        for pid in _process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= at_kill < total, at_kill
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == EXIT_SOME_FAILED, rerun.stdout + rerun.stderr
    assert "already committed" in rerun.stdout
    assert_same_gallery(reference[0], out)
    c = gallery_contents(out)
    assert c["counts"] == gallery_contents(reference[0])["counts"]


def test_show_draws_the_concept_grid(reference, tmp_path, capsys) -> None:
    out, _ = reference
    r = GalleryReader(out)
    counts = r.concept_counts()
    best = int(np.argmax(counts))
    name = r.concepts.names[best]
    empty = [i for i, c in enumerate(counts) if c == 0]
    r.close()
    png = tmp_path / "grid.png"
    assert main(["gallery", "show", str(out), name, "--out", str(png), "--max-patches", "12", "--columns", "4",
                 "--cell", "64"]) == 0
    im = Image.open(png)
    assert im.size[0] == 4 * 64 and im.size[1] > 64
    assert np.asarray(im).std() > 10  # crops were drawn, not an empty sheet
    assert f"{min(12, int(counts[best]))} of {int(counts[best])} patches" in capsys.readouterr().out
    if empty:
        assert main(["gallery", "show", str(out), str(empty[0]), "--out", str(tmp_path / "none.png")]) == 0
    assert main(["gallery", "show", str(out), "no-such-concept", "--out", str(png)]) == 2
    assert main(["gallery", "finalize", str(out)]) == 0
