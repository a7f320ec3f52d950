"""Records -> tagged sentences: spaCy (batched), concept matching, word-pieces.

The output dicts are exactly what `TextStoreWriter.write_shard` takes. Char
offsets (of spans and word-pieces) count code points of the sentence text, so
`text[start:end]` is the grounded word even after emoji or accented letters.
A grounded span's word-piece span is every word-piece overlapping its chars.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from .concepts import ConceptMatcher, TokenView
from .corpus import SENTENCE_TOO_LONG, Record
from .wordpiece import WordPieceTokenizer

NO_WORDPIECES = "span_without_wordpieces"


class SentenceTagger:
    """Holds the loaded pieces; `tag(records)` streams sentences and counts what it skipped."""

    def __init__(self, nlp: Any, matcher: ConceptMatcher, wordpiece: WordPieceTokenizer, *, split: bool,
                 max_sentence_chars: int = 2000, batch_size: int = 256, n_process: int = 1,
                 pipe: Callable[..., Iterator[Any]] | None = None) -> None:
        """`pipe` replaces `nlp.pipe` (see attribute_rules.annotator: same output, faster)."""
        self.nlp = nlp
        self.pipe = pipe or nlp.pipe
        self.matcher = matcher
        self.wordpiece = wordpiece
        self.split = split
        self.max_sentence_chars = max_sentence_chars
        self.batch_size = batch_size
        self.n_process = n_process
        self.skipped: Counter[str] = Counter()
        self._lower_lemma: dict[int, int] = {}

    def _keys(self, lemma_hashes: list[int]) -> list[int]:
        """Hash of the lower-cased lemma (PROPN lemmas keep their case in spaCy)."""
        out = []
        low = self._lower_lemma
        strings = self.nlp.vocab.strings
        for h in lemma_hashes:
            k = low.get(h)
            if k is None:
                text = strings[h] if h else ""
                k = low[h] = strings.add(text.lower()) if text != text.lower() else h
            out.append(k)
        return out

    def _sentences(self, records: Iterable[Record]) -> Iterator[dict[str, Any]]:
        from spacy.attrs import IDX, IS_SPACE, LEMMA, LENGTH, LOWER, POS
        from spacy.symbols import NOUN, PROPN

        pairs = ((r.text, r) for r in records)
        kwargs: dict[str, Any] = {"batch_size": self.batch_size}
        if self.n_process > 1:
            kwargs["n_process"] = self.n_process
        for doc, rec in self.pipe(pairs, as_tuples=True, **kwargs):
            arr = doc.to_array([LOWER, LEMMA, POS, IDX, LENGTH, IS_SPACE]).tolist()
            if not arr:
                continue
            lower, lemma, pos, idx, length, space = (list(c) for c in zip(*arr))
            tv = TokenView(lower=lower, lemma=self._keys(lemma), noun=[p in (NOUN, PROPN) for p in pos])
            bounds = [(s.start, s.end) for s in doc.sents] if self.split else [(0, len(doc))]
            k = 0
            for a, b in bounds:
                while a < b and space[a]:
                    a += 1
                while b > a and space[b - 1]:
                    b -= 1
                if a == b:
                    continue
                cs = idx[a]
                ce = idx[b - 1] + length[b - 1]
                text = doc.text[cs:ce]
                sid = f"{rec.base_id}#{k}" if self.split else rec.base_id
                k += 1
                if len(text) > self.max_sentence_chars:
                    self.skipped[SENTENCE_TOO_LONG] += 1
                    continue
                spans = [(idx[i] - cs, idx[j - 1] + length[j - 1] - cs, c) for i, j, c in self.matcher.match(tv, a, b)]
                yield {"id": sid, "text": text, "image_key": rec.image_key, "char_spans": spans}

    def tag(self, records: Iterable[Record], chunk: int = 1024) -> Iterator[dict[str, Any]]:
        """Sentences with `tokens`, `token_chars` and 5-column `spans`, in input order."""
        buf: list[dict[str, Any]] = []
        for s in self._sentences(records):
            buf.append(s)
            if len(buf) >= chunk:
                yield from self._wordpieces(buf)
                buf = []
        if buf:
            yield from self._wordpieces(buf)

    def _wordpieces(self, sents: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for s, (ids, offs) in zip(sents, self.wordpiece.encode_batch([s["text"] for s in sents])):
            spans = []
            for c0, c1, concept in s.pop("char_spans"):
                t0 = int(np.searchsorted(offs[:, 1], c0, side="right")) if len(offs) else 0
                t1 = int(np.searchsorted(offs[:, 0], c1, side="left")) if len(offs) else 0
                if t1 <= t0:
                    self.skipped[NO_WORDPIECES] += 1
                    continue
                spans.append((c0, c1, t0, t1, concept))
            s["tokens"] = ids
            s["token_chars"] = offs
            s["spans"] = spans
            yield s
