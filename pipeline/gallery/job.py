"""`vlmixer gallery build`: plan shards, run them (Ray or in-process), finalize.

The driver only plans and steers. On Ray, CPU tasks decode and resize a
batch, a detector actor (one per GPU, or a few CPU ones) turns it into a
`BatchPiece`, and when every batch of a shard is done the writer actor,
pinned to the driver's node where the output lives, commits the shard in one
transaction. The driver holds object refs, never image data, and a fixed
window of them (`ray.wait`), so its memory does not grow with the job.

Resume is derived from the store: a shard whose commit marker exists is
skipped (and must hold the same keys, or the plan changed and we refuse).
`--retry-failed` additionally re-runs the images recorded as failed, as new
shards `r<attempt>-<shard>`, in the first part not yet finalized (a finalized
part is never written again: readers may be mapping it). The driver holds the
gallery's write lock from planning through finalize, so a second build into
the same --out is refused at once.

The plan streams (`plan.py`): shards come from a listing sorted on disk or
from one webdataset tar / parquet file at a time, so neither the plan nor
the loop that runs it holds the image list.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmixer.errors import VlmixerError
from vlmixer.pipeline import ray_session
from vlmixer.pipeline.containers import is_container_spec
from vlmixer.pipeline.gallery.images import DecodePolicy
from vlmixer.pipeline.gallery.options import DECODE_MODES, BuildOptions
from vlmixer.pipeline.gallery.plan import (
    ContainerOptions,
    PlanShards,
    container_plan,
    container_shard_file,
    listing_plan,
    listing_shard_index,
    retry_shards,
    spill_folder,
)
from vlmixer.pipeline.gallery.sources import ImageItem, Shard, keys_digest
from vlmixer.pipeline.gallery.work import (
    BatchPiece,
    BoxPlan,
    DetectorRunner,
    ShardCommitter,
    decode_batch,
    failure_piece,
)
from vlmixer.storage.finalize_budget import MIN_FINALIZE_MEMORY_MB

EXIT_SOME_FAILED = 3


@dataclass
class BuildReport:
    """What a build did; `exit_code` is 0, or EXIT_SOME_FAILED when images are recorded as failed."""

    out: str
    images_planned: int = 0
    shards_planned: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    images_done: int = 0
    patches_done: int = 0
    failures_this_run: int = 0
    gallery_images: int = 0
    gallery_patches: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)  # the first 1000 (at least max_listed)
    failed_count: int = 0
    not_planned: list[tuple[str, str]] = field(default_factory=list)  # (what, why): left out while listing
    not_planned_count: int = 0
    converted: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    mode: str = ""
    workers: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed_count else 0

    def summary(self, max_listed: int = 50) -> str:
        rate = self.images_done / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"gallery {self.out}: {self.gallery_images} images, {self.gallery_patches} patches",
            f"this run ({self.mode}, {self.workers} detector worker(s)): {self.shards_done} shards "
            f"({self.shards_skipped} already committed), {self.images_done} images, {self.patches_done} "
            f"patches, {self.failures_this_run} failed, {self.seconds:.1f} s ({rate:.1f} images/s)",
        ]
        lines += self.notes
        if self.converted:
            lines.append(f"converted to RGB ({len(self.converted)}):")
            for k, note in sorted(self.converted.items())[:max_listed]:
                lines.append(f"  {k}: {note}")
            if len(self.converted) > max_listed:
                lines.append(f"  ... and {len(self.converted) - max_listed} more (shard stats: 'converted')")
        if self.not_planned_count:
            lines.append(f"left out while listing ({self.not_planned_count}):")
            for what, why in self.not_planned[:max_listed]:
                lines.append(f"  {what}: {why}")
            if self.not_planned_count > max_listed:
                lines.append(f"  ... and {self.not_planned_count - max_listed} more")
        if self.failed_count:
            lines.append(f"FAILED images ({self.failed_count}; recorded in the gallery, "
                         "re-run only them with --retry-failed):")
            for f in self.failed[:max_listed]:
                lines.append(f"  {f['key']}: {f['reason']}  [{f['path']}]")
            if self.failed_count > max_listed:
                lines.append(f"  ... and {self.failed_count - max_listed} more (GalleryReader.failures())")
        return "\n".join(lines)


# -- validation and planning --------------------------------------------------------


def validate(opts: BuildOptions) -> None:
    """Check every argument before any work starts (and before Ray is started)."""
    if not Path(opts.detector).is_file():
        raise VlmixerError(f"{opts.detector}: detector config does not exist")
    if opts.weights is not None and not Path(opts.weights).is_file():
        raise VlmixerError(f"{opts.weights}: detector weights do not exist")
    for name in ("labelmap", "vocab"):
        v = getattr(opts, name)
        if v is not None and not Path(v).is_file():
            raise VlmixerError(f"{v}: --{name} file does not exist")
    if opts.labelmap and opts.vocab:
        raise VlmixerError("give either --labelmap or --vocab, not both")
    if opts.image_root is not None and not Path(opts.image_root).is_dir():
        raise VlmixerError(f"{opts.image_root}: --image-root is not a directory")
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise VlmixerError(f"{opts.out}: --out exists and is not a directory")
    if opts.shard_size < 1 or opts.batch_size < 1:
        raise VlmixerError("--shard-size and --batch-size must be >= 1")
    if opts.num_gpus_per_worker < 0:
        raise VlmixerError("--num-gpus-per-worker must be >= 0")
    if opts.threads is not None and opts.threads < 1:
        raise VlmixerError("--threads must be >= 1")
    if opts.cpu_workers is not None and opts.cpu_workers < 1:
        raise VlmixerError("--cpu-workers must be >= 1")
    if opts.device not in ("auto", "cpu", "cuda") and not opts.device.startswith("cuda:"):
        raise VlmixerError(f"--device {opts.device!r}: expected auto, cpu, cuda or cuda:N")
    if not opts.ray_address:
        raise VlmixerError("--ray-address must be auto, local, none or a Ray address")
    if opts.max_pixels < 1:
        raise VlmixerError("--max-pixels must be >= 1")
    if opts.finalize_memory_mb < MIN_FINALIZE_MEMORY_MB:
        raise VlmixerError(f"--finalize-memory-mb {opts.finalize_memory_mb}: finalize needs at least "
                           f"{MIN_FINALIZE_MEMORY_MB} MB")
    if opts.decode not in DECODE_MODES:
        raise VlmixerError(f"--decode {opts.decode!r}: expected one of {', '.join(DECODE_MODES)}")
    if opts.boxes is not None and not Path(opts.boxes).is_file():
        raise VlmixerError(f"{opts.boxes}: --boxes annotation file does not exist")

    if not isinstance(opts.images, str) and len(opts.images) > 1 and not is_container_spec(opts.images):
        raise VlmixerError("several --images are only for webdataset .tar shards or .parquet files; give one "
                           "folder, list file or json")


def _same_pixels_and_boxes(out: Path, opts: BuildOptions) -> None:
    """A resumed gallery must keep its decode mode and box source: mixing them would store patches
    of rotated and unrotated pictures, or detected and annotated boxes, under one provenance."""
    header = out / "gallery.json"
    if not header.is_file():
        return
    from vlmixer.files import sha256_file
    from vlmixer.storage.headers import read_json_object

    prov = read_json_object(header, "gallery header").get("provenance") or {}
    had_decode = (prov.get("build") or {}).get("decode", "standard")
    if had_decode != opts.decode:
        raise VlmixerError(f"{out}: this gallery was built with --decode {had_decode}, not {opts.decode}; "
                           "use the same option or a new --out")
    boxes = prov.get("boxes") or {"from": "detector"}
    if (boxes.get("from") == "annotations") != (opts.boxes is not None) or (
            opts.boxes is not None and boxes.get("sha256") != sha256_file(opts.boxes)):
        had = f"--boxes {boxes.get('path')}" if boxes.get("from") == "annotations" else "detected boxes"
        raise VlmixerError(f"{out}: this gallery holds {had}; resume it with the same boxes or use a new --out")


def existing_state(out: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]]]:
    from vlmixer.storage.gallery_failures import failed_images
    from vlmixer.storage.gallery_writer import committed_shards, list_parts

    if not list_parts(out):
        return {}, []
    return committed_shards(out), failed_images(out)


def _committed(out: Path) -> dict[str, dict[str, Any]]:
    """Shard id -> what resume needs of its commit marker (keys digest, size), read marker by
    marker: the full stats of 100,000 shards (failures and timings each) never sit here at once."""
    import msgpack

    from vlmixer.storage.gallery_writer import list_parts, open_part_readonly
    from vlmixer.storage.lmdb_env import release_env

    done: dict[str, dict[str, Any]] = {}
    for p in list_parts(out):
        env = open_part_readonly(p)
        try:
            with env.begin(db=env.open_db(b"shard", create=False)) as txn:
                for k, v in txn.cursor():
                    st = msgpack.unpackb(bytes(v))
                    done[bytes(k).decode()] = {"keys_sha256": st.get("keys_sha256"),
                                               "size": int(st.get("size", 0) or 0)}
        finally:
            release_env(env)
    return done



def _inputs(opts: BuildOptions) -> list[str]:
    return [opts.images] if isinstance(opts.images, str) else list(opts.images)


def source_plan(opts: BuildOptions, spill_dir: str | Path) -> PlanShards:
    """This build's shards, lazily: a listing sorted on disk, or container files one by one."""
    inputs = _inputs(opts)
    if is_container_spec(inputs):
        return container_plan(inputs, shard_size=opts.shard_size, options=ContainerOptions(
            image_column=opts.image_column, key_column=opts.key_column, image_root=opts.image_root))
    return listing_plan(inputs[0], shard_size=opts.shard_size, seed=opts.seed, spill_dir=spill_dir,
                        image_root=opts.image_root)


