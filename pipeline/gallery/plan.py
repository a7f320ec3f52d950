"""Streaming build plans: shards come off disk or out of one input file at a time.

A collection of 20M images listed in memory costs the driver gigabytes
(about 370 MB per million as `ImageItem`s and shards); the driver's memory
must follow the shards in flight instead. Two kinds of plan:

- a listing (folder, list file, COCO/VG json) is spilled to disk in sorted
  runs and merged (an external sort), which yields exactly the shards of
  `sources.make_shards` (same ids, same members) without ever holding the
  list; repeated keys are found in the merge, before any work starts;
- container inputs (webdataset tars, parquet files) are planned one file at a
  time: the file is the unit of planning and resume, cut in archive order into
  shards of `shard_size` named after it (`t256-00017.tar-00003`).

`--retry-failed` groups the recorded failures by the shard that failed them
through the same external sort, so it too is bounded by one run.
"""
from __future__ import annotations

import heapq
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from vlmixer.errors import VlmixerError
from vlmixer.pipeline import containers
from vlmixer.pipeline.gallery.sources import (
    ImageItem,
    Shard,
    WalkReport,
    bucket_order,
    iter_source,
    keys_digest,
)

RUN_SIZE = 100_000  # records per sorted run: bounds the driver's planning memory (~ 30 MB)
FAN_IN = 64  # runs merged at once
READ_SIZE = 64 * 1024  # read buffer per run while merging


class ExternalSorter:
    """Sort msgpack-able records (lists compared element-wise) bigger than memory.

    Records are buffered up to `run_size`, sorted and spilled as one msgpack run file;
    iteration merges the runs. The spill folder is the caller's (a temporary directory)."""

    def __init__(self, folder: str | Path, run_size: int = RUN_SIZE) -> None:
        self.folder = Path(folder)
        self.run_size = max(1, int(run_size))
        self.runs: list[Path] = []
        self.buf: list[list[Any]] = []
        self.count = 0

    def add(self, record: list[Any]) -> None:
        self.buf.append(record)
        self.count += 1
        if len(self.buf) >= self.run_size:
            self._spill()

    def _spill(self) -> None:
        self.buf.sort()
        path = self.folder / f"run-{len(self.runs):06d}.msgpack"
        with open(path, "wb") as f:
            pack = msgpack.Packer(use_bin_type=True).pack
            for r in self.buf:
                f.write(pack(r))
        self.runs.append(path)
        self.buf = []

    def __iter__(self) -> Iterator[list[Any]]:
        if not self.runs:
            yield from sorted(self.buf)
            return
        if self.buf:
            self._spill()
        # at most FAN_IN runs open at once (file handles, read buffers): merge in passes
        while len(self.runs) > FAN_IN:
            group, self.runs = self.runs[:FAN_IN], self.runs[FAN_IN:]
            path = self.folder / f"run-m{len(self.runs):06d}-{group[0].stem}.msgpack"
            with open(path, "wb") as f:
                pack = msgpack.Packer(use_bin_type=True).pack
                for r in _merge(group):
                    f.write(pack(r))
            for g in group:
                os.unlink(g)
            self.runs.append(path)
        yield from _merge(self.runs)


def read_records(f: Any) -> Iterator[list[Any]]:
    """msgpack records from a file, with a small read buffer (the default is 1 MiB per reader,
    which a merge of hundreds of runs would multiply)."""
    return iter(msgpack.Unpacker(f, raw=False, use_list=True, read_size=READ_SIZE))


def _merge(runs: list[Path]) -> Iterator[list[Any]]:
    with ExitStack() as stack:
        yield from heapq.merge(*[read_records(stack.enter_context(open(p, "rb"))) for p in runs])


# -- the plan's shards ------------------------------------------------------------------------


@dataclass
class PlanShards:
    """Every shard of a plan, produced lazily, with the counts known so far.

    `images`/`shards` are exact for a listing once it is planned, and grow as container
    files are read. `owns(shard_id)` tells this plan's shards from another plan's."""

    kind: str
    prefix: str
    images: int = 0
    shards: int = 0
    skipped_entries: list[tuple[str, str]] = field(default_factory=list)  # (what, why): not planned
    skipped_count: int = 0
    inputs: dict[str, Path] = field(default_factory=dict)  # container plans: input name -> file
    files_read: int = 0
    _source: Any = None

    def owns(self, shard_id: str) -> bool:
        return shard_id.startswith(self.prefix)

    def __iter__(self) -> Iterator[Shard]:
        return iter(self._source(self))

    def note_skip(self, what: str, why: str) -> None:
        self.skipped_count += 1
        if len(self.skipped_entries) < 1000:
            self.skipped_entries.append((what, why))


