"""Webdataset tar shards and parquet files: the containers img2dataset writes.

Both jobs read them: `gallery build --images` takes the image of each sample,
`text tag --input` its caption, and both key a sample by its own key (the
webdataset convention: a member's path up to the first dot of its file name;
parquet: a key column), so a gallery and a text store made from the same
shards pair up by key.

Read with the standard library's `tarfile` and pyarrow, never by extracting:
a tar is scanned once for its member headers (name, data offset, size), and a
member is then read by seeking to its bytes, so a decode task needs no more
than a path and a byte range. A tar cut short still yields the members whose
headers survive; each member whose data runs past the end of the file, and
the unreadable tail itself, become problems with a reason rather than an
exception that would cost the whole shard.
"""
from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmixer.errors import VlmixerError

TAR_SUFFIXES = (".tar",)
PARQUET_SUFFIXES = (".parquet", ".pq")
# the member (webdataset) or file (folder) suffixes that hold an image, in preference order
IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(spec: str) -> list[str]:
    """`shards/{00000..00003}.tar` and `{train,val}.tar` as webdataset and bash write them;
    a numeric range keeps the width of its first bound (zero padding)."""
    r, a = _RANGE.search(spec), _ALTERNATIVES.search(spec)
    if r and (a is None or r.start() < a.start()):  # the leftmost brace varies slowest, as in bash
        lo, hi = r.group(1), r.group(2)
        if int(hi) < int(lo):
            raise VlmixerError(f"{spec}: brace range {{{lo}..{hi}}} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        return [x for n in range(int(lo), int(hi) + 1)
                for x in expand_braces(spec[:r.start()] + str(n).zfill(width) + spec[r.end():])]
    if a:
        return [x for alt in a.group(1).split(",")
                for x in expand_braces(spec[:a.start()] + alt + spec[a.end():])]
    return [spec]


def container_kind(path: str | Path) -> str | None:
    """'tar', 'parquet', or None for anything else (judged by suffix, like the other sources)."""
    s = str(path).lower()
    if s.endswith(TAR_SUFFIXES):
        return "tar"
    if s.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def is_container_spec(specs: str | Sequence[str]) -> bool:
    """True when the inputs name tar shards or parquet files (a list, a glob or brace notation)."""
    items = [specs] if isinstance(specs, (str, Path)) else list(specs)
    return bool(items) and all(container_kind(expand_braces(str(s))[0]) is not None for s in items)


def expand_inputs(specs: str | Sequence[str]) -> list[Path]:
    """The container files named by `specs`, in the order given (globs sorted), each once.

    Every file must exist and be of one kind (all tars or all parquet): a typo in a brace
    range fails here, before any work, naming the missing file."""
    items = [specs] if isinstance(specs, (str, Path)) else list(specs)
    out: list[Path] = []
    seen: set[str] = set()
    for spec in items:
        for one in expand_braces(str(spec)):
            if glob.has_magic(one):
                found = sorted(glob.glob(one))
                if not found:
                    raise VlmixerError(f"{one}: the pattern matches no file")
            else:
                found = [one]
            for f in found:
                p = Path(f)
                if not p.is_file():
                    raise VlmixerError(f"{p}: input shard does not exist or is not a regular file")
                real = os.path.realpath(p)
                if real not in seen:
                    seen.add(real)
                    out.append(p)
    if not out:
        raise VlmixerError("no input shards given")
    kinds = {container_kind(p) for p in out}
    if None in kinds or len(kinds) != 1:
        raise VlmixerError(f"inputs mix kinds ({', '.join(sorted(str(k) for k in kinds))}): give webdataset "
                           ".tar shards or .parquet files, one kind per run")
    return out


def shard_names(paths: Sequence[Path]) -> list[str]:
    """A short stable name per input: its path relative to the inputs' common directory."""
    if len(paths) == 1:
        return [paths[0].name]
    dirs = [str(p.resolve().parent) for p in paths]
    common = os.path.commonpath(dirs)
    return [os.path.relpath(p.resolve(), common).replace(os.sep, "/") for p in paths]


