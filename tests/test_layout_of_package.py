"""The package's shape: a one-way import flow, files a newcomer can read, and a design doc that names real things."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "turboquant"
DESIGN = PACKAGE.parent / "docs" / "DESIGN.md"

# config → codec (codebook, rotation, packing) → quantizer → {kernels, cache, index} → cli
LAYERS = {
    "config": 0,
    "threads": 0, "inputs": 1, "buffers": 1, "packing": 1, "codebook": 1, "rotation": 1,
    "codec": 2,
    "quantizer": 3,
    "io": 4, "fastscan": 4,
    "kernels": 5, "index_file": 5,
    "index": 6, "kvstore": 6,
    "cache": 7, "sharded": 7, "streaming": 7,
    "cli": 8, "demo": 8, "static_cache": 8,
}  # fmt: skip


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(path: Path) -> set[str]:
    """Top-level turboquant modules imported anywhere in ``path`` (function-local imports included)."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for turboquant/x.py, 1 for turboquant/kernels/x.py
    units = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1 - depth  # how far above the package root the import climbs
            assert up <= 0, f"{path}: relative import above the package"
            if node.level - 1 < depth:  # stays inside the subpackage
                continue
            if node.module:
                units.add(node.module.split(".")[0])
            else:
                units.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("turboquant."):
            units.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            units.update(a.name.split(".")[1] for a in node.names if a.name.startswith("turboquant."))
    return units


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path: Path) -> None:
    unit = _unit(path)
    assert unit in LAYERS, f"{path.name}: add its unit {unit!r} to LAYERS (and to docs/DESIGN.md's module map)"
    for other in _imported_units(path) - {unit}:
        assert other in LAYERS, f"{path}: imports unknown unit {other!r}"
        assert LAYERS[other] < LAYERS[unit], f"{path} ({unit}, layer {LAYERS[unit]}) imports {other} (layer {LAYERS[other]})"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_library_file_over_600_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 600, f"{path.relative_to(PACKAGE)} has {lines} lines"


def test_every_name_the_design_doc_cites_exists() -> None:
    text = DESIGN.read_text()
    names = sorted(set(re.findall(r"`(turboquant(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text)))
    assert len(names) >= 20, "the module map should cite the modules and their main names"
    missing = []
    for name in names:
        parts = name.split(".")
        obj = None
        for cut in range(len(parts), 0, -1):  # longest importable module prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            break
        if obj is None:
            missing.append(name)
    assert not missing, f"docs/DESIGN.md cites names that do not exist: {missing}"


def test_every_module_is_in_the_design_doc() -> None:
    text = DESIGN.read_text()
    for path in MODULES:
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        dotted = "turboquant." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        assert f"`{dotted}`" in text, f"docs/DESIGN.md's module map misses {dotted}"
