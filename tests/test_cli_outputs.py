"""What `lidar-completion complete` writes and refuses: outputs that a failed write cannot spoil,
render names that two inputs must not share, headers whose counts disagree with the data, seeds
that can be passed back, and scans that complete to nothing."""
import builtins
import errno
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest

from lidar_completion.checkpoints import make_random_checkpoint
from lidar_completion.cli import main
from lidar_completion.completer import Completer
from lidar_completion.errors import CloudFormatError
from lidar_completion.io import read_cloud, write_cloud
from lidar_completion.settings import BY_NAME, CompletionSettings

# the tiny random network: the files, not the completions, are under test here
FAST = ["--steps", "1", "--backend", "torch", "--n-fps", "150", "--tile", "4"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _scan(n=600, seed=0, flat=False):
    rng = np.random.default_rng(seed)
    r, a = rng.uniform(5, 25, n), rng.uniform(0, 2 * np.pi, n)
    z = np.full(n, -1.7) if flat else rng.normal(-1.5, 0.3, n)
    return np.stack([r * np.cos(a), r * np.sin(a), z, rng.random(n)], 1).astype(np.float32)


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    return write_cloud(tmp_path_factory.mktemp("scan") / "scan.bin", _scan())


def _complete(*argv):
    """``main(["complete", ...])`` (an OSError is its one-line error, exit 1: it must not escape)."""
    return main(["complete", *map(str, argv)])


# ------------------------------------------------------------------------ 1. atomic outputs
class _FullDisk:
    """A file in a folder whose disk fills up: the first ``room`` bytes are stored, the write
    that goes past them stores what fits and fails with ENOSPC (as a full disk or ``ulimit -f``)."""

    def __init__(self, fh, room):
        self._fh, self._room = fh, room

    def write(self, data):
        data = bytes(data)
        self._fh.write(data[:self._room])
        self._fh.flush()
        if len(data) > self._room:
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return len(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def _fill_disk(monkeypatch, folder: Path, room: int = 300):
    """Every file opened for writing in ``folder`` (by any writer: numpy, matplotlib, PIL, ours)
    runs out of space after ``room`` bytes."""
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if (isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax")
                and Path(file).resolve().parent == folder.resolve()):
            return _FullDisk(fh, room)
        return fh

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)      # pathlib's write_bytes / open go through io.open


@pytest.mark.parametrize("ext", [".ply", ".pcd", ".bin", ".npy", "ascii.ply", "ascii.pcd"])
def test_a_failed_write_leaves_the_previous_output_and_no_temporary_file(ckpt, scan_file, tmp_path,
                                                                         monkeypatch, ext):
    ascii_ = ext.startswith("ascii")
    out = tmp_path / "out" / ("dense" + ext.replace("ascii", ""))
    good = _scan(50, seed=3)
    write_cloud(out, good, binary=not ascii_)
    before = out.read_bytes()
    _fill_disk(monkeypatch, out.parent)
    rc = _complete(scan_file, "-o", out, "--checkpoint", ckpt, "--seed", "0",
                   *(["--ascii"] if ascii_ else []), *FAST)
    monkeypatch.undo()
    assert rc != 0
    assert out.read_bytes() == before and np.array_equal(read_cloud(out), good[:, :3])
    assert [p.name for p in out.parent.iterdir()] == [out.name]          # no temporary file left


def test_a_failed_render_leaves_the_previous_png_and_no_temporary_file(ckpt, scan_file, tmp_path,
                                                                       monkeypatch):
    out, png = tmp_path / "dense.npy", tmp_path / "renders" / "cmp.png"
    assert _complete(scan_file, "-o", out, "--checkpoint", ckpt, "--render", png, "--seed", "0", *FAST) == 0
    before = png.read_bytes()
    _fill_disk(monkeypatch, png.parent, room=2000)
    rc = _complete(scan_file, "-o", out, "--checkpoint", ckpt, "--render", png, "--seed", "1", *FAST)
    monkeypatch.undo()
    assert rc != 0
    assert png.read_bytes() == before
    assert [p.name for p in png.parent.iterdir()] == ["cmp.png"]


def test_skip_existing_resumes_after_a_failed_write(ckpt, scan_file, tmp_path, monkeypatch, capsys):
    """The batch killed by a full disk leaves no file for --skip-existing to take for done."""
    scans, out = tmp_path / "scans", tmp_path / "dense"
    write_cloud(scans / "a.bin", _scan(seed=1))
    write_cloud(scans / "b.bin", _scan(seed=2))
    out.mkdir()
    _fill_disk(monkeypatch, out)
    assert _complete(scans, "-o", out, "--checkpoint", ckpt, "--seed", "0", *FAST) != 0
    monkeypatch.undo()
    assert list(out.iterdir()) == []
    capsys.readouterr()
    assert _complete(scans, "-o", out, "--skip-existing", "--checkpoint", ckpt, "--seed", "0", *FAST) == 0
    assert "completed 2 of 2" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin"]


def test_a_killed_batchs_temporary_files_are_removed_by_the_next(ckpt, tmp_path, capsys):
    """A batch killed while writing left <output>.<pid>.tmp beside its outputs for good (the rerun
    with --skip-existing never looked at it); one of a batch still running is left alone."""
    import os
    import subprocess

    scans, out = tmp_path / "scans", tmp_path / "dense"
    write_cloud(scans / "a.bin", _scan(seed=1))
    write_cloud(scans / "b.bin", _scan(seed=2))
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, live = out / f"b.bin.{gone.pid}.tmp", out / f"a.bin.{os.getppid()}.tmp"
    dead.write_bytes(b"partial")
    live.write_bytes(b"being written")
    assert _complete(scans, "-o", out, "--skip-existing", "--no-progress", "--checkpoint", ckpt,
                     "--seed", "0", *FAST) == 0
    assert "completed 2 of 2" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.bin", "b.bin", live.name])


# ------------------------------------------------------------------------ 2. render names
def test_batch_refuses_two_inputs_rendered_to_one_png(ckpt, tmp_path, capsys):
    scans = tmp_path / "scans"
    write_cloud(scans / "good.bin", _scan(seed=1))
    write_cloud(scans / "good.npy", _scan(seed=2))          # outputs good.bin / good.npy: distinct
    out, renders = tmp_path / "dense", tmp_path / "renders"
    assert _complete(scans, "-o", out, "--render", renders, "--checkpoint", ckpt, *FAST) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "good.bin" in err and "good.npy" in err and "would both be rendered to" in err
    assert str(renders / "good.png") in err
    assert not out.exists() and not renders.exists()        # refused before anything ran


def test_a_completion_never_replaces_its_own_scan(ckpt, tmp_path, capsys):
    """`complete scan.bin -o scan.bin` (or `complete d -o d/`, or through a link) replaced the scan
    with its completion, silently: refused before the model loads, the scans untouched; another
    format into the same folder is fine."""
    scans = tmp_path / "scans"
    src = write_cloud(scans / "a.bin", _scan(seed=1))
    write_cloud(scans / "b.bin", _scan(seed=2))
    (tmp_path / "link").symlink_to(scans)
    before = {f.name: f.read_bytes() for f in scans.iterdir()}
    for argv in ((src, "-o", src), (src, "-o", f"{scans}/"), (src, "-o", tmp_path / "link" / "a.bin"),
                 (scans, "-o", f"{scans}/"), (scans, "-o", tmp_path / "link")):
        assert _complete(*argv, "--checkpoint", ckpt, *FAST) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert "would be replaced by its completion" in err or "is the input scan itself" in err, err
    assert {f.name: f.read_bytes() for f in scans.iterdir()} == before
    assert _complete(scans, "-o", f"{scans}/", "--format", "npy", "--checkpoint", ckpt, *FAST) == 0
    assert sorted(f.name for f in scans.iterdir()) == ["a.bin", "a.npy", "b.bin", "b.npy"]
    assert {f.name: f.read_bytes() for f in scans.glob("*.bin")} == before


# ------------------------------------------------------------------------ 3. header counts
def _header_edit(path: Path, old: bytes, new: bytes) -> Path:
    raw = path.read_bytes()
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))
    return path


