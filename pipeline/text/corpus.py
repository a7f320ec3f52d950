"""Corpus readers: files -> shards of raw records -> decoded records or counted rejects.

The driver only cuts files into shards (`plan_shards`); decoding happens in the
shard worker (`decode_items`), so a bad line costs one counted reason in that
shard's stats instead of an exception that stops a long job. Shard names are
`FFFF-CCCCCC` (input file index, chunk index): the same command over the same
files yields the same names, which is what resume relies on.

Formats (`--format auto` picks by suffix):
  txt    one sentence or document per line (documents are split into sentences later)
  jsonl  one json object per line, text under `--field` (default "text")
  tsv    tab-separated; `--field` names a header column, or is a 0-based column index
         for files without a header
  coco   a COCO captions json (`annotations` with `caption`, `image_id`); records keep
         the annotation id as sentence id and the image key for paired data
  webdataset  tar shards as img2dataset writes them: the caption is the sample's `.txt`
         member (`--field txt`, the default) or a field of its `.json` member (`--field
         caption`); the sample's key is the sentence id and the image key
  parquet  `--caption-column` (default caption) and `--key-column` (default key) of each row

Inputs may name many files at once: a list, a glob or brace notation
(`shards/{00000..00999}.tar`), expanded by `containers.expand_inputs`.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmixer.errors import VlmixerError
from vlmixer.pipeline import containers

FORMATS = ("txt", "jsonl", "tsv", "coco", "webdataset", "parquet")
_SUFFIX_FORMAT = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv",
                  ".json": "coco", ".tar": "webdataset", ".parquet": "parquet", ".pq": "parquet"}
CONTAINER_FORMATS = ("webdataset", "parquet")
IMAGE_KEY_MODES = ("file_name", "id")

# Reasons a record or sentence is skipped; the keys of every `skipped` counter.
NON_UTF8 = "non_utf8"
EMPTY = "empty"
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
MALFORMED_TSV = "malformed_tsv"
TOO_LONG = "too_long"
SENTENCE_TOO_LONG = "sentence_too_long"
MISSING_MEMBER = "missing_member"  # a webdataset sample without the caption member
TRUNCATED = "truncated"  # a webdataset member cut short with its tar
REASONS = (NON_UTF8, EMPTY, MALFORMED_JSON, MISSING_FIELD, MALFORMED_TSV, TOO_LONG, SENTENCE_TOO_LONG,
           MISSING_MEMBER, TRUNCATED)


@dataclass(frozen=True)
class CorpusFile:
    """One input file and how to read it; validated by `open_corpus_file` before any work."""

    index: int
    path: str
    fmt: str
    tag: str  # prefix of sentence ids for line formats (the file name, made unique)
    field: str = "text"
    id_field: str | None = None
    split: bool = True  # split records into sentences
    column: int = -1  # tsv: resolved text column
    id_column: int = -1  # tsv: resolved id column, -1 = none
    has_header: bool = False  # tsv
    key_column: str = "key"  # parquet


@dataclass(frozen=True)
class Record:
    """A decoded record: `base_id` becomes the sentence id (plus `#k` when split)."""

    base_id: str
    text: str
    image_key: str = ""


@dataclass(frozen=True)
class ShardTask:
    """A unit of work with a stable name. Line formats carry (line_no, raw bytes or None
    when over-long); coco carries (ann_id, caption as found in the json, image_key);
    webdataset and parquet carry (sample key, raw caption bytes / str or None, problem)."""

    name: str
    file: CorpusFile
    items: tuple[tuple[Any, ...], ...]


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise VlmixerError(f"unknown corpus format {fmt!r} (known: {', '.join(FORMATS)})")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMAT:
        raise VlmixerError(f"{path}: cannot tell the corpus format from the suffix {suffix!r}; pass "
                           f"--format ({', '.join(FORMATS)})")
    return _SUFFIX_FORMAT[suffix]


def _tsv_columns(path: Path, field: str, id_field: str | None) -> tuple[int, int, bool]:
    if field.isdigit():
        if id_field is not None and not id_field.isdigit():
            raise VlmixerError(f"{path}: --field is a column index, so --id-field must be one too")
        return int(field), int(id_field) if id_field is not None else -1, False
    with open(path, "rb") as f:
        head = f.readline(1 << 20)
    try:
        header = head.decode("utf-8-sig").rstrip("\r\n").split("\t")
    except UnicodeDecodeError:
        raise VlmixerError(f"{path}: the tsv header line is not UTF-8") from None
    if field not in header:
        raise VlmixerError(f"{path}: tsv header has no column {field!r} (columns: {header[:10]}); "
                           "pass --field NAME or a 0-based column index for files without a header")
    idc = -1
    if id_field is not None:
        if id_field not in header:
            raise VlmixerError(f"{path}: tsv header has no id column {id_field!r}")
        idc = header.index(id_field)
    return header.index(field), idc, True


def _expand(paths: Sequence[str | Path], fmt: str) -> list[Path]:
    """Container specs (globs, brace ranges) become their files; other paths stay as given."""
    out: list[Path] = []
    for p in paths:
        if fmt in CONTAINER_FORMATS or (fmt == "auto" and containers.is_container_spec(str(p))):
            out += containers.expand_inputs(str(p))
        else:
            out.append(Path(p))
    return out


def open_corpus_files(paths: Sequence[str | Path], *, fmt: str = "auto", field: str = "text",
                      id_field: str | None = None, split: str = "auto",
                      key_column: str = "key") -> list[CorpusFile]:
    """Validate every input up front (exists, format, tsv columns) so a typo fails in a second,
    not after an hour of tagging."""
    if not paths:
        raise VlmixerError("no input corpus given (--input)")
    if split not in ("auto", "yes", "no"):
        raise VlmixerError(f"--split must be auto, yes or no, not {split!r}")
    paths = _expand(paths, fmt)
    names = [Path(p).name for p in paths]
    out = []
    for i, p in enumerate(paths):
        path = Path(p)
        if not path.is_file():
            raise VlmixerError(f"{path}: input corpus does not exist or is not a file")
        f = detect_format(path, fmt)
        tag = names[i] if names.count(names[i]) == 1 else f"{names[i]}@{i}"
        # captions (COCO, img2dataset's containers) are sentences already
        do_split = (f not in ("coco", *CONTAINER_FORMATS)) if split == "auto" else split == "yes"
        col, idc, header = (-1, -1, False)
        if f == "tsv":
            col, idc, header = _tsv_columns(path, field, id_field)
        fld = field
        if f == "parquet":
            fld = "caption" if field == "text" else field
            containers.check_columns(path, {"--caption-column": fld})
        out.append(CorpusFile(index=i, path=str(path.resolve()), fmt=f, tag=tag, field=fld,
                              id_field=id_field, split=do_split, column=col, id_column=idc, has_header=header,
                              key_column=key_column))
    return out


def file_fingerprint(path: str | Path, edge: int = 1 << 16) -> dict[str, Any]:
    """Size plus a hash of the first and last 64 KiB: cheap on terabyte corpora, and enough to
    notice that a resumed job is looking at another file than the one it started on."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            h.update(f.read(edge))
    return {"name": p.name, "size": size, "edge_sha256": h.hexdigest()}


