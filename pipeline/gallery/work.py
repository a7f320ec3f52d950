"""The three steps of a gallery build, as plain picklable callables.

`decode_batch` (CPU: read, validate, decode, resize), `DetectorRunner.run`
(detector on a batch) and `ShardCommitter.commit` (one shard -> one LMDB
transaction). The in-process build calls them in a loop; the Ray build makes
the first a task and the other two actors, and passes object refs between
them so image data never travels through the driver. Because both paths run
the same code on the same batches, their galleries are the same.

Per-image failures are data (`ImageOutcome.failure`), never exceptions: one
bad file must not cost a shard, let alone a 10-million-image job.
"""
from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmixer.pipeline.gallery.images import BadImage, DecodePolicy
from vlmixer.pipeline.gallery.sources import ImageItem, keys_digest, load_item

# A callable that turns an RGB uint8 image into the detector's input (tensor, scale),
# cheap and weight-free, so CPU tasks can resize before the detector sees the batch.
Preprocessor = Callable[[np.ndarray], Any]
# `Detector.from_config` or anything with its signature and the Detector API (tests use a double).
DetectorFactory = Callable[..., Any]


@dataclass(frozen=True)
class BoxPlan:
    """Features at annotated boxes (`gallery build --boxes`): the annotation file and its
    category -> concept id map, decided once by the driver; small, so it travels to Ray actors."""

    path: str
    concepts: list[list[str]] | None = None  # None: the detector's own vocabulary
    synonyms: bool = True
    min_pixels: float = 1.0


@dataclass
class DecodedItem:
    key: str
    path: str
    width: int = 0
    height: int = 0
    payload: Any = None  # preprocessed input, or the RGB array when the detector preprocesses
    preprocessed: bool = False
    failure: str | None = None
    note: str | None = None


@dataclass
class DecodedBatch:
    items: list[DecodedItem]
    read_s: float = 0.0


@dataclass
class ImageOutcome:
    """One image's detections (features already fp16, as stored) or its failure reason."""

    key: str
    path: str
    width: int = 0
    height: int = 0
    failure: str | None = None
    note: str | None = None
    boxes: np.ndarray | None = None
    features: np.ndarray | None = None
    concepts: np.ndarray | None = None
    confidences: np.ndarray | None = None
    attr_ids: np.ndarray | None = None
    attr_scores: np.ndarray | None = None

    @property
    def num_patches(self) -> int:
        return 0 if self.boxes is None else int(self.boxes.shape[0])


@dataclass
class BatchPiece:
    """The detector's output for one batch, plus where the time went."""

    images: list[ImageOutcome]
    read_s: float = 0.0
    infer_s: float = 0.0
    worker: str = ""

    def summary(self) -> dict[str, Any]:
        """What the driver needs for progress: small, so only this crosses to it."""
        return {
            "images": sum(1 for o in self.images if o.failure is None),
            "patches": sum(o.num_patches for o in self.images),
            "failures": sum(1 for o in self.images if o.failure is not None),
            "keys": len(self.images),
        }


def failure_piece(items: Sequence[ImageItem], reason: str) -> BatchPiece:
    return BatchPiece(images=[ImageOutcome(key=it.key, path=it.path, failure=reason) for it in items])


def decode_batch(items: Sequence[ImageItem], policy: DecodePolicy,
                 preprocess: Preprocessor | None = None) -> DecodedBatch:
    """Read and decode each image; a bad one becomes a failure entry with its reason."""
    t0 = time.perf_counter()
    out = []
    for it in items:
        d = DecodedItem(key=it.key, path=it.path)
        try:
            img = load_item(it, policy)
            d.width, d.height, d.note = img.width, img.height, img.note
            if preprocess is not None:
                t, scale = preprocess(img.array)[:2]
                d.payload, d.preprocessed = (t, scale, (img.height, img.width)), True
            else:
                d.payload = img.array
        except BadImage as e:
            d.failure = e.reason
        except Exception as e:  # noqa: BLE001  a decoder bug on one file must not stop the job
            d.failure = f"decoder error ({type(e).__name__}: {str(e)[:100]})"
        out.append(d)
    return DecodedBatch(items=out, read_s=time.perf_counter() - t0)


