"""The sharded job: a SIGKILLed run resumed equals an uninterrupted one; the Ray path agrees."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from vlmixer.pipeline.text.corpus import open_corpus_files  # noqa: E402
from vlmixer.pipeline.text.job import TagJobConfig, TagShard, run_tag_job  # noqa: E402
from vlmixer.pipeline.text.render import iter_dump_records  # noqa: E402
from vlmixer.pipeline.text.resolve import build_mapping  # noqa: E402
from vlmixer.pipeline.text.spacy_model import load_spacy, model_label, resolve_model_name  # noqa: E402
from vlmixer.pipeline.text.wordpiece import resolve_tokenizer  # noqa: E402
from vlmixer.storage.textstore import TextStoreReader  # noqa: E402
from vlmixer.storage.vocab import Vocabulary  # noqa: E402

CONCEPTS = Vocabulary(names=("man", "woman", "dog", "horse", "traffic light", "bike", "beach"),
                      variants=(("man",), ("woman",), ("dog",), ("horse",), ("traffic light",),
                                ("bike", "bicycle"), ("beach",)))
WHO = ["A man", "Two women", "A small dog", "The horses", "A child", "Someone"]
DOES = ["walks past", "waits at", "rides along", "looks at", "runs toward"]
WHERE = ["the traffic lights.", "a bicycle.", "the beach.", "a parked car.", "the old bridge."]


def write_corpus(path: Path, n: int) -> Path:
    """n deterministic captions, every 37th line bad (non-UTF-8) so skips are part of the comparison."""
    lines = []
    for i in range(n):
        if i % 37 == 36:
            lines.append(b"\xff\xfe broken line")
        else:
            lines.append(f"{WHO[i % 6]} {DOES[(i // 6) % 5]} {WHERE[(i // 30) % 5]}".encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def make_config(corpus: Path, out: Path, nlp, shard_size: int) -> TagJobConfig:
    return TagJobConfig(out=str(out), inputs=open_corpus_files([corpus]), concepts=CONCEPTS,
                        mapping=build_mapping(CONCEPTS, nlp), spacy_model=resolve_model_name(None),
                        tokenizer=resolve_tokenizer(None, cache_dir=out.parent), spacy_label=model_label(nlp),
                        shard_size=shard_size)


def store_content(store: Path) -> list[tuple]:
    r = TextStoreReader(store)
    rows = []
    for i in range(len(r)):
        s = r.sentence(i)
        rows.append((s.id, s.text, s.tokens.tolist(), s.token_chars.tolist(), [tuple(x.__dict__.values())
                                                                                 for x in s.spans]))
    return rows


@pytest.fixture(scope="module")
def nlp():
    return load_spacy(resolve_model_name(None))


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
import test_text_job as t
from vlmixer.pipeline.text import job
orig = job.TagShard.__call__
def slow(self, task):
    out = orig(self, task)
    time.sleep(0.4)
    return out
job.TagShard.__call__ = slow
nlp = t.load_spacy(t.resolve_model_name(None))
cfg = t.make_config(Path({corpus!r}), Path({out!r}), nlp, {shard!r})
job.run_tag_job(cfg, progress=False, nlp=nlp)
print("finished")
"""


def test_killed_and_resumed_equals_uninterrupted(tmp_path, nlp):
    corpus = write_corpus(tmp_path / "captions.txt", 400)
    ref = tmp_path / "ref" / "store"
    ref.parent.mkdir()
    full = run_tag_job(make_config(corpus, ref, nlp, 25), progress=False, nlp=nlp)
    assert full["summary"]["shards"] == 16 and full["summary"]["skipped"] == {"non_utf8": 10}

    out = tmp_path / "run" / "store"
    out.parent.mkdir()
    script = CHILD.format(tests=str(Path(__file__).parent), corpus=str(corpus), out=str(out), shard=25)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    deadline = time.time() + 90
    try:
        while time.time() < deadline and child.poll() is None:
            if len(list((out / "shards").glob("*.h5"))) >= 4:
                break
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()[1].decode()[-2000:]
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    done = len(list((out / "shards").glob("*.h5")))
    assert 4 <= done < 16 and not (out / "manifest.json").exists()

    resumed = run_tag_job(make_config(corpus, out, nlp, 25), progress=False, nlp=nlp)
    assert resumed["summary"]["sentences_this_run"] < resumed["summary"]["sentences"]
    assert resumed["summary"]["skipped"] == full["summary"]["skipped"]
    assert store_content(out) == store_content(ref)
    assert [s["name"] for s in resumed["shards"]] == [s["name"] for s in full["shards"]]
    # resuming a finished store is a no-op that keeps it identical
    again = run_tag_job(make_config(corpus, out, nlp, 25), progress=False, nlp=nlp)
    assert again["summary"]["sentences_this_run"] == 0 and store_content(out) == store_content(ref)


