"""Store inspection: `verify`, `gallery info`, `text info`."""
from __future__ import annotations

import argparse
import json

from vlmixer.cli import CommandTree


def _verify(args: argparse.Namespace) -> int:
    from vlmixer.storage.verify import store_kind, verify_store

    bad = 0
    for path in args.stores:
        kind = store_kind(path)
        problems = verify_store(path, quick=args.quick)
        if problems:
            bad += 1
            print(f"{path}: {kind} store has {len(problems)} problem(s):")
            for p in problems[: args.max_problems]:
                print(f"  - {p}")
            if len(problems) > args.max_problems:
                print(f"  ... and {len(problems) - args.max_problems} more")
        else:
            print(f"{path}: {kind} store OK")
    return 1 if bad else 0


def _gallery_info(args: argparse.Namespace) -> int:
    from vlmixer.storage.verify import format_info, gallery_info

    info = gallery_info(args.gallery)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def _text_info(args: argparse.Namespace) -> int:
    from vlmixer.storage.verify import format_info, text_info

    info = text_info(args.store)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command("verify", _verify, help="check the integrity of galleries and text stores",
                     example="vlmixer verify out/gallery out/text")
    p.add_argument("stores", nargs="+", metavar="STORE", help="gallery or text store directory")
    p.add_argument("--max-problems", type=int, default=50, help="problems to print per store")
    p.add_argument("--quick", action="store_true",
                   help="check structure and indexes only, not every block's checksum or every shard's bytes")

    p = tree.subcommand("gallery", "info", _gallery_info, help="counts, vocabularies, provenance, size on disk",
                        example="vlmixer gallery info out/gallery")
    p.add_argument("gallery", metavar="GALLERY")
    p.add_argument("--json", action="store_true", help="print json")

    p = tree.subcommand("text", "info", _text_info, help="counts, vocabularies, provenance, size on disk",
                        example="vlmixer text info out/text")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--json", action="store_true", help="print json")