def _refused(path, *words):
    with pytest.raises(CloudFormatError) as info:
        read_cloud(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("binary", [True, False])
def test_negative_counts_are_refused_naming_the_file(tmp_path, binary):
    cloud = _scan(40)
    p = write_cloud(tmp_path / "neg.ply", cloud, binary=binary)
    _refused(_header_edit(p, b"element vertex 40\n", b"element vertex -5\n"), "element vertex -5", ">= 0")
    p = write_cloud(tmp_path / "neg.pcd", cloud, binary=binary)
    _header_edit(p, b"WIDTH 40\n", b"WIDTH -5\n")
    _refused(_header_edit(p, b"POINTS 40\n", b"POINTS -5\n"), "-5", ">= 0")
    # the same for an element before the vertices, and a count that is not a number
    p = tmp_path / "face_first.ply"
    p.write_text("ply\nformat ascii 1.0\nelement face -1\nproperty list uchar int vertex_indices\n"
                 "element vertex 1\nproperty float x\nproperty float y\nproperty float z\nend_header\n1 2 3\n")
    _refused(p, "element face -1")
    p.write_text("ply\nformat ascii 1.0\nelement vertex\nproperty float x\nend_header\n")
    _refused(p, "element NAME COUNT")


@pytest.mark.parametrize("ext", [".ply", ".pcd"])
@pytest.mark.parametrize("binary", [True, False])
def test_a_header_that_declares_fewer_points_than_the_data_is_refused(tmp_path, ext, binary):
    cloud = _scan(40)
    p = write_cloud(tmp_path / f"c{ext}", cloud, binary=binary)
    if ext == ".ply":
        _header_edit(p, b"element vertex 40\n", b"element vertex 30\n")
        _refused(p, "30 vertices", "more")
        return
    _header_edit(p, b"WIDTH 40\n", b"WIDTH 30\n")
    _refused(p, "POINTS announces 40 points", "30 x 1 = 30")  # WIDTH x HEIGHT != POINTS
    _header_edit(p, b"POINTS 40\n", b"POINTS 30\n")
    if binary:
        _refused(p, "30 points", f"{40 * 16 - 30 * 16} more than declared")
    else:
        _refused(p, "30 points", "values")                    # ascii: already checked by count


def test_data_of_elements_after_the_vertices_is_not_extra(tmp_path):
    pts = _scan(5)[:, :3]
    faces = b"3 0 1 2\n3 2 3 4\n"
    head = ("ply\nformat {fmt} 1.0\nelement vertex 5\nproperty float x\nproperty float y\nproperty float z\n"
            "element face 2\nproperty list uchar int vertex_indices\nend_header\n")
    p = tmp_path / "mesh.ply"
    p.write_bytes(head.format(fmt="ascii").encode()
                  + "".join(" ".join(f"{v:.9g}" for v in row) + "\n" for row in pts).encode() + faces)
    assert np.array_equal(read_cloud(p), pts)
    tri = np.array([(3, (0, 1, 2)), (3, (2, 3, 4))], dtype=[("n", "u1"), ("i", "<i4", (3,))])
    p.write_bytes(head.format(fmt="binary_little_endian").encode() + pts.astype("<f4").tobytes()
                  + tri.tobytes())
    assert np.array_equal(read_cloud(p), pts)
    # trailing blank lines after the vertices of an ascii PLY are harmless; a declared empty element
    # holds no data, so bytes after the vertices are extra
    p = write_cloud(tmp_path / "blank.ply", pts, binary=False)
    p.write_bytes(p.read_bytes() + b"\n\n")
    assert np.array_equal(read_cloud(p), pts)
    p.write_bytes(head.replace("face 2", "face 0").format(fmt="binary_little_endian").encode()
                  + pts.astype("<f4").tobytes() + b"\0" * 12)
    _refused(p, "5 vertices", "12 more than declared")


def test_the_page_padding_of_older_pcl_binary_pcds_is_not_extra(tmp_path):
    """PCL 1.7 stretched a binary PCD to getpagesize() + the data's size: zeros after the data up
    to one page past the header's length. Other zeros, or a longer tail, are extra data."""
    cloud = _scan(40)
    p = write_cloud(tmp_path / "pcl.pcd", cloud)
    header = p.read_bytes().index(b"DATA binary\n") + len(b"DATA binary\n")
    good = p.read_bytes()
    for page in (4096, 16384):
        p.write_bytes(good + b"\0" * (page - header))
        assert np.array_equal(read_cloud(p, xyz_only=False), cloud)
    p.write_bytes(good + b"\0" * (4096 - header - 16))         # one zero point too few for a page
    _refused(p, "40 points", "more than declared")
    p.write_bytes(good + b"\1" * (4096 - header))
    _refused(p, "40 points", "more than declared")


@pytest.mark.parametrize("ext", [".ply", ".pcd"])
def test_a_tail_shorter_than_one_point_is_not_a_missing_point(tmp_path, ext):
    """A newline some writers end a binary file with cannot be a point the header left out."""
    cloud = _scan(30)
    p = write_cloud(tmp_path / f"c{ext}", cloud)
    p.write_bytes(p.read_bytes() + b"\n")
    assert np.array_equal(read_cloud(p, xyz_only=False), cloud)


def test_a_bad_header_in_a_folder_is_reported_and_the_batch_goes_on(ckpt, tmp_path, capsys):
    scans, out = tmp_path / "scans", tmp_path / "dense"
    write_cloud(scans / "a.bin", _scan(seed=1))
    p = write_cloud(scans / "neg.ply", _scan(seed=2), binary=False)
    _header_edit(p, b"element vertex 600\n", b"element vertex -5\n")
    assert _complete(scans, "-o", out, "--checkpoint", ckpt, "--seed", "0", *FAST) == 1
    res = capsys.readouterr()
    assert "neg.ply" in res.err and "element vertex -5" in res.err and "Traceback" not in res.err
    assert "completed 1 of 2 scans" in res.out and "1 failed: neg.ply" in res.out
    assert [p.name for p in out.iterdir()] == ["a.bin"]


# ------------------------------------------------------------------------ 4. drawn seeds
def test_a_drawn_seed_can_be_passed_back(ckpt, scan_file, tmp_path, capsys):
    c = Completer.from_checkpoint(ckpt, steps=1, backend="torch", n_fps=150, tile=4)
    scan = read_cloud(scan_file)
    first = c.complete_detailed(scan)
    assert CompletionSettings(seed=first.seed).seed == first.seed      # the settings accept it
    assert BY_NAME["seed"].range[0] <= first.seed <= BY_NAME["seed"].range[1]
    assert np.array_equal(c.complete_detailed(scan, seed=first.seed).points, first.points)
    # the seed the command logs reproduces its output through --seed
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert _complete(scan_file, "-o", a, "--checkpoint", ckpt, *FAST) == 0
    seed = re.search(r"seed (\d+)\)", capsys.readouterr().out).group(1)
    assert _complete(scan_file, "-o", b, "--checkpoint", ckpt, "--seed", seed, *FAST) == 0
    assert f"seed {seed})" in capsys.readouterr().out
    assert np.array_equal(np.load(a), np.load(b))


# ------------------------------------------------------------------------ 5. nothing kept
@pytest.mark.parametrize("case", ["flat", "identical"])
def test_a_flat_scan_is_refused_before_completing(ckpt, tmp_path, capsys, case):
    # post-processing keeps points between the scan's mean height - 2 std and its highest point:
    # nothing for a scan at one height (a 2D laser scan, one point repeated)
    pts = _scan(flat=True) if case == "flat" else np.tile([[10.0, 5.0, -1.2, 0.5]], (600, 1))
    src = write_cloud(tmp_path / f"{case}.bin", pts)
    out = tmp_path / "dense.ply"
    assert _complete(src, "-o", out, "--checkpoint", ckpt, "--seed", "0", *FAST) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(src) in err
    z = "-1.7" if case == "flat" else "-1.2"
    assert "flat cloud" in err and f"one height (z = {z} m)" in err and "2D laser scan" in err
    assert not out.exists()


def test_a_flat_scan_in_a_batch_is_reported_and_skipped(ckpt, tmp_path, capsys):
    scans, out = tmp_path / "scans", tmp_path / "dense"
    write_cloud(scans / "a.bin", _scan(seed=1))
    write_cloud(scans / "flat.bin", _scan(seed=2, flat=True))
    assert _complete(scans, "-o", out, "--checkpoint", ckpt, "--seed", "0", *FAST) == 1
    res = capsys.readouterr()
    assert "flat.bin" in res.err and "flat cloud" in res.err
    assert "completed 1 of 2 scans" in res.out and "1 failed: flat.bin" in res.out
    assert [p.name for p in out.iterdir()] == ["a.bin"]


def test_devices_the_sparse_backends_do_not_run_on_are_refused(scan_file, tmp_path, capsys):
    for device in ("mps", "meta"):
        assert _complete(scan_file, "-o", tmp_path / "x.ply", "--device", device, *FAST) == 1
        err = capsys.readouterr().err
        assert "expected cpu, cuda, cuda:N or auto" in err and "Traceback" not in err


def test_options_that_do_not_apply_say_so(ckpt, scan_file, tmp_path, caplog):
    """--ascii for a binary-only format, CUDA graphs on a CPU, a refiner file with refinement off:
    accepted (they are harmless) but no longer silently ignored."""
    with caplog.at_level("INFO"):
        assert _complete(scan_file, "-o", tmp_path / "a.bin", "--ascii", "--cuda-graphs", "on",
                         "--checkpoint", ckpt, "--refiner-checkpoint", ckpt, "--no-refine", *FAST) == 0
    text = caplog.text
    assert "--ascii applies to .ply and .pcd outputs" in text
    assert "cuda_graphs on applies on CUDA only" in text
    assert "refiner checkpoint was given with refinement off" in text


# ------------------------------------------------------------------------ 6. batch failures
def test_a_write_error_or_a_model_error_skips_one_scan_and_the_batch_goes_on(ckpt, tmp_path,
                                                                              monkeypatch, capsys):
    """An OSError writing one completion (no permission, a full disk) and a RuntimeError of the
    model (out of memory) fail that scan; the scans after it are completed, the summary line is
    printed, the exit status is 1, and the message names the user's path, not a temporary one."""
    import lidar_completion.io as lio
    scans, out = tmp_path / "scans", tmp_path / "dense"
    for name in ("a", "b", "c", "d"):
        write_cloud(scans / f"{name}.bin", _scan(seed=ord(name)))
    real_write = lio.write_cloud

    def write_cloud_(path, *args, **kwargs):
        if Path(path).name == "b.bin":
            raise PermissionError(errno.EACCES, "Permission denied", f"{path}.4242.tmp")
        return real_write(path, *args, **kwargs)

    real_complete = Completer.complete_detailed

    def complete_(self, scan, *args, **kwargs):
        if len(scan) == len(_scan(seed=ord("c"))) and np.array_equal(scan, _scan(seed=ord("c"))[:, :3]):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real_complete(self, scan, *args, **kwargs)

    monkeypatch.setattr(lio, "write_cloud", write_cloud_)
    monkeypatch.setattr(Completer, "complete_detailed", complete_)
    assert _complete(scans, "-o", out, "--checkpoint", ckpt, "--seed", "0", *FAST) == 1
    res = capsys.readouterr()
    assert "completed 2 of 4 scans" in res.out and "2 failed: b.bin, c.bin" in res.out
    assert f"Permission denied: {out / 'b.bin'}" in res.err and ".tmp" not in res.err
    assert "c.bin: RuntimeError: CUDA out of memory" in res.err and "more detail" not in res.err
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "d.bin"]


