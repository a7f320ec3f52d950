"""WordNet synonyms for the concept mapping ("puppy" -> "dog"), by fixed, versioned rules.

For each concept (each of its spellings) take its most frequent noun sense that
is a physical entity (something a detector could see), then that sense's lemma
names and the lemma names of its hyponyms down to `DEPTH` levels. A word is
kept only when
  - it is not on `STOP_WORDS` (words WordNet relates to a concept but that text
    mostly uses otherwise),
  - the sense it was reached through is its own most frequent noun sense (so
    "frank" never becomes "dog" and "pawl" never "dog"),
  - it is a plain lower-case word or phrase in WordNet (letters, spaces, hyphens,
    apostrophes): capitalised lemma names are proper or taxonomic names
    ("Psittacus erithacus", "Newfoundland") and are left out.
A word reached from several concepts goes to the nearest (fewest hyponym
steps), then to the earlier concept in the vocabulary. Concept names and
variants always win over synonyms (the mapping's priority order), so "puppy"
maps to "dog" only while "puppy" is not itself a concept.

Any change to these rules or the stop-list changes `version()`, which goes
into the mapping TSV and the store's provenance.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

from vlmixer.errors import VlmixerError
from vlmixer.storage.vocab import Vocabulary

from .concepts import MappingEntry

RULES_VERSION = 1
DEPTH = 2
# Reached through a visual sense, but in running text mostly something else.
STOP_WORDS = frozenset({
    "article", "attack", "base", "case", "cell", "check", "club", "count", "cover", "date", "destination",
    "die", "drive", "fan", "figure", "file", "fix", "game", "guy", "issue", "jack", "kid", "lead", "line",
    "list", "lot", "mark", "match", "model", "note", "number", "order", "organ", "party", "pass", "patient",
    "piece", "pitch", "place", "plant", "point", "post", "power", "present", "press", "program", "record",
    "round", "rule", "run", "safe", "scale", "seal", "set", "space", "spring", "square", "staff", "stage",
    "star", "state", "step", "still", "stock", "story", "suit", "support", "term", "track", "type", "unit",
    "wave", "will",
})
_PLAIN = re.compile(r"^[a-z][a-z' -]*[a-z]$")


def _wordnet() -> Any:
    """nltk's WordNet reader, or a clear error: scripts/install.sh copies WordNet 3.0 into
    `<venv>/nltk_data` because nltk.download() needs a network."""
    try:
        from nltk.corpus import wordnet as wn

        wn.ensure_loaded()
    except (ImportError, LookupError, OSError) as e:
        raise VlmixerError("WordNet for nltk is not installed (run scripts/install.sh, which copies "
                           f"WordNet 3.0 into <venv>/nltk_data), or use --synonyms off ({type(e).__name__})") from None
    return wn


def version() -> str:
    stop = hashlib.sha256("\n".join(sorted(STOP_WORDS)).encode()).hexdigest()[:12]
    return f"wordnet-{_wordnet().get_version()}/rules-{RULES_VERSION}/depth-{DEPTH}/stop-{stop}"


def _physical_sense(wn: Any, phrase: str) -> Any | None:
    physical = wn.synset("physical_entity.n.01")
    for syn in wn.synsets(phrase.replace(" ", "_"), pos=wn.NOUN):
        if any(physical in path for path in syn.hypernym_paths()):
            return syn
    return None


def wordnet_synonyms(concepts: Vocabulary, *, depth: int = DEPTH) -> list[MappingEntry]:
    """Synonym rows (phrase, concept, "wordnet:<synset>") for `concepts`, by the rules above."""
    wn = _wordnet()
    best: dict[str, tuple[int, int, str]] = {}  # word -> (depth, concept index, synset name)
    first_sense: dict[str, Any] = {}

    def most_frequent(word: str) -> Any:
        if word not in first_sense:
            s = wn.synsets(word.replace(" ", "_"), pos=wn.NOUN)
            first_sense[word] = s[0] if s else None
        return first_sense[word]

    for ci, variants in enumerate(concepts.variants):
        for v in variants:
            root = _physical_sense(wn, v)
            if root is None:
                continue
            frontier, seen = [root], {root}
            for d in range(depth + 1):
                nxt = []
                for syn in frontier:
                    for lemma in syn.lemma_names():
                        word = lemma.replace("_", " ")
                        if word in STOP_WORDS or not _PLAIN.match(word) or most_frequent(word) != syn:
                            continue
                        cand = (d, ci, syn.name())
                        if word not in best or cand[:2] < best[word][:2]:
                            best[word] = cand
                    for h in syn.hyponyms():
                        if h not in seen:
                            seen.add(h)
                            nxt.append(h)
                frontier = nxt
    rows = sorted(best.items(), key=lambda kv: (kv[1][1], kv[1][0], kv[0]))
    return [MappingEntry(word, concepts.names[ci], f"wordnet:{syn}") for word, (_, ci, syn) in rows]
