"""The CUDA paths, marked `gpu`: they skip without a CUDA device; bench/gpu_check.sh runs them on one.

What the CPU suite cannot show: the detector on CUDA gives the CPU's boxes and
features, the box selection on CUDA gives exactly the CPU's choice, a trainer
step in bf16 autocast stays close to fp32, and DDP over nccl trains as the
plain model does. Each compares against the CPU or fp32 path, never against
itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

ROOT = Path(__file__).resolve().parents[1]
TINY_DETECTOR = ROOT / "configs" / "detector" / "tiny.yaml"
TINY_PRETRAIN = ROOT / "configs" / "pretrain" / "tiny.yaml"


@pytest.fixture
def strict_fp32():  # noqa: ANN201
    """fp32 means fp32 here: TF32 convolutions and matmuls (cuDNN's default) would differ by ~1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def test_detector_on_cuda_equals_cpu(tmp_path: Path, strict_fp32: None) -> None:
    from vlmixer.pipeline.detector import Detector

    cpu = Detector.from_config(TINY_DETECTOR)
    ckpt = tmp_path / "tiny_calibrated.pth"  # the CPU's calibrated random weights, so both run one model
    torch.save({"model": cpu.model.state_dict()}, ckpt)
    gpu = Detector.from_config(TINY_DETECTOR, weights=ckpt, device="cuda")
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]

    # the backbone alone: no selection in between, so the tolerance is the convolutions' own
    t, _ = cpu.preprocess(photos[0])
    h, w = (-(-s // 32) * 32 for s in t.shape[1:])
    x = torch.zeros((1, 3, h, w))
    mean = torch.tensor(cpu.cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    x[0, :, : t.shape[1], : t.shape[2]] = t.float() - mean
    with torch.inference_mode():
        ref = cpu.model.backbone(x)["res4"]
        got = gpu.model.backbone(x.cuda())["res4"].cpu()
    scale = float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale)

    # whole images: every CPU box has its CUDA twin (same concept, IoU >= 0.99) with the same
    # confidence and feature; near-tied scores at the threshold may swap a box or two
    for a, b in zip(cpu(photos), gpu(photos)):
        assert b.image_size == a.image_size and abs(len(a) - len(b)) <= 2, (len(a), len(b))
        iou = box_iou(a.boxes, b.boxes)
        twin = iou.argmax(axis=1)
        ok = (iou.max(axis=1) >= 0.99) & (a.concepts == b.concepts[twin])
        assert ok.mean() >= 0.9, f"{ok.sum()} of {len(a)} CPU boxes have a CUDA twin"
        np.testing.assert_allclose(b.confidences[twin[ok]], a.confidences[ok], atol=1e-4)
        fa, fb = a.features[ok], b.features[twin[ok]]
        cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-12)
        assert cos.min() > 0.9999, cos.min()


def random_case(seed: int, n: int = 300, classes: int = 1595, temperature: float = 4.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand((n, 2), generator=g) * 600
    wh = torch.rand((n, 2), generator=g) * 300 + 4
    boxes = torch.cat([xy, (xy + wh).clamp(max=599)], dim=1)
    return boxes, torch.softmax(torch.randn((n, classes), generator=g) * temperature, dim=1)[:, 1:]


@pytest.mark.parametrize("seed,temperature,prefilter", [(0, 4.0, 0.01), (1, 6.0, 0.01), (2, 0.5, 0.01),
                                                        (3, 4.0, 0.0)])
def test_selection_on_cuda_equals_cpu_exactly(seed: int, temperature: float, prefilter: float) -> None:
    from vlmixer.pipeline.detector.selection import select_boxes

    cases = [random_case(seed + 10 * k, n=n, temperature=temperature) for k, n in enumerate((300, 120, 40))]
    ref = select_boxes([b for b, _ in cases], [p for _, p in cases], prefilter=prefilter)
    got = select_boxes([b.cuda() for b, _ in cases], [p.cuda() for _, p in cases], prefilter=prefilter)
    for r, g in zip(ref, got):
        assert g.indices.is_cuda
        assert torch.equal(g.indices.cpu(), r.indices)
        assert torch.equal(g.labels.cpu(), r.labels)
        assert torch.equal(g.scores.cpu(), r.scores)
        assert 10 <= r.indices.numel() <= 100


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from vlmixer.storage.synthetic import tiny_stores

    return tiny_stores(tmp_path_factory.mktemp("gpu_stores"), n_images=40, n_sentences=160, feature_dim=64)


def tiny_config(stores: tuple[Path, Path], out: Path, *extra: str):  # noqa: ANN201
    from vlmixer.trainer.loop import load_train_config

    g, t = stores
    return load_train_config(TINY_PRETRAIN, [f"data.gallery={g}", f"data.text_stores=[{t}]", f"run.out_dir={out}",
                                             "model.feature_dim=64", "run.progress=false", "run.log_every=1",
                                             "data.tavp_ratio=0.5", *extra])


def test_trainer_steps_in_bf16_autocast_stay_close_to_fp32(stores: tuple[Path, Path], tmp_path: Path,
                                                           strict_fp32: None) -> None:
    from vlmixer.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from vlmixer.trainer.loop import train

    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        train(tiny_config(stores, out, "run.device=cuda", f"run.precision={precision}", "optim.total_steps=6",
                          "run.ckpt_every=6"))
        runs[precision] = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        state = load_checkpoint(latest_checkpoint(out))
        assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert [r["task"] for r in bf16] == [r["task"] for r in fp32] and {r["task"] for r in fp32} == {"valp", "tavp"}
    for a, b in zip(fp32, bf16):
        assert np.isfinite(b["loss"]) and np.isfinite(b["grad_norm"])
        assert b["loss"] == pytest.approx(a["loss"], rel=0.03), (a["step"], a["loss"], b["loss"])
    # autocast really ran in bf16: the first step's loss (same weights, same batch) is not fp32's to the bit
    assert bf16[0]["loss"] != fp32[0]["loss"]


def test_ddp_over_nccl_in_a_world_of_one_trains_as_the_plain_model(stores: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vlmixer.trainer.build import build_datasets, open_stores
    from vlmixer.trainer.data import TaskLoaders
    from vlmixer.trainer.model import VLMixerModel
    from vlmixer.trainer.objectives import Pretrainer

    cfg = tiny_config(stores, tmp_path / "ddp", "run.device=cuda", "run.precision=bf16")
    s = open_stores(cfg)
    loaders = TaskLoaders(build_datasets(cfg, s), micro_batch=8, rank=0, world_size=1, seed=0, num_workers=0,
                          prefetch_factor=1, pin_memory=True)
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = VLMixerModel.from_config(cfg.model, vocab_size=s.vocab.size, num_concepts=len(s.gallery.concepts))
    plain = Pretrainer(model=model, objective=cfg.objective).to(dev)
    twin = copy.deepcopy(plain)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DDP(twin, device_ids=[0], find_unused_parameters=True)
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (plain, twin)]
        for task in ("valp", "tavp", "valp"):
            batch = {k: v.to(dev, non_blocking=True) for k, v in loaders.next(task).items()}
            losses = []
            for net, opt in zip((plain, ddp), opts):
                torch.manual_seed(1)  # the same dropout masks in both
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = net(batch, task)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            assert losses[0] == losses[1], (task, losses)
        for (name, a), b in zip(plain.named_parameters(), twin.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    finally:
        dist.destroy_process_group()
