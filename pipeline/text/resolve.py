"""User arguments -> the job's resolved pieces (concepts, mapping, spaCy, tokenizer), checked
before any corpus is read. The CLI and Python callers share these functions."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmixer.errors import VlmixerError
from vlmixer.storage.vocab import Vocabulary, load_vocabulary

from .concepts import ConceptMapping
from .spacy_model import singularizer

SYNONYM_MODES = ("off", "wordnet")


def load_concepts(spec: str | Path) -> Vocabulary:
    """A label map json, a vocabulary txt (comma-separated variants), or a gallery directory
    (its own vocabulary, so text and gallery always agree)."""
    p = Path(spec)
    if p.is_dir():
        from vlmixer.storage.gallery import GalleryReader

        return GalleryReader(p).concepts
    return load_vocabulary(p)


def build_mapping(concepts: Vocabulary, nlp: Any, *, synonyms: str = "off",
                  mapping_file: str | Path | None = None) -> ConceptMapping:
    """The user's edited mapping when given, else names + variants + singulars (+ WordNet)."""
    if synonyms not in SYNONYM_MODES:
        raise VlmixerError(f"--synonyms must be one of {SYNONYM_MODES}, not {synonyms!r}")
    if mapping_file is not None:
        if synonyms != "off":
            raise VlmixerError("--mapping already fixes every word -> concept row (synonyms included); "
                               "drop --synonyms")
        return ConceptMapping.read_tsv(mapping_file, concepts)
    phrases = sorted({v for vs in concepts.variants for v in vs})
    singular = singularizer(nlp, phrases)
    rows = []
    version = "off"
    if synonyms == "wordnet":
        from . import synonyms as wn_synonyms

        rows = wn_synonyms.wordnet_synonyms(concepts)
        version = wn_synonyms.version()
    return ConceptMapping.from_vocabulary(concepts, singularize=lambda v: singular.get(v, v), synonyms=rows,
                                          synonyms_version=version)
