"""Each formula of the method, computed here from its paper on small numbers written in the test.

VLMixer (patch embedding, shared patch position, CMCL with global negatives, TAVP masking, K-shot pools),
ALBEF (hard negatives, ITM, fused MLM and its distillation), TCL (LMI with the other samples' tokens as
negatives, distilled IMC), X-VLM (concept-level ITC/ITM, the hidden box target) and the learning-rate
schedule. The expected values are plain Python arithmetic, not calls into the code under test.
"""
from __future__ import annotations

import math
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.synthetic import CONCEPTS, write_gallery, write_vocab
from vlmixer.trainer.cmc import CrossModalCutMix
from vlmixer.trainer.config import ModelConfig
from vlmixer.trainer.data import TavpDataset, WordPieceVocab, collate, concept_wordpieces, spatial6
from vlmixer.trainer.masking import IGNORE
from vlmixer.trainer.model import PatchEmbedding, VLMixerModel
from vlmixer.trainer.objectives.albef import distilled_mlm_loss, itm_loss, sample_hard_negatives
from vlmixer.trainer.objectives.paired_terms import ConceptITC
from vlmixer.trainer.objectives.tcl import imc_loss, lmi_loss

REPO = Path(__file__).resolve().parents[1]
TINY_BERT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
             "max_position_embeddings": 32, "vocab_size": 0, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0}


def neg_log_softmax(logits: list[float], k: int) -> float:
    m = max(logits)
    return -(logits[k] - m - math.log(sum(math.exp(x - m) for x in logits)))


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def t64(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# -- VLMixer: the patch token ---------------------------------------------------------------------
def test_patch_embedding_is_layer_norm_of_feature_and_box_projections() -> None:
    # a 40 x 60 box at (10, 20) in a 100 x 200 image: x1/w, y1/h, x2/w, y2/h, bw/w, bh/h
    s = spatial6(np.array([[10.0, 20.0, 50.0, 80.0]]), np.array([100.0]), np.array([200.0]))[0]
    assert s.tolist() == pytest.approx([0.1, 0.1, 0.5, 0.4, 0.4, 0.3])
    pe = PatchEmbedding(feature_dim=2, hidden=3, dropout=0.0)
    with torch.no_grad():
        pe.feature.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        pe.feature.bias.zero_()
        pe.spatial.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1.0], [0, 1.0, 0, 1.0, 0, 0]]))
        pe.spatial.bias.copy_(torch.tensor([0.5, 0.0, 0.0]))
    got = pe(torch.tensor([[2.0, -1.0]]), torch.from_numpy(s[None])).detach()[0].tolist()
    # W_f f = (2, -1, 1); W_s s + b_s = (0.1 + 0.5, 0.3, 0.1 + 0.4); LN with gain 1, bias 0
    x = [2 + 0.6, -1 + 0.3, 1 + 0.5]
    mean = sum(x) / 3
    var = sum((v - mean) ** 2 for v in x) / 3
    assert got == pytest.approx([(v - mean) / math.sqrt(var + 1e-12) for v in x], abs=1e-6)


@pytest.fixture(scope="module")
def tavp_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[GalleryReader, WordPieceVocab]:
    root = tmp_path_factory.mktemp("fidelity")
    rng = np.random.default_rng(0)
    images = [[(int(rng.integers(9)), float(rng.uniform(0.2, 1.0))) for _ in range(12)] for _ in range(60)]
    g = GalleryReader(write_gallery(root / "g", CONCEPTS, images, feature_dim=8))
    return g, WordPieceVocab.read(write_vocab(root / "vocab.txt"))


def tavp(g: GalleryReader, vocab: WordPieceVocab, patch_prob: float, tag_prob: float = 0.15) -> TavpDataset:
    return TavpDataset(galleries=[g], tag_pieces=concept_wordpieces(vocab.path, CONCEPTS), vocab=vocab,
                       mask=vocab.mask_spec(tag_prob, 0.8, 0.0), patch_mask_prob=patch_prob, max_len=30,
                       max_tag_tokens=12, seed=0)