# -- webdataset tars ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    """One regular file inside a tar: where its bytes start and how many there are."""

    name: str
    offset: int
    size: int


@dataclass
class Sample:
    """The members sharing one webdataset key, by extension (`jpg`, `txt`, `json`, ...)."""

    key: str
    members: dict[str, Member] = field(default_factory=dict)
    problem: str | None = None  # why this sample cannot be read whole (data past the end of the file)

    def image(self) -> tuple[str, Member] | None:
        for ext in IMAGE_MEMBER_EXTENSIONS:
            if ext in self.members:
                return ext, self.members[ext]
        return None


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/000123.seg.png` -> (`dir/000123`, `seg.png`): webdataset's key/extension rule."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


def scan_tar(path: str | Path) -> tuple[list[Sample], str | None]:
    """The samples of a tar in archive order, and what made the rest unreadable (None when whole).

    Reads member headers only (one seek per member). Members that are not regular files
    (links, devices, directories) are never followed; a member whose data runs past the end
    of the file marks its sample with a problem."""
    p = Path(path)
    size = p.stat().st_size
    samples: dict[str, Sample] = {}
    problem = None
    try:
        with tarfile.open(p, mode="r:") as tf:
            while True:
                try:
                    m = tf.next()
                except (tarfile.TarError, OSError, EOFError) as e:
                    problem = f"tar archive unreadable after {len(tf.members)} members ({e})"
                    break
                if m is None:
                    break
                if not m.isreg():
                    continue
                key, ext = split_member_name(m.name)
                s = samples.get(key)
                if s is None:
                    s = samples[key] = Sample(key)
                if ext in s.members:
                    s.problem = f"member {m.name} appears twice in the tar"
                s.members[ext] = Member(m.name, int(m.offset_data), int(m.size))
                if m.offset_data + m.size > size:
                    s.problem = (f"truncated tar member {m.name} ({size - m.offset_data} of {m.size} bytes; "
                                 "archive cut short)")
            # tarfile ends quietly at a header cut short: what follows the last member must be
            # the zero blocks that close an archive, or something was lost
            if problem is None and tf.offset < size and _nonzero_tail(p, tf.offset):
                problem = (f"tar archive unreadable after {len(tf.members)} members (a header at byte "
                           f"{tf.offset} is cut short or damaged)")
    except (tarfile.TarError, OSError, EOFError) as e:
        return [], f"not a readable tar archive ({e})"
    return list(samples.values()), problem


def _nonzero_tail(path: Path, offset: int, limit: int = 1 << 20) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        return any(f.read(limit))


def read_range(path: str | Path, offset: int, size: int) -> bytes:
    """Exactly `size` bytes at `offset`, or OSError saying how many were there."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"truncated tar member ({len(data)} of {size} bytes; archive cut short)")
    return data


_TAR_INDEX: dict[Any, dict[str, Member]] = {}


def _identity(path: str | Path) -> tuple[str, int, int]:
    """What a cache of a file's contents is keyed by: a rewritten file is another file."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_mtime_ns, st.st_size


def find_member(path: str | Path, name: str) -> Member:
    """A member by name, from a scan of its tar (the last tar scanned is kept, so looking up
    several members of one tar scans it once). For retries and pictures, not the hot path."""
    key = _identity(path)
    index = _TAR_INDEX.get(key)
    if index is None:
        samples, _ = scan_tar(path)
        index = {m.name: m for s in samples for m in s.members.values()}
        _TAR_INDEX.clear()
        _TAR_INDEX[key] = index
    if name not in index:
        raise OSError(f"no member {name!r} in {path}")
    return index[name]


# -- parquet ------------------------------------------------------------------------------


def _pq() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover  declared in setup.cfg
        raise VlmixerError("parquet inputs need pyarrow (pip install pyarrow)") from None
    return pq


def parquet_file(path: str | Path) -> Any:
    try:
        return _pq().ParquetFile(str(path))
    except Exception as e:  # noqa: BLE001  pyarrow raises its own error types for a bad footer
        raise VlmixerError(f"{path}: not a readable parquet file ({e})") from None


def parquet_columns(path: str | Path) -> list[str]:
    return list(parquet_file(path).schema_arrow.names)


def check_columns(path: str | Path, wanted: dict[str, str | None]) -> None:
    """Every named column exists; `wanted` maps the option (`--image-column`) to the column."""
    names = parquet_columns(path)
    for option, col in wanted.items():
        if col is not None and col not in names:
            raise VlmixerError(f"{path}: parquet file has no column {col!r} for {option} (columns: {names[:12]})")


def iter_parquet(path: str | Path, columns: Sequence[str], batch_rows: int = 4096) -> Iterator[dict[str, list]]:
    """Record batches of the named columns as python lists; memory stays one batch."""
    pf = parquet_file(path)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
        yield {c: batch.column(c).to_pylist() for c in columns}


_ROW_GROUP: dict[tuple[Any, str, int], Any] = {}
_OPEN_PARQUET: dict[Any, Any] = {}  # the last file read, footer parsed once


def read_parquet_cell(path: str | Path, column: str, row: int) -> Any:
    """One cell by row number. A row group is the unit parquet can read alone, so the last
    one read is kept: consecutive rows (a decode batch) cost one read."""
    real = _identity(path)
    pf = _OPEN_PARQUET.get(real)
    if pf is None:
        pf = parquet_file(path)
        _OPEN_PARQUET.clear()
        _OPEN_PARQUET[real] = pf
    meta = pf.metadata
    start = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if row < start + n:
            ck = (real, column, g)
            col = _ROW_GROUP.get(ck)
            if col is None:
                col = pf.read_row_group(g, columns=[column]).column(column)
                _ROW_GROUP.clear()
                _ROW_GROUP[ck] = col
            return col[row - start].as_py()
        start += n
    raise OSError(f"{path}: row {row} past the end ({start} rows)")


# -- locators: where an image's bytes are, as one string ----------------------------------

# A gallery records each image's source as one path string. For a container member it
# is `ARCHIVE.tar#MEMBER` or `FILE.parquet#COLUMN/ROW`, which `read_located` reads back.


