"""Scale benchmark: memory must follow a budget or the work in flight, not the data.

    .venv/bin/python bench/scale.py finalize [--sizes 1000000 10000000 50000000] [--memory-mb 512 ...]
                                             [--in-memory 1000000 10000000] [--work DIR]
    .venv/bin/python bench/scale.py plan [--sizes 1000000 5000000 20000000] [--legacy 1000000]
    .venv/bin/python bench/scale.py text [--lines 1000000 10000000]

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

plan  The gallery build's planning, as the driver runs it: a list file of N
      `key<TAB>path` lines is listed, sorted on disk by the seeded shard order,
      checked for repeated keys, and every shard is produced and handed on (as
      the run loop takes them), with an empty store so every shard is to do.
      `--legacy N` also measures the in-memory plan (`read_source` +
      `make_shards`) that the build used before, for comparison.
      `--retry N ...` groups N failure records into retry shards (the
      `--retry-failed` plan; records generated, not read from a store).
      `--tars N ...` plans N webdataset tars of 1,000 samples each (tiny
      members): the plan reads one tar at a time, so the peak must not grow
      with N.
text  The `text tag` driver over an N-line txt corpus: counting, streaming
      shards of 10,000 lines, committing them and the manifest, with progress.
      The shard callable is a stand-in that decodes each shard's lines and
      commits an empty store shard (spaCy tagging at 10M lines would take
      hours on this machine and runs in workers, not in the driver); the
      driver still loads spaCy, the mapping and the tokenizer as `text tag` does.
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


# ============================================================================ planning (gallery)


def write_list(path: Path, n: int) -> None:
    """n `key<TAB>path` lines, like a list file of a large collection (paths need not exist)."""
    with open(path, "w", encoding="utf-8") as f:
        step = 100_000
        for a in range(0, n, step):
            f.write("".join(f"img{i:09d}\t/data/collection/{i % 1000:03d}/{i:09d}.jpg\n"
                            for i in range(a, min(n, a + step))))


def write_tars(folder: Path, n_tars: int, per_tar: int = 1000) -> str:
    """n_tars webdataset tars of `per_tar` samples (a 100-byte .jpg and a .txt each); the glob."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    data = bytes(100)
    for t in range(n_tars):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tf:
            for i in range(per_tar):
                for ext, payload in (("jpg", data), ("txt", b"a caption")):
                    ti = tarfile.TarInfo(f"{t * per_tar + i:09d}.{ext}")
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
    return str(folder / "*.tar")