@pytest.mark.parametrize("mode", ["shared", "word"])
def test_patches_carry_no_order(tavp_setup: tuple[GalleryReader, WordPieceVocab], mode: str) -> None:
    """With one shared patch position a TAVP input's [CLS] does not depend on the patches' order (their
    confidence rank); with the slot's position (`word`) it does, which is the leak."""
    g, vocab = tavp_setup
    (row,) = tavp(g, vocab, 0.0, tag_prob=1e-9)[(0, 3)]
    torch.manual_seed(0)
    model = VLMixerModel.from_config(ModelConfig(bert=dict(TINY_BERT), feature_dim=8, proj_dim=4,
                                                 patch_position=mode), vocab_size=vocab.size,
                                     num_concepts=len(CONCEPTS)).eval()
    with torch.no_grad():  # positions as distinct as a trained model's, so an order would show
        model.bert.embeddings.position_embeddings.weight.mul_(50.0)
    batch = collate([[row]])
    perm = torch.randperm(batch["patch_feats"].shape[0], generator=torch.Generator().manual_seed(1))
    shuffled = {**batch, "patch_feats": batch["patch_feats"][perm], "patch_spatial": batch["patch_spatial"][perm]}
    with torch.no_grad():
        a, b = model.encode(batch).cls, model.encode(shuffled).cls
    assert torch.allclose(a, b, atol=1e-5) == (mode == "shared")
    if mode == "shared":  # every patch slot reads the one shared position, the last index
        pos = model.position_ids(batch)
        assert set(pos[batch["is_patch"]].tolist()) == {TINY_BERT["max_position_embeddings"] - 1}
        assert torch.equal(pos[~batch["is_patch"]], batch["position_ids"][~batch["is_patch"]])


# -- VLMixer: TAVP masking -------------------------------------------------------------------------
def test_tavp_patch_mask_rate_and_no_label_in_the_input(tavp_setup: tuple[GalleryReader, WordPieceVocab]) -> None:
    from scipy.stats import binomtest

    g, vocab = tavp_setup
    pieces = concept_wordpieces(vocab.path, CONCEPTS)
    ds, base = tavp(g, vocab, 0.3), tavp(g, vocab, 0.0)
    masked = total = hidden = 0
    for epoch in range(3):
        for i in range(g.num_images):
            (row,) = ds[(epoch, i)]
            (ref,) = base[(epoch, i)]  # the same random stream with no patch masked
            total += len(row.patch_labels)
            sel = row.patch_labels != IGNORE
            masked += int(sel.sum())
            n_tag = int(np.flatnonzero(row.ids == vocab.sep)[0]) - 1
            visible = {int(t) for t in row.ids[1: 1 + n_tag] if t != vocab.mask}
            for c in set(row.patch_labels[sel].tolist()):
                assert not visible & set(pieces[c].tolist()), f"masked patch's concept {CONCEPTS[c]} is in the tags"
                hidden += bool({int(t) for t in ref.ids[1: 1 + n_tag]} & set(pieces[c].tolist()))
            # the hidden tags are predicted: their labels are the word-pieces that stood there
            changed = row.ids != ref.ids
            assert np.all(row.ids[changed] == vocab.mask) and np.array_equal(row.labels[changed], ref.ids[changed])
    assert hidden > 0  # the rule had tags to hide
    # each patch is masked independently with probability 0.3 (a binomial count, not only 0 and 1)
    assert 0.2 < masked / total < 0.4 and binomtest(masked, total, 0.3).pvalue > 1e-3


