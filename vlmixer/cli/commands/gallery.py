"""`vlmixer gallery build | import | export | report | show | finalize` (`gallery info` lives in stores.py).

Thin wiring: arguments -> `pipeline.gallery` functions, which are the Python
API too. The build's defaults come from `BuildOptions` (a light module);
heavy imports happen inside the handlers.
"""
from __future__ import annotations

import argparse

from vlmixer.cli import CommandTree
from vlmixer.pipeline.gallery.options import DECODE_MODES, default
from vlmixer.storage.finalize_budget import DEFAULT_FINALIZE_MEMORY_MB, MIN_FINALIZE_MEMORY_MB


def _build(a: argparse.Namespace) -> int:
    from vlmixer.config import resolve_config
    from vlmixer.pipeline.gallery.job import BuildOptions, build_gallery

    opts = BuildOptions(
        images=a.images[0] if len(a.images) == 1 else tuple(a.images),
        detector=str(resolve_config(a.detector, "detector")), out=a.out, weights=a.weights, image_root=a.image_root,
        labelmap=a.labelmap, vocab=a.vocab, ray_address=a.ray_address, num_cpus=a.num_cpus,
        shard_size=a.shard_size, batch_size=a.batch_size, num_gpus_per_worker=a.num_gpus_per_worker,
        cpu_workers=a.cpu_workers, threads=a.threads, retry_failed=a.retry_failed, seed=a.seed, device=a.device,
        strict_modes=not a.convert_modes, max_pixels=a.max_pixels, decode=a.decode, boxes=a.boxes,
        box_synonyms=a.box_synonyms == "wordnet",
        progress=False if a.no_progress else None, max_listed=a.max_listed,
        finalize_memory_mb=a.finalize_memory_mb, image_column=a.image_column, key_column=a.key_column,
    )
    report = build_gallery(opts)
    print(report.summary(opts.max_listed))
    return report.exit_code


def _show(a: argparse.Namespace) -> int:
    from vlmixer.pipeline.gallery.render import render_concept

    info = render_concept(a.gallery, a.concept, a.out, max_patches=a.max_patches, columns=a.columns,
                          cell=a.cell, image_root=a.image_root)
    print(f"{a.out}: {info['shown']} of {info['total']} patches of concept {info['concept']!r} "
          f"(id {info['concept_id']})")
    return 0


def _finalize(a: argparse.Namespace) -> int:
    from vlmixer.storage.gallery_finalize import finalize_gallery
    from vlmixer.storage.gallery_writer import build_lock

    with build_lock(a.gallery):  # not while a build writes it
        m = finalize_gallery(a.gallery, a.memory_mb)
    print(f"{a.gallery}: index rebuilt: {m['images']} images, {m['patches']} patches, {m['failed']} failed")
    return 0


def _import(a: argparse.Namespace) -> int:
    from vlmixer.pipeline.gallery.imports import ImportOptions, import_gallery

    opts = ImportOptions(
        format=a.format, inputs=tuple(a.input), out=a.out, vocab=a.vocab, labelmap=a.labelmap,
        attribute_vocab=a.attribute_vocab, concepts=a.concepts, id_base=a.id_base, feature_dim=a.feature_dim,
        image_pattern=a.image_pattern, shard_size=a.shard_size, ray_address=a.ray_address, num_cpus=a.num_cpus,
        progress=False if a.no_progress else None, max_listed=a.max_listed)
    report = import_gallery(opts)
    print(report.summary(opts.max_listed))
    return report.exit_code


def _export(a: argparse.Namespace) -> int:
    from vlmixer.pipeline.gallery.exports import export_gallery

    r = export_gallery(a.gallery, a.out, a.format, columns=a.columns)
    print(f"{r['out']}: {r['images']} images, {r['patches']} patches as {r['format']} (float32); "
          f"vocabularies: {', '.join(r['vocabularies'])}")
    return 0