def test_a_folder_where_one_completion_goes_fails_that_scan_only(ckpt, tmp_path, capsys):
    scans, out = tmp_path / "scans", tmp_path / "dense"
    for name in ("a", "b", "c"):
        write_cloud(scans / f"{name}.bin", _scan(seed=ord(name)))
    (out / "b.bin").mkdir(parents=True)
    assert _complete(scans, "-o", out, "--checkpoint", ckpt, "--seed", "0", *FAST) == 1
    res = capsys.readouterr()
    assert f"cannot write {out / 'b.bin'}: it is a folder" in res.err and ".tmp" not in res.err
    assert "completed 2 of 3 scans" in res.out and "1 failed: b.bin" in res.out


# ------------------------------------------------------------------------ 7. output paths
@pytest.mark.parametrize("case", ["folder", "parent_is_file", "render_folder"])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_model_loads(
        ckpt, scan_file, tmp_path, monkeypatch, capsys, case):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Completer, "from_settings", no_model)
    (tmp_path / "d.ply").mkdir()
    (tmp_path / "a_file.npy").write_bytes(b"x")
    (tmp_path / "r.png").mkdir()
    out, words = {
        "folder": (["-o", tmp_path / "d.ply"], f"-o {tmp_path / 'd.ply'}: exists and is a folder"),
        "parent_is_file": (["-o", tmp_path / "a_file.npy" / "x.ply"],
                           f"{tmp_path / 'a_file.npy'} is a file, not a folder"),
        "render_folder": (["-o", tmp_path / "o.ply", "--render", tmp_path / "r.png"],
                          f"--render {tmp_path / 'r.png'}: exists and is a folder"),
    }[case]
    assert _complete(scan_file, *out, "--checkpoint", ckpt, *FAST) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err and ".tmp" not in err, err


