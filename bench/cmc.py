"""How fast CMC mixes, and whether the data loader can starve a step.

    python bench/cmc.py                          # synthetic stores built in a temp dir
    python bench/cmc.py --gallery G --text T     # real stores
    python bench/cmc.py --gpu                    # also BERT-base bf16 throughput/MFU (batch 256, seq 80)

Figures (CPU time of one process, so they read "per dataloader worker" and
do not depend on what else the machine runs):
  cmc_only      CrossModalCutMix.sample per sentence (r_cmc 0.5, 15-shot)
  valp_example  one full VALP example: read + CMC + views + masking + patch features
  valp_batch    examples + collate, batches of --batch
then the wall-clock loader throughput with --workers workers, and the
fraction of a tiny-config training step spent waiting for data.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.trainer.cmc import CrossModalCutMix, SampleRandom
from vlmixer.trainer.data import TaskLoaders, TextCorpus, ValpDataset, WordPieceVocab, collate


def per_s(n: int, t: float) -> float:
    return n / t if t > 0 else float("inf")


def bench_cpu(gallery: Path, text: Path, n: int, batch: int, workers: int) -> dict[str, float]:
    g = GalleryReader(gallery)
    t = TextStoreReader(text, expect_concepts_sha256=g.concepts.sha256)
    vocab = WordPieceVocab.read(t.vocab_file)
    cmc = CrossModalCutMix(gallery=g, r_cmc=0.5, r_ctx=0.5, k_shot=15)
    ds = ValpDataset(corpus=TextCorpus([t]), cmc=cmc, vocab=vocab, mask=vocab.mask_spec(0.15, 0.8, 0.1),
                     max_len=80, seed=0)
    n = min(n, len(ds))
    idx = np.random.default_rng(0).permutation(len(ds))[:n]
    for i in idx[:200]:  # warm: shard caches, memory maps, LMDB pages
        ds[(0, int(i))]
    spans = [ds.corpus.get(int(i))[1][:, 4] for i in idx]
    rand = SampleRandom(0, 1)
    c0 = time.process_time()
    for k, s in enumerate(spans):
        cmc.sample(s, rand.for_sample(0, k))
    cmc_only = per_s(n, time.process_time() - c0)
    c0 = time.process_time()
    for i in idx:
        ds[(0, int(i))]
    example = per_s(n, time.process_time() - c0)
    c0 = time.process_time()
    for b in range(0, n - batch + 1, batch):
        collate([ds[(0, int(i))] for i in idx[b: b + batch]])
    batched = per_s((n // batch) * batch, time.process_time() - c0)
    out = {"cmc_only_per_s": cmc_only, "valp_example_per_s": example, "valp_batch_per_s": batched}
    if workers:
        loaders = TaskLoaders({"valp": ds}, micro_batch=batch, rank=0, world_size=1, seed=0, num_workers=workers,
                              prefetch_factor=4, pin_memory=False)
        nb = max(4, n // batch)
        loaders.next("valp")
        w0 = time.perf_counter()
        for _ in range(nb):
            loaders.next("valp")
        out[f"loader_{workers}w_wall_per_s"] = per_s(nb * batch, time.perf_counter() - w0)
    return out


def bench_step(gallery: Path, text: Path, steps: int, workers: int, feature_dim: int) -> dict[str, float]:
    from vlmixer.trainer.loop import load_train_config, train

    out = {}
    cfg_path = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"
    with tempfile.TemporaryDirectory() as d:
        for w in sorted({0, workers}):
            run = Path(d) / f"w{w}"
            cfg = load_train_config(cfg_path, [f"data.gallery={gallery}", f"data.text_stores=[{text}]",
                                               f"run.out_dir={run}", f"model.feature_dim={feature_dim}",
                                               "run.progress=false", "data.tavp_ratio=0", f"data.num_workers={w}",
                                               f"optim.total_steps={steps}", "run.log_every=1",
                                               f"run.ckpt_every={steps * 10}"])
            train(cfg)
            rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()][5:]
            out[f"tiny_step_data_frac_{w}w"] = float(np.mean([r["data_frac"] for r in rows]))
            out[f"tiny_step_samples_per_s_{w}w"] = float(np.median([r["samples_per_s"] for r in rows]))
    return out


def bench_gpu(batch: int = 256, seq: int = 80, iters: int = 20) -> dict[str, float]:
    """BERT-base fwd+bwd+AdamW in bf16 autocast on VALP-shaped batches (2 views x batch rows)."""
    import torch

    from vlmixer.trainer.config import ModelConfig, ObjectiveConfig
    from vlmixer.trainer.model import VLMixerModel
    from vlmixer.trainer.objectives import Pretrainer

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = VLMixerModel.from_config(ModelConfig(), vocab_size=30522, num_concepts=1594).to(dev)
    pre = Pretrainer(model=model, objective=ObjectiveConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    R = 2 * batch
    n_patch = batch * 2
    is_patch = torch.zeros(R, seq, dtype=torch.bool)
    is_patch[batch:, 5] = True
    is_patch[batch:, 9] = True
    labels = torch.full((R, seq), -100)
    sel = torch.rand(R, seq) < 0.15
    sel[:batch] = False
    sel &= ~is_patch
    labels[sel] = torch.randint(5, 30522, (int(sel.sum()),))
    b = {"input_ids": torch.randint(5, 30522, (R, seq)), "position_ids": torch.arange(seq).expand(R, seq).clone(),
         "token_type_ids": is_patch.long(), "attention_mask": torch.ones(R, seq, dtype=torch.long),
         "is_patch": is_patch, "mlm_labels": labels, "patch_feats": torch.randn(n_patch, 2048).half(),
         "patch_spatial": torch.rand(n_patch, 6), "patch_labels": torch.full((n_patch,), -100),
         "n_views": torch.tensor(2)}
    b = {k: v.to(dev) for k, v in b.items()}

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = pre(b, "valp")["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    H, L = model.config.hidden_size, model.config.num_hidden_layers
    tokens = R * seq
    flops = 6 * n_params * tokens + 12 * L * H * seq * tokens  # dense + attention (fwd+bwd)
    peak = 989e12  # H100/H200 SXM dense bf16
    return {"gpu_sentences_per_s": batch / dt, "gpu_rows_per_s": R / dt, "gpu_step_ms": dt * 1e3,
            "gpu_mfu": flops / dt / peak, "gpu_name": torch.cuda.get_device_name()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery")
    ap.add_argument("--text")
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="tiny-config steps for the loader fraction (0: skip)")
    ap.add_argument("--gpu", action="store_true", help="also measure BERT-base bf16 on the GPU")
    a = ap.parse_args(argv)
    tmp = None
    if bool(a.gallery) != bool(a.text):
        ap.error("give both --gallery and --text, or neither")
    if a.gallery:
        gallery, text = Path(a.gallery), Path(a.text)
    else:
        from vlmixer.storage.synthetic import tiny_stores

        tmp = tempfile.TemporaryDirectory()
        t0 = time.perf_counter()
        gallery, text = tiny_stores(tmp.name, n_images=3000, n_sentences=20000, feature_dim=2048, shard_size=5000)
        print(f"synthetic stores: 3000 images, 20000 sentences ({time.perf_counter() - t0:.1f}s)")
    fdim = GalleryReader(gallery).feature_dim
    res = bench_cpu(gallery, text, a.samples, a.batch, a.workers)
    if a.steps:
        res.update(bench_step(gallery, text, a.steps, a.workers, fdim))
    if a.gpu:
        res.update(bench_gpu())
    for k, v in res.items():
        print(f"{k:34s} {v:,.3f}" if isinstance(v, float) else f"{k:34s} {v}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