# -- VLMixer: K-shot pools -------------------------------------------------------------------------
def test_per_concept_epoch_pool(tmp_path: Path) -> None:
    n, k, concept = 10, 3, CONCEPTS.index("dog")
    g = GalleryReader(write_gallery(tmp_path / "g", CONCEPTS, [[(concept, 0.5 + 0.04 * j)] for j in range(n)],
                                    feature_dim=4))
    dogs = set(range(n))  # one patch per image: patch ids 0..9 are the dogs
    cmc = CrossModalCutMix(gallery=g, r_cmc=1.0, r_ctx=0.0, k_shot=k, pool="per_concept_epoch", seed=7)
    # fixed within an epoch: every word of the concept in epoch 4 draws from one pool of K
    pool = set(cmc.epoch_pool(concept, 4).tolist())
    assert len(pool) == k and pool <= dogs
    picks = {int(cmc.sample(np.array([concept, concept]), np.random.default_rng(s), 4).patch_ids[w])
             for s in range(200) for w in range(2)}
    assert picks == pool
    # restored on resume: a new object (a resumed run, a worker) draws the same pools from (seed, epoch, concept)
    again = CrossModalCutMix(gallery=g, r_cmc=1.0, r_ctx=0.0, k_shot=k, pool="per_concept_epoch", seed=7)
    restored = pickle.loads(pickle.dumps(cmc))
    for e in (0, 4, 9):
        assert again.epoch_pool(concept, e).tolist() == cmc.epoch_pool(concept, e).tolist()
        assert restored.epoch_pool(concept, e).tolist() == cmc.epoch_pool(concept, e).tolist()
    other_seed = CrossModalCutMix(gallery=g, k_shot=k, pool="per_concept_epoch", seed=8)
    assert any(other_seed.epoch_pool(concept, e).tolist() != cmc.epoch_pool(concept, e).tolist() for e in range(5))
    # uniform over patches across epochs: each patch is in a pool with probability K / n
    E = 600
    counts = np.zeros(n)
    for e in range(E):
        counts[cmc.epoch_pool(concept, e)] += 1
    expected = E * k / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.88  # chi-square, 9 degrees of freedom, p = 0.001
    # the default reading draws a fresh pool per word: over one epoch every patch turns up
    per_word = CrossModalCutMix(gallery=g, r_cmc=1.0, r_ctx=0.0, k_shot=k)
    assert {int(per_word.sample(np.array([concept]), np.random.default_rng(s), 4).patch_ids[0])
            for s in range(300)} == dogs


# -- VLMixer: CMCL with the global batch's negatives ------------------------------------------------
CMCL_RANKS = {0: ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 1.0]]),
              1: ([[1.0, -1.0], [2.0, 1.0]], [[-1.0, 0.0], [1.0, 2.0]])}


@pytest.mark.slow  # two processes
def test_cmcl_with_global_negatives_over_two_ranks(tmp_path: Path) -> None:
    script = tmp_path / "cmcl2.py"
    script.write_text(textwrap.dedent(f'''
        import json, sys
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        from vlmixer.trainer.objectives.valp import cmcl_loss
        RANKS = {CMCL_RANKS!r}

        def run(rank):
            dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=rank, world_size=2)
            t, s = (torch.tensor(x, dtype=torch.float64) for x in RANKS[rank])
            loss, n = cmcl_loss(t, s, 0.5, True)
            with open("{tmp_path}/rank%d.json" % rank, "w") as f:
                json.dump({{"loss": float(loss), "n": n}}, f)
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.spawn(run, nprocs=2)
    '''))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    every_s = CMCL_RANKS[0][1] + CMCL_RANKS[1][1]  # the multi-modal views of the global batch, in rank order
    for rank, (t, _) in CMCL_RANKS.items():
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # -1/M sum_m log( e^{cos(T_m, S_m)/tau} / sum_l e^{cos(T_m, S_l)/tau} ), l over both ranks' views
        want = sum(neg_log_softmax([cos(t[m], sl) / 0.5 for sl in every_s], 2 * rank + m) for m in range(2)) / 2
        assert got["n"] == 4 and got["loss"] == pytest.approx(want, rel=1e-12)


# -- ALBEF: hard negatives, ITM, fused MLM with distillation -----------------------------------------
def test_hard_negatives_are_drawn_by_softmax_of_similarity_over_temperature() -> None:
    sim, tau, N = [0.2, 0.5, -0.1, 0.3], 0.25, 6000
    same = torch.tensor([[True, False, False, False]]).expand(N, 4)  # column 0 is the row's own pair
    idx, ok = sample_hard_negatives(torch.tensor([sim]).expand(N, 4) / tau, same, torch.Generator().manual_seed(0))
    assert bool(ok.all()) and not bool((idx == 0).any())
    w = [math.exp(s / tau) for s in sim[1:]]
    p = [x / sum(w) for x in w]
    counts = [int((idx == j).sum()) for j in (1, 2, 3)]
    chi2 = sum((c - N * q) ** 2 / (N * q) for c, q in zip(counts, p))
    assert chi2 < 13.82  # chi-square, 2 degrees of freedom, p = 0.001
    # a row with nothing but its own pair has no negative
    _, ok1 = sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert not bool(ok1[0])


