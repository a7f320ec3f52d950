"""GPU check, trainer part: BERT-base VALP and TAVP steps in bf16, MFU, memory, the data loader.

    python bench/gpu/part_trainer.py --results R.jsonl [--smoke] [--no-compile]

1. the card's bf16 matrix-product rate (8192^3), beside its datasheet peak;
2. the loop's step (bf16 autocast, fused AdamW, gradient clipping and the
   loop's two finiteness checks) on full-length synthetic batches: VALP
   (2 views x B rows of 80 tokens, 3 patches in each multi-modal view) and
   TAVP (B rows of 100: 30 tag tokens, 67 patches), per micro-batch B:
   samples/s, MFU against the datasheet peak and against the measured
   matrix-product rate, peak GPU memory (an OOM is a row too: what fits);
3. the data loader: VALP batches of 256 from synthetic stores through
   DataLoader workers (samples/s per worker count), and the real training
   loop (`vlmixer train` with vlmixer_base.yaml, random init) with 8 workers:
   the share of each step spent waiting for data;
4. the same steps with the encoder under torch.compile (compile time apart).
Attention is transformers' SDPA when the install selects it (the row says).
`--smoke`: a 2-layer 64-wide BERT on the CPU, to rehearse the script.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
from figures import (  # noqa: E402
    Results,
    bf16_peak_tflops,
    device_row,
    matmul_tflops,
    peak_gib,
    pick_device,
    reset_peak,
    sync,
)

ROOT = HERE.parents[1]
VOCAB, CONCEPTS, FEATURE_DIM = 30522, 1594, 2048
SHAPES = {"valp": 80, "tavp": 100}
TAG_TOKENS, IGNORE = 30, -100


def synthetic_batch(task: str, B: int, dev: torch.device, feature_dim: int = FEATURE_DIM, vocab: int = VOCAB,
                    concepts: int = CONCEPTS, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch shaped as the collate function's, at full length (the worst case for the step)."""
    g = torch.Generator().manual_seed(seed)
    seq = SHAPES[task]
    R = 2 * B if task == "valp" else B
    is_patch = torch.zeros(R, seq, dtype=torch.bool)
    labels = torch.full((R, seq), IGNORE)
    if task == "valp":
        is_patch[B:, [5, 9, 13]] = True  # the multi-modal view: three grounded words became patches
        sel = (torch.rand(R, seq, generator=g) < 0.15) & ~is_patch
        sel[:B] = False  # only the multi-modal view carries the MLM loss
    else:
        is_patch[:, TAG_TOKENS + 2: seq - 1] = True  # [CLS] tags [SEP] patches [SEP]
        sel = torch.zeros(R, seq, dtype=torch.bool)
        sel[:, 1: TAG_TOKENS + 1] = torch.rand(R, TAG_TOKENS, generator=g) < 0.15
    labels[sel] = torch.randint(5, vocab, (int(sel.sum()),), generator=g)
    n_patch = int(is_patch.sum())
    plabels = torch.full((n_patch,), IGNORE)
    if task == "tavp":
        masked = torch.rand(n_patch, generator=g) < 0.15
        plabels[masked] = torch.randint(0, concepts, (int(masked.sum()),), generator=g)
    b = {"input_ids": torch.randint(5, vocab, (R, seq), generator=g),
         "position_ids": torch.arange(seq).expand(R, seq).clone(), "token_type_ids": is_patch.long(),
         "attention_mask": torch.ones(R, seq, dtype=torch.long), "is_patch": is_patch, "mlm_labels": labels,
         "patch_feats": torch.randn(n_patch, feature_dim, generator=g).half(),
         "patch_spatial": torch.rand(n_patch, 6, generator=g), "patch_labels": plabels,
         "n_views": torch.tensor(2 if task == "valp" else 1)}
    return {k: v.to(dev) for k, v in b.items()}


def step_flops(model: Any, batch: dict[str, torch.Tensor], proj_dim: int) -> float:
    """Model FLOPs of forward + backward (3x forward) on this batch: the encoder's matrix products
    over every (padded) token, attention scores and mixing, and the heads on the tokens they see."""
    R, seq = batch["input_ids"].shape
    T = R * seq
    cfg = model.config
    H, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    enc = sum(m.weight.numel() for m in model.bert.encoder.modules() if isinstance(m, torch.nn.Linear))
    n_patch = int(batch["is_patch"].sum())
    n_mlm = int((batch["mlm_labels"] != IGNORE).sum())
    n_cpt = int((batch["patch_labels"] != IGNORE).sum())
    fwd = (2 * enc * T + 4 * L * H * seq * T + 2 * (batch["patch_feats"].shape[1] + 6) * H * n_patch
           + 2 * (H * H + H * V) * n_mlm + 2 * (H * H + H * model.concept_head[-1].out_features) * n_cpt
           + 2 * H * proj_dim * R)
    return 3.0 * fwd


