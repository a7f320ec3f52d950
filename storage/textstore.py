"""The HDF5 text store: tagged sentences with cached word-pieces, sharded across files.

    STORE/
      store.json              build header: format, version, concept vocabulary, tokenizer, provenance
      vocab.txt               the word-piece vocabulary the token ids index (copied at build start)
      shards/NAME.h5          one file per shard, written as NAME.h5.tmp and renamed when complete
      manifest.json           written last by finalize: shards in name order with their sentence
                              counts, offsets and sha256 (what `verify` checks the files against)

Each shard file holds ragged arrays as flat data + offsets (n+1, int64),
chunked and compressed:
  text      uint8 utf-8 bytes        / text_offsets
  ids       uint8 utf-8 sentence ids / id_offsets
  image_keys uint8 utf-8 (optional paired image key, "" when unpaired) / image_key_offsets
  tokens    int32 word-piece ids (no [CLS]/[SEP]) / token_offsets
  token_chars int32 (m, 2) char [start, end) of each word-piece in its sentence
  spans     int32 (k, 5): char_start, char_end, tok_start, tok_end, concept / span_offsets
Char offsets count unicode code points of the sentence (Python str indices).
A shard file appears under its final name only once complete, so a killed
job leaves no half shard, and resume skips every shard already present.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vlmixer.errors import StoreError
from vlmixer.files import atomic_write_json, sha256_file
from vlmixer.storage.headers import check_format, read_json_object
from vlmixer.storage.vocab import Vocabulary

FORMAT_NAME = "vlmixer-text"
FORMAT_VERSION = 1
_CHUNK = 1 << 13  # elements: small enough that one sentence read decompresses little
_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


@dataclass(frozen=True)
class Span:
    char_start: int
    char_end: int
    tok_start: int  # word-piece index, inclusive
    tok_end: int  # word-piece index, exclusive
    concept: int


@dataclass(frozen=True)
class Sentence:
    index: int
    id: str
    text: str
    tokens: np.ndarray  # (m,) int32 word-piece ids
    token_chars: np.ndarray  # (m, 2) int32
    spans: tuple[Span, ...]
    image_key: str = ""


def _check_format(meta: Mapping[str, Any], path: Path) -> None:
    check_format(meta, path, name=FORMAT_NAME, version=FORMAT_VERSION, what="text store",
                 remedy="re-run `vlmixer text tag`")


def _ragged(chunks: Sequence[np.ndarray], dtype: str, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    shape = (int(offsets[-1]),) if width is None else (int(offsets[-1]), width)
    flat = np.concatenate([np.asarray(c, dtype=dtype).reshape((-1,) + shape[1:]) for c in chunks]) \
        if chunks else np.zeros(shape, dtype=dtype)
    return flat.astype(dtype, copy=False), offsets


def _utf8(strings: Iterable[str]) -> list[np.ndarray]:
    return [np.frombuffer(s.encode("utf-8"), dtype=np.uint8) for s in strings]


class TextStoreWriter:
    """Creates or resumes a text store; each shard is written whole or not at all."""

    def __init__(
        self,
        root: str | Path,
        *,
        concepts: Vocabulary,
        tokenizer_name: str,
        vocab_file: str | Path,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise StoreError(f"{vocab_file}: tokenizer vocabulary file does not exist")
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "concepts": concepts.to_json(),
            "concepts_sha256": concepts.sha256,
            "tokenizer": tokenizer_name,
            "vocab_sha256": sha256_file(vocab_file),
            "provenance": dict(provenance or {}),
        }
        path = self.root / "store.json"
        if path.exists():
            old = read_json_object(path, "text store header")
            _check_format(old, path)
            for k in ("concepts_sha256", "vocab_sha256"):
                if old.get(k) != header[k]:
                    raise StoreError(f"{path}: existing store has {k}={old.get(k)!r}, this run {header[k]!r}; "
                                     "use a new output directory")
        else:
            (self.root / "vocab.txt").write_bytes(vocab_file.read_bytes())
            atomic_write_json(path, header)
        self.header = header

    def committed_shards(self) -> list[str]:
        return sorted(p.name[:-3] for p in (self.root / "shards").glob("*.h5"))

    def write_shard(self, name: str, sentences: Sequence[Mapping[str, Any]], stats: Mapping[str, Any] | None = None
                    ) -> Path:
        """Write one shard atomically.

        Each sentence is a mapping with `id`, `text`, `tokens` (ids), `token_chars`
        ((m,2) char offsets), `spans` (iterable of (char_start, char_end, tok_start,
        tok_end, concept)) and optionally `image_key`.
        """
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"text store: bad shard name {name!r}")
        final = self.root / "shards" / f"{name}.h5"
        if final.exists():
            raise StoreError(f"{final}: shard already committed")
        n_concepts = len(self.header["concepts"])
        texts, ids, keys, toks, tchars, spans = [], [], [], [], [], []
        for i, s in enumerate(sentences):
            t = np.asarray(s["tokens"], dtype=np.int32).reshape(-1)
            tc = np.asarray(s["token_chars"], dtype=np.int32).reshape(-1, 2)
            if len(tc) != len(t):
                raise StoreError(f"text store shard {name}: sentence {i} has {len(t)} tokens, {len(tc)} offsets")
            sp = np.asarray(list(s["spans"]), dtype=np.int32).reshape(-1, 5)
            if len(sp) and (sp[:, 4].min() < 0 or sp[:, 4].max() >= n_concepts
                            or sp[:, 2].min() < 0 or sp[:, 3].max() > len(t) or np.any(sp[:, 2] >= sp[:, 3])):
                raise StoreError(f"text store shard {name}: sentence {i} has an invalid span {sp.tolist()}")
            texts.append(s["text"])
            ids.append(str(s["id"]))
            keys.append(str(s.get("image_key", "") or ""))
            toks.append(t)
            tchars.append(tc)
            spans.append(sp)
        tmp = final.with_name(final.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            for name_, chunks, dtype, width in (
                ("text", _utf8(texts), "u1", None),
                ("ids", _utf8(ids), "u1", None),
                ("image_keys", _utf8(keys), "u1", None),
                ("tokens", toks, "<i4", None),
                ("token_chars", tchars, "<i4", 2),
                ("spans", spans, "<i4", 5),
            ):
                flat, off = _ragged(chunks, dtype, width)
                chunk = (min(max(len(flat), 1), _CHUNK),) + ((width,) if width else ())
                f.create_dataset(name_, data=flat, chunks=chunk, maxshape=(None,) + flat.shape[1:], **_COMPRESSION)
                off_name = {"text": "text_offsets", "ids": "id_offsets", "image_keys": "image_key_offsets",
                            "tokens": "token_offsets", "token_chars": None, "spans": "span_offsets"}[name_]
                if off_name:
                    f.create_dataset(off_name, data=off)
            f.attrs["format"] = FORMAT_NAME
            f.attrs["version"] = FORMAT_VERSION
            f.attrs["sentences"] = len(texts)
            f.attrs["stats"] = json.dumps(dict(stats or {}))
            f.flush()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        return final

    def finalize(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write `manifest.json` (last) listing every committed shard in name order."""
        return finalize_text_store(self.root, extra)


