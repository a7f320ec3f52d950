"""External sort: sorted runs spilled to disk, then merged k at a time, in bounded memory.

Records are `RUN_DTYPE`: a 64-bit sort key, the patch id that breaks ties
(so every record is distinct and the order is total), and a payload carried
along. Runs are cut from the input in id order, so run i holds smaller ids
than run i+1: concatenated in run order, equal keys already stand in id
order, and a stable sort by key alone gives (key, id) order; on sorted
stretches numpy's stable sort (timsort) merges rather than sorts.
A merge is batched for numpy rather than record by record: each run
buffers a block; the smallest last buffered (key, id) over the runs that
still have unread records is a cutoff below which nothing unread can fall,
so every buffered record up to it is ordered in one sort and emitted. The
run that set the cutoff empties its buffer each round, so every round emits
at least a block and the merge is linear in the data.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from vlmixer.storage.finalize_budget import SortBudget

RUN_DTYPE = np.dtype([("key", "<u8"), ("id", "<i8"), ("conf", "<f4")])


def order_records(rec: np.ndarray) -> np.ndarray:
    """`rec` in (key, id) order, given that records of equal key stand in id order already."""
    # a contiguous key sorts about twice as fast as the strided field; take gathers faster than []
    return np.take(rec, np.argsort(np.ascontiguousarray(rec["key"]), kind="stable"))


class _Run:
    def __init__(self, path: Path, length: int) -> None:
        self.path, self.length, self.pos = path, length, 0
        self.buf = np.empty(0, RUN_DTYPE)

    def refill(self, block: int) -> None:
        if len(self.buf) == 0 and self.pos < self.length:
            n = min(block, self.length - self.pos)
            self.buf = np.fromfile(self.path, dtype=RUN_DTYPE, count=n, offset=self.pos * RUN_DTYPE.itemsize)
            self.pos += n

    def take_upto(self, key: int, pid: int) -> np.ndarray:
        """Remove and return the buffered records <= (key, pid)."""
        k = self.buf["key"]
        lo, hi = np.searchsorted(k, key, "left"), np.searchsorted(k, key, "right")
        n = int(lo + np.searchsorted(self.buf["id"][lo:hi], pid, "right"))
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def merge(runs: list[tuple[Path, int]], block: int, emit: Callable[[np.ndarray], None]) -> None:
    """Merge sorted run files (path, records), given in id order, into `emit` calls of ordered batches."""
    rs = [_Run(p, n) for p, n in runs]
    while True:
        for r in rs:
            r.refill(block)
        live = [r for r in rs if len(r.buf)]
        if not live:
            return
        pending = [r for r in live if r.pos < r.length]
        if pending:
            key, pid = min((int(r.buf["key"][-1]), int(r.buf["id"][-1])) for r in pending)
            parts = [r.take_upto(key, pid) for r in live]
        else:
            parts = [r.buf for r in live]
            for r in live:
                r.buf = r.buf[:0]
        batch = np.concatenate(parts)
        del parts
        if len(batch):
            emit(order_records(batch))


def merge_all(runs: list[tuple[Path, int]], budget: SortBudget, spill_dir: Path,
              emit: Callable[[np.ndarray], None]) -> None:
    """Merge any number of runs (in id order): passes of `fan_in` consecutive runs each, until one
    pass can emit the result; a merged run still holds a range of ids below the next one's.

    Intermediate runs are written into `spill_dir`, and each merged input is deleted at once, so the
    disk holds the data about once besides the index being written."""
    level = 0
    while len(runs) > budget.fan_in:
        merged: list[tuple[Path, int]] = []
        for g in range(0, len(runs), budget.fan_in):
            group = runs[g: g + budget.fan_in]
            out = spill_dir / f"merge-{level}-{g // budget.fan_in:06d}.bin"
            with open(out, "wb") as f:
                merge(group, max(1, budget.merge_records // len(group)), lambda b, f=f: f.write(b.data))
            merged.append((out, sum(n for _, n in group)))
            for p, _ in group:
                p.unlink()
        runs, level = merged, level + 1
    if runs:
        merge(runs, max(1, budget.merge_records // len(runs)), emit)
        for p, _ in runs:
            p.unlink()
