"""`vlmixer eval retrieval`: Recall@1/5/10 of a checkpoint over paired images and captions."""
from __future__ import annotations

import argparse
import json

from vlmixer.cli import CommandTree
from vlmixer.errors import VlmixerError


def _retrieval(args: argparse.Namespace) -> int:
    import torch

    from vlmixer.storage.gallery import GalleryReader
    from vlmixer.storage.textstore import TextStoreReader
    from vlmixer.trainer.data import WordPieceVocab
    from vlmixer.trainer.retrieval import KS, evaluate_retrieval, model_from_checkpoint

    if args.n is not None and args.n < 1:
        raise VlmixerError(f"--n {args.n}: evaluate at least one image")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, path = model_from_checkpoint(args.checkpoint, device)
    gallery = GalleryReader(args.gallery)
    if gallery.feature_dim != cfg.model.feature_dim:
        raise VlmixerError(f"{args.gallery}: {gallery.feature_dim}-d features, the checkpoint's model takes "
                           f"{cfg.model.feature_dim}-d")
    texts = [TextStoreReader(t) for t in args.text]
    vocab = WordPieceVocab.read(texts[0].vocab_file)
    if vocab.size != model.config.vocab_size:
        raise VlmixerError(f"{args.text[0]}: tokenised with a {vocab.size}-word-piece vocabulary, the model has "
                           f"{model.config.vocab_size}")
    res = evaluate_retrieval(model, texts, gallery, vocab, n_images=args.n,
                             max_caption_tokens=cfg.data.max_caption_tokens, max_patches=cfg.data.max_patches,
                             batch_size=args.batch_size, device=device)
    res["checkpoint"] = str(path)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"vlmixer eval retrieval: {path}")
    print(f"  {res['images']} images, {res['captions']} captions (chance t2i R@1 {res['chance_t2i_r1']:.3f})")
    print("  " + " ".join(f"{'R@' + str(k):>7}" for k in KS))
    for way, name in (("t2i", "text->image"), ("i2t", "image->text")):
        print("  " + " ".join(f"{100 * res[f'{way}_r{k}']:7.1f}" for k in KS) + f"   {name}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.subcommand(
        "eval", "retrieval", _retrieval,
        help="Text->image and image->text Recall@1/5/10 of a checkpoint over paired data (captions keyed to "
             "gallery images), by the cosine of the projected [CLS] of each caption and each image.",
        example="vlmixer eval retrieval --checkpoint runs/albef_paired --gallery G_COCO_TEST "
                "--text T_COCO_TEST_CAPTIONS --n 1000",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint .pt file, or a run directory (its latest)")
    p.add_argument("--gallery", required=True, help="patch gallery holding the images")
    p.add_argument("--text", required=True, nargs="+",
                   help="text store(s) of captions with image keys (vlmixer text tag --format coco)")
    p.add_argument("--n", type=int, default=None,
                   help="evaluate the first N captioned images and all their captions (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="inputs encoded per forward (default 64)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--json", action="store_true", help="print one json object instead of the table")
