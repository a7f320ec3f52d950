"""`vlmixer mix show|sample`: look at Cross-Modal CutMix output before training on it."""
from __future__ import annotations

import argparse
import json

from vlmixer.cli import CommandTree
from vlmixer.errors import VlmixerError


def _mixed(args: argparse.Namespace) -> tuple[list, object]:
    from vlmixer.storage.gallery import GalleryReader
    from vlmixer.storage.textstore import TextStoreReader
    from vlmixer.trainer.render import mixed_sentences

    if args.n < 1:
        raise VlmixerError(f"--n {args.n}: show at least one sentence")
    if not 0 <= args.r_cmc <= 1 or args.r_ctx < 0 or args.k_shot < 0:
        raise VlmixerError("--r-cmc must be in [0, 1], --r-ctx and --k-shot >= 0")
    gallery = GalleryReader(args.gallery)
    text = TextStoreReader(args.text, expect_concepts_sha256=gallery.concepts.sha256)
    if not 0 <= args.start < len(text):
        raise VlmixerError(f"--start {args.start}: the text store holds {len(text)} sentences")
    items = mixed_sentences(text, gallery, n=args.n, start=args.start, seed=args.seed, epoch=args.epoch,
                            r_cmc=args.r_cmc, r_ctx=args.r_ctx, k_shot=args.k_shot)
    return items, gallery


def _show(args: argparse.Namespace) -> int:
    from vlmixer.trainer.render import render_html, render_png

    suffix = args.out.lower().rsplit(".", 1)[-1]
    if suffix not in ("html", "htm", "png"):
        raise VlmixerError(f"--out {args.out}: write .html or .png")
    items, gallery = _mixed(args)
    out = (render_png if suffix == "png" else render_html)(items, gallery, args.out)
    n_rep = sum(w["replaced"] for it in items for w in it["words"])
    print(f"vlmixer mix show: {len(items)} sentences, {n_rep} words replaced by patches -> {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from vlmixer.trainer.render import as_jsonl_rows

    items, _ = _mixed(args)
    for row in as_jsonl_rows(items):
        if args.jsonl:
            print(json.dumps(row, ensure_ascii=False))
        else:
            picks = ", ".join(f"{w['text']}->{w['patch_id']}" for w in row["words"] if w["replaced"]) or "-"
            print(f"#{row['index']} {row['text']}  [{picks}]")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", required=True, help="text store (vlmixer text tag output)")
    p.add_argument("--gallery", required=True, help="patch gallery (vlmixer gallery build output)")
    p.add_argument("--n", type=int, default=8, help="number of sentences (default 8)")
    p.add_argument("--start", type=int, default=0, help="first sentence index")
    p.add_argument("--seed", type=int, default=0, help="run.seed of the training run to reproduce")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--r-cmc", type=float, default=0.5, dest="r_cmc")
    p.add_argument("--r-ctx", type=float, default=0.5, dest="r_ctx")
    p.add_argument("--k-shot", type=int, default=15, dest="k_shot")


def register(tree: CommandTree) -> None:
    p = tree.subcommand("mix", "show", _show,
                        help="Render multi-modal sentences (patch crops where the words were, concept, p_i) "
                             "exactly as the trainer mixes them",
                        example="vlmixer mix show --text text_store --gallery gallery --n 8 --out mix.html")
    _common(p)
    p.add_argument("--out", required=True, help="output file: .html or .png")
    p = tree.subcommand("mix", "sample", _sample, help="Print the patch ids CMC samples for each grounded word",
                        example="vlmixer mix sample --text text_store --gallery gallery --n 4 --jsonl")
    _common(p)
    p.add_argument("--jsonl", action="store_true", help="one json object per sentence")
