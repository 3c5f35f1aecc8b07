"""The package's import layers (docs/ARCHITECTURE.md) hold: no cycles, no upward imports.

Reads every module's imports with ``ast`` (function-level imports included, so a cycle cannot
hide behind a deferred import) and checks them against the layer table below, which is the one
in ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dapo_megatron"
DOC = PACKAGE.parent / "docs" / "ARCHITECTURE.md"

# Bottom to top: a unit may import units of strictly lower layers only.
LAYERS: list[set[str]] = [
    {"utils"},
    {"algo", "models", "data", "rewards", "checkpointing"},
    {"parallel"},
    {"config", "conversion", "rollout"},  # config reads parallel.layout (ParallelLayout)
    {"loading"},
    {"policy"},
    {"trainer"},
    {"train", "plan", "verify", "demo", "ablate"},  # entry points: nothing imports them
]
LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "dapo_megatron" or len(parts) < 2:
        return None
    return parts[1]


def import_edges(package: Path = PACKAGE) -> list[tuple[str, str, str]]:
    """``(importing unit, imported unit, file)`` for every package-internal import."""
    edges = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        unit = rel.parts[1] if len(rel.parts) > 1 else None
        if unit is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                target = _unit(name)
                if target is not None and target != unit:
                    edges.append((unit, target, str(path.relative_to(package.parent))))
    return edges


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units - set(LEVEL) == set(), "add new subpackages to LAYERS and docs/ARCHITECTURE.md"


def test_imports_only_go_down():
    bad = [f"{f}: {a} (layer {LEVEL[a]}) imports {b} (layer {LEVEL[b]})"
           for a, b, f in import_edges() if LEVEL[b] >= LEVEL[a]]
    assert not bad, "\n".join(bad)


def test_algo_and_utils_import_nothing_above_them():
    offenders = [(a, b, f) for a, b, f in import_edges() if a in {"algo", "utils"} and b != "utils"]
    assert not offenders, offenders


def test_the_table_is_the_documented_one():
    text = DOC.read_text()
    for layer in LAYERS:
        for unit in sorted(layer):
            assert f"`{unit}`" in text, f"docs/ARCHITECTURE.md does not name layer unit {unit!r}"


def test_the_check_can_fail(tmp_path):
    # A copy of two units where the lower one imports the upper one, even inside a function.
    pkg = tmp_path / "dapo_megatron"
    (pkg / "algo").mkdir(parents=True)
    (pkg / "trainer").mkdir()
    for d in (pkg, pkg / "algo", pkg / "trainer"):
        (d / "__init__.py").write_text("")
    (pkg / "algo" / "x.py").write_text("def f():\n    from dapo_megatron.trainer import loop\n")
    edges = import_edges(pkg)
    assert ("algo", "trainer", "dapo_megatron/algo/x.py") in edges
    with pytest.raises(AssertionError):
        assert all(LEVEL[b] < LEVEL[a] for a, b, _ in edges)
