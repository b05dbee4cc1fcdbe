"""The packages' public surface: what one package imports from another is public and listed in its `__all__`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgekd"
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def owner(module: str) -> str:
    """'edgekd.train.run' -> 'train'; a top-level module ('edgekd.recipe') is its own owner."""
    return module.split(".")[1] if module.count(".") else module


def cross_package_imports() -> list[tuple[str, str, str]]:
    """(importing file, imported module, name) for every `from edgekd.<pkg>... import name` across packages."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        mine = rel.parts[1] if len(rel.parts) > 2 else ".".join(rel.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("edgekd."):
                if owner(node.module) != mine:
                    found += [(str(rel), node.module, a.name) for a in node.names]
    return found


def declared_all(sub: str) -> set[str]:
    tree = ast.parse((PACKAGE / sub / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def test_no_private_name_is_imported_across_packages():
    private = [f"{f}: {m}.{n}" for f, m, n in cross_package_imports() if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_what_other_packages_import_is_in_the_package_all():
    missing = [f"{f}: {m}.{n}" for f, m, n in cross_package_imports()
               if owner(m) in SUBPACKAGES and n not in declared_all(owner(m))]
    assert missing == []


def test_no_function_in_the_package_is_over_60_lines():
    """Orchestrators read in one screen (issue 20): a longer function is split into named steps."""
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []
