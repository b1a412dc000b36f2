"""The layer contract (tests/layers.py) holds on the library, and fails on a wrong arrow."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from layers import SOURCES, modules, violations

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_keeps_its_layers():
    assert violations(ROOT) == []


def test_every_module_is_checked():
    found = modules(ROOT)
    assert {"vtc.state", "vtc.sites", "vtc.reducers.dymu.reducer", "vtc.models.llava", "vtc.kernels.merge",
            "vtc.apply", "vtc.train.trainer"} <= set(found)
    assert len(found) == sum(1 for folder in SOURCES.values() for _ in (ROOT / folder).rglob("*.py"))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the library's sources, to break."""
    for folder in SOURCES.values():
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line)


def test_an_upward_import_fails(tree: Path):
    _append(tree / "vtc" / "budget.py", "\nfrom vtc.stats import wilson\n")
    assert violations(tree) == ["vtc.budget (core) imports vtc.stats (tools), a higher layer"]


def test_a_method_importing_an_adapter_fails(tree: Path):
    _append(tree / "vtc" / "reducers" / "tome.py", "\n\ndef _late():\n    from vtc.models import zoo\n")
    assert violations(tree) == ["vtc.reducers.tome (methods) imports vtc.models.zoo (adapters), a higher layer"]


def test_a_cycle_hidden_in_a_function_fails(tree: Path):
    _append(tree / "vtc" / "merge.py", "\n\ndef _late():\n    from vtc.grid import lay_on_grid\n")
    assert violations(tree) == ["import cycle: vtc.grid -> vtc.merge -> vtc.grid"]


def test_an_unassigned_module_fails(tree: Path):
    (tree / "vtc" / "extra.py").write_text("import torch\n")
    assert violations(tree) == ["vtc.extra belongs to no layer; add it to tests/layers.py LAYERS"]
