"""Package-level facts: CUDA reporting, stubs in sync with the bindings, typed marker."""

from __future__ import annotations

import ast
from pathlib import Path

import kvsched
from kvsched import _core

PACKAGE = Path(kvsched.__file__).parent


def _stub_names():
    tree = ast.parse((PACKAGE / "_core.pyi").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {
        n.name: {m.name for m in n.body if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")}
        for n in tree.body
        if isinstance(n, ast.ClassDef)
    }
    return functions, classes


def test_stubs_match_the_extension():
    functions, classes = _stub_names()
    public = {name for name in dir(_core) if not name.startswith("_")}
    assert functions == {name for name in public if callable(getattr(_core, name)) and not isinstance(getattr(_core, name), type)}
    assert set(classes) == {name for name in public if isinstance(getattr(_core, name), type)}
    for name, members in classes.items():
        native = {m for m in dir(getattr(_core, name)) if not m.startswith("_")}
        if issubclass(getattr(_core, name), BaseException):
            continue
        assert members == native, f"{name}: stub-only {members - native}, binding-only {native - members}"


def test_python_class_exposes_every_native_method():
    native = {m for m in dir(_core.BlockAllocator) if not m.startswith("_")}
    wrapper = {m for m in dir(kvsched.BlockAllocator) if not m.startswith("_")}
    # `contains` is spelled `in` in Python; the rest must exist under the same name.
    assert native - {"contains", "enable_prefix_caching"} <= wrapper


def test_py_typed_marker_is_installed():
    assert (PACKAGE / "py.typed").is_file()


def test_cuda_reporting_is_consistent():
    assert isinstance(kvsched.cuda_compiled(), bool)
    count = _core.cuda_device_count()
    assert count >= 0
    assert kvsched.has_cuda() == (kvsched.cuda_compiled() and count > 0)
    if not kvsched.cuda_compiled():
        assert count == 0
