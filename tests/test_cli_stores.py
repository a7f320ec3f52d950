from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlmixer.cli import build_parser, main
from vlmixer.storage.synthetic import build_gallery, build_text_store, random_images, random_rows


def test_help_lists_every_command_and_each_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("verify", "gallery", "text"):
        assert cmd in out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        if p.get_default("handler") is not None and not any(a.dest.endswith("_command") for a in p._actions):
            assert "example:" in (p.epilog or ""), f"vlmixer {name} --help has no example"
        for a in p._actions:
            if a.dest.endswith("_command"):
                for sname, sp in a.choices.items():
                    assert "example:" in (sp.epilog or ""), f"vlmixer {name} {sname} --help has no example"


def test_console_script_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "vlmixer", "verify", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "vlmixer verify" in r.stdout


def test_verify_and_info(tmp_path: Path, tiny_vocab_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = build_gallery(tmp_path / "g", {0: random_images(1, 5, 16), 1: random_images(2, 4, 16)}, dim=16)
    t = build_text_store(tmp_path / "t", tiny_vocab_file, {"a": random_rows(1, 12)})
    assert main(["verify", str(g), str(t)]) == 0
    out = capsys.readouterr().out
    assert f"{g}: gallery store OK" in out and f"{t}: text store OK" in out

    assert main(["gallery", "info", str(g), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 9 and info["feature_dim"] == 16 and info["concepts"] == 5
    assert info["shards"] == 2 and info["provenance"] == {"test": True}
    assert main(["text", "info", str(t), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sentences"] == 12 and info["tokenizer"] == "tiny-test"
    assert main(["gallery", "info", str(g)]) == 0
    assert "patches:" in capsys.readouterr().out

    # damage: verify names what is wrong and exits non-zero
    (t / "shards" / "a.h5").write_bytes(b"garbage")
    assert main(["verify", str(t)]) == 1
    assert "a.h5" in capsys.readouterr().out
    (g / "manifest.json").write_text("{")
    assert main(["verify", str(g)]) == 1
    assert "corrupted gallery manifest" in capsys.readouterr().out
    # not a store at all: a user error, one line, exit 2
    assert main(["gallery", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmixer: error:") and "Traceback" not in err
