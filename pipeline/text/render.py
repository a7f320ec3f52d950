"""Human and machine views of a text store: `text show` and `text dump --jsonl`."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, TextIO

from vlmixer.storage.textstore import TextStoreReader


def mark_sentence(text: str, spans: list[tuple[int, int, str]]) -> str:
    """`A [puppies|dog] under the [traffic light|traffic light].`: each grounded word in
    brackets with its concept after the bar."""
    out, pos = [], 0
    for start, end, concept in sorted(spans):
        out.append(text[pos:start])
        out.append(f"[{text[start:end]}|{concept}]")
        pos = end
    out.append(text[pos:])
    return "".join(out)


def iter_dump_records(reader: TextStoreReader) -> Iterator[dict[str, Any]]:
    """One dict per sentence, shard by shard (bulk reads, not one HDF5 slice per field)."""
    names = reader.concepts.names
    for k in range(reader.num_shards):
        a = reader.shard_arrays(k)
        text, toff = a["text"].tobytes(), a["text_offsets"]
        ids, ioff = a["ids"].tobytes(), a["id_offsets"]
        keys, koff = a["image_keys"].tobytes(), a["image_key_offsets"]
        spans, soff = a["spans"], a["span_offsets"]
        for i in range(len(toff) - 1):
            rec: dict[str, Any] = {
                "id": ids[ioff[i]:ioff[i + 1]].decode("utf-8"),
                "text": text[toff[i]:toff[i + 1]].decode("utf-8"),
                "spans": [{"start": int(r[0]), "end": int(r[1]), "concept": names[int(r[4])]}
                          for r in spans[soff[i]:soff[i + 1]]],
            }
            key = keys[koff[i]:koff[i + 1]].decode("utf-8")
            if key:
                rec["image_key"] = key
            yield rec


def dump_jsonl(reader: TextStoreReader, out: TextIO) -> int:
    """Write `{"id", "text", "spans": [{"start", "end", "concept"}]}` lines (char offsets into
    text, concept by name; `image_key` too when the sentence has one). Returns the count."""
    n = 0
    for rec in iter_dump_records(reader):
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        n += 1
    return n


def show(reader: TextStoreReader, n: int, out: TextIO, *, start: int = 0, grounded_only: bool = False) -> int:
    """Print up to `n` sentences from `start` with grounded words marked and their concepts."""
    names = reader.concepts.names
    shown = 0
    for i in range(start, len(reader)):
        if shown >= n:
            break
        s = reader.sentence(i)
        if grounded_only and not s.spans:
            continue
        marked = mark_sentence(s.text, [(sp.char_start, sp.char_end, names[sp.concept]) for sp in s.spans])
        key = f"  image={s.image_key}" if s.image_key else ""
        out.write(f"{i:>7}  {s.id}{key}\n         {marked}\n")
        shown += 1
    return shown
