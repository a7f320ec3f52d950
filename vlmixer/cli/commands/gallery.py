"""`vlmixer gallery build | show | finalize` (`gallery info` lives in stores.py).

Thin wiring: arguments -> `pipeline.gallery` functions, which are the Python
API too. Heavy imports happen inside the handlers.
"""
from __future__ import annotations

import argparse

from vlmixer.cli import CommandTree


def _build(a: argparse.Namespace) -> int:
    from vlmixer.pipeline.gallery.job import BuildOptions, build_gallery

    opts = BuildOptions(
        images=a.images[0] if len(a.images) == 1 else tuple(a.images), detector=a.detector, out=a.out,
        weights=a.weights, image_root=a.image_root,
        labelmap=a.labelmap, vocab=a.vocab, ray_address=a.ray_address, num_cpus=a.num_cpus,
        shard_size=a.shard_size, batch_size=a.batch_size, num_gpus_per_worker=a.num_gpus_per_worker,
        cpu_workers=a.cpu_workers, threads=a.threads, retry_failed=a.retry_failed, seed=a.seed, device=a.device,
        strict_modes=not a.convert_modes, max_pixels=a.max_pixels,
        progress=False if a.no_progress else None, max_listed=a.max_listed,
        image_column=a.image_column, key_column=a.key_column,
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
    from vlmixer.storage.gallery import finalize_gallery

    m = finalize_gallery(a.gallery)
    print(f"{a.gallery}: index rebuilt: {m['images']} images, {m['patches']} patches, {m['failed']} failed")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.subcommand(
        "gallery", "build", _build,
        help="detect regions in an image collection and write an LMDB patch gallery (Ray, resumable)",
        example="vlmixer gallery build --images coco/val2014 --detector configs/detector/tiny.yaml "
                "--labelmap labelmap.json --out gallery --ray-address local")
    p.add_argument("--images", required=True, nargs="+", metavar="SRC",
                   help="a folder of images, a .txt list of paths (or key<TAB>path), a COCO/VG json, or "
                        "webdataset .tar shards / .parquet files as img2dataset writes them (several, a glob, "
                        "or brace notation such as 'shards/{00000..00999}.tar'; quote it)")
    p.add_argument("--image-column", default="jpg", metavar="COL",
                   help="parquet: the column of image bytes or image paths (default jpg)")
    p.add_argument("--key-column", default="key", metavar="COL",
                   help="parquet: the column of sample keys (default key; FILE/ROW when absent)")
    p.add_argument("--image-root", metavar="DIR",
                   help="where relative paths of a list file or json point (default: its directory)")
    p.add_argument("--detector", required=True, metavar="CONFIG", help="detector config yaml")
    p.add_argument("--weights", metavar="CKPT", help="detector checkpoint (default: random weights, tests only)")
    p.add_argument("--labelmap", metavar="JSON",
                   help="VinVL-style label map naming the classes/attributes, when the detector does not")
    p.add_argument("--vocab", metavar="TXT", help="concept vocabulary file (one class per line), instead of --labelmap")
    p.add_argument("--out", required=True, metavar="GALLERY", help="gallery directory (resumed if it exists)")
    p.add_argument("--ray-address", default="local", metavar="ADDR",
                   help="'local' starts Ray here (default), 'auto' joins the running cluster, an address "
                        "joins that one, 'none' runs in this process without Ray")
    p.add_argument("--num-cpus", type=int, metavar="N", help="CPUs for a local Ray (default: all)")
    p.add_argument("--shard-size", type=int, default=256, metavar="N",
                   help="images per shard, the unit of commit and resume (default 256); keep it when resuming")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per detector batch (default 8)")
    p.add_argument("--num-gpus-per-worker", type=float, default=1.0, metavar="G",
                   help="GPUs per detector actor (default 1; 0.5 puts two on a GPU; 0 forces CPU actors)")
    p.add_argument("--cpu-workers", type=int, metavar="N",
                   help="detector actors when there is no GPU (default: one per CPU, 2 threads each above 8 CPUs)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads of a CPU detector (in-process, or each CPU actor); "
                        "default: torch's own in-process, 1-2 per actor")
    p.add_argument("--retry-failed", action="store_true",
                   help="also re-run the images recorded as failed by earlier runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the shard assignment (default 0)")
    p.add_argument("--device", default="auto", help="device with --ray-address none: auto, cpu, cuda[:N]")
    p.add_argument("--convert-modes", action="store_true",
                   help="convert CMYK, 16-bit and alpha images to RGB (listed as converted) instead of "
                        "recording them as failed")
    p.add_argument("--max-pixels", type=int, default=89_478_485, metavar="N",
                   help="larger images are refused as decompression bombs (default: Pillow's 89,478,485)")
    p.add_argument("--max-listed", type=int, default=50, metavar="N", help="failures listed in the summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")

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