def test_itm_is_cross_entropy_on_fused_pairs() -> None:
    logits, labels = [[2.0, 0.5], [0.1, 1.0], [1.5, -0.5]], [1, 0, 0]  # a positive, then two negatives
    want = sum(neg_log_softmax(row, y) for row, y in zip(logits, labels)) / 3
    assert float(itm_loss(t64(logits), torch.tensor(labels))) == pytest.approx(want, rel=1e-6)  # computed in fp32


def test_fused_mlm_and_its_momentum_distillation() -> None:
    logits, labels, logits_m, alpha = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], [0, 2], [[0.0, 1.0, 0.0], [1.0, 1.0, 3.0]], 0.4
    ce = sum(neg_log_softmax(r, y) for r, y in zip(logits, labels)) / 2
    distill = 0.0
    for r, rm in zip(logits, logits_m):
        z = sum(math.exp(v) for v in rm)
        distill += sum(math.exp(v) / z * neg_log_softmax(r, j) for j, v in enumerate(rm)) / 2
    got = distilled_mlm_loss(t64(logits), torch.tensor(labels), t64(logits_m), alpha)
    assert float(got) == pytest.approx((1 - alpha) * ce + alpha * distill, rel=1e-6)  # computed in fp32
    assert float(distilled_mlm_loss(t64(logits), torch.tensor(labels), None, alpha)) == pytest.approx(ce, rel=1e-6)


# -- TCL: LMI with the other samples' tokens as negatives, IMC with distillation -----------------------
def test_lmi_negatives_are_the_other_samples_tokens() -> None:
    glob = [[1.0, 0.0], [0.0, 1.0]]
    local = [[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.8, 0.6]]]
    mask = [[True, True], [True, False]]  # sample 1's second token is padding
    tau = 0.5

    def dot(a: list[float], b: list[float]) -> float:
        return a[0] * b[0] + a[1] * b[1]

    per = []
    for i in range(2):
        own = [local[i][t] for t in range(2) if mask[i][t]]
        negs = [local[j][t] for j in range(2) if j != i for t in range(2) if mask[j][t]]
        per.append(sum(neg_log_softmax([dot(glob[i], x) / tau] + [dot(glob[i], y) / tau for y in negs], 0)
                       for x in own) / len(own))
    got = lmi_loss(t64(glob), t64(local), torch.tensor(mask), tau)
    assert float(got) == pytest.approx(sum(per) / 2, rel=1e-12)


def test_imc_distils_from_the_momentum_view() -> None:
    q, k, queue, tau, alpha = [[1.0, 0.0], [0.6, 0.8]], [[0.8, 0.6], [0.0, 1.0]], [[-1.0, 0.0]], 0.5, 0.4
    cand = k + queue
    want = 0.0
    for i in range(2):
        logits = [(q[i][0] * c[0] + q[i][1] * c[1]) / tau for c in cand]
        soft = [math.exp((k[i][0] * c[0] + k[i][1] * c[1]) / tau) for c in cand]
        target = [alpha * s / sum(soft) + (1 - alpha) * (j == i) for j, s in enumerate(soft)]
        want += sum(tj * neg_log_softmax(logits, j) for j, tj in enumerate(target)) / 2
    assert float(imc_loss(t64(q), t64(k), t64(queue), tau, alpha)) == pytest.approx(want, rel=1e-12)


# -- X-VLM: concept-level ITC and ITM ---------------------------------------------------------------
def test_concept_itc_is_symmetric_cross_entropy_over_concept_pairs() -> None:
    ct, cv, tau = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], [[0.8, 0.6], [0.0, 1.0], [0.6, -0.8]], 0.5
    L = [[(a[0] * b[0] + a[1] * b[1]) / tau for b in cv] for a in ct]
    t2v = sum(neg_log_softmax(L[i], i) for i in range(3)) / 3
    v2t = sum(neg_log_softmax([L[j][i] for j in range(3)], i) for i in range(3)) / 3
    step = SimpleNamespace(has=torch.arange(3), ct=t64(ct), cv=t64(cv), tau=tau, proj=t64(ct))
    loss, _ = ConceptITC(1.0).loss(step)  # type: ignore[arg-type]
    assert float(loss) == pytest.approx((t2v + v2t) / 2, rel=1e-12)


