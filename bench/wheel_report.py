"""What a built kvsched wheel is: its size, its manylinux policy, what its extension links and exports.

    python bench/wheel_report.py dist/kvsched-*.whl

Prints one Markdown table (bench/README.md, "The wheel", is this script's output). Reads the wheel as
a zip and the extension with binutils' readelf and nm; the policy comes from `auditwheel show` when
auditwheel is installed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def report(wheel: Path) -> list[tuple[str, str]]:
    rows = [("wheel", wheel.name), ("compressed", f"{wheel.stat().st_size / 1e6:.2f} MB")]
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as tmp:
        infos = archive.infolist()
        rows.append(("installed", f"{sum(i.file_size for i in infos) / 1e6:.2f} MB in {len(infos)} files"))
        (core,) = [i for i in infos if re.search(r"kvsched/_core\..*\.so$", i.filename)]
        extension = Path(archive.extract(core, tmp))
        rows.append(("extension", f"{core.file_size / 1e6:.2f} MB ({Path(core.filename).name})"))
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _run("readelf", "-d", str(extension)))
        rows.append(("links (NEEDED)", ", ".join(needed)))
        exported = _run("nm", "-D", "--defined-only", str(extension)).split()
        rows.append(("exports", ", ".join(name for name in exported[2::3])))
        fatbin = _run("readelf", "-S", "-W", str(extension))
        rows.append(("CUDA compiled in", "yes (.nv_fatbin section)" if ".nv_fatbin" in fatbin else "no"))
    if shutil.which("auditwheel"):
        shown = " ".join(_run("auditwheel", "show", str(wheel)).split())
        match = re.search(r'platform tag: "([^"]+)"', shown)
        rows.append(("auditwheel policy", match.group(1) if match else shown[:120]))
    glibc = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    # The machine this report runs on (in .ci/run, also the one that built the wheel).
    rows.append(("reported on", f"{glibc[0] if glibc else 'unknown libc'}; Python {sys.version.split()[0]}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="a built kvsched wheel (.whl)")
    args = parser.parse_args()
    if not args.wheel.is_file() or args.wheel.suffix != ".whl":
        parser.error(f"wheel: {args.wheel} is not a .whl file")
    print("| | |\n|---|---|")
    for name, value in report(args.wheel):
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