def test_spacy_n_process_matches_one_process(tmp_path, nlp):
    """spaCy's own worker processes (`--n-process`) carry the faster paths and change no output."""
    import dataclasses

    corpus = write_corpus(tmp_path / "c.txt", 120)
    one = make_config(corpus, tmp_path / "one", nlp, 60)
    two = dataclasses.replace(make_config(corpus, tmp_path / "two", nlp, 60), n_process=2, batch_size=16)
    run_tag_job(one, progress=False, nlp=nlp)
    run_tag_job(two, progress=False, nlp=nlp)
    assert store_content(tmp_path / "two") == store_content(tmp_path / "one")
    assert len(store_content(tmp_path / "one")) == 120 - 3


def test_shard_callable_is_plain_and_picklable(tmp_path, nlp):
    import pickle

    from vlmixer.pipeline.text.corpus import plan_shards
    corpus = write_corpus(tmp_path / "c.txt", 40)
    cfg = make_config(corpus, tmp_path / "store", nlp, 20)
    run_tag_job(cfg, progress=False, nlp=nlp)  # creates the store header
    fn = pickle.loads(pickle.dumps(TagShard(cfg)))  # what Ray ships: config only, no spaCy
    assert fn._ready is None and fn._nlp is None
    task = next(iter(plan_shards(cfg.inputs, 20, max_line_bytes=1 << 20)))
    (tmp_path / "store" / "shards" / f"{task.name}.h5").unlink()
    stats = TagShard(cfg, nlp=nlp)(task)
    assert stats["records"] == 20 and stats["sentences"] == 20 and stats["spans"] > 0


def test_a_worker_dying_on_a_shard_stops_cleanly_and_resume_completes(tmp_path, nlp):
    """An actor that dies on every retry of a shard (OOM, segfault) stops the job with a clear error, not
    a Ray traceback; the shards committed so far stay, and the same command resumes to the full store."""
    import ray
    from test_gallery_build_support import ray_env

    from vlmixer.errors import VlmixerError

    corpus = write_corpus(tmp_path / "c.txt", 60)
    with corpus.open("ab") as f:
        f.write(b"A man runs past the crash-me sign.\n")
    ref = tmp_path / "ref"
    run_tag_job(make_config(corpus, ref, nlp, 30), progress=False, nlp=nlp)
    env = ray_env()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env={
        "worker_process_setup_hook": "crash_hooks.crash_on_text_shard",
        "env_vars": {"PYTHONPATH": env["PYTHONPATH"], "RAY_AUTH_MODE": "disabled"}})
    out = tmp_path / "ray"
    try:
        with pytest.raises(VlmixerError, match="rerun the same command to resume"):
            run_tag_job(make_config(corpus, out, nlp, 30), ray_address="local", progress=False)
    finally:
        ray.shutdown()
    assert not (out / "manifest.json").exists()
    assert len(list((out / "shards").glob("*.h5"))) == 2  # the two shards before the fatal one
    resumed = run_tag_job(make_config(corpus, out, nlp, 30), progress=False, nlp=nlp)
    assert resumed["summary"]["sentences_this_run"] == 1
    assert store_content(out) == store_content(ref)


def test_ray_local_matches_in_process(tmp_path, nlp):
    ray = pytest.importorskip("ray")
    corpus = write_corpus(tmp_path / "c.txt", 60)
    ref = tmp_path / "ref"
    run_tag_job(make_config(corpus, ref, nlp, 30), progress=False, nlp=nlp)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray"
        m = run_tag_job(make_config(corpus, out, nlp, 30), ray_address="local", progress=False)
    finally:
        ray.shutdown()
    assert m["summary"]["shards"] == 2 and m["summary"]["skipped"] == {"non_utf8": 1}
    assert store_content(out) == store_content(ref)
    assert list(iter_dump_records(TextStoreReader(out))) == list(iter_dump_records(TextStoreReader(ref)))
