"""The options of a gallery build and their defaults, in one place.

The CLI (`vlmixer gallery build`) takes its defaults from here, tests and the
bench construct `BuildOptions` directly, and nothing here imports more than
the standard library (and a numpy-free corner of storage), so `vlmixer --help`
stays instant.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from vlmixer.storage.finalize_budget import DEFAULT_FINALIZE_MEMORY_MB

# Pillow's own decompression-bomb limit (~ 0.25 GiB of RGBA); images.py enforces it per decode
DEFAULT_MAX_PIXELS = 89_478_485
# "standard": EXIF orientation, alpha on white; "reference": Image.open().convert("RGB") as VinVL (images.py)
DECODE_MODES = ("standard", "reference")


@dataclass(frozen=True)
class BuildOptions:
    """Every knob of a build; the CLI fills it, tests and the bench construct it directly."""

    images: str | tuple[str, ...]  # a folder, list file or json; or webdataset tars / parquet files
    detector: str
    out: str
    weights: str | None = None
    image_root: str | None = None
    labelmap: str | None = None
    vocab: str | None = None
    ray_address: str = "local"  # "local" (start Ray here), "auto", an address, or "none" (no Ray)
    num_cpus: int | None = None  # for a local Ray only
    shard_size: int = 256
    batch_size: int = 8
    num_gpus_per_worker: float = 1.0
    cpu_workers: int | None = None  # detector actors when the cluster has no GPU
    threads: int | None = None  # torch threads of a CPU detector (in-process, or each CPU actor)
    retry_failed: bool = False
    seed: int = 0
    device: str = "auto"  # in-process only; Ray actors use their GPU if they got one
    strict_modes: bool = True  # CMYK/16-bit/alpha are failures; False converts them (--convert-modes)
    decode: str = "standard"  # one of DECODE_MODES, recorded in the provenance
    boxes: str | None = None  # annotation file: features at its boxes instead of detected ones (--boxes)
    box_synonyms: bool = True  # map box categories to concepts through WordNet synonyms too
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_inflight_batches: int | None = None
    progress: bool | None = None  # None: a bar on a terminal, periodic log lines otherwise
    max_listed: int = 50
    finalize_memory_mb: int = DEFAULT_FINALIZE_MEMORY_MB  # finalize's peak memory: external sort beyond it
    image_column: str = "jpg"  # parquet: image bytes or paths (img2dataset's column names)
    key_column: str | None = "key"  # parquet: the sample key (default: FILE/ROW when absent)
    # Python API only: builds the detector instead of `pipeline.detector.Detector.from_config`
    # (must be importable where Ray runs it). Tests pass a double; users a custom detector.
    detector_factory: Any = None


def default(name: str) -> Any:
    """The default of a `BuildOptions` field, for the command line's arguments and help."""
    for f in fields(BuildOptions):
        if f.name == name:
            if f.default is MISSING:
                raise KeyError(f"BuildOptions.{name} has no default")
            return f.default
    raise KeyError(f"BuildOptions has no field {name!r}")
