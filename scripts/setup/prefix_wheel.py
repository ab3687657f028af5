#!/usr/bin/env python3
"""Pack an installed prefix (what `cmake --install` wrote) into a wheel for this interpreter.

The layout is the one of the ROS 2 Kilted wheels on PyPI: the Python package goes to site-packages,
everything else (lib/*.so, share/, include/) under the wheel's .data/data/, which pip puts at the
root of the environment, so the libraries land in <venv>/lib, where the Kilted wheels' bootstrapper
puts them on the library path, and share/ extends the venv's ament index.

Written here rather than taken from a packaging tool: the build backends (setuptools, scikit-build)
build from sources, and a wheel of an already installed prefix is a zip file with a RECORD.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import sysconfig
import zipfile
from pathlib import Path


def wheel_tag() -> str:
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return f"{py}-{py}-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"


def entries(prefix: Path, dist: str, version: str):
    """(name in the wheel, file) of every file under ``prefix``."""
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    data = f"{dist}-{version}.data/data"
    for path in sorted(p for p in prefix.rglob("*") if p.is_file() or p.is_symlink()):
        if "__pycache__" in path.parts:
            continue
        if path.is_relative_to(site):
            rel = path.relative_to(site)
            if rel.parts[0].endswith((".egg-info", ".dist-info")):
                continue
            yield rel.as_posix(), path
        else:
            yield f"{data}/{path.relative_to(prefix).as_posix()}", path


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prefix", type=Path, help="the installed prefix")
    ap.add_argument("--name", required=True, help="distribution name, e.g. ros_tf2_msgs")
    ap.add_argument("--version", required=True)
    ap.add_argument("--top-level", required=True, help="the Python package it provides")
    ap.add_argument("--summary", default="")
    ap.add_argument("--requires", action="append", default=[], help="a Requires-Dist line (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the wheel")
    args = ap.parse_args(argv)

    site_pkg = (args.prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" /
                "site-packages" / args.top_level)
    if not (site_pkg / "__init__.py").is_file():
        ap.error(f"{site_pkg} has no __init__.py: not a prefix installed for this Python")
    dist, tag = args.name.replace("-", "_"), wheel_tag()
    info = f"{dist}-{args.version}.dist-info"
    metadata = "".join(f"{line}\n" for line in [
        "Metadata-Version: 2.1", f"Name: {args.name}", f"Version: {args.version}",
        f"Summary: {args.summary}",
        f"Requires-Python: =={sys.version_info.major}.{sys.version_info.minor}.*",
        *(f"Requires-Dist: {r}" for r in args.requires)])
    wheel = f"Wheel-Version: 1.0\nGenerator: lidar-completion prefix_wheel\nRoot-Is-Purelib: false\nTag: {tag}\n"

    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{dist}-{args.version}-{tag}.whl"
    partial = target.with_suffix(".partial")
    record = []
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        def write(name: str, data: bytes, mode: int = 0o644) -> None:
            zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zi.external_attr = (mode & 0xFFFF) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, data)

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            write(name, data, mode)
            record.append(record_line(name, data))

        for name, path in entries(args.prefix, dist, args.version):
            add(name, path.read_bytes(), path.stat().st_mode)   # a link is stored as its target
        add(f"{info}/METADATA", metadata.encode())
        add(f"{info}/WHEEL", wheel.encode())
        add(f"{info}/top_level.txt", f"{args.top_level}\n".encode())
        name = f"{info}/RECORD"
        write(name, "".join(f"{line}\n" for line in [*record, f"{name},,"]).encode())
    partial.replace(target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
