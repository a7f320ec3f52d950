"""`vlmixer mix show|sample`: rendered pages and sampled ids match what the trainer mixes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmixer.cli import main
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.synthetic import CONCEPTS, random_sentences, write_gallery, write_text_store, write_vocab
from vlmixer.storage.textstore import TextStoreReader
from vlmixer.trainer.cmc import CrossModalCutMix
from vlmixer.trainer.data import TextCorpus, ValpDataset, WordPieceVocab


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    images, paths = [], []
    for i in range(12):
        images.append([(int(rng.integers(9)), float(rng.uniform(0.3, 1))) for _ in range(4)])
        p = root / f"img{i}.jpg"
        if i % 2 == 0:  # odd images are missing: their patches render as grey boxes
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    g = write_gallery(root / "g", CONCEPTS, images, feature_dim=8, paths=paths)
    t = write_text_store(root / "t", CONCEPTS, write_vocab(root / "vocab.txt"), random_sentences(20, seed=1))
    return g, t


def test_mix_sample_matches_training_mix(stores: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    g, t = stores
    assert main(["mix", "sample", "--text", str(t), "--gallery", str(g), "--n", "10", "--seed", "3", "--jsonl"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == list(range(10))
    gallery, text = GalleryReader(g), TextStoreReader(t)
    vocab = WordPieceVocab.read(text.vocab_file)
    ds = ValpDataset(corpus=TextCorpus([text]), cmc=CrossModalCutMix(gallery=gallery), vocab=vocab,
                     mask=vocab.mask_spec(0.15, 0.8, 0.1), max_len=80, seed=3)
    n_rep = 0
    for r in rows:
        _, spans, mix, _ = ds.mixed(0, r["index"])
        assert [w["concept"] for w in r["words"]] == spans[:, 4].tolist()
        for w, pid, rep in zip(r["words"], mix.patch_ids, mix.replaced):
            assert w["replaced"] == bool(rep) and w.get("patch_id", -1) == int(pid)
            if rep:
                n_rep += 1
                assert gallery.patch(int(pid)).concept == w["concept"] and 0 < w["prob"] <= 1
    assert n_rep > 0


def test_mix_show_html_and_png(stores: tuple[Path, Path], tmp_path: Path) -> None:
    g, t = stores
    out = tmp_path / "mix.html"
    assert main(["mix", "show", "--text", str(t), "--gallery", str(g), "--n", "8", "--r-cmc", "1",
                 "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<figure") >= 8 and "p=" in page and "data:image/png;base64," in page
    png = tmp_path / "mix.png"
    assert main(["mix", "show", "--text", str(t), "--gallery", str(g), "--n", "4", "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.width == 1000 and im.height > 100
    assert main(["mix", "show", "--text", str(t), "--gallery", str(g), "--out", str(tmp_path / "x.gif")]) == 2


def test_unreadable_source_gives_grey_box(stores: tuple[Path, Path]) -> None:
    from vlmixer.trainer.render import patch_crop

    gallery = GalleryReader(stores[0])
    odd = gallery.image_patches(1)[0]  # image 1 has no file
    im = np.asarray(patch_crop(gallery, odd, 32))
    assert im.shape[0] == 32 and (im == 160).mean() > 0.5
    even = gallery.image_patches(0)[0]
    crop = np.asarray(patch_crop(gallery, even, 32))
    assert crop.shape[0] == 32 and (crop == 160).mean() < 0.5


def _sampled(capsys: pytest.CaptureFixture, *args: str) -> list[dict]:
    assert main(["mix", "sample", "--n", "12", "--jsonl", *args]) == 0
    return [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]


def test_mix_with_a_runs_config_mixes_as_that_run(stores: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """`--config` takes a run directory, a checkpoint or a config file: the mix is the run's (its cmc keys,
    run.seed and max_len_valp), not the command's defaults; flags override single keys."""
    import torch
    import yaml

    from vlmixer.config import to_dict
    from vlmixer.trainer.loop import load_train_config

    g, t = stores
    cfg = load_train_config("pretrain/tiny", [f"data.gallery={g}", f"data.text_stores=[{t}]", "cmc.r_cmc=1.0",
                                              "cmc.r_ctx=0.0", "cmc.k_shot=2", "run.seed=5", "data.max_len_valp=7"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    ckpt = tmp_path / "step_00000001.pt"
    torch.save({"model": {}, "config": to_dict(cfg), "step": 1}, ckpt)
    gallery, text = GalleryReader(g), TextStoreReader(t)
    vocab = WordPieceVocab.read(text.vocab_file)
    ds = ValpDataset(corpus=TextCorpus([text]), cmc=CrossModalCutMix(gallery=gallery, r_cmc=1.0, r_ctx=0.0, k_shot=2),
                     vocab=vocab, mask=vocab.mask_spec(0.15, 0.8, 0.1), max_len=7, seed=5)
    expected = []
    for i in range(12):
        _, spans, mix, _ = ds.mixed(0, i)
        expected.append([(int(c), int(p)) for c, p in zip(spans[:, 4], mix.patch_ids)])
    assert sum(p >= 0 for row in expected for _, p in row) > 0
    for source in (str(run), str(ckpt), str(run / "config.yaml")):
        rows = _sampled(capsys, "--config", source)  # the stores come from the config too
        assert [[(w["concept"], w.get("patch_id", -1)) for w in r["words"]] for r in rows] == expected
    # every grounded word is replaced at r_cmc 1 (but words whose concept has no patch)
    assert all(w["replaced"] for r in rows for w in r["words"] if gallery.concept_counts()[w["concept"]] > 0)
    # a flag overrides one key of the run's config
    none = _sampled(capsys, "--config", str(run), "--r-cmc", "0")
    assert not any(w["replaced"] for r in none for w in r["words"])
    assert main(["mix", "sample", "--config", str(run), "--k-shot", "-1"]) == 2
    assert main(["mix", "sample", "--config", str(tmp_path)]) == 2  # a directory that is not a run
    assert main(["mix", "sample", "--text", str(t)]) == 2  # no gallery anywhere


def test_a_checkpoint_older_than_a_method_key_reads_as_it_trained() -> None:
    """A config saved before `model.patch_position`, `objective.box_hide` and `cmc.pool` existed trained with
    slot positions, a visible box and per-word pools: reading it back must say so, not today's defaults."""
    from vlmixer.config import to_dict
    from vlmixer.trainer.config import TrainConfig
    from vlmixer.trainer.loop import config_from_checkpoint

    old = to_dict(TrainConfig())
    for section, key in (("model", "patch_position"), ("objective", "box_hide"), ("cmc", "pool")):
        del old[section][key]
    cfg = config_from_checkpoint({"config": old})
    assert (cfg.model.patch_position, cfg.objective.box_hide, cfg.cmc.pool) == ("word", "none", "per_word")
    new = config_from_checkpoint({"config": to_dict(TrainConfig())})
    assert (new.model.patch_position, new.objective.box_hide) == ("shared", "geometry")
