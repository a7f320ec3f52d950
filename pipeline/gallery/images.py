"""Decode one image file into an RGB uint8 array, or say exactly why not.

Image collections scraped or assembled by others always hold some files the
detector must not see: empty or truncated downloads, HTML saved as `.jpg`,
decompression bombs, CMYK or 16-bit or transparent images. Each is a
`BadImage` with a short reason that the build records per image and prints
in its summary; nothing here raises anything else for a bad file.

Grayscale and palette images are converted to RGB. CMYK, 16-bit and
transparent images are refused by default (recorded with a reason
and skipped, since any conversion is a guess about colour, depth or the
background); with `strict_modes=False` (`--convert-modes`) they are converted
where the result is a faithful RGB picture (alpha composited on white) and
each conversion is reported back so the build can list it. Orientation follows the
EXIF tag, so boxes refer to the picture as a person sees it; `gallery show`
decodes with the same function to crop the same pixels.

Decode modes (`DecodePolicy.mode`, `gallery build --decode`, recorded in the
store's provenance): "standard" is the above; "reference" decodes as VinVL's
extractor does, `Image.open(...).convert("RGB")`: no EXIF rotation, alpha
dropped rather than composited, every mode converted by Pillow's own rule.
Use it to reproduce VinVL's features exactly, or with annotations (COCO,
Visual Genome) drawn on the stored pixel grid. (Bottom-up attention reads
with `cv2.imread`, which applies the EXIF orientation: "standard" is the
closer there.) Which files are refused (strict modes, size limits, corrupt
data) does not change.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlmixer.pipeline.gallery.options import DECODE_MODES, DEFAULT_MAX_PIXELS

# Pillow's own bomb guard uses a module global; every decode sets it from the
# policy (see `_open`), and 0 or None would disable it, which we never allow.
ODD_MODES = ("CMYK", "I;16", "I;16B", "I;16L", "I;16N", "I", "RGBA", "LA", "PA", "RGBa", "La", "YCbCr", "LAB", "HSV")


class BadImage(Exception):
    """A file the build skips; `reason` is short, stable and meant for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodePolicy:
    """What counts as a usable image. Kept small and picklable: it travels to Ray tasks."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 8
    strict_modes: bool = True
    mode: str = "standard"  # or "reference" (see the module docstring)

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be >= 1 (the decompression-bomb guard cannot be disabled)")
        if self.mode not in DECODE_MODES:
            raise ValueError(f"decode mode {self.mode!r}: expected one of {', '.join(DECODE_MODES)}")


@dataclass(frozen=True)
class DecodedImage:
    """An RGB uint8 (H, W, 3) picture after EXIF orientation; `note` names any mode conversion."""

    array: np.ndarray
    note: str | None

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])


def _open(data: bytes, policy: DecodePolicy) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = policy.max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never gray-filled
    with warnings.catch_warnings():
        # Pillow warns between 1x and 2x MAX_IMAGE_PIXELS and raises above; both are "too large"
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(f"too large (over {policy.max_pixels} pixels; decompression bomb guard)") from None
        except UnidentifiedImageError:
            raise BadImage("not an image (unrecognised format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadImage(f"unreadable header ({_short(e)})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage(f"zero-sized image ({w}x{h})")
    if w * h > policy.max_pixels:
        raise BadImage(f"too large ({w}x{h} > {policy.max_pixels} pixels)")
    if min(w, h) < policy.min_side:
        raise BadImage(f"too small ({w}x{h}, min side {policy.min_side})")
    return img


def _short(e: BaseException) -> str:
    s = str(e).strip() or type(e).__name__
    return s if len(s) <= 120 else s[:117] + "..."


def _sixteen_bit(img: Image.Image) -> bool:
    """True when the file stores 16 bits per sample that Pillow would silently cut to 8 (RGB PNG)."""
    for t in getattr(img, "tile", None) or ():
        args = t[3] if len(t) > 3 else None
        raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
        if isinstance(raw, str) and "16" in raw:
            return True
    return False


def _odd_mode(img: Image.Image, strict: bool, deep: bool) -> bool:
    """Whether the image is CMYK, 16-bit, alpha or palette-transparent; under strict modes that is
    a BadImage. One rule for both decode modes: they differ in converting, not in refusing."""
    odd = img.mode in ODD_MODES or (img.mode == "P" and "transparency" in img.info) or deep
    if odd and strict:
        what = f"16-bit {img.mode}" if deep and img.mode == "RGB" else img.mode
        raise BadImage(f"unsupported mode {what} (strict modes)")
    return odd


def _to_rgb(img: Image.Image, strict: bool, deep: bool) -> tuple[Image.Image, str | None]:
    mode = img.mode
    _odd_mode(img, strict, deep)
    if mode == "RGB":
        return img, ("16-bit RGB -> 8-bit RGB" if deep else None)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        g = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([g, g, g], axis=-1)), f"{mode} (16-bit gray) -> RGB"
    if mode == "F":
        raise BadImage("unsupported mode F (32-bit float samples)")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "P+transparency"
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:
            return rgba.convert("RGB"), f"{mode} (opaque alpha) -> RGB"
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), f"{mode} -> RGB on white"
    try:
        return img.convert("RGB"), (f"{mode} -> RGB" if mode not in ("L", "1", "P") else None)
    except (ValueError, OSError) as e:
        raise BadImage(f"unsupported mode {mode} ({_short(e)})") from None


def _reference_rgb(img: Image.Image, strict: bool, deep: bool) -> tuple[Image.Image, str | None]:
    """What the reference extractors do: `convert("RGB")`, nothing else (same refusals as standard)."""
    mode = img.mode
    odd = _odd_mode(img, strict, deep)
    if mode == "F":
        raise BadImage("unsupported mode F (32-bit float samples)")
    try:
        out = img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImage(f"unsupported mode {mode} ({_short(e)})") from None
    return out, (f"{mode} -> RGB (reference: Pillow convert)" if odd else None)


def decode_bytes(data: bytes, policy: DecodePolicy = DecodePolicy()) -> DecodedImage:
    """Validate and decode an encoded image; raises `BadImage(reason)` for any bad file."""
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    img = _open(data, policy)
    deep = _sixteen_bit(img)
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"too large (over {policy.max_pixels} pixels; decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
        msg = _short(e)
        reason = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise BadImage(f"{reason} ({msg})") from None
    if policy.mode == "reference":
        img, note = _reference_rgb(img, policy.strict_modes, deep)
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise BadImage(f"decoder returned shape {arr.shape}")
        return DecodedImage(array=np.ascontiguousarray(arr), note=note)
    try:
        img = ImageOps.exif_transpose(img) or img
        note_exif = None
    except Exception as e:  # noqa: BLE001  a broken EXIF block must not cost the picture
        note_exif = f"EXIF orientation ignored ({_short(e)})"
    img, note = _to_rgb(img, policy.strict_modes, deep)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadImage(f"decoder returned shape {arr.shape}")
    notes = [n for n in (note, note_exif) if n]
    return DecodedImage(array=np.ascontiguousarray(arr), note="; ".join(notes) or None)


def load_rgb(path: str | Path, policy: DecodePolicy = DecodePolicy()) -> DecodedImage:
    """Read and decode one file; missing, unreadable or special files are `BadImage` too."""
    return decode_bytes(read_regular_file(path), policy)


def read_regular_file(path: str | Path) -> bytes:
    """A file's bytes, refusing anything but a regular file without blocking on it.

    Opened non-blocking and checked with fstat on the open descriptor: a FIFO named
    `.jpg` would otherwise hang the reader forever, and a device could be read without end."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except IsADirectoryError:
        raise BadImage("not a file (directory)") from None
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadImage(f"not a regular file ({_file_kind(mode)})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror or e})") from None
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"
