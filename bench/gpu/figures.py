"""What the GPU check's parts share: the results file, the card's name and bf16 peak, a timer.

Each part appends one JSON object per figure to the results file as soon as it
is measured (flushed), so a part stopped at its time cap still leaves every
figure it had; `report.py` turns the file into the table and gpu_report.md.
"""
from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the report writer reads results without loading torch
    import torch

# dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), by a piece of
# torch.cuda.get_device_name(); first match wins, so the longer names come first
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of a card, or None when the card is not in the table."""
    for piece, tflops in BF16_PEAK_TFLOPS:
        if piece in device_name:
            return tflops
    return None


class Results:
    """Append-only JSON lines; every row carries its section (the report's table it goes to)."""

    def __init__(self, path: str | Path, echo: bool = True) -> None:
        self.path, self.echo = Path(path), echo
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, **row: Any) -> dict[str, Any]:
        # NaN/inf are not JSON: a figure that could not be computed is null
        rec = {"section": section, **{k: None if isinstance(v, float) and not math.isfinite(v) else v
                                      for k, v in row.items()}}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.echo:
            print(json.dumps(rec), flush=True)
        return rec


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results file; a line cut off by a kill at the time cap is skipped."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "section" in rec:
            rows.append(rec)
    return rows


def pick_device(smoke: bool) -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if not smoke:
        raise SystemExit("no CUDA device: run the parts on a GPU machine, or with --smoke for a CPU rehearsal")
    return torch.device("cpu")


def device_row(dev: torch.device) -> dict[str, Any]:
    """Card, software and where the peak comes from: the report's header."""
    import torch

    row: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        row.update(device=torch.cuda.get_device_name(dev), memory_gib=round(p.total_memory / 2**30, 1),
                   sms=p.multi_processor_count, cuda=torch.version.cuda,
                   bf16_peak_tflops=bf16_peak_tflops(torch.cuda.get_device_name(dev)))
    else:
        row.update(device=f"CPU ({torch.get_num_threads()} threads): smoke run, no GPU figure")
    return row


def sync(dev: torch.device) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def seconds_per_call(fn: Callable[[], Any], dev: torch.device, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / iters


def reset_peak(dev: torch.device) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def matmul_tflops(dev: torch.device, n: int = 8192, iters: int = 10) -> float | None:
    """bf16 n^3 matrix products: what the card delivers here, beside its datasheet peak."""
    import torch

    if dev.type != "cuda":
        return None
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    dt = seconds_per_call(lambda: a @ b, dev, iters, warmup=3)
    return round(2 * n**3 / dt / 1e12, 1)
