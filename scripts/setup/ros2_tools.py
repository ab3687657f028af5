#!/usr/bin/env python3
"""Build the ROS 2 command-line and launch tools as wheels from their sources at pinned commits.

PyPI serves ROS 2 Kilted's runtime as ``ros-kilted-*`` wheels (rclpy, the message packages) but not
the pure-Python tools around it: ``ros2 launch`` (launch, launch_xml, launch_yaml, launch_ros,
ros2launch), ``ros2 topic / node / param / service / lifecycle / run / pkg`` (ros2cli and its verbs,
rosidl_runtime_py) and sensor_msgs_py. Where no folder of ready wheels is given (ROS2_CLI_WHEELS),
``make setup`` runs this script: it fetches each source archive once (from GitHub, or from
ROS2_TOOLS_SOURCES), checks every package folder it uses against the content hash recorded below
(a hash of the files, so it does not depend on how the archive was compressed), and builds each
package with the venv's own pip and setuptools into a folder of the wheel cache:

    ${XDG_CACHE_HOME:-~/.cache}/lidar-completion/wheels/ros2-tools-<hash of this file>/
        *.whl                                   pure-Python wheels (py3-none-any)
        interfaces/composition_interfaces/      an interface package launch_ros imports; it needs
                                                compiled type support, so the setup builds it with
                                                build_interfaces.sh like tf2_msgs

and prints that folder. A folder that is complete is reused without a download. The pinned commits
are the rolling heads of December 2024 (launch 3.7.1, launch_ros 0.28.0, ros2cli 0.36.1), which run
with the Kilted wheels; every one of these packages is Apache-2.0 or BSD licensed.

Usage (with the venv's python; make setup runs `install`):
    python scripts/setup/ros2_tools.py install [--cache DIR] [--sources URL_OR_DIR]
        build (or take from the cache), install the wheels into this venv, build composition_interfaces
    python scripts/setup/ros2_tools.py build [--cache DIR] [--sources URL_OR_DIR]    (print the folder)
    python scripts/setup/ros2_tools.py download --to DIR     (the checked archives, for an offline machine)
    python scripts/setup/ros2_tools.py hashes --sources URL_OR_DIR   (the content hashes, to pin new commits)

--sources (or ROS2_TOOLS_SOURCES): a base URL (default https://github.com/ros2, fetched as
<base>/<repo>/archive/<commit>.tar.gz) or a local folder holding <repo>-<commit>.tar.gz files.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

DEFAULT_SOURCES = "https://github.com/ros2"

# repository -> (commit, {package folder: content hash of that folder})
REPOS: dict[str, tuple[str, dict[str, str]]] = {
    "launch": ("02595bafc7891d4d287667b6aa9161edf738e9f3", {
        "launch": "ffd42750dcac41f9853635620fd3487c8ad796c9427dd9336fdfad7f266bfb3d",
        "launch_xml": "9ff70ab81d440b3be4ac5a6977d306093580562e3ad41c6bc555894eead2334d",
        "launch_yaml": "f58589c1da42735e99e141ca73d7a437e752820368f9242a701aedc0484efc56",
    }),
    "launch_ros": ("f9ab9371824d470bca47602bc7d277eb2217c90d", {
        "launch_ros": "a7b7562c02c04fe9beb452211821ed8482ac1753278740d38535f01d0997b580",
        "ros2launch": "d0ce161cf03692616d2f26f18385d161c1fba94e7c3da868a26e4b1408854e53",
    }),
    "ros2cli": ("e20d2c664fc2981b0b80ebed534e5becc6fdbf34", {
        "ros2cli": "27e60dc4202cac9d040dbafdf057fdf26f445d5d068b1820ee2116af5ccad232",
        "ros2lifecycle": "45df7fb4fe88b7fd20fe4fe562dcc6fd5dee3b9b4275669d064930d25d98ab34",
        "ros2node": "7ca5d0a66cdc5c5e538d3550c37b58d9baa2c8d9b001ca89e222fe94e1d823bd",
        "ros2param": "dab1660a77bfcc4aeaf355a2dea846d10aefe0219f6c28968324e458c21fb200",
        "ros2pkg": "0c67ef6c3579baee55b2e97c740a86ee64d30933f7ca994c79d0ea8e82319055",
        "ros2run": "38cfe2bd6af6002e25fac39d4074eb74cb3fb31e1b73223aed9dad93c05dbc31",
        "ros2service": "be9a58f79d3390c948f28f4a978ed5149970ff583c563f0816132fd1a9cc7373",
        "ros2topic": "3aaba1341172b59978fba4aaaa39c1c886d369edaba7457ad5d335a79267cc83",
    }),
    "rosidl_runtime_py": ("3327b1dc488af514017c5446ffff12d102bbe94a", {
        ".": "61da9401139e5ca978d7a0b8fd6b2943e558ccdb018d941ee63696ee8bfe007b",
    }),
    "common_interfaces": ("c0c0bc57f958eb54a142446f0c2a475754367eee", {
        "sensor_msgs_py": "7125bafaae3b06681ad30da091e83f2acb03e7376de2280aa7ef95e8c504cdde",
    }),
    "rcl_interfaces": ("f6b3741d921ef5414125091b2ccc74b863be3c24", {
        "composition_interfaces": "f22318f82f45da78099dd6b7171ed78fc2d8a5ee6b55531c8e5bb0280cc696a5",
    }),
}
# folders that are interface packages (CMake + rosidl), extracted for build_interfaces.sh, not pip
INTERFACES = {"composition_interfaces"}
COMPLETE = "complete.json"


class ToolsError(RuntimeError):
    """A source that cannot be fetched, does not match its hash, or does not build."""


def log(msg: str) -> None:
    print(f"[ros2-tools] {msg}", file=sys.stderr, flush=True)


def tree_hash(root: Path) -> str:
    """sha256 over the sorted relative paths, run bits, link targets and file contents under root."""
    h = hashlib.sha256()
    entries = sorted(p for p in root.rglob("*") if p.is_symlink() or p.is_file())
    for path in entries:
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            h.update(f"{rel}\0l\0{os.readlink(path)}\n".encode())
            continue
        kind = "x" if path.stat().st_mode & stat.S_IXUSR else "-"
        h.update(f"{rel}\0{kind}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def archive_location(sources: str, repo: str, commit: str) -> str:
    if "://" not in sources:
        return str(Path(sources) / f"{repo}-{commit}.tar.gz")
    return f"{sources.rstrip('/')}/{repo}/archive/{commit}.tar.gz"


def fetch(location: str, dest: Path, attempts: int = 3) -> None:
    """Copy a local archive or download one (following redirects; proxies from the environment)."""
    if "://" not in location:
        if not Path(location).is_file():
            raise ToolsError(f"no source archive {location}")
        shutil.copyfile(location, dest)
        return
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(location, timeout=60) as response, open(dest, "wb") as out:
                shutil.copyfileobj(response, out)
            return
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            unknown_host = isinstance(getattr(exc, "reason", None), socket.gaierror)
            if attempt == attempts or unknown_host or getattr(exc, "code", 500) < 500:
                raise ToolsError(f"cannot download {location}: {exc}") from exc
            time.sleep(2 * attempt)


def extract(archive: Path, dest: Path) -> Path:
    """Unpack a source archive whose members share one top folder; return that folder."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            tops = {PurePosixPath(m.name).parts[0] for m in members if m.name not in ("", ".")}
            if len(tops) != 1:
                raise ToolsError(f"{archive.name}: expected one top folder, found {sorted(tops)[:5]}")
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.name.startswith("/") or ".." in parts:
                    raise ToolsError(f"{archive.name}: unsafe member path {m.name!r}")
                if m.islnk() or m.isdev():
                    raise ToolsError(f"{archive.name}: unexpected member type of {m.name!r}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python before the extraction filters (3.10.11 and older): members checked above
                tar.extractall(dest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ToolsError(f"{archive.name} is not a readable tar.gz archive: {exc}") from exc
    return dest / tops.pop()


def sources_of(sources: str, work: Path) -> dict[str, Path]:
    """Fetch and unpack every repository; return {repo: its unpacked top folder}."""
    roots = {}
    for repo, (commit, _packages) in REPOS.items():
        location = archive_location(sources, repo, commit)
        log(f"{repo} @ {commit[:8]} from {location}")
        archive = work / f"{repo}-{commit}.tar.gz"
        fetch(location, archive)
        roots[repo] = extract(archive, work / "src" / repo)
    return roots


def check(roots: dict[str, Path]) -> None:
    for repo, (commit, packages) in REPOS.items():
        for folder, want in packages.items():
            path = roots[repo] / folder
            if not path.is_dir():
                raise ToolsError(f"{repo} @ {commit[:8]} has no folder {folder}")
            have = tree_hash(path)
            if have != want:
                raise ToolsError(f"{repo} @ {commit[:8]}, folder {folder}: content hash {have[:16]}..., "
                                 f"expected {want[:16]}... (a different or altered archive)")


def download(sources: str, to: Path) -> list[Path]:
    """Fetch and check every archive into ``to`` (a folder that ROS2_TOOLS_SOURCES / --sources can
    name on a machine without GitHub, e.g. a robot: copy the folder there)."""
    with tempfile.TemporaryDirectory(prefix="ros2-tools-") as tmp:
        check(sources_of(sources, Path(tmp)))
        to.mkdir(parents=True, exist_ok=True)
        saved = []
        for repo, (commit, _packages) in REPOS.items():
            name = f"{repo}-{commit}.tar.gz"
            shutil.copyfile(Path(tmp) / name, to / name)
            saved.append(to / name)
    return saved


def key() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def build(cache: Path, sources: str) -> Path:
    out = cache / "wheels" / f"ros2-tools-{key()}"
    if (out / COMPLETE).is_file():
        log(f"using the cached wheels in {out}")
        return out
    if importlib.util.find_spec("setuptools") is None:   # (a Python 3.12 venv has none by default)
        raise ToolsError(f"building the wheels needs setuptools in {sys.prefix} "
                         f"(make setup installs it; else: {sys.executable} -m pip install setuptools wheel)")
    cache.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ros2-tools-", dir=cache) as tmp:
        work = Path(tmp)
        roots = sources_of(sources, work)
        check(roots)
        staged = work / "out"
        (staged / "interfaces").mkdir(parents=True)
        folders = []
        for repo, (_commit, packages) in REPOS.items():
            for folder in packages:
                if folder in INTERFACES:
                    shutil.copytree(roots[repo] / folder, staged / "interfaces" / folder)
                else:
                    folders.append(str(roots[repo] / folder))
        log(f"building {len(folders)} wheels")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
        # the venv's setuptools builds them (no build isolation: no download of build tools), one call
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                               "--no-index", "-w", str(staged), *folders],
                              capture_output=True, text=True, env=env, cwd=work)
        if proc.returncode != 0:
            raise ToolsError("pip could not build the wheels:\n" + (proc.stderr or proc.stdout)[-3000:])
        wheels = sorted(p.name for p in staged.glob("*.whl"))
        if len(wheels) != len(folders):
            raise ToolsError(f"{len(folders)} packages gave {len(wheels)} wheels: {wheels}")
        (staged / COMPLETE).write_text(json.dumps({
            "wheels": wheels, "interfaces": sorted(INTERFACES),
            "commits": {repo: commit for repo, (commit, _p) in REPOS.items()}}, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)   # an incomplete earlier attempt
        out.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(out)
    log(f"built in {time.monotonic() - start:.0f} s: {out}")
    return out


def install(folder: Path) -> None:
    """Install the built wheels into this interpreter's venv (no index, no dependencies: PyPI's
    `launch` is an unrelated package) and build the interface packages with build_interfaces.sh."""
    if sys.prefix == sys.base_prefix:
        raise ToolsError(f"{sys.executable} is not inside a virtual environment; run this with the venv's python")
    pip = [sys.executable, "-m", "pip"]
    # ROS2_CLI_WHEELS' composition_interfaces (Python classes only) and ours share their files
    if subprocess.run(pip + ["show", "-q", "composition_interfaces"], capture_output=True).returncode == 0:
        subprocess.run(pip + ["uninstall", "-q", "-y", "composition_interfaces", "ros-composition-interfaces"],
                       capture_output=True)
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    proc = subprocess.run(pip + ["install", "-q", "--no-index", "--no-deps", *wheels], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolsError("pip could not install the wheels:\n" + proc.stderr[-3000:])
    script = Path(__file__).resolve().parent / "build_interfaces.sh"
    interfaces = sorted((folder / "interfaces").iterdir())
    for src in interfaces:
        if subprocess.run(["bash", str(script), str(src)], env={**os.environ, "PYTHON": sys.executable}).returncode:
            raise ToolsError(f"{src.name} could not be built (above): ros2 launch cannot start without it")
    log(f"installed {len(wheels)} wheels and {', '.join(p.name for p in interfaces)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    default_sources = os.environ.get("ROS2_TOOLS_SOURCES") or DEFAULT_SOURCES
    default_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lidar-completion"
    for name, what in (("install", "build (or take from the cache) and install into this venv"),
                       ("build", "fetch, check and build the wheels (cached); print their folder")):
        b = sub.add_parser(name, help=what)
        b.add_argument("--cache", type=Path, default=default_cache, help="cache root (default: %(default)s)")
        b.add_argument("--sources", default=default_sources,
                       help="base URL or folder of <repo>-<commit>.tar.gz archives (default: %(default)s)")
    d = sub.add_parser("download", help="fetch and check the source archives into a folder, for "
                                         "--sources / ROS2_TOOLS_SOURCES on a machine without GitHub")
    d.add_argument("--to", type=Path, required=True, help="the folder to write <repo>-<commit>.tar.gz into")
    d.add_argument("--sources", default=default_sources)
    h = sub.add_parser("hashes", help="print the content hash of every package folder of the sources")
    h.add_argument("--sources", default=default_sources)
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            install(build(args.cache, args.sources))
        elif args.command == "build":
            print(build(args.cache, args.sources))
        elif args.command == "download":
            for path in download(args.sources, args.to):
                print(path)
        else:
            with tempfile.TemporaryDirectory(prefix="ros2-tools-") as tmp:
                roots = sources_of(args.sources, Path(tmp))
                for repo, (_commit, packages) in REPOS.items():
                    for folder in packages:
                        print(f"{repo}\t{folder}\t{tree_hash(roots[repo] / folder)}")
    except ToolsError as exc:
        print(f"[ros2-tools] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
