"""Text tagging on real sentences with known answers, corpus formats, bad lines, tokenizer, CLI."""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vlmixer.cli import CommandTree  # noqa: E402
from vlmixer.errors import VlmixerError  # noqa: E402
from vlmixer.pipeline.text.concepts import ConceptMapping, MappingEntry  # noqa: E402
from vlmixer.pipeline.text.corpus import open_corpus_files  # noqa: E402
from vlmixer.pipeline.text.gemm import NumpyGemmOps  # noqa: E402
from vlmixer.pipeline.text.job import TagJobConfig, run_tag_job  # noqa: E402
from vlmixer.pipeline.text.render import iter_dump_records, mark_sentence  # noqa: E402
from vlmixer.pipeline.text.resolve import build_mapping  # noqa: E402
from vlmixer.pipeline.text.spacy_model import load_spacy, model_label, resolve_model_name  # noqa: E402
from vlmixer.pipeline.text.wordpiece import (  # noqa: E402
    BERT_UNCASED_VOCAB_MD5,
    _md5,
    resolve_tokenizer,
)
from vlmixer.storage.textstore import TextStoreReader  # noqa: E402
from vlmixer.storage.vocab import Vocabulary, read_vocab_txt  # noqa: E402

VOCAB = """man
dog
horse
car
park
traffic light
light
glasses
glass
bananas
bike,bicycle
t-shirt
skateboarder
"""


@pytest.fixture(scope="session")
def nlp():
    return load_spacy(resolve_model_name(None))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return resolve_tokenizer(None, cache_dir=tmp_path_factory.mktemp("tok"))


def _vocab(tmp_path: Path, text: str = VOCAB) -> Vocabulary:
    p = tmp_path / "concepts.txt"
    p.write_text(text, encoding="utf-8")
    return read_vocab_txt(p)


def _tag(tmp_path: Path, nlp, tokenizer, lines: list[str] | None = None, *, concepts: Vocabulary | None = None,
         synonyms: str = "off", mapping: ConceptMapping | None = None, files: list[Path] | None = None,
         out: str = "store", **kw) -> tuple[Path, dict]:
    if files is None:
        src = tmp_path / "corpus.txt"
        src.write_text("\n".join(lines or []) + "\n", encoding="utf-8")
        files = [src]
    concepts = concepts or _vocab(tmp_path)
    mapping = mapping or build_mapping(concepts, nlp, synonyms=synonyms)
    open_kw = {k: kw.pop(k) for k in ("fmt", "field", "id_field", "split") if k in kw}
    config = TagJobConfig(out=str(tmp_path / out), inputs=open_corpus_files(files, **open_kw), concepts=concepts,
                          mapping=mapping, tokenizer=tokenizer, spacy_model="test", spacy_label=model_label(nlp),
                          **kw)
    manifest = run_tag_job(config, progress=False, nlp=nlp)
    return tmp_path / out, manifest


def _grounded(store: Path) -> list[list[tuple[str, str]]]:
    return [[(r["text"][s["start"]:s["end"]], s["concept"]) for s in r["spans"]]
            for r in iter_dump_records(TextStoreReader(store))]


SENTENCES = [
    "Two men ride horses past the puppies.",  # irregular + regular plural; puppy not a concept
    "She will park the car near the park.",  # verb homograph: only the second park
    "The traffic lights are red.",  # multi-word, longest match, plural head
    "A light was on.",  # the single word still matches alone
    "He rides a bicycle to work.",  # variant -> canonical concept
    "She ate a banana and wore glasses and drank from a glass.",  # plural concept name, exact before lemma
    "It was raining all afternoon.",  # nothing grounded
    "Le chat dort sur le canapé.",  # French
    "一只狗在公园里跑。",  # Chinese
    "A 🐶 and a dog 🙂 wear t-shirts near skateboarders.",  # emoji shifts offsets; word split into pieces
]
EXPECTED = [
    [("men", "man"), ("horses", "horse")],
    [("car", "car"), ("park", "park")],
    [("traffic lights", "traffic light")],
    [("light", "light")],
    [("bicycle", "bike")],
    [("banana", "bananas"), ("glasses", "glasses"), ("glass", "glass")],
    [],
    [],
    [],
    [("dog", "dog"), ("t-shirts", "t-shirt"), ("skateboarders", "skateboarder")],
]


