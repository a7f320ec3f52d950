"""`vlmixer eval retrieval`: Recall@K against hand-made similarities, and end to end on a tiny paired set where
the right answer is known (captions name their image's concepts): a model trained on the pairs finds them,
an untrained one and the same model on captions keyed to the wrong images do not."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmixer.cli import main
from vlmixer.storage.synthetic import CONCEPTS, paired_stores, write_text_store
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.trainer.loop import load_train_config, train
from vlmixer.trainer.retrieval import recall_at_k
from vlmixer.trainer.smoke import TINY_OVERRIDES

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "albef_paired.yaml"
N_IMAGES = 24




def test_recall_at_k_by_hand() -> None:
    # 4 captions, 3 images; caption c belongs to image gt[c]
    sim = torch.tensor([[0.9, 0.1, 0.0],   # c0 -> i0: rank 0
                        [0.5, 0.4, 0.6],   # c1 -> i1: rank 2
                        [0.2, 0.3, 0.1],   # c2 -> i1: rank 0
                        [0.7, 0.7, 0.2]])  # c3 -> i0: tie with i1, counted against: rank 1
    gt = torch.tensor([0, 1, 1, 0])
    r = recall_at_k(sim, gt, ks=(1, 2, 3))
    assert r["t2i_r1"] == pytest.approx(2 / 4) and r["t2i_r2"] == pytest.approx(3 / 4) and r["t2i_r3"] == 1.0
    # image->text: i0's captions {c0, c3}: column 0 = [.9,.5,.2,.7] -> c0 first: rank 0;
    # i1's {c1, c2}: column 1 = [.1,.4,.3,.7] -> best own .4 behind c3: rank 1; i2 has no caption: not counted
    assert r["i2t_r1"] == pytest.approx(1 / 2) and r["i2t_r2"] == 1.0
    # a constant model scores 0 at R@1, not chance by luck of order
    assert recall_at_k(torch.zeros(4, 3), gt, ks=(1,))["t2i_r1"] == 0.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("retrieval")
    g, t = paired_stores(root / "p", n_images=N_IMAGES, captions_per_image=3, feature_dim=64)
    common = [*TINY_OVERRIDES, f"data.gallery={g}", f"data.paired_text_stores=[{t}]",
              "objective.paired={itc: 1.0, itm: 0.0}", "objective.queue_size=0", "objective.momentum=0.0",
              "objective.distill_alpha=0.0", "optim.lr=3.0e-3", "optim.warmup_steps=5"]
    train(load_train_config(CONFIG, [*common, f"run.out_dir={root / 'trained'}", "optim.total_steps=250"]))
    train(load_train_config(CONFIG, [*common, f"run.out_dir={root / 'untrained'}", "optim.total_steps=1",
                                     "optim.lr=1.0e-9"]))
    # the same captions keyed to the next image: the "right answer" is now wrong
    r = TextStoreReader(t)
    sents = [r.sentence(i) for i in range(len(r))]
    keys = [f"img{(int(s.image_key[3:]) + 1) % N_IMAGES}" for s in sents]
    wrong = write_text_store(root / "wrong", CONCEPTS, r.vocab_file,
                             [(s.text, [(sp.char_start, sp.char_end, sp.concept) for sp in s.spans]) for s in sents],
                             image_keys=keys)
    return {"gallery": g, "text": t, "wrong": wrong, "trained": root / "trained", "untrained": root / "untrained"}


def probe(capsys: pytest.CaptureFixture, ckpt: Path, gallery: Path, text: Path, *extra: str) -> dict:
    assert main(["eval", "retrieval", "--checkpoint", str(ckpt), "--gallery", str(gallery), "--text", str(text),
                 "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_trained_model_retrieves_its_pairs(runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    g, t = runs["gallery"], runs["text"]
    res = probe(capsys, runs["trained"], g, t)
    assert res["images"] == N_IMAGES and res["captions"] == 3 * N_IMAGES
    chance = res["chance_t2i_r1"]
    assert res["t2i_r1"] > 4 * chance and res["i2t_r1"] > 4 * chance, res  # seeds 0-2: t2i R@1 0.32-0.60
    assert res["t2i_r5"] > 0.7 and res["i2t_r10"] > 0.8, res
    assert all(res[f"{w}_r1"] <= res[f"{w}_r5"] <= res[f"{w}_r10"] for w in ("t2i", "i2t"))
    base = probe(capsys, runs["untrained"], g, t)
    assert base["t2i_r1"] < 3 * chance and base["t2i_r5"] < res["t2i_r5"] - 0.3, base
    wrong = probe(capsys, runs["trained"], g, runs["wrong"])
    assert wrong["t2i_r1"] < res["t2i_r1"] / 2 and wrong["t2i_r5"] < res["t2i_r5"] - 0.3, wrong
    # --n: the first N captioned images and all their captions; the table form prints both ways
    small = probe(capsys, runs["trained"], g, t, "--n", "5")
    assert small["images"] == 5 and small["captions"] == 15
    assert main(["eval", "retrieval", "--checkpoint", str(runs["trained"] / "checkpoints" / "step_00000250.pt"),
                 "--gallery", str(g), "--text", str(t)]) == 0
    out = capsys.readouterr().out
    assert "text->image" in out and "image->text" in out and "R@10" in out


def test_bad_arguments_are_errors(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    g, t = runs["gallery"], runs["text"]
    assert main(["eval", "retrieval", "--checkpoint", str(runs["trained"]), "--gallery", str(g), "--text", str(t),
                 "--n", "0"]) == 2
    assert main(["eval", "retrieval", "--checkpoint", str(tmp_path), "--gallery", str(g), "--text", str(t)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
