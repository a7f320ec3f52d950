"""Gallery store benchmark: write rate, bytes per patch, random reads vs raw LMDB, checksum cost.

Builds a synthetic gallery (default 200,000 patches of 2048-d fp16, ~0.8 GB)
through the real writer, then in one process times random single-patch reads
through `GalleryReader.feature` against the best raw `lmdb` access to the
same bytes (zero-copy `txn.get` of the same block key plus the same 4 KiB
slice), and concept-sampling reads (15 patches of a random concept, as CMC
asks). Prints one figure per line.

Block checksums: every shard is also committed to a twin gallery whose
CRC-32 is replaced by a constant (the same puts, no checksum computed), the
two commits back to back in alternating order, so load from other jobs on a
shared machine falls on both alike; the time inside the CRC-32 itself is
reported too. Random reads are
timed with `check_blocks=True` (first pass: every block checked once; then
steady state); `verify` is timed in full (every block's CRC-32) and `--quick`,
in GB of features per second.

    python bench/storage.py [--patches 200000] [--dim 2048] [--out DIR] [--keep] [--control]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlmixer.files import dir_size
from vlmixer.storage import gallery_format as fmt
from vlmixer.storage.gallery import GalleryReader, finalize_gallery
from vlmixer.storage.gallery_writer import GalleryWriter, ShardBuffer
from vlmixer.storage.verify import verify_gallery
from vlmixer.storage.vocab import Vocabulary


def build(root: Path, n_patches: int, dim: int, n_concepts: int, per_image: int, per_shard: int,
          control: bool = False) -> dict[str, float]:
    """Write the gallery at `root` and, shard by shard, the same shards into a twin at `root-nosums`
    whose checksum is a constant (the same puts, no CRC-32 computed). The two commits of a shard
    run back to back, in alternating order, so a machine shared with other jobs slows both alike.
    Returns seconds: `total` (filling shards + committing, with checksums), `commit`, `commit_nosums`
    (wall; `_cpu`: CPU time, which leaves out waiting for fsync), and `crc` (inside the CRC-32 itself)."""
    rng = np.random.default_rng(0)
    vocab = Vocabulary(names=tuple(f"c{i}" for i in range(n_concepts)))
    twin = root.with_name(root.name + "-nosums")
    writers = {"commit": GalleryWriter(root, feature_dim=dim, concepts=vocab, map_size=1 << 28),
               "commit_nosums": GalleryWriter(twin, feature_dim=dim, concepts=vocab, map_size=1 << 28)}
    feats = rng.standard_normal((per_image * per_shard, dim)).astype(np.float16)  # reused: rate of the store only
    crc, extend = fmt.block_sums, fmt.extend_sums
    spent = dict.fromkeys(("commit", "commit_nosums", "commit_cpu", "commit_nosums_cpu", "crc", "fill"), 0.0)

    def timed(fn: Callable[..., bytes]) -> Callable[..., bytes]:
        def run(*args: Any) -> bytes:
            t = time.perf_counter()
            out = fn(*args)
            spent["crc"] += time.perf_counter() - t
            return out
        return run

    def constant(*args: Any) -> bytes:
        return b"\0" * 8

    # control: the twin computes checksums too (an A/A run): what remains is the bias of the set-up
    sums = {"commit": (timed(crc), timed(extend)), "commit_nosums": (crc, extend) if control else (constant, constant)}
    written, shard = 0, 0
    try:
        while written < n_patches:
            t = time.perf_counter()
            buf = ShardBuffer(shard_id=f"shard-{shard:06d}", feature_dim=dim)
            for i in range(per_shard):
                n = min(per_image, n_patches - written)
                if n <= 0:
                    break
                boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (n, 1))
                buf.add_image(f"img-{shard}-{i}", f"/x/{shard}/{i}.jpg", 640, 480, boxes,
                              feats[i * per_image: i * per_image + n], rng.integers(0, n_concepts, n),
                              rng.uniform(0.2, 1, n).astype(np.float32))
                written += n
            spent["fill"] += time.perf_counter() - t
            for name in (("commit", "commit_nosums") if shard % 2 == 0 else ("commit_nosums", "commit")):
                fmt.block_sums, fmt.extend_sums = sums[name]
                t, c = time.perf_counter(), time.process_time()
                writers[name].commit(buf)
                spent[name] += time.perf_counter() - t
                spent[name + "_cpu"] += time.process_time() - c
            shard += 1
    finally:
        fmt.block_sums, fmt.extend_sums = crc, extend
        for w in writers.values():
            w.close()
    shutil.rmtree(twin)
    return {**spent, "total": spent["fill"] + spent["commit"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--concepts", type=int, default=1594)
    ap.add_argument("--reads", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--control", action="store_true", help="A/A run: the twin computes checksums as well")
    a = ap.parse_args()
    root = a.out or Path(tempfile.mkdtemp(prefix="vlmixer-bench-")) / "gallery"
    if root.exists():
        shutil.rmtree(root)
    print(f"machine: {os.cpu_count()} cpus; gallery {a.patches} patches x {a.dim}-d fp16 at {root}")
    sec = build(root, a.patches, a.dim, a.concepts, per_image=30, per_shard=256, control=a.control)
    if a.control:
        print("control run: the twin computes checksums too; the comparison below shows the set-up's bias")
    print(f"write: {a.patches / sec['total']:,.0f} patches/s ({sec['total']:.1f} s, of which commits "
          f"{sec['commit']:.1f} s)")
    print(f"block checksums on write: commits {sec['commit']:.2f} s wall / {sec['commit_cpu']:.2f} s cpu with "
          f"CRC-32 vs {sec['commit_nosums']:.2f} s / {sec['commit_nosums_cpu']:.2f} s without (same shards, "
          f"interleaved): {100 * (sec['commit'] / sec['commit_nosums'] - 1):+.1f}% wall (fsync-bound, noisy on a "
          f"shared disk), {100 * (sec['commit_cpu'] / sec['commit_nosums_cpu'] - 1):+.1f}% cpu; time inside the "
          f"CRC-32 itself {sec['crc']:.2f} s = {100 * sec['crc'] / sec['total']:.1f}% of the write "
          "(target within 10%)")
    t0 = time.perf_counter()
    finalize_gallery(root)
    print(f"finalize (index): {time.perf_counter() - t0:.1f} s")
    size = dir_size(root)
    raw = a.dim * 2
    print(f"disk: {size / a.patches:,.0f} bytes/patch = {size / a.patches / raw:.3f}x the raw {raw} feature bytes")

    g = GalleryReader(root)
    rng = np.random.default_rng(1)
    pids = rng.integers(0, g.num_patches, a.reads)
    g.feature(0)
    st = g._open()  # the reader's own environment and transaction: the raw baseline uses the same handles
    txn, db = st["txns"][0], st["dbs"][0][b"feat"]
    D = a.dim

    def raw_reads() -> float:
        t = time.perf_counter()
        for pid in pids:
            block, row = divmod(int(pid), fmt.BLOCK)
            buf = txn.get(fmt.ukey(block), db=db)
            np.frombuffer(buf, dtype=np.float16, count=D, offset=row * D * 2).copy()
        return a.reads / (time.perf_counter() - t)

    def reader_reads() -> float:
        t = time.perf_counter()
        for pid in pids:
            g.feature(int(pid))
        return a.reads / (time.perf_counter() - t)

    raw_reads(), reader_reads()  # warm the page cache for both
    r_raw = max(raw_reads() for _ in range(3))
    r_reader = max(reader_reads() for _ in range(3))
    print(f"random single-patch reads: reader {r_reader:,.0f}/s, raw lmdb txn.get {r_raw:,.0f}/s, "
          f"ratio {r_reader / r_raw:.2f}x (target >= 0.7x)")

    gc = GalleryReader(root, check_blocks=True)
    t = time.perf_counter()
    for pid in pids:
        gc.feature(int(pid))
    first = a.reads / (time.perf_counter() - t)
    t = time.perf_counter()
    for pid in pids:
        gc.feature(int(pid))
    steady = a.reads / (time.perf_counter() - t)
    print(f"reads with check_blocks=True: first pass {first:,.0f}/s (checks {len(gc._open()['checked'])} blocks "
          f"once), then {steady:,.0f}/s = {steady / r_reader:.2f}x the unchecked reader")
    gc.close()

    counts = g.concept_counts()
    nonempty = np.flatnonzero(counts)
    t = time.perf_counter()
    n_samples = 5_000
    for c in rng.choice(nonempty, n_samples):
        ids, confs = g.concept_patches(int(c))
        pick = rng.choice(len(ids), min(15, len(ids)), replace=False)
        for pid in ids[pick]:
            g.feature(int(pid))
        g.context(int(ids[pick[0]]))
    dt = time.perf_counter() - t
    print(f"concept sampling: {n_samples / dt:,.0f} concepts/s (15 patches each: {15 * n_samples / dt:,.0f} patch reads/s)")
    g.close()

    feat_gb = a.patches * a.dim * 2 / 1e9
    for quick in (False, True):
        t, c = time.perf_counter(), time.process_time()
        problems = verify_gallery(root, quick=quick)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        print(f"verify{' --quick' if quick else ''}: {dt:.2f} s wall, {dc:.2f} s cpu: {feat_gb / dt:.2f} GB/s of "
              f"features wall, {feat_gb / dc:.2f} GB/s cpu{'' if quick else ' (target >= 1 GB/s)'}, "
              f"{len(problems)} problems")
    if not a.keep and a.out is None:
        shutil.rmtree(root.parent)


if __name__ == "__main__":
    main()
