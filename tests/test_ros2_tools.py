"""scripts/setup/ros2_tools.py: the ROS 2 launch / CLI tools built from their sources at pinned
commits when no folder of their wheels is given. Checked here on small synthetic source archives
(no network): the content hash, the wheels and the cache, and every way a source can be wrong."""
from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "setup" / "ros2_tools.py"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def tools(monkeypatch):
    spec = importlib.util.spec_from_file_location("ros2_tools_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package(name: str, version: str = "1.2.3") -> dict[str, bytes]:
    """The files of a minimal ament_python-like package (setup.py with data_files, a module)."""
    setup = f"""from setuptools import setup
setup(name={name!r}, version={version!r}, packages=[{name!r}],
      data_files=[('share/ament_index/resource_index/packages', ['resource/{name}']),
                  ('share/{name}', ['package.xml'])],
      entry_points={{'console_scripts': ['{name}-hello = {name}:main']}})
"""
    return {
        "setup.py": setup.encode(),
        f"{name}/__init__.py": b"def main():\n    print('hello')\n",
        f"resource/{name}": b"",
        "package.xml": f"<package><name>{name}</name></package>\n".encode(),
    }


def _archive(path: Path, top: str, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in files.items():
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size, info.mode = len(data), 0o755 if rel.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b""))


def _sources(tmp_path: Path, tools, tamper: bool = False) -> Path:
    """A folder with one archive 'demo-<commit>.tar.gz' holding two Python packages and an interface
    package, and the module's manifest pointed at it with the right content hashes."""
    src = tmp_path / "sources"
    src.mkdir()
    files = {}
    for name in ("demo_a", "demo_b"):
        files.update({f"{name}/{rel}": data for rel, data in _package(name).items()})
    files["demo_msgs/package.xml"] = b"<package><name>demo_msgs</name><version>0.1.0</version></package>\n"
    files["demo_msgs/CMakeLists.txt"] = b"project(demo_msgs)\n"
    files["demo_msgs/msg/Demo.msg"] = b"int32 a\n"
    files["README.md"] = b"not a package\n"
    unpacked = tmp_path / "unpacked"
    for rel, data in files.items():
        (unpacked / rel).parent.mkdir(parents=True, exist_ok=True)
        (unpacked / rel).write_bytes(data)
    hashes = {name: tools.tree_hash(unpacked / name) for name in ("demo_a", "demo_b", "demo_msgs")}
    if tamper:
        files["demo_b/demo_b/__init__.py"] += b"import os  # altered\n"
    _archive(src / f"demo-{COMMIT}.tar.gz", f"demo-{COMMIT}", files)
    tools.REPOS = {"demo": (COMMIT, hashes)}
    tools.INTERFACES = {"demo_msgs"}
    return src


def test_tree_hash_covers_paths_contents_and_run_bits(tmp_path, tools):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.py").write_text("x = 1\n")
    (d / "b.txt").write_text("b\n")
    first = tools.tree_hash(d)
    assert re.fullmatch(r"[0-9a-f]{64}", first) and tools.tree_hash(d) == first
    (d / "sub" / "a.py").chmod(0o755)
    assert tools.tree_hash(d) != first
    (d / "sub" / "a.py").chmod(0o644)
    assert tools.tree_hash(d) == first
    (d / "sub" / "a.py").write_text("x = 2\n")
    assert tools.tree_hash(d) != first
    (d / "sub" / "a.py").write_text("x = 1\n")
    (d / "sub" / "a.py").rename(d / "a.py")
    assert tools.tree_hash(d) != first


def test_build_makes_a_wheel_per_package_caches_them_and_keeps_the_interface_sources(tmp_path, tools):
    sources = _sources(tmp_path, tools)
    out = tools.build(tmp_path / "cache", str(sources))
    assert out.parent == tmp_path / "cache" / "wheels" and out.name.startswith("ros2-tools-")
    wheels = sorted(p.name for p in out.glob("*.whl"))
    assert wheels == ["demo_a-1.2.3-py3-none-any.whl", "demo_b-1.2.3-py3-none-any.whl"]
    with zipfile.ZipFile(out / wheels[0]) as zf:
        names = set(zf.namelist())
        assert "demo_a/__init__.py" in names
        assert "demo_a-1.2.3.data/data/share/ament_index/resource_index/packages/demo_a" in names
        assert "demo_a-hello = demo_a:main" in zf.read("demo_a-1.2.3.dist-info/entry_points.txt").decode()
    assert (out / "interfaces" / "demo_msgs" / "msg" / "Demo.msg").read_text() == "int32 a\n"
    assert not (out / "interfaces" / "demo_a").exists()
    record = json.loads((out / "complete.json").read_text())
    assert record["wheels"] == wheels and record["commits"] == {"demo": COMMIT}
    # the second run takes the cache and needs no source at all
    (sources / f"demo-{COMMIT}.tar.gz").unlink()
    assert tools.build(tmp_path / "cache", str(sources)) == out
    # no temporary folders left in the cache
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["wheels"]


