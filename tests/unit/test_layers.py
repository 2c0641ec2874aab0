"""The layers of ARCHITECTURE.md, checked from the code's own imports (``ast``), at module level and in functions.

Lowest first: core ``refit/``, runtime ``refit/runtime/``, registry
``registry/``, stages ``tasks/``, serving ``serving/``, flows ``flows/``, and
the composition layer ``refit/cli/`` and ``refit/bench/``, which may import
anything. A module importing from a layer above its own fails the test with
the file, the line and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("refit", "registry", "tasks", "serving", "flows")

# layer -> what it may not import (module prefixes, matched on whole dotted names)
FORBIDDEN = {
    "core": ("tasks", "flows", "registry", "serving", "prefect", "refit.runtime", "refit.cli", "refit.bench"),
    "runtime": ("tasks", "flows", "registry", "serving", "prefect", "mlflow", "fastapi", "refit.cli", "refit.bench"),
    "registry": ("tasks", "flows", "serving", "prefect", "refit.cli", "refit.bench"),
    "stages": ("flows", "serving", "refit.cli", "refit.bench"),
    "serving": ("tasks", "flows", "prefect", "refit.cli", "refit.bench"),
    "flows": ("refit.cli", "refit.bench"),
    "composition": (),
}


def layer_of(module: str) -> str:
    """The layer of a dotted module name of the product."""
    if _within(module, "refit.cli") or _within(module, "refit.bench"):
        return "composition"
    if _within(module, "refit.runtime"):
        return "runtime"
    return {"refit": "core", "registry": "registry", "tasks": "stages", "serving": "serving",
            "flows": "flows"}[module.split(".")[0]]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
            parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    return []


def violations(root: Path) -> list[str]:
    """Every import in the product under ``root`` that reaches a layer above its module's own."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).with_suffix("")
            is_package = relative.name == "__init__"
            module = ".".join(relative.parts[:-1] if is_package else relative.parts)
            layer = layer_of(module)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = _imported(node, module, is_package)
                banned = next((p for name in names for p in FORBIDDEN[layer] if _within(name, p)), None)
                if banned:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {layer} module {module} imports "
                                 f"{names[0]} ({banned})")
    return sorted(found)


def test_every_layer_imports_only_the_layers_below_it():
    assert violations(ROOT) == []


@pytest.mark.parametrize("where,source,layer", [
    ("refit/settings_extra.py", "from registry import versions\n", "core"),
    ("refit/runtime/extra.py", "def f():\n    import mlflow\n", "runtime"),
    ("registry/extra.py", "def f():\n    from prefect import flow\n", "registry"),
    ("tasks/extra.py", "from serving.app import create_app\n", "stages"),
    ("serving/extra.py", "from tasks import gate\n", "serving"),
    ("refit/extra.py", "from .runtime import served\n", "core"),
])
def test_the_check_fails_on_a_planted_upward_import(tmp_path, where, source, layer):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "refit" / "runtime").mkdir()
    (tmp_path / where).write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{where}:") and f"{layer} module" in found[0], found


def test_composition_may_import_anything(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "refit" / "cli").mkdir()
    (tmp_path / "refit" / "cli" / "serve.py").write_text("from flows import update\nfrom serving import app\n")
    assert violations(tmp_path) == []
