"""The wheels the GPU check carries: fetch them (`make gpu-wheels`) and check a folder of them.

    python bench/gpu/wheels.py download [--dir .whl]   # needs the package registry
    python bench/gpu/wheels.py check [--dir .whl] [--need-folder]

Why carried wheels: the lent GPU machine starts bare and reaches no registry,
so everything its image lacks must travel with the working tree, which is
capped at 64 MiB. The list is `wheels.txt` beside this file (how each is
fetched is its second column); the folder is ignored by git.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LIST = HERE / "wheels.txt"
DEFAULT_DIR = ROOT / ".whl"
LIMIT_BYTES = 64 * 2**20  # what may travel with the working tree in all
HOWS = ("binary", "build", "prepare")
PLATFORM_ARGS = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]


@dataclass(frozen=True)
class Entry:
    name: str
    version: str
    how: str

    @property
    def key(self) -> str:
        return normalize(self.name)


def normalize(name: str) -> str:
    """PEP 503 name: wheel files spell `pb1-detectron2` as `pb1_detectron2`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: Path = LIST) -> list[Entry]:
    """Entries of `wheels.txt`; raises ValueError naming the line on anything malformed."""
    out: list[Entry] = []
    seen: set[str] = set()
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", parts[0])
        if m is None or len(parts) != 2 or parts[1] not in HOWS:
            raise ValueError(f"{path}:{n}: expected 'NAME==VERSION {'|'.join(HOWS)}', got {raw.strip()!r}")
        e = Entry(m.group(1), m.group(2), parts[1])
        if e.key in seen:
            raise ValueError(f"{path}:{n}: {e.name} is listed twice (one version of each)")
        seen.add(e.key)
        out.append(e)
    if not out:
        raise ValueError(f"{path}: no wheels listed")
    return out


def parse_wheel_name(filename: str) -> tuple[str, str, str, str, str]:
    """(name, version, python tag, abi tag, platform tag) of a wheel file name (PEP 427)."""
    stem = filename[: -len(".whl")]
    parts = stem.split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name")
    name, version, py, abi, plat = parts[0], parts[1], parts[-3], parts[-2], parts[-1]
    return name, version, py, abi, plat


def runs_on_gpu_machine(py: str, abi: str, plat: str) -> bool:
    """Installable by CPython 3.12 on manylinux x86-64 (tags may be dotted sets)."""
    pys, abis, plats = py.split("."), abi.split("."), plat.split(".")
    py_ok = any(p in ("py3", "cp312") or (p.startswith("py3") and p[3:].isdigit()) for p in pys) or (
        "abi3" in abis and any(p.startswith("cp3") and p[3:].isdigit() and int(p[3:]) <= 12 for p in pys))
    abi_ok = any(a in ("none", "abi3", "cp312") for a in abis)
    plat_ok = any(p == "any" or (p.startswith("manylinux") and p.endswith("_x86_64")) for p in plats)
    return py_ok and abi_ok and plat_ok


def check_folder(folder: Path, entries: list[Entry], limit: int = LIMIT_BYTES) -> list[str]:
    """Problems with a wheel folder against the list (empty: ready to carry)."""
    problems: list[str] = []
    by_key: dict[str, list[Path]] = {}
    for whl in sorted(folder.glob("*.whl")):
        try:
            name, version, py, abi, plat = parse_wheel_name(whl.name)
        except ValueError as e:
            problems.append(str(e))
            continue
        by_key.setdefault(normalize(name), []).append(whl)
        want = next((e for e in entries if e.key == normalize(name)), None)
        if want is None:
            problems.append(f"{whl.name}: not in {LIST.name} (one stray wheel stops nothing, two versions do)")
        elif version != want.version:
            problems.append(f"{whl.name}: version {version}, {LIST.name} pins {want.version}")
        if not runs_on_gpu_machine(py, abi, plat):
            problems.append(f"{whl.name}: tags {py}-{abi}-{plat} do not install on CPython 3.12 x86-64")
    for e in entries:
        found = by_key.get(e.key, [])
        if not found:
            problems.append(f"{e.name}=={e.version}: no wheel in {folder} (run `make gpu-wheels`)")
        elif len(found) > 1:
            problems.append(f"{e.name}: {len(found)} wheels in {folder}; keep one")
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if total >= limit:
        problems.append(f"{folder}: {total / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB that may travel")
    return problems


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("[gpu-wheels] " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def download(folder: Path, entries: list[Entry]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for e in entries:
        have = [w for w in folder.glob("*.whl") if normalize(parse_wheel_name(w.name)[0]) == e.key]
        if [w for w in have if parse_wheel_name(w.name)[1] == e.version]:
            continue
        for w in have:  # another version would make two
            w.unlink()
        if e.how == "binary":
            _pip("download", "-q", "--no-deps", *PLATFORM_ARGS, "-d", str(folder), f"{e.name}=={e.version}")
        elif e.how == "build":
            _pip("wheel", "-q", "--no-deps", "--no-binary", e.name, "-w", str(folder), f"{e.name}=={e.version}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                src = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_detectron2.py"), tmp],
                                     check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                _pip("wheel", "-q", "--no-deps", "-w", str(folder), src)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("download", "check"))
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--need-folder", action="store_true", help="check: a missing folder is a problem")
    a = ap.parse_args(argv)
    try:
        entries = read_list()
    except ValueError as e:
        print(f"[gpu-wheels] {e}", file=sys.stderr)
        return 2
    if a.what == "download":
        download(a.dir, entries)
    if not a.dir.is_dir():
        if a.need_folder or a.what == "download":
            print(f"[gpu-wheels] {a.dir}: no wheel folder (run `make gpu-wheels`)", file=sys.stderr)
            return 2
        print(f"[gpu-wheels] list ok: {len(entries)} wheels; no folder {a.dir} here (make gpu-wheels)")
        return 0
    problems = check_folder(a.dir, entries)
    for p in problems:
        print(f"[gpu-wheels] {p}", file=sys.stderr)
    if problems:
        return 2
    total = sum(p.stat().st_size for p in a.dir.iterdir() if p.is_file())
    print(f"[gpu-wheels] {a.dir}: {len(entries)} wheels, {total / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