def test_concept_itm_draws_negatives_of_other_concepts(monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmixer.trainer.objectives.paired_terms as terms

    seen = {}
    monkeypatch.setattr(terms, "itm_on_hard_negatives",
                        lambda model, head, batch, t, v, s_i2t, s_t2i, same: seen.update(
                            t=t, v=v, s_i2t=s_i2t, s_t2i=s_t2i, same=same) or torch.tensor(0.0))
    ct, cv, tau = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], [[0.8, 0.6], [0.0, 1.0], [0.6, -0.8]], 0.25
    step = SimpleNamespace(has=torch.tensor([0, 2, 3]), ct=t64(ct), cv=t64(cv), hard_tau=tau, proj=t64(ct),
                           batch={"concept_ids": torch.tensor([4, 1, 4, 7])}, model=None,
                           owner=SimpleNamespace(itm_head=None), CT=torch.arange(8, 12), CV=torch.arange(12, 16))
    terms.ConceptITM(1.0).loss(step)  # type: ignore[arg-type]
    # pairs 0 and 2 of the batch name one concept (4): they are no negatives of each other
    assert seen["same"].tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    want = [[(v[0] * t[0] + v[1] * t[1]) / tau for t in ct] for v in cv]  # concept patch rows -> texts
    assert seen["s_i2t"].flatten().tolist() == pytest.approx([x for r in want for x in r])
    assert seen["s_t2i"].flatten().tolist() == pytest.approx([x for r in zip(*want) for x in r])
    assert seen["t"].tolist() == [8, 10, 11] and seen["v"].tolist() == [12, 14, 15]


# -- the learning-rate schedule ---------------------------------------------------------------------
def test_learning_rate_warms_up_then_decays_linearly() -> None:
    from vlmixer.trainer.loop import linear_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(4, 10))
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up: step s < 4 trains at (s + 1) / 4 of the peak; then (10 - s) / (10 - 4), 0 at the last step
    want = [1e-3 * (s + 1) / 4 if s < 4 else 1e-3 * (10 - s) / 6 for s in range(11)]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert lrs[3] == pytest.approx(1e-3) and lrs[4] == pytest.approx(1e-3) and lrs[7] == pytest.approx(5e-4)
    assert lrs[10] == 0.0


# -- X-VLM: the box target is not in the box task's input ------------------------------------------
@pytest.mark.parametrize("hide", ["geometry", "geometry_and_feature"])
def test_box_target_is_hidden_from_the_box_input(tmp_path: Path, hide: str) -> None:
    from vlmixer.storage.synthetic import paired_stores
    from vlmixer.storage.textstore import TextStoreReader
    from vlmixer.trainer.data import TextCorpus
    from vlmixer.trainer.paired_data import PairedDataset, PairIndex, collate_paired, fuse, hide_patches

    gd, td = paired_stores(tmp_path, n_images=6, captions_per_image=1, feature_dim=8)
    g, t = GalleryReader(gd), TextStoreReader(td)
    vocab = WordPieceVocab.read(t.vocab_file)
    ds = PairedDataset(corpus=TextCorpus([t]), index=PairIndex([t], g), gallery=g, vocab=vocab,
                       tag_pieces=concept_wordpieces(vocab.path, CONCEPTS), max_caption_tokens=16, max_patches=8,
                       seed=0)
    batch = collate_paired([ds[(0, i)] for i in range(6)])
    B = 6
    has = batch["has_box"].nonzero()[:, 0]
    fused = fuse(batch, (has + 2 * B).tolist(), (has + B).tolist())
    out = hide_patches(fused, batch["box_patch"][has], feature=hide == "geometry_and_feature")
    start = 0
    for r, i in enumerate(has.tolist()):
        n = int(fused["is_patch"][r].sum())
        j = start + int(batch["box_patch"][i])
        s = fused["patch_spatial"][j].tolist()  # x1/w, y1/h, x2/w, y2/h, bw/w, bh/h of the target patch
        box = [(s[0] + s[2]) / 2, (s[1] + s[3]) / 2, s[2] - s[0], s[3] - s[1]]
        assert box == pytest.approx(batch["box_targets"][i].tolist(), abs=1e-6)  # it is the target's box
        assert out["patch_spatial"][j].tolist() == [0.0] * 6
        assert bool(out["patch_feats"][j].any()) == (hide == "geometry")
        others = [q for q in range(start, start + n) if q != j]
        assert torch.equal(out["patch_spatial"][others], fused["patch_spatial"][others])
        assert torch.equal(out["patch_feats"][others], fused["patch_feats"][others])
        start += n


