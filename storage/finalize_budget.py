"""How a memory budget for `gallery finalize` becomes sizes: records per sorted run, records
buffered by a merge, runs merged at once, and LMDB bytes mapped before they are let go.

Kept free of numpy so the command line can show the default without loading it.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlmixer.errors import StoreError

DEFAULT_FINALIZE_MEMORY_MB = 1024
MIN_FINALIZE_MEMORY_MB = 64
# the interpreter with numpy, lmdb and msgpack loaded, and finalize's small fixed buffers
BASELINE_MB = 48
# peak bytes per record while a chunk is sorted or a merge batch is ordered: the 20-byte run
# record, its copy in sorted order, the sort's int64 order and the key computation's temporaries
BYTES_PER_RECORD = 96
MIN_MERGE_RECORDS = 4096  # per run in a merge: smaller reads cost more in calls than they save


@dataclass(frozen=True)
class SortBudget:
    """Sizes for the external sort/merge of finalize; `from_memory_mb` derives them from a budget,
    tests give tiny ones directly to exercise every boundary."""

    run_records: int  # patches sorted in memory and spilled as one run; also the streaming chunk
    merge_records: int  # records buffered by one merge, over all of its runs together
    fan_in: int  # runs merged at once (more runs take several merge passes)
    read_bytes: int  # LMDB metadata bytes read through one mapping before it is closed

    def __post_init__(self) -> None:
        if self.run_records < 1 or self.merge_records < self.fan_in or self.fan_in < 2 or self.read_bytes < 1:
            raise StoreError(f"finalize: inconsistent sort budget {self}")

    @classmethod
    def from_memory_mb(cls, memory_mb: int) -> SortBudget:
        if memory_mb < MIN_FINALIZE_MEMORY_MB:
            raise StoreError(f"finalize --memory-mb {memory_mb}: at least {MIN_FINALIZE_MEMORY_MB} MB are needed")
        avail = (memory_mb - BASELINE_MB) << 20
        records = avail // BYTES_PER_RECORD
        # an LMDB part is memory-mapped: pages read stay resident in this process until the
        # mapping is closed, so the metadata is read in windows of a fraction of the budget
        return cls(run_records=records, merge_records=records, fan_in=max(2, records // MIN_MERGE_RECORDS),
                   read_bytes=min(avail // 4, 256 << 20))
