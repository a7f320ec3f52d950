"""The text tagging job: shards of records -> committed text store shards, resumable.

`TagShard` is the unit of work: a plain, picklable callable that tags one
`ShardTask` and commits it with `TextStoreWriter.write_shard` (atomic: the
shard file appears under its final name only when complete). `run_tag_job`
plans shards, skips those already committed (resume = the same command
again), and runs the rest in this process or on Ray actors (one per CPU, each
loading spaCy once), with at most one task in flight per actor so memory stays
bounded. Bad lines never stop the job: they are counted per reason in each
shard's stats and in the summary written into the manifest.

A store remembers the job that made it (`provenance.signature` in store.json:
inputs with size and edge hashes, options, mapping, tokenizer, spaCy model);
resuming into it with different arguments is refused instead of mixing shards.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmixer.errors import VlmixerError
from vlmixer.pipeline import ray_session
from vlmixer.storage.textstore import TextStoreWriter
from vlmixer.storage.vocab import Vocabulary

from .attribute_rules import annotator
from .concepts import ConceptMapping, ConceptMatcher
from .corpus import CorpusFile, ShardTask, count_records, decode_items, file_fingerprint, plan_shards
from .gemm import use_numpy_gemm
from .spacy_model import load_spacy
from .tagger import SentenceTagger
from .wordpiece import WordPieceTokenizer


@dataclass
class TagJobConfig:
    """Everything a shard worker needs, resolved on the driver (no hub or WordNet access in
    workers). `spacy_label` is `name version` of the pipeline the driver validated."""

    out: str
    inputs: list[CorpusFile]
    concepts: Vocabulary
    mapping: ConceptMapping
    tokenizer: WordPieceTokenizer
    spacy_model: str
    spacy_label: str
    shard_size: int = 10_000
    max_line_bytes: int = 1 << 20
    max_record_chars: int = 100_000
    max_sentence_chars: int = 2_000
    batch_size: int = 256
    n_process: int = 1
    image_key: str = "file_name"
    # self-checked faster spaCy paths with the same output: attribute ruler and lemmatizer
    # stand-ins (attribute_rules.py), numpy's BLAS for the network's products (gemm.py)
    fast_spacy: bool = True
    extra_provenance: dict[str, Any] = field(default_factory=dict)

    def signature(self) -> dict[str, Any]:
        """What must not change between a run and its resume."""
        return {
            "inputs": [{"path": cf.path, "format": cf.fmt, "field": cf.field, "id_field": cf.id_field,
                        "split": cf.split, **file_fingerprint(cf.path)} for cf in self.inputs],
            "shard_size": self.shard_size, "max_line_bytes": self.max_line_bytes,
            "max_record_chars": self.max_record_chars, "max_sentence_chars": self.max_sentence_chars,
            "image_key": self.image_key, "mapping_sha256": self.mapping.sha256,
            "concepts_sha256": self.concepts.sha256, "tokenizer": self.tokenizer.name,
            "spacy_model": self.spacy_label,
        }

    def provenance(self, signature: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "job": "vlmixer text tag",
            "signature": _sha(signature),
            "signature_fields": dict(signature),
            "sources": [cf.path for cf in self.inputs],
            "spacy_model": self.spacy_label,
            "tokenizer": self.tokenizer.name,
            "tokenizer_source": self.tokenizer.source,
            "synonyms": self.mapping.synonyms,
            "mapping_sha256": self.mapping.sha256,
            "mapping": [[e.phrase, e.concept, e.source] for e in self.mapping.entries],
            **self.extra_provenance,
        }


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class TagShard:
    """Tag one shard and commit it; returns the shard's stats. Loads spaCy, the matcher, the
    tokenizer and the writer once per process (lazily, so the object pickles small)."""

    def __init__(self, config: TagJobConfig, *, nlp: Any = None) -> None:
        self.config = config
        self._nlp = nlp
        self._ready: tuple[SentenceTagger, SentenceTagger, TextStoreWriter] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "_nlp": None, "_ready": None}

    def _setup(self) -> tuple[SentenceTagger, SentenceTagger, TextStoreWriter]:
        if self._ready is None:
            c = self.config
            nlp = self._nlp if self._nlp is not None else load_spacy(c.spacy_model)
            matcher = ConceptMatcher(c.mapping, lambda p: [t.lower_ for t in nlp.tokenizer(p)], key=nlp.vocab.strings.add)
            if c.fast_spacy:
                use_numpy_gemm(nlp)
            pipe = annotator(nlp) if c.fast_spacy else nlp.pipe
            kw = {"max_sentence_chars": c.max_sentence_chars, "batch_size": c.batch_size, "n_process": c.n_process,
                  "pipe": pipe}
            split = SentenceTagger(nlp, matcher, c.tokenizer, split=True, **kw)
            whole = SentenceTagger(nlp, matcher, c.tokenizer, split=False, **kw)
            writer = TextStoreWriter(c.out, concepts=c.concepts, tokenizer_name=c.tokenizer.name,
                                     vocab_file=Path(c.out) / "vocab.txt")
            self._ready = (split, whole, writer)
        return self._ready

    def __call__(self, task: ShardTask) -> dict[str, Any]:
        t0 = time.perf_counter()
        split, whole, writer = self._setup()
        tagger = split if task.file.split else whole
        records, skipped, examples = decode_items(task, max_record_chars=self.config.max_record_chars)
        tagger.skipped.clear()
        sentences = list(tagger.tag(records))
        skipped.update(tagger.skipped)
        n_spans = sum(len(s["spans"]) for s in sentences)
        stats = {
            "shard": task.name,
            "file": Path(task.file.path).name,
            "records": len(task.items),
            "records_ok": len(records),
            "sentences": len(sentences),
            "grounded_sentences": sum(1 for s in sentences if s["spans"]),
            "spans": n_spans,
            "wordpieces": int(sum(len(s["tokens"]) for s in sentences)),
            "skipped": dict(sorted(skipped.items())),
            "bad_examples": examples,
        }
        stats["tag_seconds"] = round(time.perf_counter() - t0, 3)
        writer.write_shard(task.name, sentences, stats)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        return stats


def _check_resume(out: Path, provenance: Mapping[str, Any]) -> None:
    header = out / "store.json"
    if not header.exists():
        return
    try:
        old = json.loads(header.read_text(encoding="utf-8")).get("provenance", {})
    except (OSError, json.JSONDecodeError) as e:
        raise VlmixerError(f"{header}: unreadable store header ({e}); use a new --out") from None
    if old.get("signature") == provenance["signature"]:
        return
    before, now = old.get("signature_fields", {}), provenance["signature_fields"]
    diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    raise VlmixerError(f"{out}: this store was started by a different `text tag` command (differs in: "
                       f"{', '.join(diff) or 'unknown'}); rerun the same command to resume, or use a new --out")


def summarize(shard_stats: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Totals over shards: counts, skipped per reason, and the first bad examples."""
    total: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    examples: list[Any] = []
    n = 0
    for s in shard_stats:
        n += 1
        for k in ("records", "records_ok", "sentences", "grounded_sentences", "spans", "wordpieces"):
            total[k] += int(s.get(k, 0))
        skipped.update(s.get("skipped", {}))
        examples += list(s.get("bad_examples", []))[: max(0, 50 - len(examples))]
    return {"shards": n, **dict(total), "skipped": dict(sorted(skipped.items())),
            "skipped_total": sum(skipped.values()), "bad_examples": examples}


