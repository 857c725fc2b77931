"""The layout rules docs/architecture.md states: tensor maths without torch.fx, no private imports across modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PACKAGE = Path(__file__).resolve().parents[1] / "cora_fx"


def imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


@pytest.mark.parametrize("path", sorted((PACKAGE / "quant").glob("*.py")), ids=lambda p: p.name)
def test_quant_is_tensor_maths_only(path: Path):
    for node in imports(path):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        for name in names:
            assert not name.startswith("torch.fx"), f"{module_name(path)} imports {name}"
            if name.startswith("cora_fx"):
                assert name.startswith(("cora_fx.quant", "cora_fx.config", "cora_fx.errors")), \
                    f"{module_name(path)} imports {name}: quant/ may use only config and errors outside itself"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=module_name)
def test_no_private_names_imported_across_modules(path: Path):
    for node in imports(path):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cora_fx"):
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            assert not private, f"{module_name(path)} imports {private} from {node.module}"


def test_every_folder_is_a_package_with_a_docstring():
    for folder in [p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"]:
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder.name}/ has no __init__.py (setuptools would not ship it)"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{folder.name}/__init__.py says nothing of the folder"
