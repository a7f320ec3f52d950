"""Run the spaCy pipeline's matrix products on numpy's BLAS, one thread per process.

Why: with parser and NER excluded and the attribute-rule stand-ins in, most
of en_core_web_sm's remaining time is tok2vec (alone 1,340 captions/s here,
against 32k/s for the tokenizer and 59k/s for the tagger head), whose cost is
a few (tokens x 288) @ (288 x 288) products per batch. thinc multiplies them with the `blis` package; numpy's bundled
OpenBLAS does the same products about 3x faster per CPU-second on the
machines we measured (bench/text_tag.py), which makes the whole pipeline
about 1.6x faster. Only the multiplication backend changes, not the
weights or the model: results differ at most by float rounding, and
`use_numpy_gemm` checks the tags, POS, morphology and lemmas of a fixed sentence set
before and after, restoring the original ops on any difference.

Each product runs with BLAS limited to one thread: the job gets its
parallelism from processes (Ray workers, `n_process`), and OpenBLAS threads
on products this small cost more CPU than they save.
"""
from __future__ import annotations

from typing import Any

from thinc.backends.numpy_ops import NumpyOps
from threadpoolctl import ThreadpoolController

from .attribute_rules import SELF_CHECK, token_signature


class NumpyGemmOps(NumpyOps):
    """thinc NumpyOps whose `gemm` is numpy's `dot` under a one-thread BLAS limit.

    The BLAS controller is per process and made on first use, so the ops pickle (spaCy's
    `n_process` workers under spawn) and a forked child inspects its own libraries."""

    name = "numpy"

    def __init__(self) -> None:
        super().__init__(use_blis=False)
        self._blas: ThreadpoolController | None = None

    def __reduce__(self) -> tuple[type, tuple]:
        return (NumpyGemmOps, ())

    def gemm(self, x: Any, y: Any, *, out: Any = None, trans1: bool = False, trans2: bool = False) -> Any:
        if self._blas is None:
            self._blas = ThreadpoolController()
        with self._blas.limit(limits=1, user_api="blas"):
            return super().gemm(x, y, out=out, trans1=trans1, trans2=trans2)


def _models(nlp: Any) -> list[Any]:
    nodes = []
    for _, proc in nlp.pipeline:
        model = getattr(proc, "model", None)
        if model is not None and hasattr(model, "walk"):
            nodes.extend(model.walk())
    return nodes


def _annotations(nlp: Any, texts: list[str]) -> list[list[tuple[str, str, str, str]]]:
    return [token_signature(doc) for doc in nlp.pipe(texts)]


def use_numpy_gemm(nlp: Any, check: list[str] | None = None) -> bool:
    """Switch every thinc layer of `nlp` to `NumpyGemmOps` in place; True when switched.

    Kept only when the annotations of `check` (default: the attribute-rule self-check
    sentences) are identical before and after; otherwise the original ops are restored."""
    nodes = _models(nlp)
    if not nodes or not all(type(n.ops) in (NumpyOps, NumpyGemmOps) for n in nodes):
        return False  # nothing to switch, or other ops (GPU, Apple's Accelerate) that stay as they are
    if all(isinstance(n.ops, NumpyGemmOps) for n in nodes):
        return True
    texts = check if check is not None else SELF_CHECK
    before = _annotations(nlp, texts)
    original = [n.ops for n in nodes]
    ops = NumpyGemmOps()
    for n in nodes:
        n.ops = ops
    if _annotations(nlp, texts) != before:
        for n, o in zip(nodes, original):
            n.ops = o
        return False
    return True