def test_known_sentences(tmp_path, nlp, tokenizer):
    store, manifest = _tag(tmp_path, nlp, tokenizer, SENTENCES)
    assert _grounded(store) == EXPECTED
    reader = TextStoreReader(store)
    assert len(reader) == len(SENTENCES)
    assert [reader.sentence(i).text for i in range(len(reader))] == SENTENCES
    assert reader.sentence(1).id == "corpus.txt:2#0"
    park = reader.sentence(1).spans[1]
    assert (park.char_start, park.char_end) == (31, 35)  # the noun, not "park" at 9
    assert manifest["summary"]["grounded_sentences"] == 7
    assert manifest["summary"]["skipped_total"] == 0
    prov = json.loads((store / "store.json").read_text())["provenance"]
    assert prov["spacy_model"].endswith("3.8.0") and prov["synonyms"] == "off"
    assert prov["tokenizer"] == "bert-base-uncased" and "mapping_sha256" in prov
    assert prov["sources"] == [str((tmp_path / "corpus.txt").resolve())]


def test_token_spans_cover_exactly_the_word_pieces(tmp_path, nlp, tokenizer):
    store, _ = _tag(tmp_path, nlp, tokenizer, SENTENCES)
    reader = TextStoreReader(store)
    vocab = (store / "vocab.txt").read_text(encoding="utf-8").splitlines()
    multi = 0
    for i in range(len(reader)):
        s = reader.sentence(i)
        tc = s.token_chars
        assert len(tc) == len(s.tokens)
        for sp in s.spans:
            inside = [k for k in range(len(tc)) if tc[k, 0] < sp.char_end and tc[k, 1] > sp.char_start]
            assert inside == list(range(sp.tok_start, sp.tok_end))
            assert tc[sp.tok_start, 0] == sp.char_start and tc[sp.tok_end - 1, 1] == sp.char_end
            pieces = [vocab[t].removeprefix("##") for t in s.tokens[sp.tok_start:sp.tok_end]]
            assert "".join(pieces) == s.text[sp.char_start:sp.char_end].replace(" ", "").lower()
            multi += sp.tok_end - sp.tok_start > 1
    assert multi >= 3  # traffic lights, t-shirts, skateboarders
    emoji = reader.sentence(9)
    assert emoji.text[emoji.spans[0].char_start:emoji.spans[0].char_end] == "dog"


def test_synonyms_on_and_off(tmp_path, nlp, tokenizer):
    lines = ["The puppies sleep.", "A puppy and an automobile."]
    concepts = _vocab(tmp_path, "dog\ncar\n")
    off, _ = _tag(tmp_path, nlp, tokenizer, lines, concepts=concepts, out="off")
    assert _grounded(off) == [[], []]
    on, _ = _tag(tmp_path, nlp, tokenizer, lines, concepts=concepts, synonyms="wordnet", out="on")
    assert _grounded(on) == [[("puppies", "dog")], [("puppy", "dog"), ("automobile", "car")]]
    assert json.loads((on / "store.json").read_text())["provenance"]["synonyms"].startswith("wordnet-3.0/")
    # puppy is its own concept: the synonym never overrides it
    own = _vocab(tmp_path, "dog\npuppy\n")
    both, _ = _tag(tmp_path, nlp, tokenizer, lines, concepts=own, synonyms="wordnet", out="own")
    assert _grounded(both) == [[("puppies", "puppy")], [("puppy", "puppy")]]


