"""The wheel is the product outside a checkout: one top-level package, configs and demo data inside.

Built from a copy of the repository, installed into a fresh virtualenv that sees the
dependencies already installed here (never the editable checkout), and run from a folder
outside the repository.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"vlmixer": "vlmixer", "storage": "vlmixer/storage", "pipeline": "vlmixer/pipeline",
           "trainer": "vlmixer/trainer", "configs": "vlmixer/configs"}

pytestmark = pytest.mark.slow


def expected_files() -> set[str]:
    """Every module, config and data file of the checkout, by its path inside the wheel."""
    out = set()
    for folder, target in FOLDERS.items():
        for p in (ROOT / folder).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".yaml", ".txt"):
                out.add(f"{target}/{p.relative_to(ROOT / folder).as_posix()}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "vlmixer"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "demo_out", ".whl", ".gl", ".pytest_cache",
        ".ruff_cache"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", "-w", str(out), str(src)], check=True)
    (whl,) = out.glob("vlmixer-*.whl")
    return whl


def test_wheel_holds_one_package_with_configs_and_data(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert tops == {"vlmixer", "vlmixer-0.1.0.dist-info"}, tops
    missing = expected_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "vlmixer/configs/detector/vinvl_x152c4.yaml" in names
    assert "vlmixer/data/demo_captions.txt" in names


def test_wheel_installs_and_runs_outside_the_checkout(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    new_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies installed here, as a plain path: its .pth files (the editable
    # checkout's import hook among them) are not processed from there
    Path(new_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", "-q",
                    "--disable-pip-version-check", str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> str:
        r = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    where = run(str(py), "-c", "import vlmixer.storage, vlmixer.configs as c; print(vlmixer.storage.__file__);"
                               "print(c.__file__)")
    assert all(line.startswith(new_site) for line in where.split()), where
    listed = run(str(venv / "bin" / "vlmixer"), "config", "list").split()
    assert "detector/vinvl_x152c4" in listed and "pretrain/tiny" in listed and "pretrain/albef_paired" in listed
    assert "usage: vlmixer verify" in run(str(venv / "bin" / "vlmixer"), "verify", "--help")
    path = run(str(py), "-c", "from vlmixer.config import resolve_config; print(resolve_config('pretrain/tiny'))")
    assert path.strip().startswith(new_site) and Path(path.strip()).is_file()
    for top in ("storage", "pipeline", "trainer"):
        r = subprocess.run([str(py), "-c", f"import {top}"], cwd=elsewhere, env=env, capture_output=True)
        assert r.returncode != 0, f"{top} is importable as a top-level package"
