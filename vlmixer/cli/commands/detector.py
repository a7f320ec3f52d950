"""`vlmixer detector ...`: checkpoint conversion for the region detector."""
from __future__ import annotations

import argparse

from vlmixer.cli import CommandTree
from vlmixer.errors import VlmixerError


def _convert(args: argparse.Namespace) -> int:
    from vlmixer.pipeline.detector.convert import convert_file

    config = args.config or ("detector/vinvl_x152c4" if args.source == "vinvl" else "detector/butd_r101c4")
    if args.labelmap is None and args.concept_vocab is None:
        raise VlmixerError("give the class names: --labelmap JSON or --concept-vocab TXT")
    meta = convert_file(args.source, args.checkpoint, config, args.out, labelmap=args.labelmap,
                        concept_vocab=args.concept_vocab, attribute_vocab=args.attribute_vocab,
                        overrides=args.override)
    print(f"wrote {args.out}: config {meta['config_name']}, {meta['num_classes']} classes, "
          f"{meta['num_attributes']} attributes, source sha256 {meta['source_sha256'][:12]}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.subcommand(
        "detector", "convert", _convert,
        help="convert a VinVL (maskrcnn-benchmark) or bottom-up attention detector checkpoint to vlmixer's model",
        example="vlmixer detector convert --from vinvl vinvl_vg_x152c4.pth "
                "--labelmap VG-SGG-dicts-vgoi6-clipped.json --out vinvl_x152c4.pth")
    p.add_argument("checkpoint", help="source checkpoint: .pth (loaded with weights_only=True) or, for butd, "
                   "airsplay's numpy .pkl (read by an unpickler that admits only arrays, numbers, strings, "
                   "lists and dicts)")
    p.add_argument("--from", dest="source", default="vinvl", choices=["vinvl", "butd"],
                   help="checkpoint family: vinvl (scene_graph_benchmark) or butd (bottom-up-attention.pytorch "
                        ".pth, py-bottom-up-attention .pkl)")
    p.add_argument("--config", default=None,
                   help="detector yaml or bundled name (default: vinvl_x152c4, or butd_r101c4 with --from butd)")
    p.add_argument("--labelmap", default=None, help="label map json (label_to_idx, attribute_to_idx; 1-based)")
    p.add_argument("--concept-vocab", default=None, help="class names, one per line (instead of --labelmap)")
    p.add_argument("--attribute-vocab", default=None, help="attribute names, one per line")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable")
    p.add_argument("--out", required=True, help="output .pth ({'model': ..., 'vlmixer': provenance})")