def test_mapping_tsv_round_trip_and_edit(tmp_path, nlp, tokenizer):
    concepts = _vocab(tmp_path)
    m = build_mapping(concepts, nlp)
    path = tmp_path / "map.tsv"
    m.write_tsv(path)
    back = ConceptMapping.read_tsv(path, concepts)
    assert back.sha256 == m.sha256 and len(back) == len(m)
    assert back.as_dict()["banana"] == "bananas" and back.as_dict()["bicycle"] == "bike"
    with open(path, "a", encoding="utf-8") as f:
        f.write("pony\thorse\tuser\n")
    edited = ConceptMapping.read_tsv(path, concepts)
    store, _ = _tag(tmp_path, nlp, tokenizer, ["The pony is brown."], concepts=concepts, mapping=edited)
    assert _grounded(store) == [[("pony", "horse")]]
    bad = tmp_path / "bad.tsv"
    bad.write_text("pony\tunicorn\n", encoding="utf-8")
    with pytest.raises(VlmixerError, match="unicorn"):
        ConceptMapping.read_tsv(bad, concepts)
    bad.write_text("pony\thorse\npony\tdog\n", encoding="utf-8")
    with pytest.raises(VlmixerError, match="line 1"):
        ConceptMapping.read_tsv(bad, concepts)
    with pytest.raises(VlmixerError, match="--mapping"):
        build_mapping(concepts, nlp, synonyms="wordnet", mapping_file=path)


def test_mapping_priority_names_before_variants_before_synonyms():
    v = Vocabulary(names=("dog", "puppy"), variants=(("dog", "puppy"), ("puppy",)))
    m = ConceptMapping.from_vocabulary(v, synonyms=[MappingEntry("puppy", "dog", "wordnet:x"),
                                                    MappingEntry("pup", "dog", "wordnet:y")])
    assert m.as_dict() == {"dog": "dog", "puppy": "puppy", "pup": "dog"}


def test_bad_lines_counted_per_reason_and_processing_continues(tmp_path, nlp, tokenizer):
    src = tmp_path / "bad.jsonl"
    long_sentence = "A dog " + "runs and runs " * 20 + "home."
    rows = [
        json.dumps({"text": "A dog sits."}).encode(),
        b"",  # empty
        b"   ",  # empty
        b'{"text": "caf\xe9"}',  # latin-1, not UTF-8
        b'{"text": "unterminated',  # malformed json
        b"[1, 2, 3]",  # json but not an object
        json.dumps({"caption": "no text field"}).encode(),  # missing field
        json.dumps({"text": 42}).encode(),  # field not a string
        json.dumps({"text": "x" * 500}).encode(),  # line over --max-line-bytes
        json.dumps({"text": long_sentence}).encode(),  # sentence over --max-sentence-chars
        json.dumps({"text": "   "}).encode(),  # empty text
        json.dumps({"text": "The man rides a horse."}).encode(),  # good, after every bad case
    ]
    src.write_bytes(b"\n".join(rows) + b"\n")
    store, manifest = _tag(tmp_path, nlp, tokenizer, files=[src], max_line_bytes=450, max_sentence_chars=200,
                           shard_size=5)
    s = manifest["summary"]
    assert s["skipped"] == {"empty": 3, "malformed_json": 2, "missing_field": 2, "non_utf8": 1, "too_long": 1,
                            "sentence_too_long": 1}
    assert s["records"] == 12 and s["sentences"] == 2 and s["shards"] == 3
    assert _grounded(store) == [[("dog", "dog")], [("man", "man"), ("horse", "horse")]]
    assert {"file": "bad.jsonl", "line": 4, "reason": "non_utf8"} in s["bad_examples"]
    per_shard = [sh["stats"]["skipped"] for sh in manifest["shards"]]
    assert per_shard[0] == {"empty": 2, "non_utf8": 1, "malformed_json": 1}


