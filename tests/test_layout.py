"""The engine's layering, checked from the source: each package imports only from the layers below it.

``LAYERS`` lists them from the bottom up: a module may import its own package and any layer listed
before its own, nothing else (imports inside functions and under ``TYPE_CHECKING`` count too). Units on
one line of ``SIDE_BY_SIDE`` are separate concerns at the same height and import nothing of each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "bcd_engine"

LAYERS: list[set[str]] = [
    {"errors", "settings", "progress", "files", "processes", "version"},  # leaves
    {"data"},
    {"store"},
    {"evaluation"},  # the ground: three separate concerns, none imports another
    {"models"},
    {"inference"},
    {"training"},
    {"classroom"},  # class mode: heads on a class pack's cached features, queued like inference
    {"protocols"},
    {"reports"},
    {"export"},  # two tops beside each other
    {"cli"},
    {"__init__", "__main__"},  # the package's entry points
]
SIDE_BY_SIDE = [{"data", "store", "evaluation"}, {"reports", "export"}]
FORBIDDEN_ANYWHERE = ("streamlit", "plotly")


def _rank(unit: str) -> int:
    for rank, layer in enumerate(LAYERS):
        if unit in layer:
            return rank
    raise AssertionError(f"bcd_engine.{unit} is in no layer of tests/test_layout.py: place it")


def _unit(module: str) -> str:
    """The layer unit of a ``bcd_engine`` module: its subpackage or top-level module name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(("bcd_engine", *path.relative_to(ENGINE).parent.parts))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if module == "bcd_engine":  # from bcd_engine import settings: the names are modules
                found += [(node.lineno, f"bcd_engine.{alias.name}") for alias in node.names]
    return found


def _violations() -> list[str]:
    problems = []
    for path in sorted(ENGINE.rglob("*.py")):
        relative = path.relative_to(ENGINE)
        own = _unit(".".join(("bcd_engine", *relative.with_suffix("").parts)))
        for line, module in _imports(path):
            where = f"bcd_engine/{relative.as_posix()}:{line}"
            if module.split(".")[0] in FORBIDDEN_ANYWHERE:
                problems.append(f"{where} imports {module}: drawing and Streamlit belong in ui/ and pages/")
            if not module.startswith("bcd_engine.") or module == "bcd_engine":
                continue
            other = _unit(module)
            if other == own:
                continue
            side_by_side = any({own, other} <= group for group in SIDE_BY_SIDE)
            if side_by_side or _rank(other) >= _rank(own):
                problems.append(f"{where}: {own} imports {module}, which is not below it")
    return problems


def test_every_import_in_the_engine_points_down():
    assert _violations() == []


def test_every_engine_module_has_a_layer():
    for path in ENGINE.rglob("*.py"):
        _rank(_unit(".".join(("bcd_engine", *path.relative_to(ENGINE).with_suffix("").parts))))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from bcd_engine.training.run import train\n", "data imports bcd_engine.training.run, which is not below it"),
        ("from bcd_engine.store import RunStore\n", "data imports bcd_engine.store, which is not below it"),
        ("import plotly.express as px\n", "imports plotly.express: drawing and Streamlit belong in ui/"),
    ],
)
def test_the_check_catches_an_import_that_points_up_or_sideways(tmp_path, monkeypatch, source, expected):
    fake = tmp_path / "bcd_engine"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "bad.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ENGINE", fake)
    problems = _violations()
    assert len(problems) == 1 and expected in problems[0]


def test_importing_the_package_imports_no_tensorflow_and_its_entry_points_resolve():
    code = (
        "import sys, bcd_engine; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; "
        "from bcd_engine import RunStore, TrainConfig, train, scan_dataset, load_run_model, Diagnoser; "
        "print(sorted(set(bcd_engine.__all__) - set(dir(bcd_engine))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ENGINE.parent, check=True)
    assert out.stdout.strip() == "[]"