def _check(det: Any, feature_dim: int) -> None:
    n = det.boxes.shape[0]
    shapes = {"boxes": (det.boxes.shape, (n, 4)), "features": (det.features.shape, (n, feature_dim)),
              "concepts": (det.concepts.shape, (n,)), "confidences": (det.confidences.shape, (n,))}
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            raise RuntimeError(f"detector returned {name} of shape {tuple(got)}, expected {want}")


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class DetectorRunner:
    """Holds one detector; `run` turns a decoded batch into a `BatchPiece`.

    A Ray actor wraps it (one per GPU, or a few CPU ones); the in-process build
    uses it directly. If the detector raises on a batch, the images are run one
    by one so that only the image that breaks it is recorded as failed.
    """

    def __init__(self, config: str, weights: str | None = None, device: str = "auto",
                 num_threads: int | None = None, factory: DetectorFactory | None = None,
                 boxes: BoxPlan | None = None) -> None:
        import torch

        self.box_plan = boxes
        self._annotations: Any = None
        self._to_concept: dict[str, int] = {}

        if num_threads:
            torch.set_num_threads(int(num_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        if factory is None:
            from vlmixer.pipeline.detector import Detector

            factory = Detector.from_config
        self.detector = factory(config, weights=weights, device=device)
        self.feature_dim = int(self.detector.feature_dim)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{device}"

    def info(self) -> dict[str, Any]:
        """Sizes, provenance and (when the detector knows them) its vocabularies, as json."""
        d = self.detector
        out: dict[str, Any] = {"feature_dim": self.feature_dim, "num_classes": int(d.num_classes),
                               "num_attributes": int(getattr(d, "num_attributes", 0) or 0),
                               "provenance": dict(getattr(d, "provenance", {}) or {}),
                               "device": self.device, "concepts": None, "attributes": None}
        for name, attrs in (("concepts", ("concepts", "concept_vocab", "vocabulary")),
                            ("attributes", ("attributes", "attribute_vocab"))):
            for a in attrs:
                v = getattr(d, a, None)
                if v is not None and hasattr(v, "to_json"):
                    out[name] = v.to_json()
                    break
        return out

    def preprocessor(self) -> Preprocessor | None:
        """A weight-free copy of the detector's `preprocess` for CPU tasks, or None (then this
        runner resizes). Checked against the real one on a test image before it is trusted."""
        d = self.detector
        pre = getattr(d, "preprocessor", None)
        if pre is None and hasattr(d, "cfg"):
            pre = ConfigOnlyPreprocess(type(d), d.cfg)
        if pre is None:
            return None
        probe = (np.arange(37 * 53 * 3) % 251).astype(np.uint8).reshape(37, 53, 3)
        try:
            a, b = pre(probe), d.preprocess(probe)
            same = float(a[1]) == float(b[1]) and bool((_np(a[0]) == _np(b[0])).all())
        except Exception:  # noqa: BLE001  any doubt: the runner preprocesses itself
            same = False
        return pre if same else None

    def _detect(self, inputs: list[Any], given: list[tuple[np.ndarray, np.ndarray]] | None = None) -> list[Any]:
        if given is None:
            return list(self.detector.detect_preprocessed(inputs))
        return list(self.detector.detect_at_boxes(inputs, [g[0] for g in given], [g[1] for g in given]))

    def _given_boxes(self, outcomes: list[ImageOutcome], todo: list[int]) -> tuple[list[int], list[Any]]:
        """With a box plan: each image's annotated boxes and concepts; images with none are failures."""
        from vlmixer.pipeline.gallery.annotations import boxes_for_image, map_categories, read_annotations
        from vlmixer.storage.vocab import Vocabulary

        plan = self.box_plan
        assert plan is not None
        if self._annotations is None:
            ann = read_annotations(plan.path)
            vocab = Vocabulary.from_json(plan.concepts) if plan.concepts else getattr(self.detector, "concepts", None)
            if vocab is None:
                raise RuntimeError("--boxes needs the concept vocabulary (--labelmap or --vocab)")
            self._to_concept = map_categories(ann.category_counts(), vocab, synonyms=plan.synonyms).to_concept
            self._annotations = ann
        kept, given = [], []
        for i in todo:
            o = outcomes[i]
            entry = self._annotations.lookup(o.key, o.path)
            b, c, reason = boxes_for_image(entry, self._to_concept, o.width, o.height, plan.min_pixels)
            if reason is not None:
                o.failure = reason
                continue
            kept.append(i)
            given.append((b, c))
        return kept, given

    def run(self, batch: DecodedBatch) -> BatchPiece:
        t0 = time.perf_counter()
        outcomes = [ImageOutcome(key=d.key, path=d.path, width=d.width, height=d.height,
                                 failure=d.failure, note=d.note) for d in batch.items]
        todo = [i for i, d in enumerate(batch.items) if d.failure is None]
        given: list[Any] | None = None
        if self.box_plan is not None:
            todo, given = self._given_boxes(outcomes, todo)
        inputs = []
        for i in todo:
            d = batch.items[i]
            if d.preprocessed:
                inputs.append(d.payload)
            else:
                t, scale = self.detector.preprocess(d.payload)[:2]
                inputs.append((t, scale, (d.height, d.width)))
        results: list[Any] = []
        if inputs:
            try:
                results = self._detect(inputs, given)
                if len(results) != len(inputs):
                    raise RuntimeError(f"detector returned {len(results)} results for {len(inputs)} images")
            except Exception:  # noqa: BLE001  isolate the image that breaks the batch
                results = []
                for n, x in enumerate(inputs):
                    try:
                        results.append(self._detect([x], None if given is None else [given[n]])[0])
                    except Exception as e:  # noqa: BLE001
                        results.append(e)
        for i, det in zip(todo, results):
            o = outcomes[i]
            if isinstance(det, Exception):
                o.failure = f"detector error ({type(det).__name__}: {str(det)[:100]})"
                continue
            _check(det, self.feature_dim)
            if len(_np(det.boxes)) == 0:
                # e.g. a 10000x20 picture: every proposal is under the detector's minimum box size
                o.failure = getattr(det, "empty_reason", None) or "no detections (the detector kept no box)"
                continue
            feats = _np(det.features).astype(np.float16)
            if not np.all(np.isfinite(feats)):
                o.failure = "non-finite detector features"
                continue
            o.boxes = _np(det.boxes).astype(np.float32)
            o.features = feats
            o.concepts = _np(det.concepts).astype(np.int32)
            o.confidences = _np(det.confidences).astype(np.float32)
            if getattr(det, "attr_ids", None) is not None:
                o.attr_ids = _np(det.attr_ids).astype(np.int32)
                o.attr_scores = _np(det.attr_scores).astype(np.float32)
        return BatchPiece(images=outcomes, read_s=batch.read_s, infer_s=time.perf_counter() - t0,
                          worker=self.worker)

    def run_with_summary(self, batch: DecodedBatch) -> tuple[BatchPiece, dict[str, Any]]:
        piece = self.run(batch)
        return piece, piece.summary()


class ConfigOnlyPreprocess:
    """The detector class's own `preprocess` on an instance that holds only its config.

    Resizing needs the config, not the weights; this keeps CPU tasks from building
    a model. Used only after `DetectorRunner.preprocessor` checked it matches.
    """

    def __init__(self, cls: type, cfg: Any) -> None:
        self.cls, self.cfg = cls, cfg

    def __call__(self, image: np.ndarray) -> Any:
        shell = self.cls.__new__(self.cls)
        shell.cfg = self.cfg
        return self.cls.preprocess(shell, image)


def failure_category(reason: str) -> str:
    """`truncated (image file is ...)` -> `truncated`: what per-shard stats tally."""
    return reason.split(" (", 1)[0]


@dataclass
class ShardCommitter:
    """Owns the gallery writer of one part; `commit` writes one shard atomically.

    Idempotent per shard: committing a shard that is already committed with the
    same keys (an actor retried after it died between commit and reply) returns
    the stored stats instead of failing.
    """

    root: str
    feature_dim: int
    concepts: list[list[str]]
    attributes: list[list[str]] | None
    provenance: dict[str, Any]
    part: int | None = None  # the first part not yet finalized
    lock_held_by_driver: bool = False  # the build driver holds the gallery's write lock for the run
    _writer: Any = field(default=None, repr=False)

    @property
    def writer(self) -> Any:
        """The part writer, opened at the first use: a run with nothing to commit (its lazy plan
        turned out empty) leaves no new, empty part behind."""
        if self._writer is None:
            from vlmixer.storage.gallery_writer import GalleryWriter
            from vlmixer.storage.vocab import Vocabulary

            self._writer = GalleryWriter(
                self.root, part=self.part, feature_dim=self.feature_dim,
                concepts=Vocabulary.from_json(self.concepts),
                attributes=Vocabulary.from_json(self.attributes) if self.attributes else None,
                provenance=self.provenance, lock_held_by_driver=self.lock_held_by_driver)
        return self._writer

    def commit(self, shard_id: str, keys_sha256: str, extra: dict[str, Any], *pieces: BatchPiece) -> dict[str, Any]:
        t0 = time.perf_counter()
        outcomes = [o for p in pieces for o in p.images]
        got = keys_digest(o.key for o in outcomes)
        if got != keys_sha256 or len({o.key for o in outcomes}) != len(outcomes):
            raise RuntimeError(f"shard {shard_id}: the detected images are not the shard's images "
                               f"({len(outcomes)} outcomes)")
        done = self._marker(shard_id)
        if done is not None:
            if done.get("keys_sha256") != keys_sha256:
                from vlmixer.errors import StoreError
                raise StoreError(f"shard {shard_id} is committed with other images; use a new --out")
            return {**done, "already_committed": True}
        reasons: Counter[str] = Counter()
        failed: dict[str, str] = {}
        converted: dict[str, str] = {}
        with self.writer.shard(shard_id) as buf:
            for o in outcomes:
                if o.failure is not None:
                    buf.add_failure(o.key, o.path, o.failure)
                    reasons[failure_category(o.failure)] += 1
                    failed[o.key] = o.failure
                    continue
                buf.add_image(o.key, o.path, o.width, o.height, o.boxes, o.features, o.concepts,
                              o.confidences, o.attr_ids, o.attr_scores)
                if o.note:
                    converted[o.key] = o.note
            buf.stats.update(extra)
            buf.stats.update(
                keys_sha256=keys_sha256,
                batches=len(pieces),
                read_s=round(sum(p.read_s for p in pieces), 4),
                infer_s=round(sum(p.infer_s for p in pieces), 4),
                # time to assemble the shard for the writer; the LMDB commit itself follows
                write_s=round(time.perf_counter() - t0, 4),
                failure_reasons=dict(reasons),
                failed=failed,
                converted=converted,
                workers=sorted({p.worker for p in pieces if p.worker}),
                committed_at=time.time(),
            )
            stats = dict(buf.stats)
        stats.update(images=sum(1 for o in outcomes if o.failure is None),
                     patches=sum(o.num_patches for o in outcomes), failures=len(failed),
                     commit_s=round(time.perf_counter() - t0, 4))
        return stats

    def _marker(self, shard_id: str) -> dict[str, Any] | None:
        """One shard's commit marker, looked up alone (reading all of them at every commit
        would make a job of N shards cost N^2)."""
        import msgpack

        w = self.writer
        with w.env.begin(db=w.dbs[b"shard"]) as txn:
            v = txn.get(shard_id.encode())
        return None if v is None else msgpack.unpackb(bytes(v))

    def committed(self) -> dict[str, dict[str, Any]]:
        return self.writer.committed_shards()

    def stored_keys(self, keys: Sequence[str]) -> dict[str, str]:
        """Which of `keys` this part already holds, with the shard that stored each: a source that
        lists an image twice (an import of released features) must not fail a whole shard on it."""
        import msgpack

        w = self.writer
        found: dict[str, str] = {}
        with w.env.begin() as txn:
            for k in keys:
                idx = txn.get(k.encode("utf-8"), db=w.dbs[b"imgkey"])
                if idx is not None:
                    rec = txn.get(bytes(idx), db=w.dbs[b"image"])
                    found[k] = msgpack.unpackb(bytes(rec)).get("shard", "?") if rec is not None else "?"
        return found

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