def child_retry(n: str) -> dict:
    from vlmixer.pipeline.gallery.plan import retry_shards, spill_folder

    base = peak_rss_mb()
    t0 = time.perf_counter()
    failures = ({"key": f"img{i:09d}", "path": f"/data/collection/{i:09d}.jpg", "shard": f"s0-256-{i % 39_063:06d}",
                 "part": "part-00000"} for i in range(int(n)))
    shards = images = 0
    with spill_folder() as spill:
        count, todo = retry_shards(failures, 1, spill)
        for s in todo:
            shards += 1
            images += len(s.items)
    return {"images": images, "shards": shards, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_imports_mb": round(base, 1)}


def bench_retry(counts: list[int]) -> None:
    print(f"{'failures':>12} {'peak RSS MB':>12} {'after imports':>14} {'seconds':>8} {'shards':>8}")
    for n in counts:
        r = _child("retry", str(n))
        assert r["images"] == n, r
        print(f"{n:>12,} {r['peak_rss_mb']:>12.1f} {r['rss_after_imports_mb']:>14.1f} {r['seconds']:>8.1f} "
              f"{r['shards']:>8,}", flush=True)


def child_plan(list_file: str, mode: str) -> dict:
    from vlmixer.pipeline.gallery.job import BuildOptions, BuildReport, plan, source_plan
    from vlmixer.pipeline.gallery.plan import spill_folder
    from vlmixer.pipeline.gallery.sources import make_shards, read_source

    base = peak_rss_mb()
    t0 = time.perf_counter()
    shards = images = 0
    if mode == "legacy":
        for s in make_shards(read_source(list_file), 256, seed=0):
            shards += 1
            images += len(s.items)
    else:
        with tempfile.TemporaryDirectory() as out, spill_folder() as spill:
            opts = BuildOptions(images=(list_file,), detector="unused.yaml", out=str(Path(out) / "g"))
            source = source_plan(opts, spill)
            todo, _ = plan(opts, source, {}, BuildReport(out=opts.out), spill)
            for s in todo:
                shards += 1
                images += len(s.items)
    return {"images": images, "shards": shards, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_imports_mb": round(base, 1)}


def bench_tars(counts: list[int]) -> None:
    print(f"{'tars':>12} {'samples':>9} {'peak RSS MB':>12} {'after imports':>14} {'seconds':>8} {'shards':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            pattern = write_tars(Path(tmp) / f"tars-{n}", n)
            r = _child("plan", pattern, "streaming")
            print(f"{n:>12,} {r['images']:>9,} {r['peak_rss_mb']:>12.1f} {r['rss_after_imports_mb']:>14.1f} "
                  f"{r['seconds']:>8.1f} {r['shards']:>8,}", flush=True)


def bench_plan(sizes: list[int], legacy: list[int]) -> None:
    print(f"gallery planning: driver peak RSS (VmHWM) over a list file, shard size 256; {time.strftime('%Y-%m-%d')}")
    print(f"{'images':>12} {'plan':>9} {'peak RSS MB':>12} {'after imports':>14} {'seconds':>8} {'shards':>8}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(set(sizes) | set(legacy)):
            lst = Path(tmp) / f"list-{n}.txt"
            write_list(lst, n)
            for mode in (["streaming"] if n in sizes else []) + (["legacy"] if n in legacy else []):
                r = _child("plan", str(lst), mode)
                assert r["images"] == n, r
                rows[(n, mode)] = r
                print(f"{n:>12,} {mode:>9} {r['peak_rss_mb']:>12.1f} {r['rss_after_imports_mb']:>14.1f} "
                      f"{r['seconds']:>8.1f} {r['shards']:>8,}", flush=True)
            lst.unlink()
    s = sorted(n for n, m in rows if m == "streaming")
    if len(s) > 1:
        a, b = rows[(s[0], "streaming")]["peak_rss_mb"], rows[(s[-1], "streaming")]["peak_rss_mb"]
        print(f"growth {s[0]:,} -> {s[-1]:,} images: {b / a:.2f}x peak RSS")


# ============================================================================ text job driver


def write_corpus(path: Path, n: int) -> None:
    words = ["a man", "two dogs", "the red car", "a woman", "three horses", "a bike"]
    verbs = ["walks past", "waits near", "looks at", "runs toward"]
    with open(path, "w", encoding="utf-8") as f:
        step = 200_000
        for a in range(0, n, step):
            f.write("".join(f"{words[i % 6]} {verbs[(i // 6) % 4]} {words[(i // 24) % 6]} number {i}.\n"
                            for i in range(a, min(n, a + step))))


def child_text(corpus: str) -> dict:
    from vlmixer.pipeline.text import job
    from vlmixer.pipeline.text.corpus import decode_items, open_corpus_files
    from vlmixer.pipeline.text.resolve import build_mapping
    from vlmixer.pipeline.text.spacy_model import load_spacy, model_label, resolve_model_name
    from vlmixer.pipeline.text.wordpiece import resolve_tokenizer
    from vlmixer.storage.vocab import Vocabulary

    concepts = Vocabulary(names=("man", "dog", "car", "woman", "horse", "bike"))

    def stand_in(self, task):  # noqa: ANN001, ANN202  decodes like the worker, tags nothing
        records, skipped, _ = decode_items(task, max_record_chars=self.config.max_record_chars)
        _, _, writer = self._setup()
        stats = {"shard": task.name, "records": len(task.items), "records_ok": len(records), "sentences": 0,
                 "grounded_sentences": 0, "spans": 0, "wordpieces": 0, "skipped": dict(skipped),
                 "bad_examples": []}
        writer.write_shard(task.name, [], stats)
        return stats

    job.TagShard.__call__ = stand_in  # type: ignore[method-assign]
    nlp = load_spacy(resolve_model_name(None))
    base = peak_rss_mb()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        config = job.TagJobConfig(out=str(Path(out) / "store"), inputs=open_corpus_files([corpus]),
                                  concepts=concepts, mapping=build_mapping(concepts, nlp),
                                  spacy_model=resolve_model_name(None), spacy_label=model_label(nlp),
                                  tokenizer=resolve_tokenizer(None, cache_dir=out))
        m = job.run_tag_job(config, progress=False, nlp=nlp)
    return {"records": m["summary"]["records"], "shards": m["summary"]["shards"],
            "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_after_spacy_mb": round(base, 1)}


def bench_text(lines: list[int]) -> None:
    print(f"text tag driver: peak RSS (VmHWM) over a txt corpus, shards of 10,000 lines; {time.strftime('%Y-%m-%d')}")
    print(f"{'lines':>12} {'peak RSS MB':>12} {'after spaCy':>12} {'seconds':>8} {'shards':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in lines:
            corpus = Path(tmp) / f"corpus-{n}.txt"
            write_corpus(corpus, n)
            r = _child("text", str(corpus))
            assert r["records"] == n, r
            print(f"{n:>12,} {r['peak_rss_mb']:>12.1f} {r['rss_after_spacy_mb']:>12.1f} {r['seconds']:>8.1f} "
                  f"{r['shards']:>7,}", flush=True)
            corpus.unlink()


def args_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 5_000_000, 20_000_000])
    p.add_argument("--legacy", type=int, nargs="*", default=[1_000_000],
                   help="sizes at which to also measure the in-memory plan")
    p.add_argument("--tars", type=int, nargs="*", default=[],
                   help="also plan this many webdataset tars of 1,000 samples (e.g. 10 100)")
    p.add_argument("--retry", type=int, nargs="*", default=[],
                   help="also group this many failure records into retry shards (e.g. 100000 1000000)")


def run_plan(a: argparse.Namespace) -> None:
    if a.sizes:
        bench_plan(a.sizes, a.legacy)
    if a.tars:
        bench_tars(a.tars)
    if a.retry:
        bench_retry(a.retry)


def args_text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lines", type=int, nargs="+", default=[1_000_000, 10_000_000])


def run_text(a: argparse.Namespace) -> None:
    bench_text(a.lines)


# ============================================================================ command line

# name -> (help, add its arguments, run it); the child measurements by kind
SECTIONS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "finalize": ("gallery finalize under --memory-mb: peak RSS and seconds per million patches",
                 args_finalize, bench_finalize),
    "plan": ("gallery planning: driver peak RSS over N listed images", args_plan, run_plan),
    "text": ("text tag driver: peak RSS over an N-line corpus", args_text, run_text),
}
CHILDREN: dict[str, Callable[..., dict]] = {"finalize": child_finalize, "plan": child_plan, "retry": child_retry,
                                            "text": child_text}


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
