"""ALBEF's learnt temperature (clamped, trained, checkpointed) and its distillation ramp-up, against
written-out computations."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vlmixer.trainer.objectives.paired_terms as paired_mod
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.synthetic import CONCEPTS, paired_stores
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.trainer.config import ModelConfig, ObjectiveConfig
from vlmixer.trainer.data import TextCorpus, WordPieceVocab, concept_wordpieces
from vlmixer.trainer.model import VLMixerModel
from vlmixer.trainer.objectives import Pretrainer
from vlmixer.trainer.objectives.albef import Temperature, itc_loss, ramped_alpha
from vlmixer.trainer.paired_data import PairedDataset, PairIndex, collate_paired

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64, "vocab_size": 0}


def dataset(stores: tuple[Path, Path]) -> PairedDataset:
    g, t = GalleryReader(stores[0]), TextStoreReader(stores[1])
    vocab = WordPieceVocab.read(t.vocab_file)
    return PairedDataset(corpus=TextCorpus([t]), index=PairIndex([t], g), gallery=g, vocab=vocab,
                         tag_pieces=concept_wordpieces(vocab.path, CONCEPTS), max_caption_tokens=24, max_patches=8,
                         seed=0)


def make_pre(vocab_size: int, paired: dict[str, float], **obj: object) -> Pretrainer:
    torch.manual_seed(0)
    model = VLMixerModel.from_config(ModelConfig(bert=dict(TINY_BERT), feature_dim=16, proj_dim=8),
                                     vocab_size=vocab_size, num_concepts=len(CONCEPTS))
    return Pretrainer(model=model, objective=ObjectiveConfig(paired=paired, queue_size=8, **obj))  # type: ignore[arg-type]


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_temperature_is_clamped_like_albef() -> None:
    t = Temperature(0.07, 0.001, 0.5)
    assert t.tau.requires_grad and t().item() == pytest.approx(0.07)
    for raw, want in ((0.9, 0.5), (-3.0, 0.001), (0.2, 0.2)):
        with torch.no_grad():
            t.tau.fill_(raw)
        t.clamp_()
        assert t().item() == pytest.approx(want)
        assert t.tau.grad is None  # the clamp is not part of the graph
    assert not Temperature(0.07, 0.001, 0.5, learnable=False).tau.requires_grad


def plain_dloss_dtau(img, txt, img_m, txt_m, qi, qt, tau, alpha) -> float:  # noqa: ANN001
    """d ITC / d tau with the targets held fixed, written out: for a row with similarities s_j (cosines),
    target t and p = softmax(s / tau), L = -sum_j t_j log p_j and dL/dtau = (E_t[s] - E_p[s]) / tau^2."""
    def dot(a, b) -> float:  # noqa: ANN001
        return sum(float(x) * float(y) for x, y in zip(a, b))

    def direction(q, q_m, cands) -> float:  # noqa: ANN001
        total = 0.0
        for i in range(len(q)):
            s = [dot(q[i], c) for c in cands]
            sm = [dot(q_m[i], c) / tau for c in cands]
            m, mm = max(s), max(sm)
            p = [math.exp((v - m) / tau) for v in s]
            pm = [math.exp(v - mm) for v in sm]
            p, pm = [v / sum(p) for v in p], [v / sum(pm) for v in pm]
            t = [alpha * pm[j] + (1 - alpha) * (1.0 if j == i else 0.0) for j in range(len(cands))]
            total += (sum(a * b for a, b in zip(t, s)) - sum(a * b for a, b in zip(p, s))) / tau ** 2
        return total / len(q)

    return (direction(img, img_m, list(txt_m) + list(qt)) + direction(txt, txt_m, list(img_m) + list(qi))) / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_gradient_reaches_the_temperature(alpha: float) -> None:
    img, txt, img_m, txt_m = (unit(4, 6, seed=s) for s in range(4))
    qi, qt = unit(3, 6, seed=10), unit(3, 6, seed=11)
    tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    itc_loss(img, txt, img_m, txt_m, qi, qt, tau, alpha).backward()
    assert tau.grad is not None
    assert float(tau.grad) == pytest.approx(plain_dloss_dtau(img, txt, img_m, txt_m, qi, qt, 0.07, alpha), rel=1e-9)
    # a tensor temperature gives the same loss as the float
    assert float(itc_loss(img, txt, img_m, txt_m, qi, qt, tau, alpha).detach()) == pytest.approx(
        float(itc_loss(img, txt, img_m, txt_m, qi, qt, 0.07, alpha)), rel=1e-12)


def test_ramped_alpha_is_albefs_first_epoch_ramp() -> None:
    for i in range(30):
        assert ramped_alpha(0.4, i, 12) == pytest.approx(0.4 * min(1.0, i / 12))
    assert ramped_alpha(0.4, 0, 0) == 0.4 and ramped_alpha(0.4, 5, -1) == 0.4


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return paired_stores(tmp_path_factory.mktemp("paired_t"), n_images=24, captions_per_image=2, feature_dim=16)


def test_paired_task_trains_the_temperature_and_ramps_alpha(stores: tuple[Path, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ds = dataset(stores)
    seen: list[float] = []
    real = paired_mod.itc_loss

    def spy(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        seen.append(args[7])
        return real(*args, **kw)

    monkeypatch.setattr(paired_mod, "itc_loss", spy)
    pre = make_pre(ds.vocab.size, {"itc": 1.0}, distill_alpha=0.4)
    pre.paired.set_epoch_batches({"paired": 4})
    params = [q for q in pre.parameters() if q.requires_grad]
    assert any(q is pre.paired.temp.tau for q in params)  # the optimiser trains it
    pre.train()
    for k in range(6):
        out = pre(collate_paired([ds[(0, i)] for i in range(4 * k, 4 * k + 4)]), "paired")
        out["loss"].backward()
        assert pre.paired.temp.tau.grad is not None and float(pre.paired.temp.tau.grad) != 0.0
        assert float(out["temp"]) == pytest.approx(pre.paired.temp.tau.item())
        pre.zero_grad()
    assert seen == pytest.approx([0.4 * min(1.0, k / 4) for k in range(6)])
    assert int(pre.paired.paired_batches) == 6
    pre.eval()  # evaluation neither counts batches nor ramps
    with torch.no_grad():
        pre(collate_paired([ds[(0, i)] for i in range(4)]), "paired")
    assert seen[-1] == pytest.approx(0.4) and int(pre.paired.paired_batches) == 6
    # a fixed temperature stays out of the optimiser; an explicit ramp length needs no epoch size
    fixed = make_pre(ds.vocab.size, {"itc": 1.0}, itc_tau_learnable=False, distill_rampup=2)
    assert not any(q is fixed.paired.temp.tau for q in fixed.parameters() if q.requires_grad)
    fixed.train()
    seen.clear()
    for k in range(3):
        fixed(collate_paired([ds[(0, i)] for i in range(4 * k, 4 * k + 4)]), "paired")
    assert seen == pytest.approx([0.0, 0.2, 0.4])


def test_checkpoint_state_carries_temperature_and_ramp(stores: tuple[Path, Path]) -> None:
    ds = dataset(stores)
    a = make_pre(ds.vocab.size, {"itc": 1.0})
    with torch.no_grad():
        a.paired.temp.tau.fill_(0.031)
    a.paired.paired_batches.fill_(7)
    state = a.extra_state()
    assert {"paired.temp.tau", "paired.paired_batches"} <= set(state)
    b = make_pre(ds.vocab.size, {"itc": 1.0})
    b.load_extra_state(state)
    assert b.paired.temp.tau.item() == pytest.approx(0.031) and int(b.paired.paired_batches) == 7
    assert isinstance(b, Pretrainer) and b.obj == ObjectiveConfig(paired={"itc": 1.0}, queue_size=8)


def test_itm_hard_negatives_are_drawn_by_similarity_over_temperature(stores: tuple[Path, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ALBEF draws ITM negatives by softmax(sim / temp) with sim its `sim_i2t[:, :bs]` / `sim_t2i[:, :bs]`: the
    online features against the momentum model's of the batch, over the temperature (not cosines)."""
    ds = dataset(stores)
    got: dict[str, list] = {"itc": [], "sim": []}
    real_itc, real_hard = paired_mod.itc_loss, paired_mod.sample_hard_negatives

    def itc_spy(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        got["itc"].append((args[0].detach(), args[1].detach(), args[2].detach(), args[3].detach(),
                           float(args[6].detach())))
        return real_itc(*args, **kw)

    def hard_spy(sim, same, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        got["sim"].append(sim.clone())
        return real_hard(sim, same, *a, **kw)

    monkeypatch.setattr(paired_mod, "itc_loss", itc_spy)
    monkeypatch.setattr(paired_mod, "sample_hard_negatives", hard_spy)
    pre = make_pre(ds.vocab.size, {"itc": 1.0, "itm": 1.0})
    with torch.no_grad():
        pre.paired.temp.tau.fill_(0.05)
    pre.train()
    pre(collate_paired([ds[(0, i)] for i in range(6)]), "paired")
    (img, txt, img_m, txt_m, tau), = got["itc"]
    assert tau == pytest.approx(0.05)
    assert torch.allclose(got["sim"][0], img @ txt_m.t() / 0.05, atol=1e-5)  # image rows -> momentum texts
    assert torch.allclose(got["sim"][1], txt @ img_m.t() / 0.05, atol=1e-5)  # text rows -> momentum images
    assert not torch.allclose(got["sim"][0], img @ txt.t() / 0.05, atol=1e-3)  # not online against online