def test_an_output_ending_with_a_separator_is_a_folder(ckpt, scan_file, tmp_path, capsys):
    """`complete scan.bin -o dense/`: the folder (created) receives the completion under the
    scan's name, in the scan's format or --format's."""
    out = tmp_path / "dense"
    assert _complete(scan_file, "-o", f"{out}/", "--checkpoint", ckpt, "--seed", "0", *FAST) == 0
    assert [p.name for p in out.iterdir()] == [scan_file.name]
    assert f"-> {out / scan_file.name}" in capsys.readouterr().out
    assert _complete(scan_file, "-o", f"{out}/", "--format", "ply", "--checkpoint", ckpt, "--seed", "0",
                     *FAST) == 0
    assert np.array_equal(read_cloud(out / "scan.ply"), read_cloud(out / scan_file.name))
    # without the separator, a name without an extension is still refused (and says how)
    assert _complete(scan_file, "-o", tmp_path / "dense2", "--checkpoint", ckpt, *FAST) == 1
    assert "end -o with '/'" in capsys.readouterr().err


# ------------------------------------------------------------------------ 8. .bin layouts
def test_bin_format_xyz_reads_the_targets_build_gt_writes(ckpt, tmp_path, capsys, caplog):
    xyz = _scan(600)[:, :3]                                  # 600 points: 7200 bytes = 450 x 16
    p = tmp_path / "target.bin"
    xyz.astype("<f4").tofile(p)
    out = tmp_path / "o.npy"
    assert _complete(p, "-o", out, "--bin-format", "xyz", "--checkpoint", ckpt, "--seed", "0", *FAST) == 0
    assert "target.bin: 600 points" in capsys.readouterr().out
    # read as KITTI (the default), its "intensities" are coordinates, some of them negative
    with caplog.at_level("WARNING"):
        assert _complete(p, "-o", out, "--checkpoint", ckpt, "--seed", "0", *FAST) == 0
    assert "target.bin: 450 points" in capsys.readouterr().out
    assert "intensities are negative" in caplog.text and "--bin-format xyz" in caplog.text
    # a size that is a multiple of 12 and not of 16: the error says what to pass
    xyz[:599].astype("<f4").tofile(p)
    assert _complete(p, "-o", out, "--checkpoint", ckpt, "--seed", "0", *FAST) == 1
    err = capsys.readouterr().err
    assert "not a multiple of 16" in err and "--bin-format xyz" in err


