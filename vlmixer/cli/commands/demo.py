"""`vlmixer demo`: every stage end to end on bundled data (see vlmixer/demo.py)."""
from __future__ import annotations

import argparse

from vlmixer.cli import CommandTree


def _demo(args: argparse.Namespace) -> int:
    from vlmixer.demo import run_demo

    run_demo(args.out, size=args.size, detector_weights=args.detector_weights,
             detector_config=args.detector_config, labelmap=args.labelmap, ray_address=args.ray_address)
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command("demo", _demo, help="run gallery build, text tagging, training and pictures on bundled data",
                     example="vlmixer demo --out demo_out")
    p.add_argument("--out", default="demo_out", help="output directory (must be empty or absent)")
    p.add_argument("--size", choices=["full", "small"], default="full",
                   help="full: ~250 images, 300 captions, 300 steps (a few minutes); small: for tests")
    p.add_argument("--detector-weights", default=None, metavar="CKPT",
                   help="detector checkpoint (e.g. converted VinVL); without it the tiny detector has random "
                        "weights and labels are arbitrary")
    p.add_argument("--detector-config", default=None, metavar="CFG",
                   help="the checkpoint's config, a file or bundled name, e.g. vinvl_x152c4 (default: tiny)")
    p.add_argument("--labelmap", default=None, metavar="JSON",
                   help="the checkpoint's label map (VG-SGG-dicts-vgoi6-clipped.json); needed with weights")
    p.add_argument("--ray-address", default="local", help="'local' (default), 'auto', or 'none' for no Ray")