def _check_plan(opts: BuildOptions, source: PlanShards, committed: dict[str, dict[str, Any]]) -> None:
    """Refuse, before any work, a store holding shards that this plan cannot have cut."""
    for sid in sorted(committed):
        if sid.startswith("r"):
            continue
        if source.kind == "listing":
            idx = listing_shard_index(source, sid)
            ok = idx is not None and idx < source.shards
        else:
            ok = container_shard_file(source, sid) in source.inputs
        if not ok:
            raise VlmixerError(
                f"{opts.out}: holds shards of another build plan ({sid}, ...): it was built with another "
                "--shard-size, seed or input; resume with the same arguments or use a new --out")
    if source.kind == "listing" and any(source.owns(s) for s in committed):
        for s in source:  # a pass over the sorted listing on disk: the collection must be the same
            _skip(opts, s, committed)


def _skip(opts: BuildOptions, s: Shard, committed: dict[str, dict[str, Any]]) -> bool:
    done = committed.get(s.shard_id)
    if done is None:
        return False
    if done.get("keys_sha256") != s.keys_sha256:
        raise VlmixerError(
            f"{opts.out}: shard {s.shard_id} was committed with other images than the source now "
            "lists (the collection changed); use a new --out")
    return True


def plan(opts: BuildOptions, source: PlanShards, committed: dict[str, dict[str, Any]],
         report: BuildReport, spill_dir: str | Path) -> tuple[Iterator[Shard], int]:
    """Shards still to do (uncommitted plan shards, then retry shards), lazily, and how many
    retry images follow the plan. Skipped shards are counted into `report` as they pass."""
    from vlmixer.storage.gallery_failures import failed_images

    _check_plan(opts, source, committed)
    n_retry, retries = 0, iter(())
    if opts.retry_failed:
        attempt = 1 + max([int(s[1:].split("-", 1)[0]) for s in committed
                           if s.startswith("r") and s[1:].split("-", 1)[0].isdigit()] or [0])
        try:
            n_retry, retries = retry_shards(failed_images(Path(opts.out)), attempt, spill_dir)
        except VlmixerError as e:
            raise VlmixerError(f"{opts.out}: {e}") from None

    def todo() -> Iterator[Shard]:
        for s in source:
            if _skip(opts, s, committed):
                report.shards_skipped += 1
            else:
                yield s
        yield from retries

    return todo(), n_retry