def test_download_saves_checked_archives_that_serve_as_sources(tmp_path, tools):
    """`download --to DIR` on a machine with GitHub; DIR as --sources on one without."""
    sources = _sources(tmp_path, tools)
    saved = tools.download(str(sources), tmp_path / "mirror")
    assert [p.name for p in saved] == [f"demo-{COMMIT}.tar.gz"]
    assert saved[0].read_bytes() == (sources / f"demo-{COMMIT}.tar.gz").read_bytes()
    out = tools.build(tmp_path / "cache", str(tmp_path / "mirror"))
    assert len(list(out.glob("*.whl"))) == 2
    (tmp_path / "bad").mkdir()
    bad = _sources(tmp_path / "bad", tools, tamper=True)
    with pytest.raises(tools.ToolsError, match="content hash"):
        tools.download(str(bad), tmp_path / "mirror2")
    assert not (tmp_path / "mirror2").exists()


def test_an_altered_archive_is_refused_and_nothing_is_cached(tmp_path, tools):
    sources = _sources(tmp_path, tools, tamper=True)
    with pytest.raises(tools.ToolsError, match=r"demo @ 01234567, folder demo_b: content hash"):
        tools.build(tmp_path / "cache", str(sources))
    assert not list((tmp_path / "cache").glob("wheels/ros2-tools-*"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) in ([], ["wheels"])


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "hardlink", "two_tops", "not_gzip"])
def test_unsafe_or_broken_archives_are_refused(tmp_path, tools, kind):
    sources = _sources(tmp_path, tools)
    archive = sources / f"demo-{COMMIT}.tar.gz"
    top = f"demo-{COMMIT}"
    files = {"demo_a/setup.py": b"x"}
    if kind == "not_gzip":
        archive.write_bytes(b"<html>rate limited</html>")
        expect = "not a readable tar.gz archive"
    elif kind == "two_tops":
        _archive(archive, top, files, [tarfile.TarInfo("other/file")])
        expect = "expected one top folder"
    elif kind == "hardlink":
        link = tarfile.TarInfo(f"{top}/link")
        link.type, link.linkname = tarfile.LNKTYPE, "/etc/passwd"
        _archive(archive, top, files, [link])
        expect = "unexpected member type"
    else:
        bad = tarfile.TarInfo(f"{top}/../evil" if kind == "dotdot" else f"/{top}/evil")
        _archive(archive, top, files, [bad])
        expect = "unsafe member path" if kind == "dotdot" else "(unsafe member path|one top folder)"
    with pytest.raises(tools.ToolsError, match=expect):
        tools.build(tmp_path / "cache", str(sources))
    assert not (tmp_path / "evil").exists() and not list((tmp_path / "cache").glob("wheels/ros2-tools-*"))


def test_a_missing_source_fails_the_command_with_its_name(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "build", "--cache", str(tmp_path / "cache"),
                           "--sources", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "[ros2-tools] error: no source archive" in proc.stderr
    assert str(tmp_path / "nowhere" / "launch-") in proc.stderr


def test_archive_locations_for_a_url_and_a_folder(tools):
    assert tools.archive_location("https://github.com/ros2/", "launch", COMMIT) == \
        f"https://github.com/ros2/launch/archive/{COMMIT}.tar.gz"
    assert tools.archive_location("/mirror", "launch", COMMIT) == f"/mirror/launch-{COMMIT}.tar.gz"


def test_the_pinned_manifest_names_what_the_setup_and_the_tests_need(tools):
    folders = {folder for _commit, packages in tools.REPOS.values() for folder in packages}
    assert {"launch", "launch_xml", "launch_yaml", "launch_ros", "ros2launch", "ros2cli", "ros2topic",
            "ros2node", "ros2param", "ros2lifecycle", "ros2run", "sensor_msgs_py"} <= folders
    assert tools.INTERFACES == {"composition_interfaces"} and tools.INTERFACES <= folders
    for repo, (commit, packages) in tools.REPOS.items():
        assert re.fullmatch(r"[0-9a-f]{40}", commit), repo
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in packages.values()), repo
