"""Which words ground to which concept: an explicit mapping, and the matcher that applies it.

The mapping is a list of (phrase, concept name, source) rows, written as TSV by
`vlmixer text concepts` so a user can read it, edit it and pass it back with
`--mapping`. Built from a vocabulary it holds, in priority order (a phrase keeps
its first assignment): every concept name, every variant, the singular of
plural names ("bananas" -> also "banana"), then WordNet synonyms when enabled.
Its sha256 covers the (phrase, concept) pairs and goes into the store's
provenance, so two stores tagged with different mappings are told apart.

The matcher works on spaCy tokens: a token matches a phrase word by its
lower-cased text or its lower-cased lemma ("men" -> "man"). Spans are found
left to right, longest match first ("traffic lights" is one span, not "lights"),
and a span is kept only when its last token is a NOUN or PROPN, so "park" in
"she will park the car" is not grounded. A tie in length prefers the reading
that used more exact surface words (so "glasses" goes to a concept "glasses"
before the lemma "glass"). Lemma quirk: spaCy's English lemmatizer turns the
verb "riding" into "rid"; only nouns are grounded, so it never matters here.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmixer.errors import VlmixerError
from vlmixer.files import atomic_write_bytes
from vlmixer.storage.vocab import Vocabulary

MAPPING_FORMAT = "vlmixer-concept-map/1"
NOUN_POS = frozenset({"NOUN", "PROPN"})
_TERMINAL = "\x00concept"
_WS = re.compile(r"\s+")


def normalize_phrase(phrase: str) -> str:
    return _WS.sub(" ", phrase.strip().lower())


@dataclass(frozen=True)
class MappingEntry:
    phrase: str
    concept: str
    source: str


class ConceptMapping:
    """Ordered phrase -> concept rows for one concept vocabulary (first row of a phrase wins)."""

    def __init__(self, entries: Iterable[MappingEntry], *, concepts: Vocabulary, synonyms: str = "off") -> None:
        self.concepts = concepts
        self.synonyms = synonyms
        known = set(concepts.names)
        seen: dict[str, MappingEntry] = {}
        for e in entries:
            phrase = normalize_phrase(e.phrase)
            if not phrase:
                continue
            if e.concept not in known:
                raise VlmixerError(f"concept mapping: {e.phrase!r} maps to {e.concept!r}, which is not in the "
                                   "concept vocabulary")
            if phrase not in seen:
                seen[phrase] = MappingEntry(phrase, e.concept, e.source)
        self.entries: tuple[MappingEntry, ...] = tuple(seen.values())

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def sha256(self) -> str:
        """Hash of what matching depends on: the sorted (phrase, concept) pairs."""
        pairs = sorted((e.phrase, e.concept) for e in self.entries)
        return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()

    def as_dict(self) -> dict[str, str]:
        return {e.phrase: e.concept for e in self.entries}

    @classmethod
    def from_vocabulary(cls, concepts: Vocabulary, *, singularize: Callable[[str], str] | None = None,
                        synonyms: Sequence[MappingEntry] = (), synonyms_version: str = "off") -> ConceptMapping:
        """Names, variants, singulars of plural names (via `singularize`), then `synonyms`."""
        rows: list[MappingEntry] = [MappingEntry(n, n, "name") for n in concepts.names]
        for name, variants in zip(concepts.names, concepts.variants):
            rows += [MappingEntry(v, name, "variant") for v in variants[1:]]
        if singularize is not None:
            for name, variants in zip(concepts.names, concepts.variants):
                for v in variants:
                    s = normalize_phrase(singularize(v))
                    if s and s != normalize_phrase(v):
                        rows.append(MappingEntry(s, name, "lemma"))
        rows += list(synonyms)
        return cls(rows, concepts=concepts, synonyms=synonyms_version)

    def write_tsv(self, path: str | Path) -> None:
        """Atomic TSV: `#` header lines (format, vocabulary hash, synonym version), then
        `phrase<TAB>concept<TAB>source` rows in priority order."""
        lines = [f"# {MAPPING_FORMAT}", f"# concepts_sha256: {self.concepts.sha256}",
                 f"# synonyms: {self.synonyms}", f"# mapping_sha256: {self.sha256}",
                 "# edit freely: one phrase per row, the first row of a phrase wins; pass back with --mapping",
                 "phrase\tconcept\tsource"]
        lines += [f"{e.phrase}\t{e.concept}\t{e.source}" for e in self.entries]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))

    @classmethod
    def read_tsv(cls, path: str | Path, concepts: Vocabulary) -> ConceptMapping:
        """A mapping a user may have edited; every concept must be a name of `concepts`."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise VlmixerError(f"{p}: cannot read concept mapping ({e})") from None
        rows: list[MappingEntry] = []
        first: dict[str, tuple[int, str]] = {}
        version = "user"
        known = set(concepts.names)
        for n, line in enumerate(text.splitlines(), 1):
            if line.startswith("# synonyms:"):
                version = line.split(":", 1)[1].strip()
            if not line.strip() or line.startswith("#") or line.startswith("phrase\tconcept"):
                continue
            cols = line.split("\t")
            if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
                raise VlmixerError(f"{p}:{n}: expected `phrase<TAB>concept[<TAB>source]`, got {line!r}")
            phrase, concept = normalize_phrase(cols[0]), cols[1].strip()
            if concept not in known:
                raise VlmixerError(f"{p}:{n}: concept {concept!r} is not in the concept vocabulary")
            if phrase in first and first[phrase][1] != concept:
                raise VlmixerError(f"{p}:{n}: {phrase!r} maps to {concept!r} here and to "
                                   f"{first[phrase][1]!r} on line {first[phrase][0]}; keep one")
            first.setdefault(phrase, (n, concept))
            rows.append(MappingEntry(phrase, concept, cols[2].strip() if len(cols) > 2 else "user"))
        if not rows:
            raise VlmixerError(f"{p}: concept mapping has no rows")
        return cls(rows, concepts=concepts, synonyms=f"{version} (from {p.name})")


