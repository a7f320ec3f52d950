"""The training loop: one process or torchrun/DDP, exact resume, logging, NaN guard.

`train(cfg)` is the whole job; `vlmixer train` only loads the config and
calls it. Each optimiser step trains one task (VALP or TAVP, drawn from
(seed, step) so every rank agrees) over `grad_accum` micro-batches. What a
step computes depends only on the seed, the step number, the checkpointed
model/optimiser/scheduler, the loaders' consumed counts and the random
states, which is what makes `--resume` reproduce an uninterrupted run.
Rank 0 writes checkpoints, `metrics.jsonl` (one line per logged step),
TensorBoard scalars and the progress bar.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from vlmixer.config import to_dict
from vlmixer.errors import ConfigError, VlmixerError
from vlmixer.files import atomic_write_bytes
from vlmixer.trainer import distributed as tdist
from vlmixer.trainer.build import build_datasets, open_stores
from vlmixer.trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vlmixer.trainer.config import TrainConfig, saved_config, validate
from vlmixer.trainer.data import TaskLoaders, task_for_step
from vlmixer.trainer.model import VLMixerModel
from vlmixer.trainer.objectives import Pretrainer

# config keys a resume may change: they change neither the data nor the model; a new
# optim.total_steps extends (or shortens) the run and reshapes the LR decay from the resume on
RESUMABLE_CHANGES = ("run.out_dir", "run.ckpt_every", "run.keep_last", "run.log_every", "run.progress",
                     "run.stop_at_step", "data.num_workers", "data.prefetch_factor", "data.text_cache_shards",
                     "optim.total_steps")


class TrainingDiverged(VlmixerError):
    """A loss or the gradient norm became NaN/inf: training stops instead of writing garbage."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "bert":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    a, b = _flatten(saved), _flatten(to_dict(cfg))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
        show = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise ConfigError(f"--resume with a config that changes what training computes ({show}); "
                          "resume with the checkpoint's config or start a new run.out_dir")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or ".norm." in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup from 0 to the peak over `warmup` steps, then linear decay to 0 at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _Log:
    """Rank 0's outputs: metrics.jsonl, TensorBoard, progress bar (redrawn at most once a second)."""

    def __init__(self, cfg: TrainConfig, out: Path, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.metrics = out / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if start_step and self.metrics.exists():  # drop lines of steps the resume will redo
            keep = [ln for ln in self.metrics.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start_step]
            self.metrics.write_text("".join(ln + "\n" for ln in keep))
        elif not start_step and self.metrics.exists():
            self.metrics.unlink()
        self._fh = self.metrics.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a declared dependency; a broken install should not stop training
            self.tb = None
        if cfg.run.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.optim.total_steps, initial=start_step, mininterval=1.0, dynamic_ncols=True,
                            desc="train", unit="step")

    def step(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "task") and isinstance(v, (int, float)):
                    name = k if k in ("lr", "samples_per_s", "grad_norm") else f"{rec['task']}/{k}"
                    self.tb.add_scalar(name, v, rec["step"])
        if self.bar is not None:
            self.bar.set_postfix({"task": rec["task"], "loss": f"{rec['loss']:.4f}"}, refresh=False)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a pre-training job; returns {"step": last step done, "out_dir": ...}."""
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = tdist.setup(cfg.run.device)
    try:
        return _train(cfg, info, resume)
    finally:
        if owned:  # a caller's process group is the caller's to end
            tdist.teardown()


def _train(cfg: TrainConfig, info: tdist.DistInfo, resume: bool) -> dict[str, Any]:
    validate(cfg, info.world_size)
    out = Path(cfg.run.out_dir)
    state: dict[str, Any] | None = None
    if resume:
        ck = latest_checkpoint(out)
        if ck is None:
            raise VlmixerError(f"--resume: no checkpoint under {out / 'checkpoints'}")
        state = load_checkpoint(ck)
        _check_resume_config(to_dict(saved_config(state["config"])), cfg)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())

    stores = open_stores(cfg)
    datasets = build_datasets(cfg, stores)
    torch.manual_seed(cfg.run.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    model = VLMixerModel.from_config(cfg.model, vocab_size=stores.vocab.size,
                                     num_concepts=len(stores.gallery.concepts)).to(info.device)
    longest = max(cfg.data.max_len_valp, cfg.data.max_len_tavp,
                  cfg.data.max_caption_tokens + cfg.data.max_patches + 3 if cfg.data.paired_ratio > 0 else 0)
    reserved = 1 if cfg.model.patch_position == "shared" else 0  # the last index is the patches'
    if longest + reserved > model.config.max_position_embeddings:
        raise ConfigError(f"data.max_len_valp/max_len_tavp (or the paired task's max_caption_tokens + "
                          f"max_patches + 3) reach {longest} tokens but the model has "
                          f"{model.config.max_position_embeddings} position embeddings"
                          + (" (one of them the patches' shared position)" if reserved else ""))
    pre = Pretrainer(model=model, objective=cfg.objective)
    net: torch.nn.Module = pre
    if info.distributed:
        # a step trains one task, so the other task's head is unused in it
        net = DDP(pre, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                  find_unused_parameters=True)
    op = cfg.optim
    # pre's parameters: the model's first (same order as before the paired heads existed), then the
    # paired task's heads; the momentum model is frozen and stays out
    opt = torch.optim.AdamW(_param_groups(pre, op.weight_decay), lr=op.lr, betas=tuple(op.betas), eps=op.eps,
                            fused=info.device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(op.warmup_steps, op.total_steps))
    start_step = 0
    consumed: dict[str, int] = {}
    if state is not None:
        model.load_state_dict(state["model"])
        pre.load_extra_state(state.get("objectives", {}))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        consumed = {k: int(v) for k, v in state["consumed"].items()}
        rngs = state["rng"]
        if len(rngs) != info.world_size and info.is_main:
            print(f"vlmixer: warning: checkpoint from {len(rngs)} processes, resuming on {info.world_size}: "
                  "dropout streams will differ from an uninterrupted run")
        set_rng_state(rngs[info.rank % len(rngs)])
    else:
        torch.manual_seed(cfg.run.seed * 1_000_003 + info.rank + 1)  # per-rank dropout stream
    micro = op.batch_size // (info.world_size * op.grad_accum)
    loaders = TaskLoaders(datasets, micro_batch=micro, rank=info.rank, world_size=info.world_size,
                          seed=cfg.run.seed, num_workers=cfg.data.num_workers,
                          prefetch_factor=cfg.data.prefetch_factor, pin_memory=info.device.type == "cuda",
                          consumed=consumed)
    if pre.paired is not None:  # ALBEF's distillation ramp-up spans one epoch of each task's data
        pre.paired.set_epoch_batches({t: smp.per_epoch for t, smp in loaders.samplers.items()})
    use_bf16 = info.device.type == "cuda" and cfg.run.precision == "bf16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    log = _Log(cfg, out, start_step, info.is_main)
    last_ckpt: Path | None = latest_checkpoint(out) if state is not None else None
    step = start_step
    try:
        for step in range(start_step + 1, op.total_steps + 1):
            t0 = time.perf_counter()
            task = task_for_step(cfg.run.seed, step, cfg.data.tavp_ratio, cfg.data.paired_ratio)
            net.train()
            sums: dict[str, torch.Tensor] = {}
            t_data = 0.0
            for k in range(op.grad_accum):
                td = time.perf_counter()
                batch = _to_device(loaders.next(task), info.device)
                t_data += time.perf_counter() - td
                sync = contextlib.nullcontext() if (k == op.grad_accum - 1 or not info.distributed) else net.no_sync()
                with sync:
                    with autocast():
                        res = net(batch, task)
                    bad = not bool(torch.isfinite(res["loss"].detach()).item())
                    if tdist.all_reduce_flag(bad, info.device):
                        terms = ", ".join(f"{n}={float(v):.4g}" for n, v in res.items()
                                          if n != "loss" and v.numel() == 1)
                        raise TrainingDiverged(
                            f"training stopped at step {step}: the {task} loss is not finite on some process "
                            f"(this one: loss={float(res['loss'].detach()):.4g}, {terms}). Last checkpoint: "
                            f"{last_ckpt or 'none'}. Lower optim.lr or raise optim.warmup_steps, and check "
                            "the stores with `vlmixer verify`.")
                    (res["loss"] / op.grad_accum).backward()
                for n, v in res.items():
                    sums[n] = sums.get(n, 0) + v.detach().float() / op.grad_accum
            clip = op.clip_grad_norm if op.clip_grad_norm > 0 else math.inf
            gnorm = torch.nn.utils.clip_grad_norm_(pre.parameters(), clip)
            if tdist.all_reduce_flag(not bool(torch.isfinite(gnorm).item()), info.device):
                raise TrainingDiverged(f"training stopped at step {step}: the gradient norm is not finite "
                                       f"({float(gnorm)}). Last checkpoint: {last_ckpt or 'none'}. Lower optim.lr.")
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % cfg.run.log_every == 0 or step == start_step + 1 or step == op.total_steps:
                vec = torch.stack([sums[n].to(info.device) for n in sorted(sums)])
                if info.distributed:
                    torch.distributed.all_reduce(vec)
                    vec /= info.world_size
                dt = time.perf_counter() - t0
                rec: dict[str, Any] = {"step": step, "task": task, "lr": lr, "grad_norm": float(gnorm),
                                       "samples_per_s": op.batch_size / dt, "data_frac": t_data / dt}
                rec.update({n: float(v) for n, v in zip(sorted(sums), vec.tolist())})
                log.step(rec)
            log.tick()
            if step % cfg.run.ckpt_every == 0 or step == op.total_steps:
                rngs = [rng_state()]
                if info.distributed:
                    gathered: list[Any] = [None] * info.world_size
                    torch.distributed.all_gather_object(gathered, rngs[0])
                    rngs = gathered
                if info.is_main:
                    last_ckpt = save_checkpoint(out, step, {
                        "model": model.state_dict(), "objectives": pre.extra_state(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "step": step, "consumed": loaders.state_dict(), "rng": rngs, "config": to_dict(cfg),
                        "world_size": info.world_size,
                    }, keep_last=cfg.run.keep_last)
            if cfg.run.stop_at_step and step >= cfg.run.stop_at_step:
                break
    finally:
        log.close()
    return {"step": step, "out_dir": str(out)}


def load_train_config(path: str | Path | None, overrides: list[str]) -> TrainConfig:
    """Defaults <- a config file or bundled name (`pretrain/tiny`, `vlmixer_base`) <- overrides."""
    from vlmixer.config import load_config, resolve_config

    return load_config(TrainConfig, None if path is None else resolve_config(path, "pretrain"), overrides)


def config_from_checkpoint(state: dict[str, Any]) -> TrainConfig:
    return saved_config(state["config"])


def run_config(source: str | Path) -> TrainConfig:
    """The config a run trains with: a run directory's `config.yaml`, the one a checkpoint (`.pt`) was
    saved with, or a config file / bundled name (the defaults it does not set included)."""
    p = Path(source)
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise ConfigError(f"{p}: a directory but not a training run (no config.yaml)")
        return load_train_config(p / "config.yaml", [])
    if p.suffix == ".pt" and p.is_file():
        return config_from_checkpoint(load_checkpoint(p))
    return load_train_config(source, [])