def test_coco_tsv_and_jsonl_inputs(tmp_path, nlp, tokenizer):
    coco = tmp_path / "captions_val.json"
    coco.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "000000000007.jpg"}, {"id": 9, "file_name": "000000000009.jpg"}],
        "annotations": [{"id": 101, "image_id": 7, "caption": "A man riding a horse. On a beach."},
                        {"id": 102, "image_id": 9, "caption": "Two cars in a park."},
                        {"id": 103, "image_id": 9, "caption": ""}],
    }), encoding="utf-8")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("uid\tcaption\nu1\tA dog on a bike.\nu2\n", encoding="utf-8")
    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"id": "d1", "body": "A dog runs. A man waits."}) + "\n", encoding="utf-8")
    store, m = _tag(tmp_path, nlp, tokenizer, files=[coco], out="coco")
    recs = list(iter_dump_records(TextStoreReader(store)))
    assert [(r["id"], r.get("image_key")) for r in recs] == [("101", "000000000007.jpg"), ("102", "000000000009.jpg")]
    assert recs[0]["text"] == "A man riding a horse. On a beach."  # captions are not split
    assert m["summary"]["skipped"] == {"empty": 1}
    store, _ = _tag(tmp_path, nlp, tokenizer, files=[coco], out="coco_id", image_key="id")
    assert TextStoreReader(store).sentence(0).image_key == "7"
    store, m = _tag(tmp_path, nlp, tokenizer, files=[tsv], out="tsv", field="caption", id_field="uid")
    assert [r["id"] for r in iter_dump_records(TextStoreReader(store))] == ["u1#0"]
    assert m["summary"]["skipped"] == {"malformed_tsv": 1}
    bare = tmp_path / "bare.tsv"
    bare.write_bytes(b"x1\tA horse.\r\nx2\tTwo dogs.\r\n")  # no header, CRLF
    store, _ = _tag(tmp_path, nlp, tokenizer, files=[bare], out="bare", field="1", id_field="0", split="no")
    assert [(r["id"], r["text"]) for r in iter_dump_records(TextStoreReader(store))] == [
        ("x1", "A horse."), ("x2", "Two dogs.")]
    store, _ = _tag(tmp_path, nlp, tokenizer, files=[jl], out="jl", field="body", id_field="id")
    assert [(r["id"], r["text"]) for r in iter_dump_records(TextStoreReader(store))] == [
        ("d1#0", "A dog runs."), ("d1#1", "A man waits.")]
    with pytest.raises(VlmixerError, match="no column 'text'"):
        open_corpus_files([tsv])
    with pytest.raises(VlmixerError, match="does not exist"):
        open_corpus_files([tmp_path / "missing.txt"])


def test_resume_refuses_a_different_command(tmp_path, nlp, tokenizer):
    _tag(tmp_path, nlp, tokenizer, ["A dog."])
    with pytest.raises(VlmixerError, match="shard_size"):
        _tag(tmp_path, nlp, tokenizer, ["A dog."], shard_size=3)


def test_tokenizer_resolution(tmp_path, tokenizer):
    assert tokenizer.vocab_size == 30522 and _md5(tokenizer.vocab_file) == BERT_UNCASED_VOCAB_MD5
    with pytest.raises(VlmixerError, match="hub cannot be used"):
        resolve_tokenizer("no-such-org/no-such-tokenizer", cache_dir=tmp_path)
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    with pytest.raises(VlmixerError, match="neither vocab.txt nor tokenizer.json"):
        resolve_tokenizer(str(empty), cache_dir=tmp_path)
    (empty / "tokenizer_config.json").write_text("{}")
    (empty / "vocab.txt").write_text("")
    with pytest.raises(VlmixerError):
        resolve_tokenizer(str(empty), cache_dir=tmp_path)


def _cli(argv: list[str]) -> int:
    """The text commands only, as `vlmixer` wires them (other command modules are not needed)."""
    from vlmixer.cli.commands import text

    parser = argparse.ArgumentParser(prog="vlmixer")
    text.register(CommandTree(parser))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except VlmixerError:
        return 2


