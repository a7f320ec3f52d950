"""`vlmixer gallery import`: region features someone else extracted -> a gallery.

The build's machinery with a file reader in place of the detector: the driver
plans shards of rows, a reader task turns one shard into the same
`BatchPiece` the detector produces (features already fp16), and the build's
`ShardCommitter` writes it in one transaction whose commit marker comes last.
So resume, failure records, the exit code and `finalize` are the build's.

Planning reads each TSV once, streaming, for its sha256 (the provenance) and
its line starts (or takes them from VinVL's `.lineidx`); after that the driver
holds 8 bytes per row and a window of shard references, never rows. Readers
seek to their shard's first byte and go row by row, so a 60 GB TSV needs the
memory of a few shards. A resumed import refuses inputs whose sha256 changed.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmixer.errors import VlmixerError
from vlmixer.pipeline import ray_session
from vlmixer.pipeline.gallery.job import EXIT_SOME_FAILED, Progress, existing_state
from vlmixer.pipeline.gallery.region_files import (
    VINVL_POSITION_DIMS,
    BadRow,
    LabelMap,
    RegionRow,
    butd_feature_dim,
    butd_labelled,
    npz_feature_dim,
    npz_labelled,
    parse_butd,
    parse_vinvl,
    read_npz,
    tsv_key,
    vinvl_feature_dim,
)
from vlmixer.pipeline.gallery.sources import keys_digest
from vlmixer.pipeline.gallery.work import BatchPiece, ImageOutcome, ShardCommitter, failure_category

FORMATS = ("vinvl-tsv", "butd-tsv", "npz")
UNLABELLED = "__unlabelled__"  # the one concept of a `--concepts none` gallery
FP16_MAX = 65504.0
_SCAN_CHUNK = 1 << 24


@dataclass(frozen=True)
class ImportOptions:
    """Every knob of an import; the CLI fills it, tests and the bench construct it directly."""

    format: str
    inputs: tuple[str, ...]
    out: str
    vocab: str | None = None
    labelmap: str | None = None
    attribute_vocab: str | None = None
    concepts: str | None = None  # "none": import without labels (CMC cannot use the gallery)
    id_base: int | None = None  # file id of the first vocabulary entry; default 1 for npz, else 0
    feature_dim: int | None = None  # default: from the first readable row
    image_pattern: str | None = None  # where the source images are, e.g. "coco/{key}.jpg"
    shard_size: int = 256
    ray_address: str = "local"
    num_cpus: int | None = None
    progress: bool | None = None
    max_listed: int = 50


@dataclass(frozen=True)
class ImportShard:
    """Rows [first_row, first_row + rows) of the inputs: byte spans for TSVs, file paths for npz."""

    shard_id: str
    files: tuple[str, ...]
    spans: tuple[tuple[int, int], ...] = ()
    first_row: int = 0
    rows: int = 0
    source_sha256: str = ""


@dataclass
class ImportReport:
    """What an import did; `exit_code` is 0, or EXIT_SOME_FAILED when rows are recorded as bad."""

    out: str
    format: str
    shards_planned: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    rows_done: int = 0
    patches_done: int = 0
    failures_this_run: int = 0
    gallery_images: int = 0
    gallery_patches: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    unknown_labels: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    mode: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else 0

    def summary(self, max_listed: int = 50) -> str:
        rate = self.rows_done / self.seconds if self.seconds > 0 else 0.0
        lines = [f"gallery {self.out}: {self.gallery_images} images, {self.gallery_patches} patches "
                 f"(imported from {self.format})",
                 f"this run ({self.mode}): {self.shards_done} shards ({self.shards_skipped} already committed), "
                 f"{self.rows_done} rows, {self.patches_done} patches, {self.failures_this_run} bad rows, "
                 f"{self.seconds:.1f} s ({rate:.1f} rows/s)"]
        lines += [f"note: {n}" for n in self.notes]
        if self.unknown_labels:
            lines.append(f"labels not in the vocabulary ({len(self.unknown_labels)}; their rows are recorded as "
                         "bad, nothing was guessed):")
            for name, n in sorted(self.unknown_labels.items(), key=lambda kv: (-kv[1], kv[0]))[:max_listed]:
                lines.append(f"  {name}: {n} row(s)")
        if self.failed:
            lines.append(f"BAD rows ({len(self.failed)}; recorded in the gallery):")
            for f in self.failed[:max_listed]:
                lines.append(f"  {f['key']}: {f['reason']}  [{f['path']}]")
            if len(self.failed) > max_listed:
                lines.append(f"  ... and {len(self.failed) - max_listed} more (GalleryReader.failures())")
        return "\n".join(lines)


# -- validation, vocabularies ------------------------------------------------------


def validate(opts: ImportOptions) -> None:
    """Check every argument before any work starts."""
    if opts.format not in FORMATS:
        raise VlmixerError(f"--format {opts.format!r}: choose one of {', '.join(FORMATS)}")
    if not opts.inputs:
        raise VlmixerError("--input: give the file(s) to import")
    for p in opts.inputs:
        if not Path(p).exists():
            raise VlmixerError(f"{p}: --input does not exist")
        if opts.format != "npz" and not Path(p).is_file():
            raise VlmixerError(f"{p}: --input of {opts.format} must be a file (a folder is for --format npz)")
    for name in ("vocab", "labelmap", "attribute_vocab"):
        v = getattr(opts, name)
        if v is not None and not Path(v).is_file():
            raise VlmixerError(f"{v}: --{name.replace('_', '-')} file does not exist")
    if opts.concepts not in (None, "none"):
        raise VlmixerError(f"--concepts {opts.concepts!r}: the only value is 'none' (import without labels)")
    if opts.concepts == "none" and (opts.vocab or opts.labelmap):
        raise VlmixerError("--concepts none imports without labels: drop --vocab/--labelmap")
    if opts.vocab and opts.labelmap:
        raise VlmixerError("give either --labelmap or --vocab, not both")
    if opts.concepts is None and not (opts.vocab or opts.labelmap):
        raise VlmixerError("the gallery vocabulary is explicit: pass --vocab TXT or --labelmap JSON (the names "
                           "the file's labels map to), or --concepts none to import without labels")
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise VlmixerError(f"{opts.out}: --out exists and is not a directory")
    if opts.shard_size < 1:
        raise VlmixerError("--shard-size must be >= 1")
    if opts.feature_dim is not None and opts.feature_dim < 1:
        raise VlmixerError("--feature-dim must be >= 1")
    if opts.image_pattern is not None:
        try:
            opts.image_pattern.format(key="x")
        except (KeyError, IndexError, ValueError) as e:
            raise VlmixerError(f"--image-pattern {opts.image_pattern!r}: use {{key}} for the image key ({e})") from None


def _vocabularies(opts: ImportOptions) -> tuple[list[list[str]], list[list[str]] | None]:
    from vlmixer.storage.vocab import read_labelmap_json, read_vocab_txt

    if opts.concepts == "none":
        return [[UNLABELLED]], None
    attributes = None
    if opts.labelmap:
        c, a = read_labelmap_json(opts.labelmap)
        concepts, attributes = c.to_json(), (a.to_json() if a is not None else None)
    else:
        concepts = read_vocab_txt(str(opts.vocab)).to_json()
    if opts.attribute_vocab:
        attributes = read_vocab_txt(opts.attribute_vocab).to_json()
    return concepts, attributes


# -- planning ------------------------------------------------------------------------


@dataclass(frozen=True)
class ScannedFile:
    path: str
    sha256: str
    size: int
    rows: np.ndarray  # (n, 2) int64 byte [start, end) of each non-blank row
    lineidx: bool


def _lineidx(path: Path) -> Path | None:
    for cand in (path.with_suffix(".lineidx"), Path(str(path) + ".lineidx")):
        if cand.is_file():
            return cand
    return None


def scan_tsv(path: str | Path) -> ScannedFile:
    """sha256 and row spans in one streaming pass (16 MiB at a time); VinVL's `.lineidx`, when
    present, gives the row starts instead (checked against the file). Blank lines are not rows."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    nl: list[np.ndarray] = []
    idx = _lineidx(path)
    given = _read_lineidx(idx, size) if idx is not None else None
    # hashlib and numpy release the GIL: chunk k is hashed in a thread while its newlines are found
    # here (two buffers alternate, so the next read never overwrites what is being hashed)
    bufs = [bytearray(_SCAN_CHUNK), bytearray(_SCAN_CHUNK)]
    with open(path, "rb") as f, ThreadPoolExecutor(1) as pool:
        pos, k, hashing = 0, 0, None
        while True:
            buf = bufs[k % 2]
            n = f.readinto(buf)
            if not n:
                break
            if hashing is not None:
                hashing.result()
            hashing = pool.submit(h.update, memoryview(buf)[:n])
            if given is None:
                nl.append(np.flatnonzero(np.frombuffer(buf, np.uint8, count=n) == 10).astype(np.int64) + pos)
            pos += n
            k += 1
        if hashing is not None:
            hashing.result()
    if given is not None:
        bounds = np.append(given, size).astype(np.int64)
        with open(path, "rb") as f:  # rows must start right after a newline: a stale index is refused
            for s in bounds[1:-1][:: max(1, (len(bounds) - 2) // 64)]:
                f.seek(int(s) - 1)
                if f.read(1) != b"\n":
                    raise VlmixerError(f"{idx}: does not match {path} (offset {int(s)} is not a line start); "
                                       "delete the stale .lineidx")
    else:
        ends = np.concatenate(nl) + 1 if nl else np.zeros(0, np.int64)
        bounds = np.concatenate([[0], ends]).astype(np.int64)
        if bounds[-1] != size:
            bounds = np.append(bounds, size)
    rows = np.stack([bounds[:-1], bounds[1:]], 1) if len(bounds) > 1 else np.zeros((0, 2), np.int64)
    rows = rows[rows[:, 1] - rows[:, 0] > 1]  # a row is more than its newline
    return ScannedFile(str(path), h.hexdigest(), size, rows, given is not None)


def _read_lineidx(idx: Path, size: int) -> np.ndarray:
    try:
        vals = np.array([int(x) for x in idx.read_text(encoding="ascii").split()], np.int64)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise VlmixerError(f"{idx}: unreadable .lineidx ({e})") from None
    if len(vals) == 0 or vals[0] != 0 or np.any(np.diff(vals) <= 0) or vals[-1] >= size:
        raise VlmixerError(f"{idx}: not a line index of a {size}-byte file; delete the stale .lineidx")
    return vals


def _npz_files(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """(key, path) of every .npz under the inputs, by relative path; the key is the file's stem."""
    out = []
    for src in inputs:
        p = Path(src)
        if p.is_file():
            out.append((p.stem, str(p)))
            continue
        for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(".npz") and not name.startswith("."):
                    full = Path(dirpath) / name
                    out.append((full.relative_to(p).with_suffix("").as_posix(), str(full)))
    if not out:
        raise VlmixerError(f"{', '.join(inputs)}: no .npz files found")
    return out


@dataclass
class Plan:
    shards: list[ImportShard]
    feature_dim: int
    labels: LabelMap
    provenance: dict[str, Any]
    notes: list[str]


def _vinvl_files(inputs: Sequence[str]) -> tuple[str, str]:
    feats, preds = [], []
    for p in inputs:
        if Path(p).suffix == ".lineidx":
            continue
        with open(p, "rb") as f:
            head = f.read(4096)
        (preds if b'"objects"' in head or "pred" in Path(p).name else feats).append(p)
    if len(feats) != 1 or len(preds) != 1:
        raise VlmixerError(f"vinvl-tsv needs one features.tsv and one predictions.tsv (got features {feats}, "
                           f"predictions {preds})")
    return feats[0], preds[0]


def _first_readable(lines: Iterator[Any], fn: Any) -> Any:
    last: BadRow | None = None
    for k, line in enumerate(lines):
        if k >= 100:
            break
        try:
            return fn(line)
        except BadRow as e:
            last = e
    raise VlmixerError(f"no readable row among the first ones to infer the feature size from ({last}); "
                       "pass --feature-dim")


def _head_lines(path: str, n: int = 100) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for _ in range(n):
            line = f.readline()
            if not line:
                return
            if line.strip():
                yield line


def _refuse_empty(scans: Sequence[ScannedFile]) -> None:
    for s in scans:
        if len(s.rows) == 0:
            raise VlmixerError(f"{s.path}: no rows to import")


def make_plan(opts: ImportOptions) -> Plan:
    """Scan the inputs, decide the shards, the feature size, the label mapping and the provenance."""
    from vlmixer.files import sha256_file

    concepts, attributes = _vocabularies(opts)
    notes: list[str] = []
    size = opts.shard_size
    inputs: list[dict[str, Any]] = []
    shards: list[ImportShard] = []
    if opts.format == "npz":
        files = _npz_files(opts.inputs)
        labelled = npz_labelled(files[0][1])
        dim = opts.feature_dim or _first_readable((p for _, p in files), npz_feature_dim)
        for a in range(0, len(files), size):
            chunk = files[a: a + size]
            digest = keys_digest(f"{k}\0{os.path.getsize(p)}" for k, p in chunk)
            shards.append(ImportShard(shard_id=f"i{size}-npz-{a:09d}", files=tuple(p for _, p in chunk),
                                      first_row=a, rows=len(chunk), source_sha256=digest))
        inputs.append({"path": [str(Path(p).resolve()) for p in opts.inputs], "files": len(files),
                       "sha256": "per shard (shard stats 'file_sha256')"})
    else:
        if opts.format == "vinvl-tsv":
            fpath, ppath = _vinvl_files(opts.inputs)
            scans = [scan_tsv(fpath), scan_tsv(ppath)]
            _refuse_empty(scans)
            if len(scans[0].rows) != len(scans[1].rows):
                raise VlmixerError(f"{fpath} has {len(scans[0].rows)} rows but {ppath} {len(scans[1].rows)}: VinVL's "
                                   "features.tsv and predictions.tsv list the same images in the same order")
            labelled = True
            dim = opts.feature_dim or _first_readable(_head_lines(fpath), vinvl_feature_dim)
            groups = [scans]
        else:
            scans = [scan_tsv(p) for p in opts.inputs]
            _refuse_empty(scans)
            head = next(_head_lines(scans[0].path), b"")
            labelled = butd_labelled(head)
            dim = opts.feature_dim or _first_readable(_head_lines(scans[0].path), butd_feature_dim)
            groups = [[s] for s in scans]
        for fi, group in enumerate(groups):
            n = len(group[0].rows)
            sha = keys_digest(s.sha256 for s in group)
            for a in range(0, n, size):
                b = min(n, a + size)
                shards.append(ImportShard(
                    shard_id=f"i{size}-{fi}-{a:09d}", files=tuple(s.path for s in group),
                    spans=tuple((int(s.rows[a, 0]), int(s.rows[b - 1, 1])) for s in group),
                    first_row=a, rows=b - a, source_sha256=sha))
            for s in group:
                inputs.append({"path": str(Path(s.path).resolve()), "sha256": s.sha256, "bytes": s.size,
                               "rows": len(s.rows), "lineidx": s.lineidx})
    if not labelled and opts.concepts != "none":
        raise VlmixerError(f"{opts.inputs[0]}: the file holds no labels (bottom-up-attention's 6-column TSV or an "
                           "npz without info); import it with --concepts none, and know that CMC cannot mix a "
                           "gallery without concepts")
    if opts.concepts == "none":
        notes.append(f"--concepts none: every patch is concept {UNLABELLED!r} with confidence 1; Cross-Modal "
                     "CutMix cannot use this gallery (no text concept grounds in it)")
    if attributes is None and opts.concepts != "none":
        notes.append("no attribute vocabulary (--attribute-vocab or a labelmap's attribute_to_idx): "
                     "attributes are not imported")
    id_base = opts.id_base if opts.id_base is not None else (1 if opts.format == "npz" else 0)
    labels = LabelMap(concepts=concepts, attributes=attributes, id_base=id_base, unlabelled=opts.concepts == "none")
    prov: dict[str, Any] = {"import": {
        "format": opts.format, "inputs": inputs, "shard_size": size, "id_base": id_base, "feature_dim": dim,
        "concepts": "none" if opts.concepts == "none" else "mapped by name or id",
        "attributes": "imported" if attributes is not None else "not imported (no attribute vocabulary)",
        "image_pattern": opts.image_pattern,
    }}
    if opts.format == "vinvl-tsv":
        prov["import"]["dropped_position_dims"] = VINVL_POSITION_DIMS
    for name in ("vocab", "labelmap", "attribute_vocab"):
        v = getattr(opts, name)
        if v:
            prov["import"][f"{name}_sha256"] = sha256_file(v)
    return Plan(shards=shards, feature_dim=int(dim), labels=labels, provenance=prov, notes=notes)


# -- reading one shard ----------------------------------------------------------------


@dataclass(frozen=True)
class ReaderSpec:
    """What a reader task needs besides its shard (small: the vocabularies as name lists)."""

    format: str
    feature_dim: int
    labels: LabelMap
    image_pattern: str | None = None


def to_outcome(row: RegionRow, labels: LabelMap, path: str) -> ImageOutcome:
    """A parsed row as the committer takes it: labels mapped, features checked and cast to fp16."""
    ids, confs, a_ids, a_sc = labels.map_row(row)
    f = row.features
    peak = max(float(f.max()), -float(f.min())) if f.size else 0.0  # no |f| temporary
    if not np.isfinite(peak):
        raise BadRow("non-finite feature values")
    if peak > FP16_MAX:
        raise BadRow(f"feature values beyond float16 range (|x| up to {peak:.4g} > {FP16_MAX:.0f})")
    if not np.all(np.isfinite(row.boxes)):
        raise BadRow("non-finite box coordinates")
    if not np.all(np.isfinite(confs)):
        raise BadRow("non-finite confidences")
    return ImageOutcome(key=row.key, path=path, width=row.width, height=row.height,
                        boxes=np.ascontiguousarray(row.boxes, np.float32), features=f.astype(np.float16),
                        concepts=ids, confidences=confs, attr_ids=a_ids, attr_scores=a_sc)


def _rows_of(shard: ImportShard, fmt: str) -> Iterator[tuple[int, tuple[bytes, ...] | str]]:
    """(row number, raw lines of each file or the npz path) for the shard, one at a time."""
    if fmt == "npz":
        for i, p in enumerate(shard.files):
            yield shard.first_row + i, p
        return
    handles = [open(p, "rb") for p in shard.files]
    try:
        for h, (s, _) in zip(handles, shard.spans):  # seek once, then row by row
            h.seek(s)
        for i in range(shard.rows):
            yield shard.first_row + i, tuple(_next_row(h) for h in handles)
    finally:
        for h in handles:
            h.close()


def _next_row(h: Any) -> bytes:
    while True:
        line = h.readline()
        if not line or not line.isspace():  # isspace stops at the first byte; strip() would copy the row
            return line


def read_shard(shard: ImportShard, spec: ReaderSpec) -> tuple[BatchPiece, dict[str, Any]]:
    """Parse a shard's rows into outcomes (bad rows as failures with their reason) plus what the
    driver needs to commit it: the key digest and the shard's stats."""
    t0 = time.perf_counter()
    outcomes: list[ImageOutcome] = []
    used: set[str] = set()
    unknown: Counter[str] = Counter()
    file_sha = hashlib.sha256()
    where_name = Path(shard.files[0]).name
    for rowno, raw in _rows_of(shard, spec.format):
        where = raw if isinstance(raw, str) else f"{where_name}:{rowno + 1}"
        key_hint = None
        try:
            if isinstance(raw, str):
                key_hint = Path(raw).stem
                try:
                    with open(raw, "rb") as fh:
                        data = fh.read()
                except OSError as e:
                    raise BadRow(f"unreadable file ({e.strerror})") from None
                file_sha.update(hashlib.sha256(data).digest())
                row = read_npz(io.BytesIO(data), key_hint, spec.feature_dim)
            elif spec.format == "vinvl-tsv":
                key_hint = tsv_key(raw[0])
                row = parse_vinvl(raw[0], raw[1], spec.feature_dim)
            else:
                key_hint = tsv_key(raw[0])
                row = parse_butd(raw[0], spec.feature_dim)
            if row.key in used:
                raise BadRow(f"duplicate key ({row.key!r} appears twice in this shard)")
            o = to_outcome(row, spec.labels, spec.image_pattern.format(key=row.key) if spec.image_pattern else "")
        except Exception as e:  # noqa: BLE001  one odd row must not cost the shard, let alone the job
            reason = e.reason if isinstance(e, BadRow) else f"reader error ({type(e).__name__}: {str(e)[:100]})"
            unknown.update(getattr(e, "unknown", ()))
            key = key_hint or where
            if key in used:
                key = f"{key}@{where}"
            o = ImageOutcome(key=key, path=where, failure=reason)
        used.add(o.key)
        outcomes.append(o)
    piece = BatchPiece(images=outcomes, read_s=time.perf_counter() - t0, worker=f"{os.getpid()}")
    extra: dict[str, Any] = {"size": shard.rows, "source": [Path(p).name for p in shard.files[:2]],
                             "first_row": shard.first_row, "source_sha256": shard.source_sha256,
                             "unknown_labels": dict(unknown)}
    if spec.format == "npz":
        extra["file_sha256"] = file_sha.hexdigest()
    summary = {**piece.summary(), "keys_sha256": keys_digest(o.key for o in outcomes), "extra": extra}
    return piece, summary


# -- running -----------------------------------------------------------------------


def _check_resume(out: Path, plan: Plan, committed: dict[str, dict[str, Any]]) -> list[ImportShard]:
    from vlmixer.storage.headers import read_json_object

    header = out / "gallery.json"
    if header.exists():
        old = read_json_object(header, "gallery header").get("provenance", {})
        if "import" not in old:
            raise VlmixerError(f"{out}: holds a gallery that was not imported; use a new --out")
        if old["import"].get("format") != plan.provenance["import"]["format"]:
            raise VlmixerError(f"{out}: was imported from {old['import'].get('format')}; use a new --out")
    by_id = {s.shard_id: s for s in plan.shards}
    foreign = sorted(s for s in committed if s not in by_id)
    if foreign:
        raise VlmixerError(f"{out}: holds shards of another import plan ({foreign[0]}, ...): it was imported "
                           "with another --shard-size or other inputs; resume with the same arguments or use a new --out")
    todo = []
    for s in plan.shards:
        done = committed.get(s.shard_id)
        if done is None:
            todo.append(s)
        elif done.get("source_sha256") != s.source_sha256:
            raise VlmixerError(f"{out}: shard {s.shard_id} was imported from other file contents than "
                               f"{', '.join(s.files[:2])} hold now (sha256 differs); use a new --out")
    return todo


def import_gallery(opts: ImportOptions) -> ImportReport:
    """Plan, read and commit the shards still to do, finalize; the CLI and the Python API are this.

    The gallery's write lock is held for the whole run, as a build holds it: a second import or
    build into the same --out is refused while this one writes."""
    from vlmixer.storage.gallery_failures import failed_images
    from vlmixer.storage.gallery_finalize import finalize_gallery
    from vlmixer.storage.gallery_writer import build_lock, committed_shards

    validate(opts)
    t0 = time.perf_counter()
    out = Path(opts.out)
    plan = make_plan(opts)
    with build_lock(out):
        committed, _ = existing_state(out)
        todo = _check_resume(out, plan, committed)
        report = ImportReport(out=str(out), format=opts.format, shards_planned=len(plan.shards),
                              shards_skipped=len(plan.shards) - len(todo), notes=list(plan.notes))
        spec = ReaderSpec(opts.format, plan.feature_dim, plan.labels, opts.image_pattern)
        if todo:
            progress = Progress(sum(s.rows for s in todo), opts.progress)
            try:
                if opts.ray_address == "none":
                    _run_in_process(opts, plan, spec, todo, progress, report)
                else:
                    _run_ray(opts, plan, spec, todo, progress, report)
            finally:
                progress.close()
        manifest = finalize_gallery(out)
        report.failed = [{k: f[k] for k in ("key", "path", "reason")} for f in failed_images(out)]
    report.gallery_images, report.gallery_patches = manifest["images"], manifest["patches"]
    unknown: Counter[str] = Counter()
    for st in committed_shards(out).values():
        unknown.update(st.get("unknown_labels") or {})
    report.unknown_labels = dict(unknown)
    report.seconds = time.perf_counter() - t0
    return report


def _record(report: ImportReport, stats: dict[str, Any]) -> None:
    report.shards_done += 1
    report.rows_done += int(stats.get("images", 0)) + int(stats.get("failures", 0))
    report.patches_done += int(stats.get("patches", 0))
    report.failures_this_run += int(stats.get("failures", 0))


def _committer(out: str, plan: Plan) -> _Writer:
    return _Writer(out, plan.feature_dim, [list(v) for v in plan.labels.concepts],
                   [list(v) for v in plan.labels.attributes] if plan.labels.attributes else None,
                   plan.provenance, lock_held_by_driver=True)


def _run_in_process(opts: ImportOptions, plan: Plan, spec: ReaderSpec, todo: list[ImportShard],
                    progress: Progress, report: ImportReport) -> None:
    """Shard k commits in a writer thread while shard k + 1 is parsed (LMDB and numpy copies release
    the GIL); one shard waits at most, so memory stays that of two shards. Commits keep plan order."""
    committer = _committer(str(opts.out), plan)
    report.mode = "in-process"
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="gallery-writer") as writer:
            committing = None
            for shard in todo:
                piece, summary = read_shard(shard, spec)
                progress.update(summary)
                if committing is not None:
                    _record(report, committing.result())
                committing = writer.submit(committer.commit_piece, shard.shard_id, summary["extra"], piece)
            if committing is not None:
                _record(report, committing.result())
    finally:
        committer.close()


def _drop_stored_duplicates(committer: ShardCommitter, piece: BatchPiece) -> BatchPiece:
    """A key another shard already stored (a file listing an image twice) becomes a bad row here,
    instead of failing the shard's transaction."""
    good = [o.key for o in piece.images if o.failure is None]
    stored = committer.stored_keys(good)
    for o in piece.images:
        if o.failure is None and o.key in stored:
            o.failure = f"duplicate key (already imported from shard {stored[o.key]})"
            o.key = f"{o.key}@{o.path}" if o.path else f"{o.key}@dup"
            o.boxes = o.features = o.concepts = o.confidences = o.attr_ids = o.attr_scores = None
    return piece


class _Writer(ShardCommitter):
    """The committer actor: drops keys other shards stored, then commits like the build's."""

    def commit_piece(self, shard_id: str, extra: dict[str, Any], piece: BatchPiece) -> dict[str, Any]:
        piece = _drop_stored_duplicates(self, piece)
        return self.commit(shard_id, keys_digest(o.key for o in piece.images), extra, piece)


def _run_ray(opts: ImportOptions, plan: Plan, spec: ReaderSpec, todo: list[ImportShard],
             progress: Progress, report: ImportReport) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    _, started = ray_session.connect(opts.ray_address, opts.num_cpus)
    writer = None
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        here = ray.get_runtime_context().get_node_id()
        writer = ray.remote(_Writer).options(
            num_cpus=0, max_restarts=1, max_task_retries=1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(str(Path(opts.out).resolve()), plan.feature_dim, [list(v) for v in plan.labels.concepts],
                 [list(v) for v in plan.labels.attributes] if plan.labels.attributes else None, plan.provenance,
                 lock_held_by_driver=True)
        reader = ray.remote(read_shard).options(num_returns=2, num_cpus=1, max_retries=2)
        spec_ref = ray.put(spec)
        report.mode = f"ray {opts.ray_address}, {cpus} CPUs"
        window = opts.num_cpus or cpus
        window = max(2, window + 1)
        pending = iter(todo)
        inflight: dict[Any, tuple[ImportShard, Any]] = {}
        commits: list[Any] = []
        exhausted = False
        while True:
            while not exhausted and len(inflight) + len(commits) < window:
                s = next(pending, None)
                if s is None:
                    exhausted = True
                    break
                piece, summary = reader.remote(s, spec_ref)
                inflight[summary] = (s, piece)
            if not inflight and not commits:
                break
            ready, _ = ray.wait(list(inflight) + commits, num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in inflight:
                    s, piece = inflight.pop(ref)
                    summary = ray_session.get(ref, "an import reader")
                    progress.update(summary)
                    commits.append(writer.commit_piece.remote(s.shard_id, summary["extra"], piece))
                else:
                    commits.remove(ref)
                    _record(report, ray_session.get(ref, "the shard writer"))
    finally:
        if writer is not None:
            ray_session.close_writer(writer)
        if started:
            ray.shutdown()


__all__ = ["FORMATS", "ImportOptions", "ImportReport", "ImportShard", "LabelMap", "import_gallery", "make_plan",
           "read_shard", "scan_tsv", "to_outcome", "validate", "failure_category"]