def _policy(opts: BuildOptions) -> DecodePolicy:
    return DecodePolicy(max_pixels=opts.max_pixels, strict_modes=opts.strict_modes, mode=opts.decode)


def _box_plan(opts: BuildOptions) -> BoxPlan | None:
    """What detector workers need for `--boxes`; the vocabulary travels only when the user gave it."""
    if opts.boxes is None:
        return None
    concepts = None
    if opts.labelmap or opts.vocab:
        from vlmixer.storage.vocab import read_labelmap_json, read_vocab_txt

        concepts = (read_labelmap_json(opts.labelmap)[0] if opts.labelmap else read_vocab_txt(opts.vocab)).to_json()
    return BoxPlan(path=str(Path(opts.boxes).resolve()), concepts=concepts, synonyms=opts.box_synonyms)


def _batches(shard: Shard, size: int) -> list[tuple[ImageItem, ...]]:
    return [shard.items[i: i + size] for i in range(0, len(shard.items), size)]


# -- vocabularies and provenance ----------------------------------------------------


def _vocabularies(opts: BuildOptions, info: dict[str, Any]) -> tuple[list[list[str]], list[list[str]] | None]:
    from vlmixer.storage.vocab import read_labelmap_json, read_vocab_txt

    concepts, attributes = info.get("concepts"), info.get("attributes")
    if opts.labelmap:
        c, a = read_labelmap_json(opts.labelmap)
        concepts, attributes = c.to_json(), (a.to_json() if a is not None else attributes)
    elif opts.vocab:
        concepts = read_vocab_txt(opts.vocab).to_json()
    if concepts is None:
        raise VlmixerError("the detector does not name its classes; pass --labelmap LABELMAP.json or --vocab FILE")
    if len(concepts) != info["num_classes"]:
        raise VlmixerError(f"vocabulary has {len(concepts)} concepts but the detector {info['num_classes']} classes")
    if attributes is not None and info.get("num_attributes") and len(attributes) != info["num_attributes"]:
        raise VlmixerError(f"attribute vocabulary has {len(attributes)} entries, the detector "
                           f"{info['num_attributes']} attributes")
    return concepts, attributes


