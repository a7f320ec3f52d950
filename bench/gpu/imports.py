"""Dry-run check: the GPU check's code imports without Ray, and every distribution it needs travels.

    python bench/gpu/imports.py

Collects the imports of the parts, the gpu-marked tests and what they load
(by reading their source), imports them in a child process where `ray`
cannot be imported (the GPU machine has none), and records which module
imported which. A distribution is needed when vlmixer, the check's own files,
or a needed distribution the GPU image lacks imports it; each needed one must
be in the image (`image_packages.txt`) or in `wheels.txt`. Distributions that
only the image's own packages import are the image's business.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE)]
from wheels import normalize, read_list  # noqa: E402

FILES = sorted(HERE.glob("part_*.py")) + [HERE / "figures.py", ROOT / "bench" / "detector.py",
                                           ROOT / "bench" / "gallery_build.py", ROOT / "tests" / "conftest.py",
                                           ROOT / "tests" / "test_gpu_paths.py"]
LOCAL = {"figures", "detector", "gallery_build", "wheels", "report"}  # the bench's own script modules
ALIASES = {"detectron2": "pb1-detectron2"}  # an upstream build stands for the registry's


def imported_names(files: list[Path]) -> list[str]:
    names: set[str] = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
    return sorted(n for n in names if n.split(".")[0] not in LOCAL and n != "__future__")


def image_packages() -> set[str]:
    text = (HERE / "image_packages.txt").read_text(encoding="utf-8")
    return {normalize(w) for line in text.splitlines() if not line.startswith("#") for w in line.split()}


def probe(names: list[str]) -> dict:
    """In this (fresh) process: block Ray, import `names`, return failures and importer edges."""
    edges: dict[str, str] = {}

    class Watch:
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            top = name.split(".")[0]
            if top == "ray":
                raise ImportError("ray is blocked: the GPU machine has no Ray")
            if top not in sys.modules and top not in edges:
                f = sys._getframe(1)
                by = "?"
                while f is not None:
                    mod = f.f_globals.get("__name__", "")
                    if mod and not mod.startswith(("importlib", "_frozen_importlib")) and mod.split(".")[0] != top:
                        by = mod.split(".")[0]
                        break
                    f = f.f_back
                edges[top] = by
            return None

    sys.meta_path.insert(0, Watch())
    failures = {}
    for n in names:
        try:
            __import__(n)
        except Exception as e:  # noqa: BLE001  every failure is a finding
            failures[n] = f"{type(e).__name__}: {e}"
    try:  # the detector's modeling import happens on first use: make it happen here
        from vlmixer.pipeline.detector._compat import ensure_detectron2

        ensure_detectron2()
    except Exception as e:  # noqa: BLE001
        failures["detectron2.modeling"] = f"{type(e).__name__}: {e}"
    return {"failures": failures, "edges": edges}


def needed_distributions(edges: dict[str, str], image: set[str]) -> dict[str, str]:
    """{distribution: the module that made it needed}, following only edges from roots or carried ones."""
    import importlib.metadata as md

    dists = md.packages_distributions()
    dist_of = {m: normalize(ALIASES.get(dists[m][0], dists[m][0])) for m in edges if dists.get(m)}
    roots = {"vlmixer", "__main__", "conftest", "test_gpu_paths"} | LOCAL
    needed: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for mod, by in edges.items():
            d = dist_of.get(mod)
            if d is None or d == "vlmixer" or d in needed:
                continue
            by_d = dist_of.get(by)
            if by in roots or (by_d in needed and by_d not in image):
                needed[d] = f"{mod} (imported by {by})"
                changed = True
    return needed


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        print(json.dumps(probe(sys.argv[2:])))
        return 0
    names = imported_names(FILES)
    out = subprocess.run([sys.executable, __file__, "--probe", *names], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return 1
    found = json.loads(out.stdout.strip().splitlines()[-1])
    problems = [f"import {n} fails without Ray and the CPU-only extras: {msg}" for n, msg in found["failures"].items()]
    image = image_packages()
    carried = {e.key for e in read_list()}
    needed = needed_distributions(found["edges"], image)
    for d, why in sorted(needed.items()):
        if d not in image and d not in carried:
            problems.append(f"{d} is needed ({why}) but neither in the GPU image nor in wheels.txt")
    unused = sorted(carried - set(needed))
    if unused:
        problems.append(f"wheels.txt carries {unused}, which nothing in the check imports")
    for p in problems:
        print(f"[gpu imports] {p}", file=sys.stderr)
    if not problems:
        print(f"[gpu imports] {len(names)} imports load without Ray; {len(needed)} distributions needed, "
              f"{len(needed) - len(set(needed) - image)} in the image, the rest carried: "
              f"{', '.join(sorted(set(needed) - image))}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
