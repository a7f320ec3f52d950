"""The patch gallery's on-disk layout, in one place (see ARCHITECTURE.md).

    GALLERY/
      gallery.json            build header: format, version, feature dim, vocabularies, provenance
      build.lock              held (flock) by the one process writing the gallery
      parts/part-NNNNN/       one LMDB environment per writer (data.mdb, lock.mdb); immutable once
                              listed in manifest.json (an append writes the next part)
      index/*.npy             derived at finalize: per-patch concept/conf/image, concept index,
                              per-image contextual concepts (memory-mapped by readers)
      manifest.json           written last by finalize: counts and per-part offsets

Inside a part (named sub-databases, keys big-endian u64 unless said):
  meta    b"n_images", b"n_patches" -> u64 little-endian counters
  feat    block b -> raw fp16 bytes of patches [b*BLOCK, (b+1)*BLOCK) of this part, row-major (n, D)
  pmeta   block b -> PATCH_DTYPE records of the same patches
  sums    block b -> CRC-32 of the feat value, CRC-32 of the pmeta value (u32 little-endian each),
          written in the same transaction as the block
  image   local image index -> msgpack {key, path, width, height, start, count, shard}
  imgkey  utf-8 image key -> u64 local image index
  shard   utf-8 shard id -> msgpack stats; the commit marker, written last in the shard's transaction
  failed  utf-8 image key -> msgpack {path, reason, shard}

Features are packed BLOCK to a value: one 2048-d fp16 patch per value would
cost two 4 KiB pages (8,219 bytes measured); a 128-patch block wastes at most
one page per 512 KiB, and a single patch is still one `get` plus a slice of
the memory map. Block checksums are CRC-32 (zlib's, as gzip and zip use):
about 4.7 GB/s on one core here, so `verify` can afford to check every block,
and a separate sub-database leaves the feature values' layout (and the
reader's zero-copy slice) as it was.
"""
from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack
import numpy as np

from vlmixer.errors import StoreError

FORMAT_NAME = "vlmixer-gallery"
FORMAT_VERSION = 2  # 2: per-block CRC-32 checksums (sums)
BLOCK = 128
MAX_ATTRS = 16
FEATURE_DTYPE = np.dtype("<f2")

PATCH_DTYPE = np.dtype(
    [
        ("image", "<i8"),  # local image index within the part
        ("box", "<f4", (4,)),  # x1, y1, x2, y2 in pixels of the original image
        ("width", "<i4"),
        ("height", "<i4"),
        ("concept", "<i4"),  # 0-based id into the concept vocabulary
        ("conf", "<f4"),
        ("attr_ids", "<i2", (MAX_ATTRS,)),  # 0-based, -1 padded
        ("attr_scores", "<f2", (MAX_ATTRS,)),
    ]
)

SUBDBS = (b"meta", b"feat", b"pmeta", b"sums", b"image", b"imgkey", b"shard", b"failed")
INDEX_FILES = (
    "patch_concept",  # (P,) int32
    "patch_conf",  # (P,) float32
    "patch_image",  # (P,) int64 global image index
    "concept_offsets",  # (C+1,) int64 into concept_patches
    "concept_patches",  # (P,) int64 patch ids grouped by concept, confidence descending
    "concept_confs",  # (P,) float32 aligned with concept_patches
    "image_patch_start",  # (I+1,) int64: patches of image i are [start[i], start[i+1])
    "image_ctx_offsets",  # (I+1,) int64 into image_ctx_*
    "image_ctx_concepts",  # concepts detected in the image, ascending
    "image_ctx_confs",  # their maximal confidence in the image
)

_U64 = struct.Struct(">Q")
_U64LE = struct.Struct("<Q")
_SUMS = struct.Struct("<II")


ukey = _U64.pack  # u64 big-endian key of a block or record index (hot path: no wrapper)


def unkey(b: bytes) -> int:
    return _U64.unpack(bytes(b))[0]


def pack_count(i: int) -> bytes:
    return _U64LE.pack(i)


def unpack_count(b: bytes | None) -> int:
    return 0 if b is None else _U64LE.unpack(bytes(b))[0]


def unpack_record(data: bytes | memoryview, where: str) -> dict[str, Any]:
    """Decode a msgpack record; anything else (pickle bytes included) is a StoreError, never executed."""
    try:
        out = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on foreign bytes
        raise StoreError(f"{where}: record is not valid msgpack ({type(e).__name__}); store corrupted") from None
    if not isinstance(out, dict):
        raise StoreError(f"{where}: record is not a map; store corrupted")
    return out


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def block_sums(feat: bytes | memoryview, pmeta: bytes | memoryview) -> bytes:
    """The `sums` value of a block: CRC-32 of its feature bytes and of its record bytes."""
    return _SUMS.pack(zlib.crc32(feat), zlib.crc32(pmeta))


def extend_sums(old: bytes | memoryview, feat_tail: bytes, pmeta_tail: bytes) -> bytes:
    """The `sums` of a block after appending rows: CRC-32 continued from the stored values."""
    f_sum, m_sum = _SUMS.unpack(bytes(old))
    return _SUMS.pack(zlib.crc32(feat_tail, f_sum), zlib.crc32(pmeta_tail, m_sum))


def unpack_sums(b: bytes | memoryview) -> tuple[int, int]:
    return _SUMS.unpack(bytes(b))
