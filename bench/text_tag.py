"""Text tagging throughput: the job vs a naive per-sentence loop vs bare nlp.pipe (same model).

python bench/text_tag.py [--n 50000] [--naive-n 5000]
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one core: rates are per core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vlmixer.pipeline.text.concepts import ConceptMatcher
from vlmixer.pipeline.text.corpus import Record, open_corpus_files
from vlmixer.pipeline.text.gemm import use_numpy_gemm
from vlmixer.pipeline.text.job import TagJobConfig, run_tag_job
from vlmixer.pipeline.text.resolve import build_mapping
from vlmixer.pipeline.text.spacy_model import load_spacy, model_label, resolve_model_name
from vlmixer.pipeline.text.tagger import SentenceTagger
from vlmixer.pipeline.text.wordpiece import resolve_tokenizer
from vlmixer.storage.textstore import TextStoreWriter
from vlmixer.storage.vocab import Vocabulary

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
    name = resolve_model_name(None)
    nlp = load_spacy(name)  # the job's copy: run_tag_job switches it to numpy's BLAS (gemm.py)
    plain = load_spacy.__wrapped__(name)  # a second copy left as spaCy loads it, for the baselines
    concepts = Vocabulary(names=tuple(CONCEPTS))
    mapping = build_mapping(concepts, nlp)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "captions.txt"
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        tok = resolve_tokenizer(None, cache_dir=tmp)
        for model in (nlp, plain):
            list(model.pipe(["warm up the pipeline once"]))
        cfg = TagJobConfig(out=str(Path(tmp) / "store"), inputs=open_corpus_files([corpus]), concepts=concepts,
                           mapping=mapping, tokenizer=tok, spacy_model="bench", spacy_label=model_label(nlp))
        t0, w0 = clock(), time.perf_counter()
        m = run_tag_job(cfg, progress=False, nlp=nlp)
        job_s, job_wall = clock() - t0, time.perf_counter() - w0
        n_sent = m["summary"]["sentences"]
        fast = use_numpy_gemm(nlp)

        def bare(model: Any) -> tuple[float, list[Any]]:
            t0 = clock()
            docs = list(model.pipe(texts, batch_size=256))
            return clock() - t0, docs

        (pipe_s, docs), (pipe_fast_s, fast_docs) = bare(plain), bare(nlp)
        n_tok = sum(len(d) for d in docs)
        differ = sum((a.tag_, a.pos_, a.lemma_) != (b.tag_, b.pos_, b.lemma_)
                     for da, db in zip(docs, fast_docs) for a, b in zip(da, db))
        del docs, fast_docs

        # naive: the same tagging code and output, but spaCy called once per sentence
        sub = [Record(f"n:{i}", t) for i, t in enumerate(texts[: args.naive_n])]

        def naive(model: Any, out_name: str) -> float:
            matcher = ConceptMatcher(mapping, lambda p: [t.lower_ for t in model.tokenizer(p)],
                                     key=model.vocab.strings.add)
            one_by_one = SentenceTagger(model, matcher, tok, split=True,
                                        pipe=lambda pairs, as_tuples, **kw: ((model(t), c) for t, c in pairs))
            t0 = clock()
            out = list(one_by_one.tag(sub))
            writer = TextStoreWriter(Path(tmp) / out_name, concepts=concepts, tokenizer_name=tok.name,
                                     vocab_file=tok.vocab_file)
            writer.write_shard("0000-000000", out, {})
            return clock() - t0

        naive_s, naive_fast_s = naive(plain, "naive"), naive(nlp, "naive_fast")
    job_rate, naive_rate, naive_fast_rate = n_sent / job_s, len(sub) / naive_s, len(sub) / naive_fast_s
    pipe_rate, pipe_fast_rate = len(texts) / pipe_s, len(texts) / pipe_fast_s
    print(f"{len(texts)} captions, rates per CPU-second of one core, {model_label(nlp)}; "
          f"numpy BLAS products {'on' if fast else 'OFF (self-check failed)'}")
    print(f"job (split, match, word-pieces, HDF5 write): {job_rate:8.0f} sentences/s  ({job_s:.1f} CPU s; "
          f"wall {n_sent / job_wall:.0f}/s in {job_wall:.1f} s, load average {os.getloadavg()[0]:.1f})")
    print(f"bare nlp.pipe, spaCy as loaded (no matching/writing): {pipe_rate:8.0f} /s  -> job/pipe = "
          f"{job_rate / pipe_rate:.2f}x (target >= 0.8)")
    print(f"bare nlp.pipe, same numpy-BLAS model as the job:      {pipe_fast_rate:8.0f} /s  -> job/pipe = "
          f"{job_rate / pipe_fast_rate:.2f}x")
    print(f"naive nlp(sentence) loop, spaCy as loaded, on {len(sub)}: {naive_rate:8.0f} /s  -> job/naive = "
          f"{job_rate / naive_rate:.1f}x (target >= 5)")
    print(f"naive nlp(sentence) loop, same numpy-BLAS model as the job: {naive_fast_rate:8.0f} /s  -> job/naive = "
          f"{job_rate / naive_fast_rate:.1f}x")
    print(f"numpy-BLAS vs as-loaded model: {differ} of {n_tok} tokens differ in tag, POS or lemma")
    print(f"grounded spans {m['summary']['spans']}, grounded sentences {m['summary']['grounded_sentences']}")


if __name__ == "__main__":
    main()