@dataclass(frozen=True)
class TokenView:
    """What the matcher needs of a tokenised sentence: per token lower text, lower lemma (as the
    matcher's keys) and whether the token is a NOUN or PROPN."""

    lower: Sequence[Hashable]
    lemma: Sequence[Hashable]
    noun: Sequence[bool]


class ConceptMatcher:
    """Longest-match search of the mapping's phrases over tokens, as a word trie."""

    def __init__(self, mapping: ConceptMapping, tokenize: Callable[[str], list[str]],
                 key: Callable[[str], Hashable] | None = None) -> None:
        """`tokenize` splits a phrase into lower-case words the way the tagger splits text
        (spaCy's tokenizer), so "t-shirt" is ["t", "-", "shirt"] on both sides; `key` maps a
        word to what `TokenView` holds (spaCy string hashes in the tagger, words in tests)."""
        self.mapping = mapping
        index = {n: i for i, n in enumerate(mapping.concepts.names)}
        self.root: dict[Hashable, dict] = {}
        for e in mapping.entries:
            words = [w for w in tokenize(e.phrase) if w.strip()]
            if not words:
                continue
            node = self.root
            for w in words:
                node = node.setdefault(key(w) if key else w, {})
            node.setdefault(_TERMINAL, index[e.concept])

    def _longest(self, tv: TokenView, i: int, end: int) -> tuple[int, int] | None:
        best: tuple[int, int, int] | None = None  # (length, exact words, concept)
        stack: list[tuple[dict, int, int]] = [(self.root, i, 0)]
        while stack:
            node, j, exact = stack.pop()
            if j > i and _TERMINAL in node and tv.noun[j - 1]:
                cand = (j - i, exact, node[_TERMINAL])
                if best is None or cand[:2] > best[:2]:
                    best = cand
            if j >= end:
                continue
            lw, lm = tv.lower[j], tv.lemma[j]
            if lm != lw and lm in node:
                stack.append((node[lm], j + 1, exact))
            if lw in node:
                stack.append((node[lw], j + 1, exact + 1))
        return None if best is None else (best[0], best[2])

    def match(self, tv: TokenView, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
        """Non-overlapping (token_start, token_end, concept id) in tokens [start, end)."""
        end = len(tv.lower) if end is None else end
        root = self.root
        out = []
        i = start
        while i < end:
            if tv.lower[i] in root or tv.lemma[i] in root:
                m = self._longest(tv, i, end)
                if m is not None:
                    out.append((i, i + m[0], m[1]))
                    i += m[0]
                    continue
            i += 1
        return out
