"""The package's tree is its architecture: which side may import which, read from the code itself.

core/ is what both sides share and imports none of them; batch/ imports core only; login/ (the login
node) never imports node/ (Ray, vLLM, containers) and node/ never imports login/. The contract is
checked on every module's imports (type-only ones too), and a planted violation is caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PACKAGE = Path(__file__).resolve().parents[1] / "slurm_vllm"
# side -> the sides it may import (itself included); scripts/ are files sent to containers as text
ALLOWED = {
    "core": {"core", "scripts"},
    "batch": {"batch", "core"},
    "login": {"login", "core", "batch"},
    "node": {"node", "core", "batch", "scripts"},
    "scripts": set(),
}
MAX_LINES = 300


def side_of(module: str) -> str:
    """'slurm_vllm.node.ranks' -> 'node'; the package itself and its __init__/__main__ names -> 'top'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "top"


def imports(path: Path, module: str) -> set[str]:
    """Every slurm_vllm module PATH (named MODULE) imports (type-only ones too), relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            target = ".".join(x for x in (base, node.module or "") if x)
            if node.module is None or target == "slurm_vllm":     # from . import x / from slurm_vllm import x
                found.update(f"{target}.{a.name}" for a in node.names)
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("slurm_vllm.")}


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for module, path in modules(root).items():
        side = side_of(module)
        if side == "top":
            continue
        for target in sorted(imports(path, module)):
            other = side_of(target)
            if target != "slurm_vllm.__version__" and other not in ALLOWED[side]:
                found.append(f"{module} ({side}) imports {target} ({other})")
    return found


def test_each_side_imports_only_what_it_may() -> None:
    assert violations() == []


def test_a_planted_violation_is_caught(tmp_path: Path) -> None:
    """A copy of the package where a core module imports the node side (as a careless change would,
    also under TYPE_CHECKING): the contract names it."""
    import shutil

    copy = tmp_path / "slurm_vllm"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    spec = copy / "core" / "spec.py"
    spec.write_text(spec.read_text() + "\nif TYPE_CHECKING:\n    from ..node.head import Head\n")
    api = copy / "login" / "api.py"
    api.write_text(api.read_text() + "\nfrom slurm_vllm.node import proc_x\n")
    assert violations(copy) == ["slurm_vllm.core.spec (core) imports slurm_vllm.node.head (node)",
                                "slurm_vllm.login.api (login) imports slurm_vllm.node (node)"]


def test_the_tree_names_every_side() -> None:
    """`ls slurm_vllm` tells the architecture: one folder a side, each saying its job first."""
    sides = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert sides == set(ALLOWED)
    for side in sides:
        doc = ast.get_docstring(ast.parse((PACKAGE / side / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()[0]) < 110, side


def test_no_module_is_over_300_lines() -> None:
    """A module that grows past 300 lines holds more than one job: split it by what it does."""
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
