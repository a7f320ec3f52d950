"""The gallery build job on Ray: image sources -> shards -> decode -> detector -> LMDB gallery.

sources.py  collections -> (key, path) items -> shards with stable ids
images.py   decode and validate one file (reasons for every bad one)
work.py     the three steps as plain callables: decode_batch, DetectorRunner, ShardCommitter
options.py  BuildOptions: every knob of a build and its default (light: the CLI reads it at start)
job.py      planning, resume, the Ray and in-process drivers, progress, summary
render.py   `gallery show`: a picture of one concept's patches

The exports below load job.py (numpy, Pillow) on first use, not when options.py is imported.
"""
from __future__ import annotations

from typing import Any

__all__ = ["EXIT_SOME_FAILED", "BuildOptions", "BuildReport", "build_gallery"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vlmixer.pipeline.gallery import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
