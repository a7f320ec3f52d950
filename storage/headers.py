"""The rules for a store's json header and manifest, shared by the gallery and the text store.

A header that is missing, damaged or of another format version is a StoreError naming the
file, never a half-read store.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlmixer.errors import StoreError


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A store's json header or manifest; missing or damaged is a StoreError naming the file."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: missing {what}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{p}: corrupted {what} ({e})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{p}: corrupted {what} (not a json object)")
    return data


def check_format(meta: Mapping[str, Any], path: Path, *, name: str, version: int, what: str, remedy: str) -> None:
    """Refuse a header or manifest of another format or version, saying how to get a readable one.

    One rule for both stores: a store written by another format version is never read
    half-way, it is rebuilt (`remedy`) or read with the vlmixer that wrote it."""
    if meta.get("format") != name:
        raise StoreError(f"{path}: not a vlmixer {what} (format={meta.get('format')!r})")
    if meta.get("version") != version:
        raise StoreError(f"{path}: {what} format version {meta.get('version')!r}, this vlmixer reads "
                         f"version {version}; {remedy} or use a matching vlmixer")