def _report(a: argparse.Namespace) -> int:
    from vlmixer.pipeline.gallery.report import write_report

    r = write_report(a.gallery, a.out, image_root=a.image_root, top=a.top, strip=a.strip)
    print(f"{r['out']}: {r['images']} images, {r['patches']} patches, {r['failed']} failed, "
          f"{r['concepts_with_patches']} of {r['concepts']} concepts with patches")
    for n in r["notes"]:
        print(f"note: {n}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.subcommand(
        "gallery", "build", _build,
        help="detect regions in an image collection and write an LMDB patch gallery (Ray, resumable)",
        example="vlmixer gallery build --images coco/val2014 --detector tiny "
                "--labelmap labelmap.json --out gallery --ray-address local")
    p.add_argument("--images", required=True, nargs="+", metavar="SRC",
                   help="a folder of images, a .txt list of paths (or key<TAB>path), a COCO/VG json, or "
                        "webdataset .tar shards / .parquet files as img2dataset writes them (several, a glob, "
                        "or brace notation such as 'shards/{00000..00999}.tar'; quote it)")
    p.add_argument("--image-column", default=default("image_column"), metavar="COL",
                   help="parquet: the column of image bytes or image paths (default jpg)")
    p.add_argument("--key-column", default=default("key_column"), metavar="COL",
                   help="parquet: the column of sample keys (default key; FILE/ROW when absent)")
    p.add_argument("--image-root", metavar="DIR",
                   help="where relative paths of a list file or json point (default: its directory)")
    p.add_argument("--detector", required=True, metavar="CONFIG", help="detector config: a yaml file or a bundled name (vinvl_x152c4, butd_r101c4, tiny)")
    p.add_argument("--weights", metavar="CKPT", help="detector checkpoint (default: random weights, tests only)")
    p.add_argument("--labelmap", metavar="JSON",
                   help="VinVL-style label map naming the classes/attributes, when the detector does not")
    p.add_argument("--vocab", metavar="TXT", help="concept vocabulary file (one class per line), instead of --labelmap")
    p.add_argument("--out", required=True, metavar="GALLERY", help="gallery directory (resumed if it exists)")
    p.add_argument("--ray-address", default=default("ray_address"), metavar="ADDR",
                   help="'local' starts Ray here, 'auto' joins the running cluster, an address "
                        "joins that one, 'none' runs in this process without Ray (default %(default)s)")
    p.add_argument("--num-cpus", type=int, default=default("num_cpus"), metavar="N",
                   help="CPUs for a local Ray (default: all)")
    p.add_argument("--shard-size", type=int, default=default("shard_size"), metavar="N",
                   help="images per shard, the unit of commit and resume (default %(default)s); "
                        "keep it when resuming")
    p.add_argument("--batch-size", type=int, default=default("batch_size"), metavar="B",
                   help="images per detector batch (default %(default)s)")
    p.add_argument("--num-gpus-per-worker", type=float, default=default("num_gpus_per_worker"), metavar="G",
                   help="GPUs per detector actor (default %(default)s; 0.5 puts two on a GPU; 0 forces CPU actors)")
    p.add_argument("--cpu-workers", type=int, default=default("cpu_workers"), metavar="N",
                   help="detector actors when there is no GPU (default: one per CPU, 2 threads each above 8 CPUs)")
    p.add_argument("--threads", type=int, default=default("threads"), metavar="N",
                   help="torch threads of a CPU detector (in-process, or each CPU actor); "
                        "default: torch's own in-process, 1-2 per actor")
    p.add_argument("--retry-failed", action="store_true",
                   help="also re-run the images recorded as failed by earlier runs")
    p.add_argument("--seed", type=int, default=default("seed"),
                   help="seed of the shard assignment (default %(default)s)")
    p.add_argument("--device", default=default("device"),
                   help="device with --ray-address none: auto, cpu, cuda[:N] (default %(default)s)")
    p.add_argument("--convert-modes", action="store_true",
                   help="convert CMYK, 16-bit and alpha images to RGB (listed as converted) instead of "
                        "recording them as failed")
    p.add_argument("--max-pixels", type=int, default=default("max_pixels"), metavar="N",
                   help="larger images are refused as decompression bombs (default: Pillow's %(default)s)")
    p.add_argument("--decode", choices=list(DECODE_MODES), default=default("decode"),
                   help="standard: EXIF orientation, alpha on white (default); reference: as VinVL's extractor, "
                        "Image.open().convert('RGB'), no EXIF rotation (recorded in the provenance)")
    p.add_argument("--boxes", metavar="ANNOTATIONS",
                   help="features at these boxes instead of detected ones: COCO instances json, Visual Genome "
                        "objects json, or jsonl {image, boxes:[[x1,y1,x2,y2]], labels:[...]}; the category maps "
                        "to a concept by name, variant or WordNet synonym; confidence 1.0")
    p.add_argument("--box-synonyms", choices=["wordnet", "off"], default="wordnet",
                   help="map --boxes categories through WordNet synonyms too (default %(default)s)")
    p.add_argument("--max-listed", type=int, default=default("max_listed"), metavar="N",
                   help="failures listed in the summary (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--finalize-memory-mb", type=int, default=default("finalize_memory_mb"), metavar="MB",
                   help="peak memory of the finalize step; larger galleries sort on disk (default %(default)s)")

    s = tree.subcommand(
        "gallery", "show", _show,
        help="draw a grid of one concept's patches, cropped from their source images, with confidences",
        example="vlmixer gallery show gallery dog --out dog.png")
    s.add_argument("gallery", help="gallery directory")
    s.add_argument("concept", help="concept name (or any of its variants) or numeric id")
    s.add_argument("--out", required=True, metavar="FILE.png", help="picture to write")
    s.add_argument("--max-patches", type=int, default=48, metavar="N", help="patches shown, best first (default 48)")
    s.add_argument("--columns", type=int, default=8, help="grid columns (default 8)")
    s.add_argument("--cell", type=int, default=128, metavar="PX", help="cell size in pixels (default 128)")
    s.add_argument("--image-root", metavar="DIR", help="look source images up here when their stored path moved")

    f = tree.subcommand(
        "gallery", "finalize", _finalize,
        help="rebuild a gallery's concept index and manifest from its committed shards",
        example="vlmixer gallery finalize gallery")
    f.add_argument("gallery", help="gallery directory")
    f.add_argument("--memory-mb", type=int, default=DEFAULT_FINALIZE_MEMORY_MB, metavar="MB",
                   help="peak memory: the concept index is sorted on disk in runs that fit it, so any "
                        f"gallery size finalizes within it (default %(default)s, at least {MIN_FINALIZE_MEMORY_MB})")


    i = tree.subcommand(
        "gallery", "import", _import,
        help="turn released region features (VinVL TSV, bottom-up-attention/LXMERT TSV, MILVLG npz) into a "
             "gallery (Ray, resumable)",
        example="vlmixer gallery import --format butd-tsv --input train2014_obj36.tsv "
                "--vocab objects_vocab.txt --attribute-vocab attributes_vocab.txt --out gallery")
    i.add_argument("--format", required=True, choices=("vinvl-tsv", "butd-tsv", "npz"),
                   help="vinvl-tsv: features.tsv + predictions.tsv; butd-tsv: bottom-up-attention's or "
                        "LXMERT's TSV; npz: a folder of MILVLG per-image .npz")
    i.add_argument("--input", required=True, nargs="+", metavar="FILE",
                   help="the file(s) to import (VinVL: its features.tsv and predictions.tsv; npz: a folder)")
    i.add_argument("--out", required=True, metavar="GALLERY", help="gallery directory (resumed if it exists)")
    i.add_argument("--vocab", metavar="TXT", help="concept vocabulary, one entry per line (e.g. objects_vocab.txt)")
    i.add_argument("--labelmap", metavar="JSON", help="VinVL label map (label_to_idx, attribute_to_idx) instead")
    i.add_argument("--attribute-vocab", metavar="TXT", help="attribute names, one per line (attributes_vocab.txt)")
    i.add_argument("--concepts", choices=("none",),
                   help="'none' imports a file without labels; Cross-Modal CutMix cannot use such a gallery")
    i.add_argument("--id-base", type=int, metavar="N",
                   help="the file's id of the first vocabulary entry (default 1 for npz, whose 0 is background; "
                        "else 0)")
    i.add_argument("--feature-dim", type=int, metavar="D", help="feature size (default: from the first row)")
    i.add_argument("--image-pattern", metavar="PATTERN",
                   help="where the source images are, for reports and pictures, e.g. 'coco/{key}.jpg'")
    i.add_argument("--shard-size", type=int, default=256, metavar="N",
                   help="rows per shard, the unit of commit and resume (default 256); keep it when resuming")
    i.add_argument("--ray-address", default="local", metavar="ADDR",
                   help="'local' starts Ray here (default), 'auto' or an address joins a cluster, 'none' "
                        "runs in this process")
    i.add_argument("--num-cpus", type=int, metavar="N", help="CPUs for a local Ray (default: all)")
    i.add_argument("--max-listed", type=int, default=50, metavar="N", help="bad rows listed in the summary")
    i.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")

    e = tree.subcommand(
        "gallery", "export", _export,
        help="write a gallery as LXMERT/bottom-up-attention TSV or MILVLG npz (float32) for other tools",
        example="vlmixer gallery export gallery --format butd-tsv --out features/gallery_obj.tsv")
    e.add_argument("gallery", help="gallery directory")
    e.add_argument("--format", required=True, choices=("butd-tsv", "npz"), help="output format")
    e.add_argument("--out", required=True, metavar="PATH", help="the .tsv file, or the folder for npz")
    e.add_argument("--columns", default="lxmert", choices=("lxmert", "butd"),
                   help="butd-tsv only: LXMERT's 10 columns with labels (default) or bottom-up-attention's 6")

    r = tree.subcommand(
        "gallery", "report", _report,
        help="one self-contained HTML page: counts, provenance, histograms, frequent/rare concepts with "
             "patch strips, failures",
        example="vlmixer gallery report gallery --out report.html")
    r.add_argument("gallery", help="gallery directory")
    r.add_argument("--out", required=True, metavar="FILE.html", help="page to write")
    r.add_argument("--image-root", metavar="DIR", help="look source images up here when their stored path moved")
    r.add_argument("--top", type=int, default=30, metavar="N", help="most and least frequent concepts listed (30)")
    r.add_argument("--strip", type=int, default=8, metavar="N", help="patches per concept strip (8)")