def listing_plan(src: str | Path, *, shard_size: int, seed: int, spill_dir: str | Path,
                 image_root: str | Path | None = None, run_size: int = RUN_SIZE) -> PlanShards:
    """The shards of a folder, list file or json, via an on-disk sort by (seeded hash, key).

    Lists the source once into sorted runs, merges them into one sorted file while checking
    that keys are unique, then streams shards from it; the caller keeps `spill_dir` alive
    while iterating."""
    walk = WalkReport()
    sorter = ExternalSorter(Path(spill_dir), run_size)
    for it in iter_source(src, image_root=image_root, walk=walk):
        sorter.add([bucket_order(seed, it.key), it.key, it.path])
    if sorter.count == 0:
        raise VlmixerError(f"{src}: no images found")
    merged = Path(spill_dir) / "listing.msgpack"
    prev: list[Any] | None = None
    with open(merged, "wb") as f:
        pack = msgpack.Packer(use_bin_type=True).pack
        for rec in sorter:
            if prev is not None and rec[0] == prev[0] and rec[1] == prev[1]:
                raise VlmixerError(f"{src}: image key {rec[1]!r} appears twice ({prev[2]} and {rec[2]})")
            f.write(pack(rec))
            prev = rec
    for r in sorter.runs:
        os.unlink(r)
    n = sorter.count
    plan = PlanShards(kind="listing", prefix=f"s{seed}-{shard_size}-", images=n, shards=-(-n // shard_size))
    for path, why in walk.skipped:
        plan.note_skip(path, why)
    plan.skipped_count = walk.count

    def shards(_: PlanShards) -> Iterator[Shard]:
        chunk: list[ImageItem] = []
        i = 0
        with open(merged, "rb") as f:
            for _h, key, path in read_records(f):
                chunk.append(ImageItem(key=key, path=path))
                if len(chunk) == shard_size:
                    yield Shard(shard_id=f"{plan.prefix}{i:06d}", items=tuple(sorted(chunk, key=lambda x: x.key)))
                    chunk, i = [], i + 1
        if chunk:
            yield Shard(shard_id=f"{plan.prefix}{i:06d}", items=tuple(sorted(chunk, key=lambda x: x.key)))

    plan._source = shards
    return plan


def listing_shard_index(plan: PlanShards, shard_id: str) -> int | None:
    """The chunk number of a listing shard id of this plan, or None for another plan's id."""
    if not plan.owns(shard_id):
        return None
    tail = shard_id[len(plan.prefix):]
    return int(tail) if tail.isdigit() else None


# -- containers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerOptions:
    """How to find the image and key of a parquet row (webdataset samples say it themselves)."""

    image_column: str = "jpg"
    key_column: str | None = "key"
    image_root: str | None = None  # where relative paths of a path column point (default: the file's dir)


def container_plan(specs: str | Iterable[str], *, shard_size: int,
                   options: ContainerOptions = ContainerOptions()) -> PlanShards:
    """Shards of webdataset tars or parquet files, one input file at a time, in input order."""
    files = containers.expand_inputs(list(specs) if not isinstance(specs, str) else specs)
    kind = containers.container_kind(files[0])
    assert kind is not None
    names = containers.shard_names(files)
    if kind == "parquet":
        for f in files:
            containers.check_columns(f, {"--image-column": options.image_column,
                                         "--key-column": options.key_column if options.key_column != "key" else None})
    letter = "t" if kind == "tar" else "p"
    plan = PlanShards(kind=kind, prefix=f"{letter}{shard_size}-")
    plan.inputs = dict(zip(names, files))

    def shards(p: PlanShards) -> Iterator[Shard]:
        for name, f in zip(names, files):
            items = _tar_items(f, name, p) if kind == "tar" else _parquet_items(f, name, options, p)
            p.images += len(items)
            p.files_read += 1
            for k in range(0, len(items), shard_size):
                p.shards += 1
                yield Shard(shard_id=f"{p.prefix}{name}-{k // shard_size:05d}", items=tuple(items[k:k + shard_size]))

    plan._source = shards
    return plan


def container_shard_file(plan: PlanShards, shard_id: str) -> str | None:
    """The input name a container shard id was cut from (None for another plan's id)."""
    if not plan.owns(shard_id):
        return None
    name, _, k = shard_id[len(plan.prefix):].rpartition("-")
    return name if k.isdigit() else None


def _tar_items(path: Path, name: str, plan: PlanShards) -> list[ImageItem]:
    samples, problem = containers.scan_tar(path)
    items: list[ImageItem] = []
    seen: set[str] = set()
    truncated = False
    for s in samples:
        img = s.image()
        if img is None:
            plan.note_skip(f"{name}#{s.key}", f"no image member (has {', '.join(sorted(s.members)) or 'nothing'})")
            continue
        if s.key in seen:
            continue
        seen.add(s.key)
        _, m = img
        truncated |= bool(s.problem and s.problem.startswith("truncated"))
        items.append(ImageItem(key=s.key, path=containers.tar_locator(path, m.name), offset=m.offset, size=m.size,
                               problem=s.problem or ""))
    if problem is not None and not truncated:
        # cut inside a header, or not a tar at all: what follows is lost, and the gallery says so
        items.append(ImageItem(key=f"{name}#", path=containers.tar_locator(path, "*"), problem=problem))
    return items


def _parquet_items(path: Path, name: str, options: ContainerOptions, plan: PlanShards) -> list[ImageItem]:
    pf = containers.parquet_file(path)
    names = pf.schema_arrow.names
    key_col = options.key_column if options.key_column in names else None
    field_type = str(pf.schema_arrow.field(options.image_column).type)
    holds_bytes = "binary" in field_type
    if not holds_bytes and "string" not in field_type:
        raise VlmixerError(f"{path}: --image-column {options.image_column!r} holds {field_type}, "
                           "expected image bytes (binary) or paths (string)")
    base = Path(options.image_root) if options.image_root else path.parent
    cols = [c for c in (key_col, None if holds_bytes else options.image_column) if c]
    items: list[ImageItem] = []
    seen: set[str] = set()
    row = 0
    if holds_bytes:
        # only the key column is read here; null cells are found when the image is read
        batches: Iterable[dict[str, list]] = (containers.iter_parquet(path, cols) if cols
                                             else _row_counts(pf.metadata.num_rows))
    else:
        batches = containers.iter_parquet(path, cols)
    for batch in batches:
        n = len(next(iter(batch.values()))) if batch else 0
        keys = batch.get(key_col) if key_col else None
        values = batch.get(options.image_column)
        for j in range(n):
            key = keys[j] if keys is not None and keys[j] not in (None, "") else f"{name}/{row}"
            key = str(key)
            if key in seen:
                raise VlmixerError(f"{path}: key {key!r} appears twice (row {row}); pass --key-column")
            seen.add(key)
            if holds_bytes:
                items.append(ImageItem(key=key, path=containers.parquet_locator(path, options.image_column, row),
                                       offset=row))
            else:
                v = values[j] if values is not None else None
                if not v:
                    items.append(ImageItem(key=key, path=f"{path}#{options.image_column}/{row}",
                                           problem=f"no image path (empty {options.image_column} in row {row})"))
                else:
                    p = Path(v)
                    items.append(ImageItem(key=key, path=str(p if p.is_absolute() else base / p)))
            row += 1
    return items


def _row_counts(n: int, step: int = 4096) -> Iterator[dict[str, list]]:
    for a in range(0, n, step):
        yield {"_": [None] * min(step, n - a)}


# -- retry shards -----------------------------------------------------------------------------


def retry_shards(failures: Iterable[dict[str, str]], attempt: int, spill_dir: str | Path,
                 run_size: int = RUN_SIZE) -> tuple[int, Iterator[Shard]]:
    """Failed images grouped by the shard that recorded them, as `r<attempt>-<shard>` shards,
    and how many there are. `failures` (key, path, shard, part) is read now, to the end, and
    sorted on disk (never held whole); the shards are then produced lazily."""
    sorter = ExternalSorter(Path(spill_dir), run_size)
    for f in failures:
        part = f.get("part", "")
        if part not in ("", "part-00000"):
            raise VlmixerError(f"failures recorded in {part}; this build writes part 0 only")
        sorter.add([f.get("shard", "x"), f["key"], f["path"]])
    return sorter.count, _retry_groups(sorter, attempt)


def _retry_groups(sorter: ExternalSorter, attempt: int) -> Iterator[Shard]:
    group: list[ImageItem] = []
    origin = None
    for shard, key, path in sorter:
        if origin is not None and shard != origin:
            yield Shard(shard_id=f"r{attempt}-{origin}", items=tuple(group))
            group = []
        origin = shard
        group.append(ImageItem(key=key, path=path))
    if group:
        yield Shard(shard_id=f"r{attempt}-{origin}", items=tuple(group))


def spill_folder(prefix: str = "vlmixer-plan-") -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


__all__ = ["ContainerOptions", "ExternalSorter", "PlanShards", "container_plan", "container_shard_file",
           "keys_digest", "listing_plan", "listing_shard_index", "retry_shards", "spill_folder"]
