"""Exact, faster stand-ins for spaCy's attribute ruler matching and rule lemmatizer loop.

Why: with parser and NER excluded, en_core_web_sm spent about 40% of its time
in its attribute ruler (179 token patterns run through spaCy's general
`Matcher`, mapping tags to POS/morphology and fixing exceptions) and its
lemmatizer's per-token Python loop. The ruler's patterns are all one or two
tokens of equality, `IN` or regex tests, so the patterns that can start at a
token follow from its (tag, lower, orth, ...) features, cached per distinct
feature tuple. Only the matching is replaced: each match is applied with
spaCy's own `set_token_attrs` in the ruler's order (later patterns win).

The rule lemmatizer is applied the same way: its own `lemmatize` per distinct
(orth, pos, morph), the key spaCy itself caches it by, with lemmas read and
written as arrays instead of one Python Token object per token.

`FastAttributeRuler.build` returns None for any pattern it does not fully
understand (quantifiers, other attributes or predicates); callers then keep the
real component. `annotator` additionally checks itself against the real
pipeline on a fixed set of sentences at load time and falls back on any
difference, so a model with other rules can never change the output.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

# pattern key -> Token attribute read for it
_ATTRS = {"TAG": "tag_", "LOWER": "lower_", "ORTH": "orth_", "TEXT": "orth_", "DEP": "dep_",
          "IS_SPACE": "is_space", "POS": "pos_", "NORM": "norm_"}
_CACHE_MAX = 1 << 19

SELF_CHECK = [
    "Two men ride horses past the puppies.", "She will park the car near the park.",
    "The traffic lights aren't red, but it's something anyone can see.", "I'd've gone if I could've.",
    "Whether or not that's true, those dogs were barking all night!", "He said: 'Let's go' -- and left.",
    "A woman's umbrella, the children's toys and Mr. Smith's cats.", "Nobody knows what everyone wants.",
    "They gonna wanna see y'all at 5 p.m. on the 3rd of May.", "Cannot stop; won't stop; shan't stop.",
    "This is a  test\twith  odd   spacing\n and newlines.", "Der Hund läuft im Park. 一只狗在公园里跑。 🙂",
    "Its legs were longer than hers, so she ran less than he did.", "There ain't no cake, ma'am.",
]


def _check(spec: dict[str, Any], vals: dict[str, Any]) -> bool:
    for key, want in spec.items():
        have = vals[_ATTRS[key]]
        if isinstance(want, dict):
            if "IN" in want and have not in want["IN"]:
                return False
            if "NOT_IN" in want and have in want["NOT_IN"]:
                return False
            if "REGEX" in want and not (isinstance(have, str) and re.search(want["REGEX"], have)):
                return False
        elif have != want:
            return False
    return True


_FEATURE_NAMES = ("tag_", "lower_", "orth_", "is_space", "dep_", "pos_", "norm_")


def _supported(spec: Any) -> bool:
    if not isinstance(spec, dict) or not spec:
        return False
    for key, want in spec.items():
        if key not in _ATTRS:
            return False
        if isinstance(want, dict):
            if not set(want) <= {"IN", "NOT_IN", "REGEX"}:
                return False
            if not all(isinstance(v, list) for k, v in want.items() if k != "REGEX"):
                return False
            if "REGEX" in want and not isinstance(want["REGEX"], str):
                return False
        elif not isinstance(want, (str, bool)):
            return False
    return True


class FastAttributeRuler:
    """Finds the same (pattern, start, end) matches as the ruler's Matcher. A token's features
    (tag, lower, orth, is_space, dep, pos, norm) decide which patterns can start at it; that
    answer is cached per distinct feature tuple, so the cost per token is one dict lookup."""

    def __init__(self, ruler: Any, patterns: list[tuple[int, list[dict]]]) -> None:
        self.ruler = ruler
        self._patterns = patterns
        from spacy.attrs import DEP, IS_SPACE, LOWER, NORM, ORTH, POS, TAG

        self._attr_ids = [TAG, LOWER, ORTH, IS_SPACE, DEP, POS, NORM]  # order of _FEATURE_NAMES
        self._cache: dict[tuple[Any, ...], tuple[tuple[int, ...], tuple[tuple[int, dict], ...]]] = {}

    @classmethod
    def build(cls, ruler: Any) -> FastAttributeRuler | None:
        patterns: list[tuple[int, list[dict]]] = []
        for i, p in enumerate(ruler.patterns):
            for pattern in p["patterns"]:
                if not isinstance(pattern, list) or not 1 <= len(pattern) <= 2:
                    return None
                if not all(_supported(spec) for spec in pattern):
                    return None
                patterns.append((i, pattern))
        return cls(ruler, patterns)

    def _starts(self, feats: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[tuple[int, dict], ...]]:
        hit = self._cache.get(feats)
        if hit is None:
            vals = self._values(feats)
            singles = tuple(i for i, pat in self._patterns if len(pat) == 1 and _check(pat[0], vals))
            pairs = tuple((i, pat[1]) for i, pat in self._patterns if len(pat) == 2 and _check(pat[0], vals))
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            hit = self._cache[feats] = (singles, pairs)
        return hit

    def _values(self, feats: tuple[int, ...]) -> dict[str, Any]:
        strings = self.ruler.vocab.strings
        vals = {name: (strings[h] if h else "") for name, h in zip(_FEATURE_NAMES, feats)}
        vals["is_space"] = bool(feats[3])
        return vals

    def match(self, doc: Any) -> list[tuple[int, int, int]]:
        """Sorted (pattern id, start, end), as the ruler's own `match` orders them."""
        feats = [tuple(r) for r in doc.to_array(self._attr_ids).tolist()]
        found = set()
        n = len(feats)
        for s, f in enumerate(feats):
            singles, pairs = self._starts(f)
            for i in singles:
                found.add((i, s, s + 1))
            if pairs and s + 1 < n:
                vals = self._values(feats[s + 1])
                for i, spec in pairs:
                    if _check(spec, vals):
                        found.add((i, s, s + 2))
        return sorted(found)

    def __call__(self, doc: Any) -> Any:
        """The ruler's `set_annotations` without building a Span per match: same token
        (span[index]), same `set_token_attrs`, same order (later patterns win)."""
        from spacy.tokens._retokenize import set_token_attrs

        attrs, indices = self.ruler.attrs, self.ruler.indices
        for i, start, end in self.match(doc):
            k = indices[i]
            pos = start + k if k >= 0 else end + k
            if not start <= pos < end:
                raise ValueError(f"attribute ruler pattern {i}: index {k} outside its {end - start}-token match")
            set_token_attrs(doc[pos], attrs[i])
        return doc


