"""Concept and attribute vocabularies shared by the detector, the text job and the stores.

A vocabulary is an ordered list of canonical names (id = position, 0-based,
no background entry) with optional variant spellings per entry. Gallery and
text store both record its sha256, so a text store tagged against another
vocabulary than the gallery's is refused instead of silently mixing ids.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlmixer.errors import VlmixerError
from vlmixer.files import read_lines


@dataclass(frozen=True)
class Vocabulary:
    """Ordered names; `variants[i]` lists every spelling of entry i, canonical first."""

    names: tuple[str, ...]
    variants: tuple[tuple[str, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.variants:
            object.__setattr__(self, "variants", tuple((n,) for n in self.names))
        if len(self.variants) != len(self.names):
            raise VlmixerError("vocabulary: variants and names differ in length")
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise VlmixerError(f"vocabulary: duplicate names {dup[:5]}")

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise VlmixerError(f"vocabulary: unknown name {name!r}") from None

    @property
    def sha256(self) -> str:
        """Hash of the canonical names and variants (order matters: ids are positions)."""
        blob = json.dumps([list(v) for v in self.variants], ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def to_json(self) -> list[list[str]]:
        return [list(v) for v in self.variants]

    @classmethod
    def from_json(cls, data: Sequence[Sequence[str]]) -> Vocabulary:
        variants = tuple(tuple(str(s) for s in v) for v in data)
        if any(len(v) == 0 for v in variants):
            raise VlmixerError("vocabulary: an entry has no name")
        return cls(names=tuple(v[0] for v in variants), variants=variants)


def read_vocab_txt(path: str | Path) -> Vocabulary:
    """One entry per line; comma-separated variants, the first is canonical (BUTD style)."""
    p = Path(path)
    lines = read_lines(p, "vocabulary file")
    entries = []
    for n, line in enumerate(lines, 1):
        parts = [s.strip().lower() for s in line.split(",") if s.strip()]
        if not parts:
            if line.strip():
                raise VlmixerError(f"{p}:{n}: empty vocabulary entry")
            continue
        entries.append(tuple(dict.fromkeys(parts)))
    if not entries:
        raise VlmixerError(f"{p}: vocabulary file has no entries")
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise VlmixerError(f"{p}: duplicate vocabulary entries {dup[:5]}")
    return Vocabulary(names=tuple(names), variants=tuple(entries))


def read_labelmap_json(path: str | Path) -> tuple[Vocabulary, Vocabulary | None]:
    """A VinVL/scene_graph_benchmark label map: `label_to_idx` (1-based, 0 = background)
    and optionally `attribute_to_idx`. Returns (concepts, attributes) with 0-based ids."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VlmixerError(f"{p}: cannot read label map json ({e})") from None
    if not isinstance(data, dict) or "label_to_idx" not in data:
        raise VlmixerError(f"{p}: label map needs a 'label_to_idx' object")

    def one(key: str) -> Vocabulary:
        table = data[key]
        if not isinstance(table, dict) or not table:
            raise VlmixerError(f"{p}: '{key}' must be a non-empty object name -> index")
        by_idx: dict[int, str] = {}
        for name, idx in table.items():
            if not isinstance(idx, int) or idx < 1:
                raise VlmixerError(f"{p}: '{key}'[{name!r}] = {idx!r}; indices are integers >= 1")
            if idx in by_idx:
                raise VlmixerError(f"{p}: '{key}' index {idx} used by {by_idx[idx]!r} and {name!r}")
            by_idx[idx] = name
        n = len(by_idx)
        if sorted(by_idx) != list(range(1, n + 1)):
            missing = sorted(set(range(1, n + 1)) - set(by_idx))[:5]
            raise VlmixerError(f"{p}: '{key}' indices are not 1..{n} (missing {missing})")
        return Vocabulary(names=tuple(by_idx[i] for i in range(1, n + 1)))

    attrs = one("attribute_to_idx") if "attribute_to_idx" in data else None
    return one("label_to_idx"), attrs


def load_vocabulary(path: str | Path) -> Vocabulary:
    """Concept vocabulary from a label map json or a vocabulary txt file."""
    p = Path(path)
    if not p.exists():
        raise VlmixerError(f"{p}: vocabulary file does not exist")
    if p.suffix.lower() == ".json":
        return read_labelmap_json(p)[0]
    return read_vocab_txt(p)
