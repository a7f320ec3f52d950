"""Import throughput of `gallery import --format butd-tsv` against a bare decoding loop, and its memory.

    python bench/gallery_import.py                 # 20,000 images x 36 boxes x 2048-d (~7.9 GB TSV)
    python bench/gallery_import.py --images 2000   # a quick look

Writes a synthetic bottom-up-attention TSV (LXMERT's labelled columns), then in the same process
1. the bare loop: read each row, split it, base64-decode boxes and features, `np.frombuffer` them;
2. the import, in-process (one process, like one Ray reader plus the writer): the streaming
   sha256/row scan, parsing, label mapping, fp16 cast with range check, LMDB commits, finalize.
Prints rows/s of both and their ratio (target >= 0.5), and the import's peak RSS (VmHWM) when a
quarter of the rows were committed and at the end, and its own (anonymous) memory over the first
and last quarter of the rows, up to where finalize starts (target: within 10%: nothing holds all
rows); finalize's own peak is printed apart, it keeps to its --memory-mb budget.
The TSV and gallery are deleted unless --keep.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

N_OBJECTS, N_ATTRS = 1600, 400


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def write_tsv(path: Path, n_images: int, boxes: int, dim: int, seed: int = 0) -> None:
    """Rows cycle through 64 distinct feature blocks (writing 7.9 GB of fresh random numbers would
    take longer than the bench); keys, sizes, boxes and labels differ per row."""
    rng = np.random.default_rng(seed)
    pool = [base64.b64encode((rng.standard_normal((boxes, dim)) * 2).astype("<f4").tobytes()) for _ in range(64)]
    with open(path, "wb") as f:
        for i in range(n_images):
            w, h = int(rng.integers(320, 640)), int(rng.integers(240, 480))
            x1, y1 = rng.uniform(0, w / 2, boxes), rng.uniform(0, h / 2, boxes)
            bx = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, boxes), y1 + rng.uniform(1, h / 2, boxes)], 1)
            fields = [str(100000 + i).encode(), b"%d" % h, b"%d" % w,
                      base64.b64encode(rng.integers(0, N_OBJECTS, boxes).astype("<i8").tobytes()),
                      base64.b64encode(rng.uniform(0.2, 1, boxes).astype("<f4").tobytes()),
                      base64.b64encode(rng.integers(0, N_ATTRS, boxes).astype("<i8").tobytes()),
                      base64.b64encode(rng.uniform(0.1, 1, boxes).astype("<f4").tobytes()),
                      b"%d" % boxes, base64.b64encode(bx.astype("<f4").tobytes()), pool[i % 64]]
            f.write(b"\t".join(fields) + b"\n")


def bare_loop(path: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b"\t")
            k = int(fields[7])
            np.frombuffer(binascii.a2b_base64(fields[8]), dtype="<f4").reshape(k, 4)
            np.frombuffer(binascii.a2b_base64(fields[9]), dtype="<f4").reshape(k, -1)
            n += 1
    return n, time.perf_counter() - t0


def run_import(tsv: Path, out: Path, vocab: Path, attrs: Path, shard_size: int) -> dict:
    from vlmixer.pipeline.gallery import imports
    from vlmixer.storage import gallery_finalize

    total = sum(1 for _ in open(tsv, "rb"))
    done = [0]
    marks: dict[str, int] = {}
    real = imports.read_shard

    def counting(shard, spec):  # noqa: ANN001, ANN202
        r = real(shard, spec)
        done[0] += shard.rows
        if done[0] >= total / 4 and "quarter" not in marks:
            marks["quarter"] = _status("VmHWM")
        return r

    imports.read_shard = counting
    real_finalize = gallery_finalize.finalize_gallery

    def timed_finalize(*a, **k):  # noqa: ANN002, ANN003, ANN202  rows end where finalize (its own budget) starts
        marks["finalize_t"] = time.perf_counter()
        return real_finalize(*a, **k)

    gallery_finalize.finalize_gallery = timed_finalize
    samples: list[tuple[float, int, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), done[0], _status("RssAnon"), _status("RssFile")))
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    th.start()
    try:
        rep = imports.import_gallery(imports.ImportOptions(
            format="butd-tsv", inputs=(str(tsv),), out=str(out), vocab=str(vocab), attribute_vocab=str(attrs),
            ray_address="none", shard_size=shard_size, progress=False))
    finally:
        stop.set()
        th.join()
        imports.read_shard = real
        gallery_finalize.finalize_gallery = real_finalize
    secs = time.perf_counter() - t0
    first_commit = next((t for t, d, _, _ in samples if d > 0), t0)
    q1 = [r for _, d, r, _ in samples if 0 < d <= total / 4]
    rows_end = marks.get("finalize_t", float("inf"))
    q4 = [r for t, d, r, _ in samples if d >= 3 * total / 4 and t < rows_end]
    f1 = [f for _, d, _, f in samples if 0 < d <= total / 4]
    f4 = [f for t, d, _, f in samples if d >= 3 * total / 4 and t < rows_end]
    fin = [r for t, _, r, _ in samples if t >= rows_end]
    return {"rows": rep.rows_done, "seconds": secs, "scan_seconds": first_commit - t0, "failed": len(rep.failed),
            "hwm_quarter": marks.get("quarter", 0), "hwm_end": _status("VmHWM"),
            "anon_q1": max(q1, default=0), "anon_q4": max(q4, default=0), "file_q1": max(f1, default=0),
            "file_q4": max(f4, default=0), "anon_finalize": max(fin, default=0), "patches": rep.gallery_patches}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--boxes", type=int, default=36)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vlmixer-import-bench-", dir=a.dir))
    try:
        tsv = root / "feats.tsv"
        t = time.perf_counter()
        write_tsv(tsv, a.images, a.boxes, a.dim)
        size = tsv.stat().st_size
        print(f"wrote {tsv}: {a.images} rows x {a.boxes} boxes x {a.dim}-d, {size / 1e9:.2f} GB in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        (root / "objects.txt").write_text("".join(f"object{i}\n" for i in range(N_OBJECTS)))
        (root / "attributes.txt").write_text("".join(f"attribute{i}\n" for i in range(N_ATTRS)))
        n, secs = bare_loop(tsv)  # the file was just written: both runs read it from the page cache
        bare = n / secs
        print(f"bare loop (read, split, base64-decode, frombuffer): {n} rows in {secs:.1f} s = {bare:.0f} rows/s "
              f"({size / secs / 1e6:.0f} MB/s)", flush=True)
        r = run_import(tsv, root / "gallery", root / "objects.txt", root / "attributes.txt", a.shard_size)
        rate = r["rows"] / r["seconds"]
        print(f"import (in-process): {r['rows']} rows, {r['patches']} patches in {r['seconds']:.1f} s "
              f"(of which the sha256 + row scan {r['scan_seconds']:.1f} s) = {rate:.0f} rows/s, "
              f"{rate / bare:.2f}x the bare loop (target >= 0.5x); {r['failed']} bad rows")
        growth = r["hwm_end"] / r["hwm_quarter"] - 1 if r["hwm_quarter"] else float("nan")
        anon = r["anon_q4"] / r["anon_q1"] - 1 if r["anon_q1"] else float("nan")
        print(f"peak RSS (VmHWM, counts LMDB's mapped file pages): {r['hwm_quarter'] / 2**20:.0f} MiB after the "
              f"first quarter of rows, {r['hwm_end'] / 2**20:.0f} MiB at the end ({100 * growth:+.1f}%); peak "
              f"anonymous RSS (the process's own memory) {r['anon_q1'] / 2**20:.0f} MiB in the first quarter, "
              f"{r['anon_q4'] / 2**20:.0f} MiB in the last ({100 * anon:+.1f}%, target within 10%); mapped file "
              f"pages {r['file_q1'] / 2**20:.0f} / {r['file_q4'] / 2**20:.0f} MiB; finalize afterwards (under its "
              f"own --memory-mb budget) {r['anon_finalize'] / 2**20:.0f} MiB anonymous; "
              f"gallery {sum(f.stat().st_size for f in (root / 'gallery').rglob('*') if f.is_file()) / 1e9:.2f} GB")
    finally:
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