def iter_raw_lines(path: str | Path, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes without the newline), or None for a line over `max_bytes`
    (read past in pieces, never held whole)."""
    with open(path, "rb") as f:
        n = 0
        while True:
            line = f.readline(max_bytes + 1)
            if not line:
                return
            n += 1
            if len(line) > max_bytes and not line.endswith(b"\n"):
                while True:
                    rest = f.readline(1 << 20)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield n, None
                continue
            yield n, line.rstrip(b"\r\n")


def count_records(cf: CorpusFile) -> int | None:
    """Line count (or caption count) for the progress bar's total; reads at disk speed. None for
    a webdataset tar, whose samples are known only by reading it (the job estimates instead)."""
    if cf.fmt == "webdataset":
        return None
    if cf.fmt == "parquet":
        return int(containers.parquet_file(cf.path).metadata.num_rows)
    if cf.fmt == "coco":
        return len(_coco_items(cf, "file_name"))
    n = 0
    last = b"\n"
    with open(cf.path, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                break
            n += b.count(b"\n")
            last = b[-1:]
    n += last != b"\n"
    return n - int(cf.has_header)


def _coco_items(cf: CorpusFile, image_key: str) -> list[tuple[Any, ...]]:
    try:
        with open(cf.path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VlmixerError(f"{cf.path}: cannot read COCO captions json ({e})") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise VlmixerError(f"{cf.path}: not a COCO captions json (no 'annotations' list)")
    names: dict[Any, str] = {}
    for im in data.get("images") or []:
        if isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str):
            names[im["id"]] = im["file_name"]
    items = []
    for k, a in enumerate(anns):
        if not isinstance(a, dict):
            items.append((f"{cf.tag}:{k}", None, ""))
            continue
        ann_id = a.get("id", f"{cf.tag}:{k}")
        img = a.get("image_id")
        key = "" if img is None else (names.get(img, str(img)) if image_key == "file_name" else str(img))
        items.append((str(ann_id), a.get("caption"), key))
    return items


def plan_shards(files: Sequence[CorpusFile], shard_size: int, *, max_line_bytes: int,
                image_key: str = "file_name") -> Iterator[ShardTask]:
    """Stream shards of `shard_size` records per file, in input order; memory stays one shard."""
    if shard_size < 1:
        raise VlmixerError(f"--shard-size must be >= 1, not {shard_size}")
    for cf in files:
        if cf.fmt == "coco":
            items = _coco_items(cf, image_key)
            for c in range(0, len(items), shard_size):
                yield ShardTask(f"{cf.index:04d}-{c // shard_size:06d}", cf, tuple(items[c:c + shard_size]))
            continue
        chunk: list[tuple[Any, ...]] = []
        c = 0
        if cf.fmt in CONTAINER_FORMATS:
            records = _webdataset_items(cf, max_line_bytes) if cf.fmt == "webdataset" else _parquet_items(cf)
            for item in records:
                chunk.append(item)
                if len(chunk) == shard_size:
                    yield ShardTask(f"{cf.index:04d}-{c:06d}", cf, tuple(chunk))
                    chunk, c = [], c + 1
            if chunk:
                yield ShardTask(f"{cf.index:04d}-{c:06d}", cf, tuple(chunk))
            continue
        for n, raw in iter_raw_lines(cf.path, max_line_bytes):
            if n == 1 and cf.has_header:
                continue
            chunk.append((n, raw))
            if len(chunk) == shard_size:
                yield ShardTask(f"{cf.index:04d}-{c:06d}", cf, tuple(chunk))
                chunk, c = [], c + 1
        if chunk:
            yield ShardTask(f"{cf.index:04d}-{c:06d}", cf, tuple(chunk))


def _webdataset_items(cf: CorpusFile, max_bytes: int) -> Iterator[tuple[Any, ...]]:
    """(key, caption member bytes or None, problem) per sample, in archive order; the caption is
    the `.txt` member, or the `.json` member for a json field."""
    samples, problem = containers.scan_tar(cf.path)
    ext = "txt" if cf.field in ("text", "txt") else "json"
    for s in samples:
        m = s.members.get(ext)
        if m is None:
            yield s.key, None, MISSING_MEMBER
        elif m.size > max_bytes:
            yield s.key, None, TOO_LONG
        else:
            try:
                yield s.key, containers.read_range(cf.path, m.offset, m.size), None
            except OSError:
                yield s.key, None, TRUNCATED
    if problem is not None and not any(s.problem for s in samples):
        yield f"{Path(cf.path).name}#", None, TRUNCATED


def _parquet_items(cf: CorpusFile) -> Iterator[tuple[Any, ...]]:
    names = containers.parquet_columns(cf.path)
    key_col = cf.key_column if cf.key_column in names else None
    cols = [c for c in (key_col, cf.field) if c]
    row = 0
    for batch in containers.iter_parquet(cf.path, cols):
        keys = batch.get(key_col) if key_col else None
        for j, text in enumerate(batch[cf.field]):
            key = keys[j] if keys is not None and keys[j] not in (None, "") else f"{cf.tag}/{row}"
            yield str(key), text, None
            row += 1


def _decode_sample(cf: CorpusFile, key: str, raw: Any, problem: str | None) -> Record | str:
    """A container sample's caption as a record keyed (and image-keyed) by the sample's key, or
    the reason it has none."""
    if problem is not None:
        return problem
    if raw is None:
        return MISSING_FIELD
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return NON_UTF8
    if cf.fmt == "webdataset" and cf.field not in ("text", "txt"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return MALFORMED_JSON
        value = obj.get(cf.field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            return MISSING_FIELD
        text = value
    return Record(key, text, key) if text.strip() else EMPTY


def _decode_line(cf: CorpusFile, n: int, raw: bytes | None) -> Record | str:
    if raw is None:
        return TOO_LONG
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return NON_UTF8
    if n == 1:
        line = line.lstrip("\ufeff")
    base = f"{cf.tag}:{n}"
    if cf.fmt == "txt":
        return Record(base, line) if line.strip() else EMPTY
    if cf.fmt == "jsonl":
        if not line.strip():
            return EMPTY
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return MALFORMED_JSON
        if not isinstance(obj, dict):
            return MALFORMED_JSON
        text = obj.get(cf.field)
        if not isinstance(text, str):
            return MISSING_FIELD
        if cf.id_field is not None:
            rid = obj.get(cf.id_field)
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                return MISSING_FIELD
            base = str(rid)
        return Record(base, text) if text.strip() else EMPTY
    # tsv
    if not line.strip():
        return EMPTY
    cols = line.split("\t")
    if cf.column >= len(cols) or cf.id_column >= len(cols):
        return MALFORMED_TSV
    text = cols[cf.column]
    if cf.id_column >= 0:
        base = cols[cf.id_column]
    return Record(base, text) if text.strip() else EMPTY


def decode_items(task: ShardTask, *, max_record_chars: int,
                 bad_examples: int = 20) -> tuple[list[Record], Counter[str], list[dict[str, Any]]]:
    """Records of a shard, the per-reason counts of what was skipped, and the first few skipped
    items (line or annotation, reason) so a user can find them."""
    cf = task.file
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    for item in task.items:
        if cf.fmt == "coco":
            ann_id, caption, key = item
            if not isinstance(caption, str):
                r: Record | str = MISSING_FIELD
            elif not caption.strip():
                r = EMPTY
            else:
                r = Record(ann_id, caption, key)
            where = {"annotation": ann_id}
        elif cf.fmt in CONTAINER_FORMATS:
            key, raw, problem = item
            r = _decode_sample(cf, key, raw, problem)
            where = {"sample": key}
        else:
            n, raw = item
            r = _decode_line(cf, n, raw)
            where = {"line": n}
        if isinstance(r, Record) and len(r.text) > max_record_chars:
            r = TOO_LONG
        if isinstance(r, str):
            skipped[r] += 1
            if len(examples) < bad_examples:
                examples.append({"file": os.path.basename(cf.path), **where, "reason": r})
        else:
            records.append(r)
    return records, skipped, examples
