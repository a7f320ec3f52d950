"""`vlmixer mix show|sample`: look at Cross-Modal CutMix output before training on it."""
from __future__ import annotations

import argparse
import dataclasses
import json

from vlmixer.cli import CommandTree
from vlmixer.errors import VlmixerError


def _mixed(args: argparse.Namespace) -> tuple[list, object]:
    from vlmixer.storage.gallery import GalleryReader
    from vlmixer.storage.textstore import TextStoreReader
    from vlmixer.trainer.config import TrainConfig, validate_cmc
    from vlmixer.trainer.loop import run_config
    from vlmixer.trainer.render import mixed_sentences

    if args.n < 1:
        raise VlmixerError(f"--n {args.n}: show at least one sentence")
    cfg = run_config(args.config) if args.config else TrainConfig()
    cmc = {k: v for k, v in (("r_cmc", args.r_cmc), ("r_ctx", args.r_ctx), ("k_shot", args.k_shot)) if v is not None}
    cfg.cmc = dataclasses.replace(cfg.cmc, **cmc)
    if args.seed is not None:
        cfg.run.seed = args.seed
    validate_cmc(cfg.cmc)
    gallery_dir = args.gallery or cfg.data.gallery
    text_dirs = [args.text] if args.text else cfg.data.text_stores
    if not gallery_dir or not text_dirs:
        raise VlmixerError("say which stores to mix: --text and --gallery, or --config with data.text_stores "
                           "and data.gallery")
    gallery = GalleryReader(gallery_dir)
    texts = [TextStoreReader(t, expect_concepts_sha256=gallery.concepts.sha256) for t in text_dirs]
    total = sum(len(t) for t in texts)
    if not 0 <= args.start < total:
        raise VlmixerError(f"--start {args.start}: the text stores hold {total} sentences")
    items = mixed_sentences(texts, gallery, cfg, n=args.n, start=args.start, epoch=args.epoch)
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
    p.add_argument("--config", help="mix as this run does: a run directory, a checkpoint (.pt), or a "
                                    "pre-training config file or bundled name (default: the config defaults)")
    p.add_argument("--text", help="text store (vlmixer text tag output); default: the config's data.text_stores")
    p.add_argument("--gallery", help="patch gallery (vlmixer gallery build output); default: the config's "
                                     "data.gallery")
    p.add_argument("--n", type=int, default=8, help="number of sentences (default 8)")
    p.add_argument("--start", type=int, default=0, help="first sentence index")
    p.add_argument("--epoch", type=int, default=0)
    # these override the config's keys; unset, the config's value holds
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("--r-cmc", type=float, dest="r_cmc", help="cmc.r_cmc")
    p.add_argument("--r-ctx", type=float, dest="r_ctx", help="cmc.r_ctx")
    p.add_argument("--k-shot", type=int, dest="k_shot", help="cmc.k_shot")


def register(tree: CommandTree) -> None:
    p = tree.subcommand("mix", "show", _show,
                        help="Render multi-modal sentences (patch crops where the words were, concept, p_i) "
                             "exactly as the trainer mixes them",
                        example="vlmixer mix show --config runs/vlmixer --n 8 --out mix.html")
    _common(p)
    p.add_argument("--out", required=True, help="output file: .html or .png")
    p = tree.subcommand("mix", "sample", _sample, help="Print the patch ids CMC samples for each grounded word",
                        example="vlmixer mix sample --text text_store --gallery gallery --n 4 --jsonl")
    _common(p)
    p.add_argument("--jsonl", action="store_true", help="one json object per sentence")
