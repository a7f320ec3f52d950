"""Scale benchmark: memory must follow a budget or the work in flight, not the data.

    .venv/bin/python bench/scale.py finalize [--sizes 1000000 10000000 50000000] [--memory-mb 512 ...]
                                             [--in-memory 1000000 10000000] [--work DIR]

Each measurement runs in a fresh child process, which reports its peak RSS
(VmHWM) and wall time, so one size's garbage never counts against the next.
Sections are independent: each registers its arguments, its run and its
child measurement in SECTIONS and CHILDREN below.

finalize  `gallery finalize --memory-mb N` on a synthetic gallery of P
          patches, written by the real writer: 32 patches per image,
          1,594 concepts (the Visual Genome vocabulary of VinVL's detector)
          drawn Zipf-like, confidences in [0.2, 1) rounded to 3 decimals so
          ties are common, 4-d features so the store fits this disk. The
          child only finalizes; its peak RSS is what the budget bounds. The
          page cache is warm (the gallery was just written). `--in-memory`
          sizes are also finalized by the whole-array path, and the two index
          directories must be byte-identical. The machine's 1-minute load
          average after each row says how much others were running.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(kind: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "_child", kind, *args], check=True, capture_output=True,
                         text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


# ============================================================================ finalize (gallery)

PER_IMAGE = 32
N_CONCEPTS = 1594
DIM = 4


def write_gallery(root: Path, n_patches: int, images_per_shard: int = 20_000) -> int:
    """A gallery of `n_patches` through GalleryWriter; returns the number of images."""
    import numpy as np

    from vlmixer.storage.gallery_writer import GalleryWriter
    from vlmixer.storage.vocab import Vocabulary

    rng = np.random.default_rng(0)
    zipf = 1.0 / np.arange(1, N_CONCEPTS + 1)
    zipf /= zipf.sum()
    vocab = Vocabulary(names=tuple(f"concept{i}" for i in range(N_CONCEPTS)))
    w = GalleryWriter(root, feature_dim=DIM, concepts=vocab, map_size=1 << 32)
    boxes = np.tile(np.array([[4, 8, 120, 96]], np.float32), (PER_IMAGE, 1))
    feats = np.zeros((PER_IMAGE, DIM), np.float16)
    written = image = shard = 0
    while written < n_patches:
        n_shard = min(images_per_shard * PER_IMAGE, n_patches - written)
        concepts = rng.choice(N_CONCEPTS, n_shard, p=zipf)
        confs = np.round(rng.uniform(0.2, 1.0, n_shard), 3).astype(np.float32)
        with w.shard(f"shard-{shard:06d}") as s:
            for a in range(0, n_shard, PER_IMAGE):
                n = min(PER_IMAGE, n_shard - a)
                s.add_image(f"img{image:09d}", f"/data/{image % 1000:03d}/{image:09d}.jpg", 640, 480,
                            boxes[:n], feats[:n], concepts[a: a + n], confs[a: a + n])
                image += 1
        written += n_shard
        shard += 1
    w.close()
    return image


def child_finalize(root: str, memory_mb: str) -> dict:
    from vlmixer.storage.finalize_budget import SortBudget
    from vlmixer.storage.gallery_finalize import finalize_gallery

    base = peak_rss_mb()
    t0 = time.perf_counter()
    m = finalize_gallery(root, None if memory_mb == "none" else int(memory_mb))
    runs = 1 if memory_mb == "none" else -(-m["patches"] // SortBudget.from_memory_mb(int(memory_mb)).run_records)
    return {"patches": m["patches"], "seconds": round(time.perf_counter() - t0, 2), "runs": runs,
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_imports_mb": round(base, 1)}


def index_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((root / "index").iterdir()):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def bench_finalize(a: argparse.Namespace) -> None:
    print(f"gallery finalize: peak RSS (VmHWM) of the finalizing process, {PER_IMAGE} patches per image, "
          f"{N_CONCEPTS} concepts, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}")
    print(f"{'patches':>12} {'path':>10} {'peak RSS MB':>12} {'after imports':>14} {'seconds':>8} "
          f"{'s per M':>8} {'runs':>5} {'write s':>8} {'load avg':>9}")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="vlmixer-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for n in a.sizes:
            root = work / f"gallery-{n}"
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.perf_counter()
            write_gallery(root, n)
            t_write = time.perf_counter() - t0
            paths = [str(m) for m in a.memory_mb] + (["none"] if n in a.in_memory else [])
            digests = {}
            for mem in paths:
                r = _child("finalize", str(root), mem)
                assert r["patches"] == n, r
                digests[mem] = index_digest(root) if len(paths) > 1 else ""
                label = f"{mem} MB" if mem != "none" else "in memory"
                print(f"{n:>12,} {label:>10} {r['peak_rss_mb']:>12.1f} {r['rss_after_imports_mb']:>14.1f} "
                      f"{r['seconds']:>8.1f} {r['seconds'] / (n / 1e6):>8.2f} {r['runs']:>5} {t_write:>8.0f} "
                      f"{os.getloadavg()[0]:>9.1f}", flush=True)
            if len(set(digests.values())) > 1:
                raise SystemExit(f"{n} patches: budgeted and in-memory index files differ")
            shutil.rmtree(root)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def args_finalize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    p.add_argument("--memory-mb", type=int, nargs="+", default=[512],
                   help="budgets to finalize each gallery with (several: how the number of runs costs)")
    p.add_argument("--in-memory", type=int, nargs="*", default=[1_000_000, 10_000_000],
                   help="sizes at which to also finalize in memory (and compare the index bytes)")
    p.add_argument("--work", help="where the galleries are written (default: a temporary folder)")


# ============================================================================ command line

# name -> (help, add its arguments, run it); the child measurements by kind
SECTIONS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "finalize": ("gallery finalize under --memory-mb: peak RSS and seconds per million patches",
                 args_finalize, bench_finalize),
}
CHILDREN: dict[str, Callable[..., dict]] = {"finalize": child_finalize}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        kind, *rest = argv[1:]
        print(json.dumps(CHILDREN[kind](*rest)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="section", required=True)
    for name, (help_, add_args, _) in SECTIONS.items():
        add_args(sub.add_parser(name, help=help_))
    a = ap.parse_args(argv)
    SECTIONS[a.section][2](a)


if __name__ == "__main__":
    main()
