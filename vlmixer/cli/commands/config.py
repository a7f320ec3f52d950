"""`vlmixer config list`: the configs that ship inside the package, by the names `--config` takes."""
from __future__ import annotations

import argparse

from vlmixer.cli import CommandTree


def _list(args: argparse.Namespace) -> int:
    from vlmixer.config import bundled_config_dir, bundled_configs

    names = bundled_configs(args.kind)
    for name in names:
        print(name)
    if args.paths:
        print(f"(files under {bundled_config_dir()})")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.subcommand("config", "list", _list, help="list the bundled configs (names that --config accepts)",
                        example="vlmixer config list --kind detector")
    p.add_argument("--kind", choices=("detector", "pretrain"), default=None, help="only this kind")
    p.add_argument("--paths", action="store_true", help="also say where the files are")
