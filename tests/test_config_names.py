"""`--config` takes a path or a bundled name, as detectron2's model zoo resolves names."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlmixer.cli import main
from vlmixer.config import bundled_configs, resolve_config
from vlmixer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_names_are_the_files_under_configs():
    want = sorted(f"{p.parent.name}/{p.stem}" for p in (ROOT / "configs").glob("*/*.yaml"))
    assert bundled_configs() == want
    assert bundled_configs("detector") == [n for n in want if n.startswith("detector/")]


@pytest.mark.parametrize("spec,kind,rel", [
    ("vinvl_x152c4", None, "detector/vinvl_x152c4.yaml"),
    ("pretrain/tiny", None, "pretrain/tiny.yaml"),
    ("detector/tiny.yaml", None, "detector/tiny.yaml"),
    ("tiny", "pretrain", "pretrain/tiny.yaml"),
    ("tiny", "detector", "detector/tiny.yaml"),
])
def test_names_resolve_to_the_bundled_file(spec, kind, rel):
    assert resolve_config(spec, kind).read_bytes() == (ROOT / "configs" / rel).read_bytes()


def test_a_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("tiny").write_text("run: {}\n")
    assert resolve_config("tiny", "pretrain") == Path("tiny")


def test_ambiguous_and_unknown_names_are_errors():
    with pytest.raises(ConfigError, match="ambiguous.*detector/tiny, pretrain/tiny"):
        resolve_config("tiny")
    with pytest.raises(ConfigError, match="no_such: no such config file.*bundled: detector/butd_r101c4"):
        resolve_config("no_such")


def test_train_config_loads_by_name():
    from vlmixer.trainer.loop import load_train_config

    assert load_train_config("tiny", []) == load_train_config(ROOT / "configs" / "pretrain" / "tiny.yaml", [])


def test_config_list_command(capsys):
    assert main(["config", "list", "--kind", "pretrain"]) == 0
    assert capsys.readouterr().out.split() == bundled_configs("pretrain")
    assert main(["train", "--config", "nothing_like_it"]) == 2
    assert "nothing_like_it: no such config file" in capsys.readouterr().err


def test_gallery_build_takes_a_bundled_detector_name(tmp_path, capsys):
    """`--detector tiny` is the bundled file; an unknown name is one line, not a traceback."""
    assert main(["gallery", "build", "--images", str(tmp_path / "none"), "--detector", "no_such_detector",
                 "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_detector: no such config file" in err