def finalize_text_store(root: str | Path, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    root = Path(root)
    header = read_json_object(root / "store.json", "text store header")
    _check_format(header, root / "store.json")
    shards = []
    total = 0
    spans_total = 0
    for p in sorted((root / "shards").glob("*.h5")):
        with h5py.File(p, "r") as f:
            n = int(f.attrs["sentences"])
            k = int(f["spans"].shape[0])
            stats = json.loads(f.attrs.get("stats", "{}"))
        shards.append({"name": p.name, "sentences": n, "spans": k, "offset": total, "sha256": sha256_file(p),
                       "stats": stats})
        total += n
        spans_total += k
    for tmp in (root / "shards").glob("*.tmp"):
        tmp.unlink()
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "sentences": total,
        "spans": spans_total,
        "concepts_sha256": header["concepts_sha256"],
        "vocab_sha256": header["vocab_sha256"],
        "shards": shards,
        **dict(extra or {}),
    }
    atomic_write_json(root / "manifest.json", manifest)
    return manifest


def check_shard_list(shards: Sequence[Mapping[str, Any]], total: int, where: Path) -> None:
    """A manifest's shard list as finalize writes it: names ascending, offsets the running sum of counts.

    Two swapped entries would otherwise send sentence lookups to the wrong file."""
    off = 0
    for k, s in enumerate(shards):
        name, n = s.get("name"), s.get("sentences")
        if not isinstance(n, int) or n < 0 or s.get("offset") != off:
            raise StoreError(f"{where}: shard entry {k} ({name}) has offset {s.get('offset')!r} and "
                             f"{n!r} sentences, expected offset {off} (entries reordered or edited)")
        if k and not str(shards[k - 1].get("name")) < str(name):
            raise StoreError(f"{where}: shard entries out of name order at {k} ({name}) "
                             "(entries reordered or edited)")
        off += n
    if off != total:
        raise StoreError(f"{where}: shards hold {off} sentences, the manifest says {total}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class _ShardCache:
    """Offsets of one open shard, read once per process (small: 8 bytes a sentence)."""

    def __init__(self, f: h5py.File) -> None:
        self.f = f
        self.off = {k: f[k][()] for k in ("text_offsets", "id_offsets", "image_key_offsets", "token_offsets",
                                          "span_offsets")}


class TextStoreReader:
    """Sentences by global index across shards. Fork-safe: files open lazily per process."""

    def __init__(self, root: str | Path, *, expect_concepts_sha256: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: text store directory does not exist")
        self.manifest = read_json_object(self.root / "manifest.json", "text store manifest (was tagging finished?)")
        _check_format(self.manifest, self.root / "manifest.json")
        self.header = read_json_object(self.root / "store.json", "text store header")
        _check_format(self.header, self.root / "store.json")
        for k in ("sentences", "shards", "concepts_sha256"):
            if k not in self.manifest:
                raise StoreError(f"{self.root / 'manifest.json'}: corrupted text store manifest (no {k!r})")
        self.concepts = Vocabulary.from_json(self.header["concepts"])
        if self.concepts.sha256 != self.header["concepts_sha256"] or \
                self.manifest["concepts_sha256"] != self.header["concepts_sha256"]:
            raise StoreError(f"{self.root}: concept vocabulary does not match its recorded sha256")
        if expect_concepts_sha256 is not None and expect_concepts_sha256 != self.concepts.sha256:
            raise StoreError(f"{self.root}: text store was tagged with another concept vocabulary "
                             f"(sha256 {self.concepts.sha256[:12]}) than the gallery's "
                             f"({expect_concepts_sha256[:12]}); re-tag with `--concepts GALLERY`")
        self.vocab_file = self.root / "vocab.txt"
        self.num_sentences = int(self.manifest["sentences"])
        self._shards = self.manifest["shards"]
        self._offsets = np.array([s["offset"] for s in self._shards] + [self.num_sentences], np.int64)
        check_shard_list(self._shards, self.num_sentences, self.root / "manifest.json")
        self._pid = -1
        self._files: dict[int, _ShardCache] = {}

    def __len__(self) -> int:
        return self.num_sentences

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_pid"], d["_files"] = -1, {}
        return d

    def close(self) -> None:
        if self._pid == os.getpid():
            for c in self._files.values():
                c.f.close()
        self._files, self._pid = {}, -1

    def _shard(self, k: int) -> _ShardCache:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        c = self._files.get(k)
        if c is None:
            path = self.root / "shards" / self._shards[k]["name"]
            if not path.exists():
                raise StoreError(f"{path}: shard listed in the manifest is missing")
            try:
                f = h5py.File(path, "r")
                c = _ShardCache(f)
                n = int(f.attrs["sentences"])
            except (OSError, KeyError, ValueError) as e:
                raise StoreError(f"{path}: cannot read text store shard ({_first_line(e)})") from None
            want = self._shards[k]["sentences"]
            if n != want or len(c.off["text_offsets"]) != n + 1:
                f.close()
                raise StoreError(f"{path}: holds {n} sentences, manifest.json lists {want} for it "
                                 "(manifest edited or shards swapped); run `vlmixer verify`")
            self._files[k] = c
        return c

    def _locate(self, index: int) -> tuple[_ShardCache, int]:
        if not 0 <= index < self.num_sentences:
            raise IndexError(f"sentence index {index} out of range [0, {self.num_sentences})")
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._shard(k), index - int(self._offsets[k])

    @staticmethod
    def _slice(c: _ShardCache, data: str, offsets: str, i: int) -> np.ndarray:
        o = c.off[offsets]
        try:
            return c.f[data][int(o[i]): int(o[i + 1])]
        except (OSError, KeyError) as e:  # a damaged gzip chunk, a missing dataset
            raise StoreError(f"{c.f.filename}: cannot read {data} of sentence {i} ({_first_line(e)}); "
                             "the shard is damaged") from None

    def tokens(self, index: int) -> np.ndarray:
        c, i = self._locate(index)
        return self._slice(c, "tokens", "token_offsets", i)

    def span_array(self, index: int) -> np.ndarray:
        """(k, 5) int32: char_start, char_end, tok_start, tok_end, concept."""
        c, i = self._locate(index)
        return self._slice(c, "spans", "span_offsets", i)

    def text(self, index: int) -> str:
        c, i = self._locate(index)
        return self._slice(c, "text", "text_offsets", i).tobytes().decode("utf-8")

    def sentence(self, index: int) -> Sentence:
        c, i = self._locate(index)
        sp = self._slice(c, "spans", "span_offsets", i)
        return Sentence(
            index=index,
            id=self._slice(c, "ids", "id_offsets", i).tobytes().decode("utf-8"),
            text=self._slice(c, "text", "text_offsets", i).tobytes().decode("utf-8"),
            tokens=self._slice(c, "tokens", "token_offsets", i),
            token_chars=self._slice(c, "token_chars", "token_offsets", i),
            spans=tuple(Span(*map(int, row)) for row in sp),
            image_key=self._slice(c, "image_keys", "image_key_offsets", i).tobytes().decode("utf-8"),
        )

    def shard_arrays(self, k: int) -> dict[str, np.ndarray]:
        """All arrays of shard k in memory: for bulk readers (trainer caches, verify, dump)."""
        c = self._shard(k)
        out = {}
        for name in c.f.keys():
            try:
                out[name] = c.f[name][()]
            except (OSError, KeyError) as e:  # a damaged gzip chunk, a missing dataset
                raise StoreError(f"{c.f.filename}: cannot read {name} ({_first_line(e)}); "
                                 "the shard is damaged") from None
        return out

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def shard_offset(self, k: int) -> int:
        return int(self._offsets[k])
