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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dynamic sections are a Linux matter")
def test_extension_needs_no_cuda_library():
    # One wheel for machines with and without a GPU: the CUDA runtime is linked statically and opens
    # the driver (libcuda.so.1) only when first used, so nothing CUDA may appear among the libraries
    # the loader must find at import.
    readelf = shutil.which("readelf")
    assert readelf is not None, "readelf (binutils) is needed to read the extension's dynamic section"
    dynamic = subprocess.run([readelf, "-d", kvsched._core.__file__], check=True, capture_output=True,
                             text=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, "the extension lists no needed libraries: the check read the wrong section"
    assert not [name for name in needed if "cuda" in name or "nvrtc" in name], needed
