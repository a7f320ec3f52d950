"""The import graph of the package: one namespace, arrows only downward, no circles.

Every module of the installed `vlmixer` lives in one of four layers:
ground (errors, typed config loader, file helpers) < storage < the stages
(pipeline, trainer; never each other) < the command line and the demo. Imports inside
functions count too: a lazy import up a layer is still an arrow up.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it is installed as (setup.cfg's package_dir)
FOLDERS = {"vlmixer": "vlmixer", "storage": "vlmixer.storage", "pipeline": "vlmixer.pipeline",
           "trainer": "vlmixer.trainer", "configs": "vlmixer.configs"}
GROUND = ("vlmixer", "vlmixer.errors", "vlmixer.config", "vlmixer.files", "vlmixer.configs")
LAYERS = {"ground": 0, "vlmixer.storage": 1, "vlmixer.pipeline": 2, "vlmixer.trainer": 2,
          "vlmixer.cli": 3, "vlmixer.demo": 3, "vlmixer.__main__": 3}


def layer_of(module: str) -> tuple[int, str]:
    if module in GROUND:
        return 0, "ground"
    for prefix, level in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return level, prefix
    raise AssertionError(f"{module}: in no layer; add it to the layer table of this test")


def package_modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


class Imports(ast.NodeVisitor):
    """(line, imported module, imported name or None) for every import, relative ones resolved."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module, self.is_package, self.known = module, is_package, known
        self.found: list[tuple[int, str, str | None]] = []
        self.aliases: dict[str, str] = {}

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.found.append((node.lineno, a.name, None))
            if a.asname:
                self.aliases[a.asname] = a.name

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            here = self.module.split(".")
            if not self.is_package:
                here = here[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join([*here, base] if base else here)
        for a in node.names:
            sub = f"{base}.{a.name}"
            if sub in self.known:
                self.found.append((node.lineno, sub, None))
                self.aliases[a.asname or a.name] = sub
            else:
                self.found.append((node.lineno, base, a.name))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        # `mod._private` through a module alias (`import vlmixer.storage.gallery as g; g._x`)
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            self.found.append((node.lineno, self.aliases[node.value.id], node.attr))
        self.generic_visit(node)


def graph() -> tuple[dict[str, list[tuple[int, str, str | None]]], dict[str, Path]]:
    mods = package_modules()
    known = set(mods)
    out = {}
    for name, path in mods.items():
        v = Imports(name, path.name == "__init__.py", known)
        v.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        out[name] = v.found
    return out, mods


def test_every_module_has_a_layer_and_only_vlmixer_is_imported():
    imports, mods = graph()
    assert "vlmixer.storage.gallery" in mods and "vlmixer.cli" in mods  # the table sees the package
    bad = []
    for name, found in imports.items():
        layer_of(name)
        for line, target, _ in found:
            if target.split(".")[0] in ("storage", "pipeline", "trainer", "configs"):
                bad.append(f"{mods[name]}:{line}: imports top-level {target!r}; use vlmixer.{target}")
    assert not bad, "\n".join(bad)


def test_imports_run_downward_only():
    imports, mods = graph()
    bad = []
    for name, found in imports.items():
        level, group = layer_of(name)
        for line, target, _ in found:
            if not target.startswith("vlmixer") or target not in mods and not any(
                    m.startswith(target + ".") for m in mods):
                continue
            t_level, t_group = layer_of(target)
            if t_level > level or (t_level == level == 2 and t_group != group):
                bad.append(f"{mods[name]}:{line}: {group} imports {target} ({t_group})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_private_name_of_another_module():
    imports, mods = graph()
    bad = [f"{mods[name]}:{line}: uses {target}.{attr}"
           for name, found in imports.items() for line, target, attr in found
           if attr and attr.startswith("_") and not attr.startswith("__") and target != name
           and target.startswith("vlmixer")]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_no_import_circle():
    imports, mods = graph()
    edges = {n: sorted({t for _, t, _ in found if t in mods and t != n}) for n, found in imports.items()}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("source,bad", [
    ("from vlmixer.cli import main\n", "upward"),
    ("from vlmixer.trainer.cmc import CMC\n", "sideways"),
    ("from vlmixer.storage.gallery import _secret\n", "private"),
])
def test_the_checker_catches_each_kind(source, bad):
    """A planted bad import in a pipeline module is reported (the checks can fail)."""
    mods = package_modules()
    v = Imports("vlmixer.pipeline.planted", False, set(mods))
    v.visit(ast.parse(source))
    (line, target, attr), = v.found
    level, group = layer_of("vlmixer.pipeline.planted")
    t_level, t_group = layer_of(target)
    verdict = ("private" if attr and attr.startswith("_") else
               "upward" if t_level > level else "sideways" if t_group != group and t_level == level else "ok")
    assert verdict == bad


def test_code_and_docs_cite_papers_not_internal_documents():
    """A reader of the repository has the papers and formats, not the team's spec sections,
    reading notes or issue numbers: none of those are cited."""
    pattern = re.compile(r"\bSPEC ?\d|\bseed ?0\d\d\b|\bseeds/|\b[Ii]ssue ?#?\d+\b")
    bad = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".git", ".venv", "build", "demo_out") or path.suffix not in (
                ".py", ".md", ".yaml", ".sh", ".cfg", ".toml", ".txt") or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line) and path != Path(__file__):
                bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