class _TagActor:
    """One per Ray worker CPU: keeps spaCy loaded across shards."""

    def __init__(self, config: TagJobConfig) -> None:
        self.fn = TagShard(config)

    def run(self, task: ShardTask) -> dict[str, Any]:
        return self.fn(task)


def run_tag_job(config: TagJobConfig, *, ray_address: str | None = None, workers: int | None = None,
                progress: bool = True, nlp: Any = None,
                on_shard: Callable[[dict[str, Any]], None] | None = None, log_every: float = 30.0) -> dict[str, Any]:
    """Tag every uncommitted shard, then write the manifest; returns the manifest (with `summary`)."""
    from tqdm import tqdm

    out = Path(config.out)
    signature = config.signature()
    provenance = config.provenance(signature)
    _check_resume(out, provenance)
    writer = TextStoreWriter(out, concepts=config.concepts, tokenizer_name=config.tokenizer.name,
                             vocab_file=config.tokenizer.vocab_file, provenance=provenance)
    committed = set(writer.committed_shards())
    counts_known = [count_records(cf) for cf in config.inputs]
    unknown = {cf.index for cf, n in zip(config.inputs, counts_known) if n is None}
    total = sum(n for n in counts_known if n is not None)
    # a bar on a terminal; in a log (a cluster job's stderr) a line every `log_every` seconds
    tty = sys.stderr.isatty()
    bar = tqdm(total=total if not unknown else None, unit="rec", mininterval=1.0, smoothing=0.05,
               disable=not (progress and tty), desc="text tag", dynamic_ncols=True)
    last_log = [time.perf_counter()]
    # tars are counted as they are read: the total (and so the ETA) is estimated from those read
    planned: Counter[int] = Counter()
    counts: Counter[str] = Counter()
    started = time.perf_counter()

    def done(stats: dict[str, Any]) -> None:
        counts["sentences"] += stats["sentences"]
        counts["spans"] += stats["spans"]
        counts["skipped"] += sum(stats["skipped"].values())
        el = max(time.perf_counter() - started, 1e-9)
        bar.set_postfix({"sent/s": f"{counts['sentences'] / el:.0f}", "spans": counts["spans"],
                         "skipped": counts["skipped"]}, refresh=False)
        bar.update(stats["records"])
        counts["records"] += stats["records"]
        if progress and not tty and time.perf_counter() - last_log[0] >= log_every:
            last_log[0] = time.perf_counter()
            print(progress_line(counts["records"], bar.total, counts["sentences"], el), file=sys.stderr, flush=True)
        if on_shard is not None:
            on_shard(stats)

    def estimate(current: int) -> None:
        read = [i for i in planned if i in unknown and i != current]
        if read:
            per_file = sum(planned[i] for i in read) / len(read)
            bar.total = total + round(sum(planned[i] for i in unknown if i in planned) - planned[current]
                                      + per_file * (len(unknown) - len(read)))
            bar.refresh()

    skipped_records = [0]  # committed before this run: not part of this run's rate

    def progress_line(done_records: int, total_records: int | None, sentences: int, el: float) -> str:
        rate = done_records / el
        left = None if total_records is None else total_records - done_records - skipped_records[0]
        eta = f"ETA {left / rate:.0f} s" if rate > 0 and left is not None else "ETA ?"
        return (f"[text] {done_records + skipped_records[0]}/{total_records if total_records is not None else '?'} "
                f"records, {rate:.0f} rec/s, {sentences / el:.0f} sent/s, {eta}")

    def pending() -> Iterable[ShardTask]:
        last = -1
        for task in plan_shards(config.inputs, config.shard_size, max_line_bytes=config.max_line_bytes,
                                image_key=config.image_key):
            if unknown:
                if task.file.index != last:
                    estimate(task.file.index)
                    last = task.file.index
                planned[task.file.index] += len(task.items)
            if task.name in committed:
                bar.update(len(task.items))
                skipped_records[0] += len(task.items)
                continue
            yield task

    try:
        if ray_address is None:
            fn = TagShard(config, nlp=nlp)
            for task in pending():
                done(fn(task))
        else:
            _run_on_ray(config, pending(), done, ray_address, workers)
    finally:
        bar.close()
    manifest = writer.finalize()
    summary = summarize(s["stats"] for s in manifest["shards"])
    summary["seconds_this_run"] = round(time.perf_counter() - started, 3)
    summary["sentences_this_run"] = counts["sentences"]
    manifest = writer.finalize({"summary": summary})
    if not summary.get("sentences"):
        raise VlmixerError(f"{out}: no sentences: {_nothing_reason(summary)}; nothing to train on. Check "
                           "--format and --field, then remove the empty store and run again")
    return manifest