def test_cli_tag_show_dump_concepts_vocab(tmp_path, capsys, nlp):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    vocab = tmp_path / "v.txt"
    vocab.write_text(VOCAB, encoding="utf-8")
    store = tmp_path / "store"
    assert _cli(["text", "tag", "--input", str(corpus), "--concepts", str(vocab), "--out", str(store),
                 "--no-progress", "--shard-size", "4"]) == 0
    assert "10 sentences" in capsys.readouterr().out
    assert _cli(["text", "show", str(store), "--n", "3"]) == 0
    shown = capsys.readouterr().out
    assert "Two [men|man] ride [horses|horse] past the puppies." in shown
    assert "She will park the [car|car] near the [park|park]." in shown
    dump = tmp_path / "d.jsonl"
    assert _cli(["text", "dump", str(store), "--jsonl", "--out", str(dump)]) == 0
    recs = [json.loads(x) for x in dump.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 10 and set(recs[2]) == {"id", "text", "spans"}
    assert recs[2]["spans"] == [{"start": 4, "end": 18, "concept": "traffic light"}]
    # mapping written, edited, passed back
    mp = tmp_path / "map.tsv"
    assert _cli(["text", "concepts", "--concepts", str(vocab), "--out", str(mp)]) == 0
    with open(mp, "a", encoding="utf-8") as f:
        f.write("puppy\tdog\tuser\n")
    assert _cli(["text", "tag", "--input", str(corpus), "--concepts", str(vocab), "--out", str(tmp_path / "s2"),
                 "--no-progress", "--mapping", str(mp)]) == 0
    first = next(iter_dump_records(TextStoreReader(tmp_path / "s2")))
    assert [s["concept"] for s in first["spans"]] == ["man", "horse", "dog"]
    # a WordPiece vocabulary trained here is a usable --tokenizer directory
    tokdir = tmp_path / "tok"
    assert _cli(["text", "vocab", "--input", str(corpus), "--out", str(tokdir), "--vocab-size", "300",
                 "--min-frequency", "1"]) == 0
    assert _cli(["text", "tag", "--input", str(corpus), "--concepts", str(vocab), "--out", str(tmp_path / "s3"),
                 "--no-progress", "--tokenizer", str(tokdir)]) == 0
    r3 = TextStoreReader(tmp_path / "s3")
    assert r3.header["tokenizer"] == str(tokdir)
    assert [len(r3.sentence(i).spans) for i in range(10)] == [len(e) for e in EXPECTED]
    capsys.readouterr()
    assert _cli(["text", "tag", "--input", str(corpus), "--concepts", str(vocab), "--out", str(tmp_path / "s4"),
                 "--no-progress", "--mapping", str(mp), "--synonyms", "wordnet"]) == 2


def test_mark_sentence():
    assert mark_sentence("a dog and a cat", [(2, 5, "dog"), (12, 15, "cat")]) == "a [dog|dog] and a [cat|cat]"
    assert mark_sentence("nothing", []) == "nothing"


def test_concepts_from_a_gallery(tmp_path, nlp, tokenizer):
    """`--concepts GALLERY` tags with the gallery's own vocabulary (variants included)."""
    try:
        from vlmixer.storage.synthetic import TINY_CONCEPTS, build_gallery, random_images
    except ImportError:
        pytest.skip("gallery test helpers not available")
    from vlmixer.pipeline.text.resolve import load_concepts

    gallery = build_gallery(tmp_path / "gallery", {0: random_images(0, 3, 32)})
    concepts = load_concepts(gallery)
    assert concepts.sha256 == TINY_CONCEPTS.sha256
    store, _ = _tag(tmp_path, nlp, tokenizer, ["A kitty sits near the traffic lights."], concepts=concepts)
    assert _grounded(store) == [[("kitty", "cat"), ("traffic lights", "traffic light")]]
    assert TextStoreReader(store, expect_concepts_sha256=concepts.sha256).concepts == concepts


def test_fast_spacy_paths_change_nothing(tmp_path, nlp, tokenizer):
    """The stand-ins for spaCy's attribute ruler and lemmatizer and the numpy-BLAS products give
    the same tags, lemmas and stores as spaCy loaded as it ships."""
    from vlmixer.pipeline.text.attribute_rules import FastAttributeRuler, annotator, token_signature

    plain = load_spacy.__wrapped__(resolve_model_name(None))  # a fresh copy, never switched
    annotate = annotator(nlp)
    assert getattr(annotate, "fast", False)
    texts = SENTENCES + ["I'd've thought y'all ain't nothin' like 'em.", "Nobody wants something that big.",
                         "Whether it rains or not, the kids gonna play outside 'til 5 p.m."]
    assert [token_signature(d) for d in annotate(texts)] == [token_signature(d) for d in plain.pipe(texts)]
    fast, _ = _tag(tmp_path, nlp, tokenizer, texts, out="fast")
    assert isinstance(nlp.get_pipe("tok2vec").model.ops, NumpyGemmOps)
    exact, _ = _tag(tmp_path, plain, tokenizer, texts, out="exact", fast_spacy=False)
    assert not isinstance(plain.get_pipe("tok2vec").model.ops, NumpyGemmOps)
    assert list(iter_dump_records(TextStoreReader(fast))) == list(iter_dump_records(TextStoreReader(exact)))

    class Ruler:  # a rule this stand-in does not understand -> the real component is kept
        patterns = [{"patterns": [[{"LOWER": "a", "OP": "+"}]], "attrs": {}, "index": 0}]

    assert FastAttributeRuler.build(Ruler()) is None


def test_numpy_gemm_is_self_checked_and_single_threaded(monkeypatch):
    """The switch keeps spaCy's own ops when annotations would change, leaves non-CPU ops alone,
    and multiplies with BLAS limited to one thread."""
    import numpy
    import threadpoolctl
    from thinc.api import Ops

    from vlmixer.pipeline.text import gemm

    def fresh():
        return load_spacy.__wrapped__(resolve_model_name(None))

    model = fresh()
    before = [n.ops for n in gemm._models(model)]
    monkeypatch.setattr(gemm.NumpyGemmOps, "gemm", lambda self, x, y, **kw: numpy.zeros(
        (x.shape[1] if kw.get("trans1") else x.shape[0], y.shape[0] if kw.get("trans2") else y.shape[1]),
        dtype=x.dtype))
    assert gemm.use_numpy_gemm(model) is False  # wrong products change the tags -> restored
    assert [n.ops for n in gemm._models(model)] == before
    monkeypatch.undo()

    from thinc.backends.numpy_ops import NumpyOps

    class AcceleratedOps(NumpyOps):  # e.g. thinc-apple-ops: a CPU backend that is already fast
        pass

    for other in (Ops(), AcceleratedOps()):  # a layer on another device or another CPU backend
        model = fresh()
        gemm._models(model)[0].ops = other
        assert gemm.use_numpy_gemm(model) is False
        assert not any(isinstance(n.ops, NumpyGemmOps) for n in gemm._models(model))

    threads = []
    dot = numpy.dot

    def spy(*a, **kw):
        threads.extend(i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas")
        return dot(*a, **kw)

    ops = NumpyGemmOps()
    monkeypatch.setattr(numpy, "dot", spy)
    x, y = numpy.ones((3, 4), dtype="f"), numpy.ones((5, 4), dtype="f")
    assert ops.gemm(x, y, trans2=True).tolist() == [[4.0] * 5] * 3
    assert threads and set(threads) == {1}
    again = pickle.loads(pickle.dumps(ops))  # spaCy's n_process workers may pickle the model
    assert isinstance(again, NumpyGemmOps) and again.gemm(x, y, trans2=True).tolist() == [[4.0] * 5] * 3
