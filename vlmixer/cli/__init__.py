"""The `vlmixer` command: one argparse tree, filled by the modules of `vlmixer.cli.commands`.

Each module there defines `register(tree)` and adds its subcommands, so jobs
can be added without touching this file. Handlers take the parsed namespace
and return an exit code; `main(argv)` takes a list so tests run the CLI
in-process. Heavy imports (torch, ray, spacy) happen inside handlers, which
keeps `vlmixer --help` instant.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence

from vlmixer.errors import VlmixerError

Handler = Callable[[argparse.Namespace], int]

GROUP_HELP = {
    "gallery": "patch gallery (LMDB): build, info, show, finalize",
    "text": "text store (HDF5): tag, info, show, dump, concepts, vocab",
    "mix": "Cross-Modal CutMix: render or sample multi-modal sentences",
    "detector": "detector checkpoints: convert",
    "eval": "evaluation probes",
    "config": "bundled configs: list",
}


class CommandTree:
    """Top-level commands and command groups (`gallery build`, `text tag`, ...)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def command(self, name: str, handler: Handler, help: str, example: str) -> argparse.ArgumentParser:
        """A top-level command, e.g. `vlmixer verify`."""
        p = self._sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        return p

    def group(self, name: str) -> argparse._SubParsersAction:
        """The subcommand table of a group, created on first use."""
        if name not in self._groups:
            help = GROUP_HELP.get(name, f"{name} commands")
            g = self._sub.add_parser(name, help=help, description=help)
            g.set_defaults(handler=lambda a, g=g: (g.print_help(), 2)[1])
            self._groups[name] = g.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")
        return self._groups[name]

    def subcommand(self, group: str, name: str, handler: Handler, help: str, example: str
                   ) -> argparse.ArgumentParser:
        """A command inside a group, e.g. `vlmixer gallery info`; group help lives in GROUP_HELP."""
        sub = self.group(group)
        p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmixer",
        description="Unpaired vision-language pre-training with Cross-Modal CutMix.",
        epilog="example:\n  vlmixer demo --out demo_out",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tree = CommandTree(parser)
    import vlmixer.cli.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"vlmixer.cli.commands.{info.name}")
        module.register(tree)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except VlmixerError as e:
        print(f"vlmixer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmixer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
