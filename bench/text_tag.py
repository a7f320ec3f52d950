"""Text tagging throughput: the job vs a naive per-sentence loop vs bare nlp.pipe (same model).

python bench/text_tag.py [--n 50000] [--naive-n 5000]
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# Run as `python bench/NAME.py`, this folder is first on sys.path and bench/storage.py would
# shadow the `storage` package: drop it (running as `python -m bench.NAME` needs nothing).
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _Path(__file__).resolve().parent]

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one core: rates are per core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.text.concepts import ConceptMatcher  # noqa: E402
from pipeline.text.corpus import Record, open_corpus_files  # noqa: E402
from pipeline.text.job import TagJobConfig, run_tag_job  # noqa: E402
from pipeline.text.resolve import build_mapping  # noqa: E402
from pipeline.text.spacy_model import load_spacy, model_label, resolve_model_name  # noqa: E402
from pipeline.text.tagger import SentenceTagger  # noqa: E402
from pipeline.text.wordpiece import resolve_tokenizer  # noqa: E402
from storage.textstore import TextStoreWriter  # noqa: E402
from storage.vocab import Vocabulary  # noqa: E402

NOUNS = ["man", "woman", "dog", "cat", "horse", "car", "bus", "bike", "bicycle", "traffic light", "tree",
         "table", "plate", "pizza", "child", "boy", "girl", "street", "beach", "surfboard", "kite", "train",
         "tennis racket", "frisbee", "umbrella", "bench", "clock", "sign", "building", "sheep", "cow", "bird",
         "elephant", "giraffe", "laptop", "phone", "cake", "banana", "skateboard", "field"]
CONCEPTS = sorted({"man", "woman", "dog", "cat", "horse", "car", "bus", "bike", "traffic light", "tree",
                   "table", "plate", "pizza", "child", "boy", "girl", "street", "beach", "surfboard", "kite",
                   "train", "tennis racket", "frisbee", "umbrella", "bench", "clock", "sign", "building",
                   "sheep", "cow", "bird", "elephant", "giraffe", "laptop", "phone", "cake", "banana",
                   "skateboard", "field", "light", "racket", "person", "people", "shirt", "hat", "water"})
VERBS = ["sitting on", "standing next to", "riding", "walking past", "holding", "looking at", "near"]
ADJ = ["a", "a small", "a large", "the red", "an old", "two", "some", "a white"]


def clock() -> float:
    """CPU seconds of this process: on a shared machine wall time measures the neighbours."""
    return time.process_time()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(NOUNS), rng.choice(NOUNS)
        plural = "s" if rng.random() < 0.3 else ""
        out.append(f"{rng.choice(ADJ).capitalize()} {a}{plural} {rng.choice(VERBS)} {rng.choice(ADJ)} {b} "
                   f"{rng.choice(['in the park.', 'on a sunny day.', 'at night.', 'outside.', ''])}".strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--naive-n", type=int, default=5_000)
    args = ap.parse_args()
    texts = captions(args.n)
    nlp = load_spacy(resolve_model_name(None))
    concepts = Vocabulary(names=tuple(CONCEPTS))
    mapping = build_mapping(concepts, nlp)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "captions.txt"
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        tok = resolve_tokenizer(None, cache_dir=tmp)
        for t in ("warm up the pipeline once",):
            list(nlp.pipe([t]))
        cfg = TagJobConfig(out=str(Path(tmp) / "store"), inputs=open_corpus_files([corpus]), concepts=concepts,
                           mapping=mapping, tokenizer=tok, spacy_model="bench", spacy_label=model_label(nlp))
        t0, w0 = clock(), time.perf_counter()
        m = run_tag_job(cfg, progress=False, nlp=nlp)
        job_s, job_wall = clock() - t0, time.perf_counter() - w0
        n_sent = m["summary"]["sentences"]

        t0 = clock()
        for _ in nlp.pipe(texts, batch_size=256):
            pass
        pipe_s = clock() - t0

        # naive: the same tagging code and output, but spaCy called once per sentence
        matcher = ConceptMatcher(mapping, lambda p: [t.lower_ for t in nlp.tokenizer(p)], key=nlp.vocab.strings.add)
        one_by_one = SentenceTagger(nlp, matcher, tok, split=True,
                                    pipe=lambda pairs, as_tuples, **kw: ((nlp(t), c) for t, c in pairs))
        sub = [Record(f"n:{i}", t) for i, t in enumerate(texts[: args.naive_n])]
        t0 = clock()
        out = list(one_by_one.tag(sub))
        writer = TextStoreWriter(Path(tmp) / "naive", concepts=concepts, tokenizer_name=tok.name,
                                 vocab_file=tok.vocab_file)
        writer.write_shard("0000-000000", out, {})
        naive_s = clock() - t0
    job_rate, pipe_rate, naive_rate = n_sent / job_s, len(texts) / pipe_s, len(sub) / naive_s
    print(f"{len(texts)} captions, rates per CPU-second of one core, {model_label(nlp)}")
    print(f"job (split, match, word-pieces, HDF5 write): {job_rate:8.0f} sentences/s  ({job_s:.1f} CPU s; "
          f"wall {n_sent / job_wall:.0f}/s in {job_wall:.1f} s, load average {os.getloadavg()[0]:.1f})")
    print(f"bare nlp.pipe (same model, no matching/writing): {pipe_rate:8.0f} /s  -> job/pipe = "
          f"{job_rate / pipe_rate:.2f}x (target >= 0.8)")
    print(f"naive nlp(sentence) loop on {len(sub)}: {naive_rate:8.0f} /s  -> job/naive = "
          f"{job_rate / naive_rate:.1f}x (target >= 5)")
    print(f"grounded spans {m['summary']['spans']}, grounded sentences {m['summary']['grounded_sentences']}")


if __name__ == "__main__":
    main()
