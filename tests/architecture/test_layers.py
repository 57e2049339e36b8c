"""The layer rule: each subpackage of ``fliqs_compiler`` imports only from layers below it.

``LAYERS`` is the order (docs/design.md, "Layers"); two subpackages on one rank may not import
each other. Checked twice: statically, every ``import`` in every module (lazy imports inside
functions included), and dynamically, each subpackage imported alone in a fresh interpreter
must not load a module of a higher layer."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# subpackage → (rank, folder). passes/, backends/, cli/ live at the top level of the repository
# and are mapped into the namespace by setuptools' package-dir (pyproject.toml).
LAYERS = {
    "base": 0, "numerics": 1, "ir": 2, "cost": 3, "data": 3, "frontends": 4, "passes": 5,
    "search": 6, "backends": 7, "report": 8, "driver": 9, "cli": 10,
}
FOLDERS = {name: ROOT / "fliqs_compiler" / name for name in LAYERS}
FOLDERS.update(passes=ROOT / "passes", backends=ROOT / "backends", cli=ROOT / "cli")
ROOT_MODULES = {"formats", "quant", "api", "errors", "graph"}  # old public paths: aliases only


def _module_name(layer: str, path: Path) -> str:
    rel = path.relative_to(FOLDERS[layer]).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["fliqs_compiler", layer, *parts])


def _imports(path: Path, module: str) -> list:
    """(line, imported module) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # `from pkg import sub`
    return out


def _layer_of(module: str):
    parts = module.split(".")
    if parts[0] != "fliqs_compiler" or len(parts) < 2:
        return None
    if parts[1] in ROOT_MODULES:
        return "root"
    return parts[1] if parts[1] in LAYERS else None


def violations() -> list:
    found = []
    for layer, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            module = _module_name(layer, path)
            for line, imported in _imports(path, module):
                target = _layer_of(imported)
                if target == "root":
                    found.append(f"{path.relative_to(ROOT)}:{line} imports the old path {imported}")
                elif target and target != layer and LAYERS[target] >= LAYERS[layer]:
                    found.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {imported} ({target})")
    return found


def test_no_module_imports_a_higher_or_sibling_layer():
    assert violations() == []


def test_every_subpackage_is_in_the_layer_table():
    on_disk = {p.name for p in (ROOT / "fliqs_compiler").iterdir()
               if p.is_dir() and (p / "__init__.py").exists() and p.name != "assets"}
    assert on_disk | {"passes", "backends", "cli"} == set(LAYERS)


_PROBE = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("fliqs_compiler."))))
"""


@pytest.mark.parametrize("layer", sorted(LAYERS, key=LAYERS.get))
def test_subpackage_imports_alone_without_loading_higher_layers(layer):
    out = subprocess.run([sys.executable, "-c", _PROBE, f"fliqs_compiler.{layer}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    higher = [m for m in loaded if (t := _layer_of(m)) not in (None, "root", layer)
              and LAYERS[t] >= LAYERS[layer]]
    assert higher == []
