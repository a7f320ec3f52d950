"""Atomic, pickle-free-to-load checkpoints and the random states an exact resume needs.

A checkpoint is one `torch.save` file written to a temporary name and moved
into place with `os.replace`, then `latest.json` (also atomic) points at it:
a job killed at any moment leaves the previous checkpoint intact and
pointed to. Loading uses `torch.load(weights_only=True)`, so a checkpoint
holds only tensors and plain containers: numpy random state is converted to
a tensor, the config is a plain dict.
"""
from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmixer.errors import VlmixerError
from vlmixer.files import atomic_write, atomic_write_json


def rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]), "has_gauss": int(st[3]),
                  "gauss": float(st[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], keep_last: int = 0) -> Path:
    """Write `checkpoints/step_NNNNNNNN.pt` atomically, point `latest.json` at it, prune old ones."""
    d = checkpoint_dir(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".*.tmp"):  # a writer killed mid-save (rank 0 is the only writer)
        stale.unlink(missing_ok=True)
    final = d / f"step_{step:08d}.pt"
    atomic_write(final, lambda f: torch.save(state, f))
    atomic_write_json(d / "latest.json", {"step": step, "file": final.name})
    if keep_last:
        for old in sorted(d.glob("step_*.pt"))[:-keep_last]:
            old.unlink()
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    d = checkpoint_dir(out_dir)
    p = d / "latest.json"
    if p.exists():
        try:
            f = d / json.loads(p.read_text(encoding="utf-8"))["file"]
        except (OSError, ValueError, KeyError) as e:
            raise VlmixerError(f"{p}: unreadable checkpoint pointer ({e})") from None
        if f.exists():
            return f
    found = sorted(d.glob("step_*.pt")) if d.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`; anything else is one VlmixerError naming the file.

    torch.load raises half a dozen unrelated types on foreign bytes, and its message for
    a file holding pickled objects advises turning weights_only off: that advice is never
    passed on, since such a file could run code when loaded.
    """
    p = Path(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except OSError as e:
        raise VlmixerError(f"{p}: cannot read checkpoint ({e.strerror or type(e).__name__})") from None
    except Exception:  # noqa: BLE001 - any failure to unpickle is the same verdict for the user
        if zipfile.is_zipfile(p):
            why = "it holds Python objects besides tensors and plain containers, and was refused unread"
        else:
            why = "not a torch checkpoint archive (damaged, truncated or another kind of file)"
        raise VlmixerError(f"{p}: not a vlmixer checkpoint ({why})") from None
    if not isinstance(state, dict) or not {"model", "config", "step"} <= state.keys():
        raise VlmixerError(f"{p}: not a vlmixer checkpoint (no model, config and step entries)")
    return state