def _provenance(opts: BuildOptions, info: dict[str, Any], box_info: dict[str, Any] | None = None) -> dict[str, Any]:
    from vlmixer.files import sha256_file

    keep = ("images", "image_root", "shard_size", "batch_size", "seed", "strict_modes", "max_pixels", "decode")
    build = {k: getattr(opts, k) for k in keep}
    images = [str(Path(i).resolve()) for i in _inputs(opts)]
    build["images"] = images[0] if len(images) == 1 else images
    if opts.labelmap:
        build["labelmap_sha256"] = sha256_file(opts.labelmap)
    out = {"detector": info.get("provenance", {}), "detector_config": str(Path(opts.detector).resolve()),
           "build": build, "boxes": {"from": "detector"}}
    if box_info is not None:
        out["boxes"] = box_info
    return out


def _box_info(opts: BuildOptions, concepts: list[list[str]], report: BuildReport) -> dict[str, Any] | None:
    """With --boxes: map the annotation categories once here (for the summary and the provenance);
    workers map them the same way from the same vocabulary."""
    if opts.boxes is None:
        return None
    from vlmixer.files import sha256_file
    from vlmixer.pipeline.gallery.annotations import map_categories, read_annotations
    from vlmixer.storage.vocab import Vocabulary

    ann = read_annotations(opts.boxes)
    cmap = map_categories(ann.category_counts(), Vocabulary.from_json(concepts), synonyms=opts.box_synonyms)
    report.notes.append(f"boxes from {opts.boxes} ({ann.format}): {cmap.summary()}")
    if ann.problems:
        report.notes.append(f"{len(ann.problems)} annotation record(s) skipped: " + "; ".join(ann.problems[:5]))
    return {"from": "annotations", "path": str(Path(opts.boxes).resolve()), "format": ann.format,
            "sha256": sha256_file(opts.boxes), "confidence": 1.0, "synonyms": opts.box_synonyms,
            "categories_mapped": {k: concepts[v][0] for k, v in sorted(cmap.to_concept.items())},
            "categories_unmapped": dict(sorted(cmap.unmapped.items())),
            "records_skipped": len(ann.problems)}


# -- progress ---------------------------------------------------------------------