def build(dev: torch.device, smoke: bool, feature_dim: int, vocab: int, concepts: int) -> tuple[Any, Any, Any]:
    from vlmixer.trainer.config import ModelConfig, ObjectiveConfig
    from vlmixer.trainer.model import VLMixerModel
    from vlmixer.trainer.objectives import Pretrainer

    mc = ModelConfig(feature_dim=feature_dim)
    if smoke:
        mc.bert = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                   "max_position_embeddings": 128, "vocab_size": 0}
    torch.manual_seed(0)
    model = VLMixerModel.from_config(mc, vocab_size=vocab, num_concepts=concepts).to(dev)
    pre = Pretrainer(model=model, objective=ObjectiveConfig())
    opt = torch.optim.AdamW([p for p in pre.parameters() if p.requires_grad], lr=5e-5,
                            fused=dev.type == "cuda")
    return model, pre, opt


def loop_step(pre: Any, opt: Any, batch: dict[str, torch.Tensor], task: str, dev: torch.device) -> None:
    """What `vlmixer train` does per optimiser step (grad_accum 1, one process)."""
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        loss = pre(batch, task)["loss"]
    if not bool(torch.isfinite(loss.detach()).item()):
        raise RuntimeError(f"{task}: loss not finite")
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(pre.parameters(), 1.0)
    if not bool(torch.isfinite(gnorm).item()):
        raise RuntimeError(f"{task}: gradient norm not finite")
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure_steps(res: Results, section: str, model: Any, pre: Any, opt: Any, dev: torch.device,
                  sizes: dict[str, list[int]], iters: int, feature_dim: int, vocab: int, peak: float | None,
                  measured: float | None, **extra: Any) -> None:
    for task, bs in sizes.items():
        for B in bs:
            row: dict[str, Any] = {"task": task, "micro_batch": B, "seq": SHAPES[task], **extra}
            try:
                reset_peak(dev)
                batch = synthetic_batch(task, B, dev, feature_dim, vocab, model.concept_head[-1].out_features)
                t = time.perf_counter()
                loop_step(pre, opt, batch, task, dev)  # warm-up (compiles, when compiled)
                sync(dev)
                first = time.perf_counter() - t
                loop_step(pre, opt, batch, task, dev)
                sync(dev)
                t = time.perf_counter()
                for _ in range(iters):
                    loop_step(pre, opt, batch, task, dev)
                sync(dev)
                dt = (time.perf_counter() - t) / iters
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                res.add(section, **row, fits=False, peak_gib=peak_gib(dev))
                continue
            except Exception as e:  # noqa: BLE001  one shot on the GPU: record, and go on to the next shape
                opt.zero_grad(set_to_none=True)
                res.add(section, **row, error=f"{type(e).__name__}: {str(e)[:200]}")
                continue
            flops = step_flops(model, batch, pre.model.cmcl_proj.out_features)
            tflops = flops / dt / 1e12
            row.update(fits=True, samples_per_s=round(B / dt, 1), step_ms=round(dt * 1e3, 1),
                       model_tflops=round(tflops, 1), mfu=round(tflops / peak, 3) if peak else None,
                       of_measured_matmul=round(tflops / measured, 3) if measured else None,
                       peak_gib=peak_gib(dev))
            if extra.get("compiled"):
                row["compile_s"] = round(first, 1)
            res.add(section, **row)
            del batch


