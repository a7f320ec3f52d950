"""What a user on a shared cluster hits: foreign checkpoints, file modes, and runs that used to
finish having done nothing (every record skipped, no grounded word, a typo on the command line)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from vlmixer.cli import main
from vlmixer.errors import ConfigError, VlmixerError
from vlmixer.files import atomic_write_bytes, atomic_write_json
from vlmixer.storage.synthetic import (
    TINY_CONCEPTS,
    build_gallery,
    build_text_store,
    random_images,
    random_rows,
    tiny_stores,
)
from vlmixer.trainer.checkpoint import load_checkpoint, save_checkpoint
from vlmixer.trainer.loop import load_train_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"


class NotATensor:
    """Stands for any Python object a checkpoint may smuggle in: loading it would run code."""


def bad_checkpoints(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    rnd = d / "random.pt"
    rnd.write_bytes(os.urandom(4096))
    pickled = d / "pickled.pt"
    torch.save({"model": NotATensor(), "config": {}, "step": 1}, pickled)
    return {"random": rnd, "pickled": pickled}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_stores(tmp_path_factory.mktemp("rel"), n_images=12, n_sentences=40, feature_dim=64)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("kind", ["random", "pickled"])
def test_a_foreign_checkpoint_is_one_line_in_train_resume_and_eval(kind: str, stores: tuple[Path, Path],
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    g, t = stores
    ck = bad_checkpoints(tmp_path / "bad")[kind]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    target = run / "checkpoints" / "step_00000005.pt"
    target.write_bytes(ck.read_bytes())
    rc = main(["train", "--config", str(TINY), f"data.gallery={g}", f"data.text_stores=[{t}]",
               f"run.out_dir={run}", "model.feature_dim=64", "run.progress=false", "--resume"])
    assert rc == 2
    line = one_line(capsys.readouterr().err)
    assert f"{target}: not a vlmixer checkpoint" in line and "weights_only" not in line
    rc = main(["eval", "retrieval", "--checkpoint", str(ck), "--gallery", str(g), "--text", str(t)])
    assert rc == 2
    line = one_line(capsys.readouterr().err)
    assert f"{ck}: not a vlmixer checkpoint" in line and "weights_only" not in line
    why = "refused unread" if kind == "pickled" else "not a torch checkpoint archive"
    assert why in line


def test_checkpoint_load_messages(tmp_path: Path) -> None:
    bad = bad_checkpoints(tmp_path)
    with pytest.raises(VlmixerError, match=r"random.pt: not a vlmixer checkpoint \(not a torch checkpoint archive"):
        load_checkpoint(bad["random"])
    with pytest.raises(VlmixerError, match="pickled.pt: not a vlmixer checkpoint .* refused unread"):
        load_checkpoint(bad["pickled"])
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)  # tensors only, but not ours
    with pytest.raises(VlmixerError, match="plain.pt: not a vlmixer checkpoint \\(no model, config and step"):
        load_checkpoint(plain)
    assert not NotATensor.__dict__.get("loaded")  # nothing of the pickled payload ran


# ------------------------------------------------------------------------ file modes

@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_written_atomically_respect_the_umask(umask: int, mode: int, tmp_path: Path,
                                                    tiny_vocab_file: Path) -> None:
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        g = build_gallery(tmp_path / "g", {0: random_images(0, 4, 16)}, dim=16, concepts=TINY_CONCEPTS)
        t = build_text_store(tmp_path / "t", tiny_vocab_file, {"a": random_rows(0, 3)})
        ck = save_checkpoint(tmp_path / "run", 3, {"model": {}, "config": {}, "step": 3})
    finally:
        os.umask(old)
    files = [tmp_path / "a.bin", tmp_path / "b.json", g / "gallery.json", g / "manifest.json", t / "store.json",
             t / "manifest.json", ck, ck.parent / "latest.json"]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(mode) for f in files}
    assert not list(tmp_path.rglob(".*.tmp"))


def test_config_yaml_of_a_run_is_world_readable_under_umask_022(stores: tuple[Path, Path], tmp_path: Path) -> None:
    from vlmixer.trainer.loop import train

    g, t = stores
    old = os.umask(0o022)
    try:
        train(load_train_config(TINY, [f"data.gallery={g}", f"data.text_stores=[{t}]", "model.feature_dim=64",
                                       f"run.out_dir={tmp_path / 'run'}", "run.progress=false",
                                       "optim.total_steps=1", "run.ckpt_every=1", "optim.batch_size=8"]))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for f in (run / "config.yaml", run / "checkpoints" / "latest.json", run / "checkpoints" / "step_00000001.pt"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# ------------------------------------------------------------------------ silent nothing

def test_training_on_a_text_store_without_grounded_spans_refuses_to_start(tmp_path: Path,
                                                                         tiny_vocab_file: Path) -> None:
    from vlmixer.trainer.loop import train

    g = build_gallery(tmp_path / "g", {0: random_images(0, 20, 64)}, dim=64)
    sents = [dict(s, spans=[]) for s in random_rows(0, 12)]
    t = build_text_store(tmp_path / "t", tiny_vocab_file, {"a": sents})
    cfg = load_train_config(TINY, [f"data.gallery={g}", f"data.text_stores=[{t}]", "model.feature_dim=64",
                                   f"run.out_dir={tmp_path / 'run'}", "run.progress=false", "data.tavp_ratio=0"])
    with pytest.raises(ConfigError, match=rf"{t}: text store has no grounded spans in 12 sentences; VALP"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_error_in_an_override_is_blamed_on_the_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError) as e:
        load_train_config(TINY, ["run.seed=1", "optim.lr=fast"])
    assert str(e.value) == "optim.lr: expected a number, got 'fast' (from the command-line override 'optim.lr=fast')"
    with pytest.raises(ConfigError, match=r"unknown config key optim.bogus .*\(from the command-line override "
                                          r"'optim.bogus=1'\)$"):
        load_train_config(TINY, ["optim.bogus=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {TINY}\noptim: {{lr: fast}}\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(bad, ["run.seed=1"])
    assert str(e.value) == f"optim.lr: expected a number, got 'fast' in {bad}"
    load_train_config(bad, ["optim.lr=0.1"])  # an override that fixes the file's value is fine
    assert main(["train", "--config", str(TINY), "optim.lr=fast"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "'optim.lr=fast'" in line and str(TINY) not in line


@pytest.mark.parametrize(("corpus", "args", "reason"), [
    ("c.jsonl", ["--field", "nosuchfield"], "missing_field 3"),
    ("c.txt", ["--format", "jsonl"], "malformed_json 3"),
])
def test_text_tag_fails_when_every_record_was_skipped(corpus: str, args: list[str], reason: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    rows = ["A dog sits near the man.", "The cat runs.", "A red car."]
    (tmp_path / "c.jsonl").write_text("".join(f'{{"text": "{r}"}}\n' for r in rows), encoding="utf-8")
    (tmp_path / "c.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "v.txt").write_text("dog\ncat\nman\ncar\n", encoding="utf-8")
    out = tmp_path / "store"
    rc = main(["text", "tag", "--input", str(tmp_path / corpus), "--concepts", str(tmp_path / "v.txt"),
               "--out", str(out), "--no-progress", *args])
    assert rc == 2
    line = one_line(capsys.readouterr().err)
    assert f"{out}: no sentences: all 3 records were skipped ({reason}); nothing to train on" in line