def test_kitti_scans_raise_no_layout_warning(ckpt, tmp_path, caplog):
    """No false alarm on KITTI-like scans: those of `make-synthetic` (intensities in [0, 1])."""
    from lidar_completion.data.synthetic import generate_dataset
    generate_dataset(tmp_path / "synth", sequences=["00"], scans=1, seed=0)
    scan = next((tmp_path / "synth").rglob("velodyne/*.bin"))
    with caplog.at_level("WARNING"):
        assert _complete(scan, "-o", tmp_path / "o.npy", "--checkpoint", ckpt, "--seed", "0", *FAST) == 0
    assert "--bin-format" not in caplog.text


# ------------------------------------------------------------------------ 9. nothing kept
def test_a_tiny_fps_sample_is_blamed_not_the_scan(ckpt, scan_file, tmp_path, capsys):
    """Post-processing keeps the points inside the height band of the farthest-point sample: one
    point (--n-fps 1) has an empty band, whatever heights the scan spans."""
    fast = [a if a != "150" else "1" for a in FAST]
    assert _complete(scan_file, "-o", tmp_path / "o.ply", "--checkpoint", ckpt, "--seed", "0", *fast) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(scan_file) in err
    assert "kept no points" in err and "sample of 1 point (--n-fps 1)" in err
    assert "band is empty" in err and "a larger --n-fps" in err


def test_a_named_input_of_no_cloud_format_fails_alone(ckpt, tmp_path, capsys):
    """An input named on the command line with an unsupported extension aborted the whole batch
    before anything ran, where a bad file in a folder is reported and skipped: now it is one failed
    scan too (and a batch of nothing but such inputs is refused before the model loads)."""
    good = write_cloud(tmp_path / "a.bin", _scan(seed=1))
    odd = tmp_path / "b.xyz"
    odd.write_text("1 2 3\n")
    out = tmp_path / "dense"
    assert _complete(good, odd, "-o", out, "--checkpoint", ckpt, "--seed", "0", *FAST) == 1
    res = capsys.readouterr()
    assert "b.xyz: unsupported extension '.xyz'" in res.err and "Traceback" not in res.err
    assert "completed 1 of 2 scans" in res.out and "1 failed: b.xyz" in res.out
    assert [p.name for p in out.iterdir()] == ["a.bin"]
    assert _complete(odd, tmp_path / "c.txt", "-o", tmp_path / "none", "--checkpoint", ckpt, *FAST) == 1
    assert "unsupported extension" in capsys.readouterr().err and not (tmp_path / "none").exists()