def loader_rates(res: Results, dev: torch.device, smoke: bool, tmp: Path, feature_dim: int,
                 step_rate: float | None) -> None:
    from vlmixer.storage.synthetic import tiny_stores
    from vlmixer.trainer.build import build_datasets, open_stores
    from vlmixer.trainer.data import TaskLoaders
    from vlmixer.trainer.loop import load_train_config, train

    t = time.perf_counter()
    n_img, n_sent = (40, 160) if smoke else (2000, 8192)
    gallery, text = tiny_stores(tmp / "stores", n_images=n_img, n_sentences=n_sent, feature_dim=feature_dim)
    batch, workers = (8, [0, 2]) if smoke else (256, [2, 4, 8, 16])
    common = [f"data.gallery={gallery}", f"data.text_stores=[{text}]", "model.pretrained=",
              f"model.feature_dim={feature_dim}", f"optim.batch_size={batch}", "run.progress=false",
              "run.log_every=1", "optim.total_steps=1000", "optim.warmup_steps=10", "run.ckpt_every=100000"]
    if smoke:
        common += ["model.bert={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
                   "intermediate_size: 128, max_position_embeddings: 128, vocab_size: 0}", "run.device=cpu"]
    cfg = load_train_config("vlmixer_base", common + ["data.tavp_ratio=0"])
    ds = build_datasets(cfg, open_stores(cfg))
    res.add("loader_setup", sentences=n_sent, images=n_img, stores_s=round(time.perf_counter() - t, 1),
            micro_batch=batch, note="synthetic template sentences (~10 word-pieces): a short GPU step, "
                                    "so the waiting share is an upper bound")
    for w in workers:
        loaders = TaskLoaders(ds, micro_batch=batch, rank=0, world_size=1, seed=0, num_workers=w,
                              prefetch_factor=4, pin_memory=dev.type == "cuda")
        n = 4 if smoke else 12
        for _ in range(2):
            loaders.next("valp")
        t = time.perf_counter()
        for _ in range(n):
            loaders.next("valp")
        rate = n * batch / (time.perf_counter() - t)
        res.add("loader", workers=w, valp_samples_per_s=round(rate, 1),
                keeps_up_with_step=None if step_rate is None else bool(rate >= step_rate))
        del loaders
    steps, w = (4, 0) if smoke else (40, 8)
    out = tmp / "loop"
    t = time.perf_counter()
    train(load_train_config("vlmixer_base", common + [f"run.out_dir={out}", f"data.num_workers={w}",
                                                      f"run.stop_at_step={steps}"]))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][min(5, steps - 1):]
    res.add("loop", workers_per_task=w, steps=steps, tasks="valp+tavp", micro_batch=batch,
            data_wait_share=round(float(np.mean([r["data_frac"] for r in rows])), 3),
            samples_per_s=round(float(np.median([r["samples_per_s"] for r in rows])), 1),
            wall_s=round(time.perf_counter() - t, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--iters", type=int, default=6)
    a = ap.parse_args(argv)
    res = Results(a.results)
    dev = pick_device(a.smoke)
    info = device_row(dev)
    res.add("device", **info)
    peak = bf16_peak_tflops(info["device"]) if dev.type == "cuda" else None
    measured = matmul_tflops(dev)
    res.add("matmul", bf16_8192_tflops=measured, datasheet_bf16_tflops=peak)
    feature_dim, vocab, concepts = (64, 1000, 80) if a.smoke else (FEATURE_DIM, VOCAB, CONCEPTS)
    model, pre, opt = build(dev, a.smoke, feature_dim, vocab, concepts)
    res.add("trainer_model", params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            layers=model.config.num_hidden_layers, hidden=model.config.hidden_size,
            attention=str(getattr(model.config, "_attn_implementation", "unknown")), optimizer="AdamW fused"
            if dev.type == "cuda" else "AdamW", autocast="bf16" if dev.type == "cuda" else "off (CPU)")
    sizes = {"valp": [2, 4], "tavp": [4]} if a.smoke else {"valp": [64, 128, 256, 512], "tavp": [128, 256, 512, 1024]}
    iters = 1 if a.smoke else a.iters
    measure_steps(res, "trainer", model, pre, opt, dev, sizes, iters, feature_dim, vocab, peak, measured,
                  compiled=False)
    step_rate = None
    for r in reversed([json.loads(ln) for ln in Path(a.results).read_text().splitlines()]):
        if r.get("section") == "trainer" and r.get("task") == "valp" and r.get("micro_batch") == (
                4 if a.smoke else 256) and r.get("fits"):
            step_rate = r["samples_per_s"]
            break
    with tempfile.TemporaryDirectory(prefix="gpu_trainer_") as tmp:
        loader_rates(res, dev, a.smoke, Path(tmp), feature_dim, step_rate)
    if not a.no_compile and dev.type == "cuda":
        model.bert = torch.compile(model.bert)
        measure_steps(res, "trainer", model, pre, opt, dev, {"valp": [256], "tavp": [512]}, iters, feature_dim,
                      vocab, peak, measured, compiled=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
