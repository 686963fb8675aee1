"""The import rules of docs/design/layers.md, read from the sources: a layer imports only those below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "kvsched"
NATIVE = PACKAGE.parent.parent / "cpp"
CORE_API = {"_core", "allocator", "estimator", "swap", "cuda", "block_copier", "step_copies", "policies", "scheduler", "risk",
            "__version__"}

# The first name under kvsched of everything a layer may import (besides itself).
ALLOWED = {
    "core": CORE_API,
    "cluster": {"_core"},
    "sim": CORE_API | {"cluster"},
    "adapters": CORE_API | {"sim.profiles", "kvsched"},  # `import kvsched` is the core API's front door
}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute kvsched module, only for type checking) for each import in ``path``."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(name, id(node) in typing_only) for name in names if name.split(".")[0] == "kvsched"]
    return found


def _layer(relative: Path) -> str:
    top = relative.parts[0]
    if top in ("cluster", "sim", "adapters"):
        return top
    return "cli" if top == "cli.py" else "core"


def _allowed(layer: str, target: str) -> bool:
    inside = target.removeprefix("kvsched").removeprefix(".")
    if not inside:
        return "kvsched" in ALLOWED[layer]
    if inside.split(".")[0] == layer or (layer == "core" and inside.split(".")[0] in CORE_API):
        return True
    return any(inside == rule or inside.startswith(rule + ".") for rule in ALLOWED[layer])


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if _layer(p.relative_to(PACKAGE)) != "cli")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_the_layers_below_it(path):
    layer = _layer(path.relative_to(PACKAGE))
    broken = [target for target, typing_only in _imports(path) if not typing_only and not _allowed(layer, target)]
    assert not broken, f"{path.relative_to(PACKAGE)} ({layer}) imports {broken}: see docs/design/layers.md"


def test_the_cluster_imports_no_engine_and_no_simulator():
    # the rule the fleet's engine protocol exists for
    for path in (PACKAGE / "cluster").rglob("*.py"):
        targets = [t for t, _ in _imports(path)]
        assert not [t for t in targets if ".sim" in t or ".adapters" in t], path


def test_the_rule_checker_sees_a_violation():
    assert not _allowed("cluster", "kvsched.sim.driver")
    assert not _allowed("core", "kvsched.cluster")
    assert not _allowed("sim", "kvsched.adapters.vllm")
    assert _allowed("adapters", "kvsched.sim.profiles") and not _allowed("adapters", "kvsched.sim.driver")
    assert _allowed("sim", "kvsched.cluster.dispatch")


def test_the_native_core_has_no_python_includes():
    for path in [*(NATIVE / "src").rglob("*"), *(NATIVE / "include").rglob("*"), *(NATIVE.parent / "cuda").rglob("*")]:
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "Python.h" not in text and "pybind11" not in text, path