def test_mlm_mask_rates_and_logged_negatives(tmp_path: Path) -> None:
    from vlmixer.storage.synthetic import tiny_stores
    from vlmixer.trainer.build import build_datasets, open_stores
    from vlmixer.trainer.loop import load_train_config
    from vlmixer.trainer.objectives import Pretrainer

    # X-VLM masks 25% of the caption, ALBEF and TCL 15%
    for name, p in (("albef_paired", 0.15), ("tcl_paired", 0.15), ("xvlm_paired", 0.25)):
        cfg = load_train_config(f"pretrain/{name}", [])
        assert cfg.objective.mlm_prob == p and cfg.objective.paired.get("mlm", 0) > 0
    # CMCL's negatives of a row are the other multi-modal views of the (micro-)batch, and the log says so
    gd, td = tiny_stores(tmp_path, n_images=8, n_sentences=16, feature_dim=64)
    cfg = load_train_config("pretrain/tiny", [f"data.gallery={gd}", f"data.text_stores=[{td}]", "data.tavp_ratio=0",
                                              "model.feature_dim=64"])
    stores = open_stores(cfg)
    batch = collate([build_datasets(cfg, stores)["valp"][(0, i)] for i in range(5)])
    model = VLMixerModel.from_config(cfg.model, vocab_size=stores.vocab.size, num_concepts=len(CONCEPTS))
    out = Pretrainer(model=model, objective=cfg.objective)(batch, "valp")
    assert float(out["cmcl_negatives"]) == 4.0 and float(out["cmcl_candidates"]) == 5.0


def test_paired_mlm_distils_from_the_momentum_model_on_the_fused_input(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLM term hands the distillation the momentum model's logits at the masked caption's positions
    and the step's alpha; with the momentum copy still equal to the model they are the model's logits."""
    import vlmixer.trainer.objectives.paired_terms as terms
    from vlmixer.storage.synthetic import paired_stores
    from vlmixer.storage.textstore import TextStoreReader
    from vlmixer.trainer.config import ObjectiveConfig
    from vlmixer.trainer.data import TextCorpus
    from vlmixer.trainer.objectives import Pretrainer
    from vlmixer.trainer.paired_data import PairedDataset, PairIndex, collate_paired

    gd, td = paired_stores(tmp_path, n_images=6, captions_per_image=1, feature_dim=8)
    g, t = GalleryReader(gd), TextStoreReader(td)
    vocab = WordPieceVocab.read(t.vocab_file)
    ds = PairedDataset(corpus=TextCorpus([t]), index=PairIndex([t], g), gallery=g, vocab=vocab,
                       tag_pieces=concept_wordpieces(vocab.path, CONCEPTS), max_caption_tokens=16, max_patches=8,
                       seed=0, mask=vocab.mask_spec(0.5, 0.8, 0.1))
    batch = collate_paired([ds[(0, i)] for i in range(6)])
    seen = {}
    real = terms.distilled_mlm_loss

    def spy(logits, labels, logits_m, alpha):  # noqa: ANN001, ANN202
        seen.update(logits=logits.detach(), labels=labels, logits_m=logits_m, alpha=alpha)
        return real(logits, labels, logits_m, alpha)

    monkeypatch.setattr(terms, "distilled_mlm_loss", spy)
    torch.manual_seed(0)
    model = VLMixerModel.from_config(ModelConfig(bert=dict(TINY_BERT), feature_dim=8, proj_dim=4),
                                     vocab_size=vocab.size, num_concepts=len(CONCEPTS))
    pre = Pretrainer(model=model, objective=ObjectiveConfig(paired={"itc": 1.0, "mlm": 1.0}, queue_size=4,
                                                            distill_alpha=0.4, distill_rampup=0)).eval()
    with torch.no_grad():
        out = pre(batch, "paired")
    masked_caption = batch["mlm_labels"][4 * 6: 5 * 6]
    assert seen["labels"].tolist() == masked_caption[masked_caption != IGNORE].tolist()
    assert seen["alpha"] == pytest.approx(0.4) and torch.allclose(seen["logits_m"], seen["logits"], atol=1e-5)
    assert float(out["mlm"]) == pytest.approx(float(real(seen["logits"], seen["labels"], seen["logits_m"], 0.4)))
