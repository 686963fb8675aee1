"""How the extension module is linked: it exports Python's entry point and nothing else, so a C++
runtime linked into it statically (GPU images' compilers do that) never mixes with the process's
own libstdc++. A crash seen on such an image came from exactly that mix."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import kvsched


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF symbol tables are a Linux matter")
def test_extension_exports_only_its_init():
    nm = shutil.which("nm")
    assert nm is not None, "nm (binutils) is needed to read the extension's symbol table"
    listing = subprocess.run([nm, "-D", "--defined-only", kvsched._core.__file__], check=True, capture_output=True,
                             text=True).stdout
    exported = sorted(line.split()[-1] for line in listing.splitlines() if line.strip())
    assert exported == ["PyInit__core"], f"{len(exported)} exported symbols, first: {exported[:10]}"
