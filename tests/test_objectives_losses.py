"""ALBEF / TCL / X-VLM losses against written-out computations on small tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmixer.trainer.objectives.albef import (
    FeatureQueue,
    ema_update,
    itc_loss,
    sample_hard_negatives,
    soft_contrastive,
)
from vlmixer.trainer.objectives.tcl import augment_patches, infonce, lmi_loss
from vlmixer.trainer.objectives.xvlm import box_loss, cxcywh_to_xyxy, giou


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(sum(float(x) * float(y) for x, y in zip(a, b)))


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def plain_albef_itc(img, txt, img_m, txt_m, qi, qt, tau, alpha) -> float:  # noqa: ANN001
    """ALBEF's ITC written out: candidates are momentum batch features then the queue; the target of
    row i is alpha * softmax(momentum similarities) + (1 - alpha) * onehot(i)."""
    B = img.shape[0]
    txt_all = list(txt_m) + list(qt)
    img_all = list(img_m) + list(qi)

    def direction(q, q_m, cands) -> float:  # noqa: ANN001
        total = 0.0
        for i in range(B):
            logits = [dot(q[i], c) / tau for c in cands]
            p = softmax(logits)
            soft = softmax([dot(q_m[i], c) / tau for c in cands])
            for j in range(len(cands)):
                target = alpha * soft[j] + (1 - alpha) * (1.0 if j == i else 0.0)
                total -= target * math.log(p[j])
        return total / B

    return (direction(img, img_m, txt_all) + direction(txt, txt_m, img_all)) / 2


@pytest.mark.parametrize("B,Q,alpha", [(1, 0, 0.4), (4, 3, 0.4), (5, 7, 0.0), (3, 2, 1.0)])
def test_itc_with_queue_and_distillation_equals_the_formula(B: int, Q: int, alpha: float) -> None:
    d = 6
    img, txt, img_m, txt_m = (unit(B, d, seed=s) for s in range(4))
    qi, qt = unit(Q, d, seed=10), unit(Q, d, seed=11)
    got = float(itc_loss(img, txt, img_m, txt_m, qi, qt, 0.07, alpha))
    assert got == pytest.approx(plain_albef_itc(img, txt, img_m, txt_m, qi, qt, 0.07, alpha), rel=1e-9)
    # alpha 0 is plain cross-entropy on the diagonal
    sim = torch.randn(3, 5, dtype=torch.float64)
    assert float(soft_contrastive(sim, sim * 2, 0.0)) == pytest.approx(
        float(F.cross_entropy(sim, torch.arange(3))), rel=1e-12)


def test_ema_update_is_the_momentum_formula() -> None:
    torch.manual_seed(0)
    online, mom = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in mom.parameters()]
    ema_update(online, mom, 0.9)
    for b, p, q in zip(before, online.parameters(), mom.parameters()):
        for x, y, z in zip(b.flatten().tolist(), p.flatten().tolist(), q.flatten().tolist()):
            assert z == pytest.approx(0.9 * x + 0.1 * y, rel=1e-6)
    ema_update(online, mom, 0.0)  # m = 0 copies the online weights
    assert all(torch.equal(p, q) for p, q in zip(online.parameters(), mom.parameters()))


def test_queue_is_fifo_and_wraps() -> None:
    q = FeatureQueue(5, 2)
    a = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    q.enqueue(a)
    assert torch.equal(q.feats[:3], a) and int(q.ptr) == 3
    b = torch.full((3, 2), 9.0)
    q.enqueue(b)  # slots 3, 4, then 0
    assert torch.equal(q.feats[3:], b[:2]) and torch.equal(q.feats[0], b[2]) and int(q.ptr) == 1
    q.enqueue(torch.ones(7, 2))  # more than the queue: keeps the newest
    assert torch.equal(q.feats, torch.ones(5, 2)) and int(q.ptr) == 0
    empty = FeatureQueue(0, 2)
    empty.enqueue(a)
    assert empty.feats.shape == (0, 2)


def test_hard_negatives_follow_the_similarity_and_skip_the_same_image() -> None:
    sim = torch.tensor([[0.0, 9.0, 0.0], [0.0, 0.0, 0.0], [5.0, 5.0, 0.0]])
    same = torch.eye(3, dtype=torch.bool)
    same[0, 2] = True  # row 0: column 2 shows the same image
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, same, g)[0] for _ in range(400)])
    assert not (draws == torch.arange(3)).any()  # never the positive
    assert (draws[:, 0] == 1).all()  # the only allowed column of row 0
    counts = torch.bincount(draws[:, 1], minlength=3)
    assert counts[1] == 0 and counts[0] > 120 and counts[2] > 120  # uniform over equal similarities
    # a batch of one image has no negative
    _, valid = sample_hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert not valid.any()


def test_infonce_equals_the_formula() -> None:
    q, k, queue = unit(4, 5, seed=1), unit(4, 5, seed=2), unit(3, 5, seed=3)
    got = float(infonce(q, k, queue, 0.1))
    cands = list(k) + list(queue)
    ref = sum(-math.log(softmax([dot(q[i], c) / 0.1 for c in cands])[i]) for i in range(4)) / 4
    assert got == pytest.approx(ref, rel=1e-9)


def test_lmi_equals_the_formula() -> None:
    B, T, d = 3, 4, 5
    glob, local = unit(B, d, seed=4), unit(B, T, d, seed=5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    got = float(lmi_loss(glob, local, mask, 0.2))
    # TCL: each own token of sample i is a positive against the other samples' valid tokens only
    valid = [(j, t) for j in range(B) for t in range(T) if mask[j, t]]
    per = []
    for i in range(B):
        own = [(j, t) for (j, t) in valid if j == i]
        if not own:
            continue  # sample 2 has no local token: it does not count
        negs = [(j, t) for (j, t) in valid if j != i]
        logs = []
        for o in own:
            p = softmax([dot(glob[i], local[o]) / 0.2] + [dot(glob[i], local[n]) / 0.2 for n in negs])
            logs.append(-math.log(p[0]))
        per.append(sum(logs) / len(own))
    assert got == pytest.approx(sum(per) / len(per), rel=1e-9)
    # globals that point at their own locals score lower than shuffled ones
    aligned = F.normalize(local.mean(1), dim=-1)
    full = torch.ones(B, T, dtype=torch.bool)
    assert float(lmi_loss(aligned, local, full, 0.2)) < float(lmi_loss(aligned.roll(1, 0), local, full, 0.2))


def test_giou_on_hand_made_boxes() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    # 1: inter 1, union 7, hull 9 -> 1/7 - 2/9; 2: identical -> 1; 3: disjoint, hull 3x1, union 2 -> -1/3;
    # 4: nested, iou 1/4, hull = a -> 1/4
    expect = [1 / 7 - 2 / 9, 1.0, -1 / 3, 0.25]
    assert giou(a, b).tolist() == pytest.approx(expect, rel=1e-6)
    # cx,cy,w,h -> corners
    assert cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 1.0, 0.5]])).tolist() == [[0.0, 0.25, 1.0, 0.75]]
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5]])
    tgt = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.75, 0.25, 0.5, 0.5]])
    l1, g = box_loss(pred, tgt)
    assert float(l1) == pytest.approx((0 + 0.5) / 2)  # L1 summed over coordinates, mean over boxes
    assert float(g) == pytest.approx((0 + (1 - (0 - 0.0))) / 2)  # touching boxes: iou 0, hull = union
    z1, z2 = box_loss(pred[:0], tgt[:0])
    assert float(z1) == float(z2) == 0.0


def test_patch_augmentation_noise_and_dropout() -> None:
    torch.manual_seed(0)
    is_patch = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    feats = torch.randn(6, 8)
    patch_rows = is_patch.nonzero()[:, 0]
    f2, a2 = augment_patches(feats, patch_rows, attn, is_patch, noise=0.5, drop=0.99, rows=torch.tensor([0, 2]))
    assert torch.equal(f2[3:5], feats[3:5]) and torch.equal(a2[1], attn[1])  # row 1 untouched
    assert not torch.equal(f2[:3], feats[:3])
    assert a2[0, 1] == 1 and a2[0, 2:4].sum() <= 2  # the first patch of a row stays
    assert torch.equal(a2[:, 0], attn[:, 0]) and torch.equal(a2[2], attn[2])  # [CLS] kept; lone patch kept
