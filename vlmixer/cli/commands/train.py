"""`vlmixer train --config CFG [key=value ...] [--resume]`: pre-training (one process or torchrun)."""
from __future__ import annotations

import argparse

from vlmixer.cli import CommandTree


def _train(args: argparse.Namespace) -> int:
    from vlmixer.trainer.loop import load_train_config, train

    cfg = load_train_config(args.config, args.overrides)
    res = train(cfg, resume=args.resume)
    print(f"vlmixer train: done at step {res['step']}; outputs in {res['out_dir']}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command(
        "train", _train,
        help="Pre-train VLMixer (VALP with Cross-Modal CutMix, TAVP) from a gallery and text stores; "
             "run under torchrun for several processes/GPUs.",
        example="vlmixer train --config pretrain/tiny data.gallery=G data.text_stores=[T] "
                "run.out_dir=runs/tiny\n  torchrun --nproc_per_node 8 -m vlmixer train --config "
                "vlmixer_base ... --resume",
    )
    p.add_argument("--config", required=True,
                   help="YAML config file or bundled name (vlmixer config list); every key: trainer/config.py")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the latest checkpoint in run.out_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-4")
