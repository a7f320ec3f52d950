"""BERT-style token masking, done in the data workers with the sample's own random stream.

Masking belongs to the sample, not to the step: drawing it from the
per-sample generator makes a batch identical for any number of workers and
after a resume, and keeps the training process free of per-token numpy work.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100  # label of a position that carries no MLM loss (torch's cross_entropy default)


@dataclass(frozen=True)
class MaskSpec:
    prob: float = 0.15  # fraction of eligible tokens selected
    mask_frac: float = 0.8  # of the selected: -> [MASK]
    random_frac: float = 0.1  # of the selected: -> a random vocabulary id; the rest stay unchanged
    mask_id: int = 103
    vocab_size: int = 30522


def mask_tokens(ids: np.ndarray, eligible: np.ndarray, spec: MaskSpec, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (masked ids, labels); labels are the original id at selected positions, IGNORE elsewhere.

    Each eligible position is selected independently with probability `prob`
    (so a short sentence may have none selected: the loss handles that).
    Draws exactly 3 uniforms per position, eligible or not, so the stream
    stays aligned whatever the sentence looks like.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    u = rng.random((3, n))
    sel = np.asarray(eligible, dtype=bool) & (u[0] < spec.prob)
    labels = np.where(sel, ids, IGNORE)
    out = ids.copy()
    to_mask = sel & (u[1] < spec.mask_frac)
    to_rand = sel & ~to_mask & (u[1] < spec.mask_frac + spec.random_frac)
    out[to_mask] = spec.mask_id
    rand_ids = np.minimum((u[2] * spec.vocab_size).astype(np.int64), spec.vocab_size - 1)
    out[to_rand] = rand_ids[to_rand]
    return out, labels