class FastLemmatizer:
    """spaCy's rule lemmatizer applied through its own per-(orth, pos, morph) results, read and
    written as arrays instead of one Token object per token. `build` returns None unless the
    component is in rule mode (whose results spaCy itself caches by exactly that key)."""

    def __init__(self, lemmatizer: Any, vocab: Any) -> None:
        self.lemmatizer = lemmatizer
        self.vocab = vocab
        self._cache: dict[tuple[int, int, int], int] = {}

    @classmethod
    def build(cls, lemmatizer: Any, vocab: Any) -> FastLemmatizer | None:
        if getattr(lemmatizer, "mode", None) != "rule" or getattr(lemmatizer, "lemmatize", None) is None:
            return None
        if lemmatizer.lemmatize.__func__ is not type(lemmatizer).rule_lemmatize:
            return None
        return cls(lemmatizer, vocab)

    def __call__(self, doc: Any) -> Any:
        from spacy.attrs import LEMMA, MORPH, ORTH, POS

        lem = self.lemmatizer
        if not lem._validated:
            return lem(doc)
        arr = doc.to_array([ORTH, POS, MORPH, LEMMA])
        lemmas = arr[:, 3].copy()
        changed = False
        cache = self._cache
        for i, (orth, pos, morph, lemma) in enumerate(arr.tolist()):
            if lem.overwrite or lemma == 0:
                key = (orth, pos, morph)
                h = cache.get(key)
                if h is None:
                    h = self.vocab.strings.add(lem.lemmatize(doc[i])[0])
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[key] = h
                lemmas[i] = h
                changed = True
        if changed:
            doc.from_array([LEMMA], lemmas.reshape(-1, 1))
        return doc


def token_signature(doc: Any) -> list[tuple[str, str, str, str]]:
    return [(t.tag_, t.pos_, str(t.morph), t.lemma_) for t in doc]


def annotator(nlp: Any) -> Any:
    """`annotate(texts_or_pairs, **pipe_kwargs)`: `nlp.pipe` with the attribute ruler's matching
    done by `FastAttributeRuler` when that is provably the same on the self-check sentences,
    else plain `nlp.pipe`."""
    names = nlp.pipe_names
    if "attribute_ruler" not in names or "lemmatizer" not in names:
        return nlp.pipe
    if names.index("lemmatizer") < names.index("attribute_ruler"):
        return nlp.pipe
    after = names[names.index("attribute_ruler") + 1:]
    if any(n not in ("lemmatizer", "sentencizer") for n in after):
        return nlp.pipe
    fast = FastAttributeRuler.build(nlp.get_pipe("attribute_ruler"))
    lemmatizer = FastLemmatizer.build(nlp.get_pipe("lemmatizer"), nlp.vocab)
    if fast is None or lemmatizer is None:
        return nlp.pipe
    skip = ["attribute_ruler", "lemmatizer"]

    def annotate(items: Iterable[Any], **kwargs: Any) -> Iterator[Any]:
        for out in nlp.pipe(items, disable=skip, **kwargs):
            doc = out[0] if kwargs.get("as_tuples") else out
            lemmatizer(fast(doc))
            yield out

    reference = [token_signature(d) for d in nlp.pipe(SELF_CHECK)]
    if [token_signature(d) for d in annotate(SELF_CHECK)] != reference:
        return nlp.pipe
    annotate.fast = True  # type: ignore[attr-defined]
    return annotate