def _nothing_reason(summary: Mapping[str, Any]) -> str:
    """Why a finished job holds no sentence, as counts by reason (a user's wrong --field, --format)."""
    records = int(summary.get("records", 0))
    if not records:
        return "the input holds no records"
    reasons = ", ".join(f"{k} {v}" for k, v in summary.get("skipped", {}).items())
    return f"all {records} records were skipped ({reasons or 'no reason recorded'})"


def _run_on_ray(config: TagJobConfig, tasks: Iterable[ShardTask], done: Callable[[dict[str, Any]], None],
                address: str, workers: int | None) -> None:
    ray, started = ray_session.connect(address, workers)
    try:
        from ray.util import ActorPool

        n = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = min(n, workers) if workers else n
        # a worker that dies (OOM, segfault) is restarted and its shard retried; past that the
        # job stops with the shards committed so far kept
        actor_cls = ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)(_TagActor)
        pool = ActorPool([actor_cls.remote(config) for _ in range(n)])

        def next_done() -> None:
            from ray.exceptions import RayError

            try:
                stats = pool.get_next_unordered()
            except RayError as e:
                raise ray_session.readable(e, "a text tagging worker") from None
            done(stats)

        for task in tasks:
            while not pool.has_free():
                next_done()
            pool.submit(lambda a, t: a.run.remote(t), task)
        while pool.has_next():
            next_done()
    finally:
        if started:
            ray.shutdown()
