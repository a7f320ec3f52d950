"""The gallery build job on Ray: image sources -> shards -> decode -> detector -> LMDB gallery.

sources.py  collections -> (key, path) items -> shards with stable ids
images.py   decode and validate one file (reasons for every bad one)
work.py     the three steps as plain callables: decode_batch, DetectorRunner, ShardCommitter
job.py      planning, resume, the Ray and in-process drivers, progress, summary
render.py   `gallery show`: a picture of one concept's patches
"""
from vlmixer.pipeline.gallery.job import EXIT_SOME_FAILED, BuildOptions, BuildReport, build_gallery

__all__ = ["EXIT_SOME_FAILED", "BuildOptions", "BuildReport", "build_gallery"]