def tar_locator(tar: str | Path, member: str) -> str:
    return f"{tar}#{member}"


def parquet_locator(file: str | Path, column: str, row: int) -> str:
    return f"{file}#{column}/{row}"


_LOCATOR = re.compile(r"^(.*?\.(?:tar|parquet|pq))#(.+)$", re.IGNORECASE | re.DOTALL)


def parse_locator(path: str) -> tuple[str, str, str] | None:
    """(kind, container file, member) for a container locator; None for a plain file path.
    The first `.tar#` splits, so a member name may itself hold `#`."""
    if "#" not in path:
        return None
    m = _LOCATOR.match(path)
    if m is None or os.path.exists(path):
        return None
    kind = container_kind(m.group(1))
    assert kind is not None
    return kind, m.group(1), m.group(2)


def read_located(path: str, offset: int = -1, size: int = -1) -> bytes:
    """The bytes a locator names; `offset`/`size` (a tar member's byte range, or a parquet row
    in `offset`) skip the lookup when the planner knew them."""
    loc = parse_locator(path)
    if loc is None:
        raise OSError(f"{path}: not a container locator")
    kind, file, member = loc
    if kind == "tar":
        if offset < 0:
            m = find_member(file, member)
            offset, size = m.offset, m.size
        return read_range(file, offset, size)
    column, _, row = member.rpartition("/")
    value = read_parquet_cell(file, column, offset if offset >= 0 else int(row))
    if value is None:
        raise OSError(f"no image bytes (null {column} in row {row})")
    if not isinstance(value, (bytes, bytearray)):
        raise OSError(f"parquet cell {column}/{row} holds {type(value).__name__}, not image bytes")
    return bytes(value)
