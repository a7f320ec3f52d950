"""An exact, faster stand-in for the matching step of spaCy's AttributeRuler.

Why: with parser and NER excluded, en_core_web_sm spends about as long in its
attribute ruler (179 token patterns run through spaCy's general `Matcher`,
which maps tags to POS/morphology and fixes exceptions) as in its neural
tok2vec + tagger. Those patterns are all one or two tokens of equality or
`IN` tests (three use a regex), so a dictionary lookup per token finds the same matches. Only the
matching is replaced: the matches go to the ruler's own `set_annotations`, so
attribute values and precedence (later patterns win) are spaCy's.

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


def _features(tok: Any) -> tuple[Any, ...]:
    return (tok.tag_, tok.lower_, tok.orth_, tok.is_space, tok.dep_, tok.pos_, tok.norm_)


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
        strings = ruler.vocab.strings
        self._match_ids = [strings[str(i)] for i in range(len(ruler.attrs))]
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

    def _starts(self, feats: tuple[Any, ...]) -> tuple[tuple[int, ...], tuple[tuple[int, dict], ...]]:
        hit = self._cache.get(feats)
        if hit is None:
            vals = dict(zip(_FEATURE_NAMES, feats))
            singles = tuple(i for i, pat in self._patterns if len(pat) == 1 and _check(pat[0], vals))
            pairs = tuple((i, pat[1]) for i, pat in self._patterns if len(pat) == 2 and _check(pat[0], vals))
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            hit = self._cache[feats] = (singles, pairs)
        return hit

    def match(self, doc: Any) -> list[tuple[int, int, int, int]]:
        feats = [_features(t) for t in doc]
        found = set()
        n = len(feats)
        for s, f in enumerate(feats):
            singles, pairs = self._starts(f)
            for i in singles:
                found.add((i, s, s + 1))
            if pairs and s + 1 < n:
                vals = dict(zip(_FEATURE_NAMES, feats[s + 1]))
                for i, spec in pairs:
                    if _check(spec, vals):
                        found.add((i, s, s + 2))
        return sorted((i, self._match_ids[i], s, e) for i, s, e in found)

    def __call__(self, doc: Any) -> Any:
        self.ruler.set_annotations(doc, self.match(doc))
        return doc


def _signature(doc: Any) -> list[tuple[str, str, str, str]]:
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
    if fast is None:
        return nlp.pipe
    lemmatizer = nlp.get_pipe("lemmatizer")
    skip = ["attribute_ruler", "lemmatizer"]

    def annotate(items: Iterable[Any], **kwargs: Any) -> Iterator[Any]:
        for out in nlp.pipe(items, disable=skip, **kwargs):
            doc = out[0] if kwargs.get("as_tuples") else out
            lemmatizer(fast(doc))
            yield out

    reference = [_signature(d) for d in nlp.pipe(SELF_CHECK)]
    if [_signature(d) for d in annotate(SELF_CHECK)] != reference:
        return nlp.pipe
    annotate.fast = True  # type: ignore[attr-defined]
    return annotate