class Progress:
    """images/s, patches, failures and ETA: a tqdm bar on a terminal, else a line every 30 s."""

    def __init__(self, total: int | None, enabled: bool | None, log_every: float = 30.0,
                 estimate: Callable[[], int | None] | None = None) -> None:
        # `estimate` gives a total when it is known only as the inputs are read (container files)
        self.total, self.images, self.patches, self.failures = total, 0, 0, 0
        self._estimate = estimate
        self.t0 = time.perf_counter()
        self._last_log = self.t0
        self._log_every = log_every
        tty = sys.stderr.isatty()
        self.enabled = tty if enabled is None else enabled
        self.bar = None
        if self.enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", mininterval=0.5, dynamic_ncols=True, file=sys.stderr)

    def update(self, s: dict[str, Any]) -> None:
        self.images += s["keys"]
        self.patches += s["patches"]
        self.failures += s["failures"]
        if self._estimate is not None:
            self.total = self._estimate()
            if self.bar is not None and self.total != self.bar.total:
                self.bar.total = self.total
        if self.bar is not None:
            self.bar.update(s["keys"])
            self.bar.set_postfix(patches=self.patches, failed=self.failures, refresh=False)
        elif self.enabled:
            now = time.perf_counter()
            if now - self._last_log >= self._log_every:
                self._last_log = now
                print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        dt = time.perf_counter() - self.t0
        rate = self.images / dt if dt > 0 else 0.0
        total = "?" if self.total is None else self.total
        eta = (f"ETA {(self.total - self.images) / rate:.0f} s" if rate > 0 and self.total is not None
               else "ETA ?")
        return (f"[gallery] {self.images}/{total} images, {rate:.1f} img/s, {self.patches} patches, "
                f"{self.failures} failed, {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the build ----------------------------------------------------------------------


def build_gallery(opts: BuildOptions) -> BuildReport:
    """Plan, run the shards still to do, finalize; the CLI and the Python API are this function."""
    from vlmixer.storage.gallery_failures import failed_images
    from vlmixer.storage.gallery_finalize import finalize_gallery
    from vlmixer.storage.gallery_writer import build_lock
    from vlmixer.storage.headers import read_json_object

    validate(opts)
    t0 = time.perf_counter()
    out = Path(opts.out)
    _same_pixels_and_boxes(out, opts)
    with build_lock(out):
        report = BuildReport(out=str(out))
        with spill_folder() as spill:
            source = source_plan(opts, spill)
            committed = _committed(out)
            todo, n_retry = plan(opts, source, committed, report, spill)
            if source.kind == "listing":
                done = sum(v["size"] for k, v in committed.items() if source.owns(k))
                progress = Progress(source.images - done + n_retry, opts.progress)
            else:  # container files are counted as they are read: ETA from the files still to read
                progress = Progress(None, opts.progress, estimate=lambda: _estimate(source, n_retry))
            try:
                if opts.ray_address == "none":
                    _run_in_process(opts, todo, progress, report)
                else:
                    _run_ray(opts, todo, progress, report)
            finally:
                progress.close()
            report.images_planned = source.images
            report.shards_planned = source.shards
            report.not_planned, report.not_planned_count = list(source.skipped_entries), source.skipped_count
        if report.shards_done or not _finalized(out):
            manifest = finalize_gallery(out, opts.finalize_memory_mb)
        else:  # nothing new: leave the index that readers may be mapping as it is
            manifest = read_json_object(out / "manifest.json", "gallery manifest")
        failures = failed_images(out)
    report.gallery_images, report.gallery_patches = manifest["images"], manifest["patches"]
    report.failed_count = len(failures)
    report.failed = [{k: f[k] for k in ("key", "path", "reason")} for f in failures[:max(opts.max_listed, 1000)]]
    report.seconds = time.perf_counter() - t0
    return report


def _finalized(out: Path) -> bool:
    """A manifest lists every part on disk: the last finalize saw everything written since."""
    from vlmixer.storage.gallery_writer import list_parts, sealed_parts

    return (out / "manifest.json").exists() and {p.name for p in list_parts(out)} <= sealed_parts(out)


def _estimate(source: PlanShards, n_retry: int) -> int | None:
    files = source.files_read
    if not files:
        return None
    return round(source.images / files * len(source.inputs)) + n_retry


def _record(report: BuildReport, stats: dict[str, Any]) -> None:
    report.shards_done += 1
    report.images_done += int(stats.get("images", 0)) + int(stats.get("failures", 0))
    report.patches_done += int(stats.get("patches", 0))
    report.failures_this_run += int(stats.get("failures", 0))
    report.converted.update(stats.get("converted", {}))


def _extra(opts: BuildOptions, shard: Shard) -> dict[str, Any]:
    return {"size": len(shard.items), "batch_size": opts.batch_size}


def _run_in_process(opts: BuildOptions, todo: Iterable[Shard], progress: Progress, report: BuildReport) -> None:
    """The same callables as the Ray job, in a loop: for debugging and machines without Ray."""
    runner = DetectorRunner(opts.detector, opts.weights, opts.device, num_threads=opts.threads,
                            factory=opts.detector_factory, boxes=_box_plan(opts))
    info = runner.info()
    concepts, attributes = _vocabularies(opts, info)
    committer = ShardCommitter(str(opts.out), info["feature_dim"], concepts, attributes,
                               _provenance(opts, info, _box_info(opts, concepts, report)), lock_held_by_driver=True)
    pre = runner.preprocessor()
    report.mode, report.workers = "in-process", 1
    try:
        for shard in todo:
            pieces = []
            for chunk in _batches(shard, opts.batch_size):
                piece = runner.run(decode_batch(chunk, _policy(opts), pre))
                progress.update(piece.summary())
                pieces.append(piece)
            _record(report, committer.commit(shard.shard_id, shard.keys_sha256, _extra(opts, shard), *pieces))
    finally:
        committer.close()


# ---- Ray ----


def _worker_plan(opts: BuildOptions, resources: dict[str, float]) -> tuple[int, dict[str, Any], int]:
    """(number of detector actors, their Ray options, torch threads each)."""
    gpus, cpus = resources.get("GPU", 0.0), max(1.0, resources.get("CPU", 1.0))
    gpw = opts.num_gpus_per_worker
    if gpw > 0 and gpus >= gpw:
        return int(gpus // gpw), {"num_gpus": gpw, "num_cpus": 1}, 0
    # Without GPUs the detector is the bottleneck (decoding a small JPEG costs a few % of
    # detecting on it), and torch scales worse over threads than over processes: many
    # actors with 1-2 threads each, which together take about all CPUs.
    threads = opts.threads or (1 if cpus <= 8 else 2)
    n = opts.cpu_workers or max(1, int(cpus // threads))
    # what Ray reserves per actor: never all CPUs, or no decode task could ever be scheduled
    reserve = min(float(threads), max(0.1, (cpus - 1) / n))
    return n, {"num_cpus": round(reserve, 2)}, threads


class _RayDetector(DetectorRunner):
    """A `DetectorRunner` that takes its GPU from Ray; without CUDA it falls back to the CPU."""

    def __init__(self, config: str, weights: str | None, threads: int, factory: Any = None,
                 boxes: BoxPlan | None = None) -> None:
        import ray
        import torch

        gpu = bool(ray.get_gpu_ids())
        if gpu and not torch.cuda.is_available():
            print("[gallery] warning: Ray assigned a GPU to a detector worker but CUDA is not available; "
                  "running on CPU", file=sys.stderr)
        super().__init__(config, weights, "cuda" if gpu and torch.cuda.is_available() else "cpu",
                         num_threads=threads or None, factory=factory, boxes=boxes)
        self.worker += f":node={ray.get_runtime_context().get_node_id()[:12]}"


@dataclass
class _OpenShard:
    shard: Shard
    slots: list[list[Any]]  # per batch: the piece refs (more than one after a crash split)
    remaining: int


def _run_ray(opts: BuildOptions, todo: Iterable[Shard], progress: Progress, report: BuildReport) -> None:
    import ray
    from ray.exceptions import RayActorError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    _, started = ray_session.connect(opts.ray_address, opts.num_cpus)
    actors: list[Any] = []
    writer = None
    try:
        n_actors, actor_opts, threads = _worker_plan(opts, ray.cluster_resources())
        det_cls = ray.remote(_RayDetector).options(max_restarts=2, max_task_retries=2, **actor_opts)
        actors = [det_cls.remote(opts.detector, opts.weights, threads, opts.detector_factory, _box_plan(opts))
                  for _ in range(n_actors)]
        info = ray_session.get(actors[0].info.remote(), "a detector worker")
        concepts, attributes = _vocabularies(opts, info)
        box_info = _box_info(opts, concepts, report)
        here = ray.get_runtime_context().get_node_id()
        writer = ray.remote(ShardCommitter).options(
            num_cpus=0, max_restarts=1, max_task_retries=1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(str(Path(opts.out).resolve()), info["feature_dim"], concepts, attributes,
                 _provenance(opts, info, box_info), lock_held_by_driver=True)
        # stays a ref: unpickling it would import the detector (torch) into the driver
        pre_ref = actors[0].preprocessor.remote()
        decode = ray.remote(decode_batch).options(num_cpus=1, max_retries=2)
        report.mode, report.workers = f"ray {opts.ray_address}", n_actors
        window = opts.max_inflight_batches or 2 * n_actors + 2
        max_open = n_actors + 2
        policy = _policy(opts)

        # lazily, one shard at a time: the plan is never materialised here
        batches: Iterator[tuple[int, int, Shard, tuple[ImageItem, ...]]] = (
            (si, bi, s, chunk) for si, s in enumerate(todo) for bi, chunk in enumerate(_batches(s, opts.batch_size)))
        retry: deque[tuple[int, int, int, tuple[ImageItem, ...]]] = deque()
        open_shards: dict[int, _OpenShard] = {}
        inflight: dict[Any, tuple[int, int, int, tuple[ImageItem, ...], int]] = {}
        load = [0] * n_actors
        commits: dict[Any, int] = {}
        exhausted = False

        def submit(si: int, bi: int, sub: int, chunk: tuple[ImageItem, ...]) -> None:
            a = min(range(n_actors), key=lambda i: load[i])
            load[a] += 1
            d = decode.remote(chunk, policy, pre_ref)
            piece, summary = actors[a].run_with_summary.options(num_returns=2).remote(d)
            open_shards[si].slots[bi][sub] = piece
            inflight[summary] = (si, bi, sub, chunk, a)

        while True:
            while len(inflight) < window:
                if retry:
                    submit(*retry.popleft())
                    continue
                if exhausted:
                    break
                nxt = next(batches, None)
                if nxt is None:
                    exhausted = True
                    break
                si, bi, shard, chunk = nxt
                if si not in open_shards:
                    if len(open_shards) + len(commits) >= max_open:  # bound what waits for a commit
                        batches = _prepend(nxt, batches)
                        break
                    n_b = len(_batches(shard, opts.batch_size))
                    open_shards[si] = _OpenShard(shard, [[None] for _ in range(n_b)], n_b)
                submit(si, bi, 0, chunk)
            if not inflight and not commits and exhausted and not retry:
                break
            ready, _ = ray.wait(list(inflight) + list(commits), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in commits:
                    commits.pop(ref)
                    _record(report, ray_session.get(ref, "the shard writer"))
                    continue
                si, bi, sub, chunk, a = inflight.pop(ref)
                load[a] -= 1
                st = open_shards[si]
                try:
                    summary = ray.get(ref)
                except RayError as e:
                    crash = ray_session.worker_crash(e)
                    if crash is None or isinstance(e, RayActorError):  # not a decode worker's death
                        raise ray_session.readable(e, "a detector worker") from None
                    # a decode worker died (after Ray's retries) on this batch, which reaches us as the
                    # detector task's argument error: isolate the image that did it
                    if len(chunk) > 1:
                        st.slots[bi][sub: sub + 1] = [None] * len(chunk)
                        st.remaining += len(chunk) - 1
                        for k, one in enumerate(chunk):
                            retry.append((si, bi, sub + k, (one,)))
                        continue
                    piece = failure_piece(chunk, f"worker crashed ({crash})")
                    st.slots[bi][sub] = ray.put(piece)
                    summary = piece.summary()
                progress.update(summary)
                st.remaining -= 1
                if st.remaining == 0:
                    refs = [r for slot in st.slots for r in slot]
                    s = st.shard
                    commits[writer.commit.remote(s.shard_id, s.keys_sha256, _extra(opts, s), *refs)] = si
                    del open_shards[si]
    finally:
        for a in actors:
            ray.kill(a)
        if writer is not None:
            ray_session.close_writer(writer)
        if started:
            ray.shutdown()


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


__all__ = ["BuildOptions", "BuildReport", "EXIT_SOME_FAILED", "build_gallery", "plan", "validate",
           "keys_digest", "BatchPiece"]
