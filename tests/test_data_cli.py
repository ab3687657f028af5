"""`lidar-completion make-synthetic` and `build-gt`."""
import json

import pytest

from lidar_completion import cli
from lidar_completion.data import kitti


def test_help_texts(capsys):
    for cmd in ("make-synthetic", "build-gt"):
        with pytest.raises(SystemExit) as exc:
            cli.main([cmd, "--help"])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "HDL-64E" in out and "--first-sequence" in out and "--azimuth-steps" in out
    assert "resumes an interrupted build" in out and "--out DIR" in out


def test_make_synthetic_then_build_gt(tmp_path, capsys):
    out = tmp_path / "synth"
    rc = cli.main(["make-synthetic", str(out), "--sequences", "2", "--scans", "3", "--seed", "4",
                   "--first-sequence", "7", "--azimuth-steps", "256", "--no-progress"])
    assert rc == 0
    assert kitti.list_sequences(out) == ["07", "08"]
    assert "wrote 2 sequence(s) (07, 08) x 3 scans" in capsys.readouterr().out
    seq = kitti.SemanticKittiSequence(out, "08", require_labels=True)
    assert len(seq) == 3

    rc = cli.main(["build-gt", str(out), "--sequences", "07", "8", "--out", str(tmp_path / "gt")])
    assert rc == 0
    text = capsys.readouterr()
    assert "sequence 07: 3 frames, built 3" in text.out and "sequence 08" in text.out
    assert "build-gt 07" in text.err  # the tqdm progress bar
    manifest = json.loads((tmp_path / "gt" / "08" / "manifest.json").read_text())
    assert len(manifest["frames"]) == 3 and manifest["map"]["points"] > 1000
    assert all(len(f["sha256"]) == 64 for f in manifest["frames"])
    # a second run only verifies
    rc = cli.main(["build-gt", str(out), "--sequences", "07", "--out", str(tmp_path / "gt"),
                   "--no-progress"])
    assert rc == 0 and "cache complete and verified" in capsys.readouterr().out
    # default: every labelled sequence, cache under DATASET_ROOT/gt_cache
    rc = cli.main(["build-gt", str(out), "--no-progress", "--verify", "size"])
    assert rc == 0 and (out / "gt_cache" / "07" / "manifest.json").is_file()
    assert (out / "gt_cache" / "08" / "manifest.json").is_file()


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["build-gt", str(tmp_path / "missing"), "--sequences", "00"]) == 1
    assert "error: " in capsys.readouterr().err
    assert cli.main(["make-synthetic", str(tmp_path / "x"), "--scans", "0"]) == 1
    assert "--scans must be >= 1" in capsys.readouterr().err
    assert cli.main(["make-synthetic", str(tmp_path / "x"), "--sequences", "3",
                     "--first-sequence", "98"]) == 1
    assert "00..99" in capsys.readouterr().err
    assert cli.main(["make-synthetic", str(tmp_path / "x"), "--azimuth-steps", "8"]) == 1
    assert "azimuth_steps" in capsys.readouterr().err
    root = tmp_path / "synth"
    assert cli.main(["make-synthetic", str(root), "--scans", "1", "--azimuth-steps", "128",
                     "--no-progress"]) == 0
    assert cli.main(["build-gt", str(root), "--sequences", "03", "--no-progress"]) == 1
    assert "sequence 03 not found" in capsys.readouterr().err


def test_make_synthetic_never_writes_over_an_existing_sequence(tmp_path, capsys):
    """A second generation into the same sequence (fewer scans, another seed) would leave scans,
    labels and poses of two generations, or replace a real dataset's: refused, files untouched."""
    root = tmp_path / "synth"
    assert cli.main(["make-synthetic", str(root), "--scans", "2", "--azimuth-steps", "128", "--no-progress"]) == 0
    before = {p: p.read_bytes() for p in sorted((root / "sequences").rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert cli.main(["make-synthetic", str(root), "--scans", "1", "--seed", "5", "--azimuth-steps", "128",
                     "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already holds sequence(s) 00" in err
    assert {p: p.read_bytes() for p in sorted((root / "sequences").rglob("*")) if p.is_file()} == before
    assert cli.main(["make-synthetic", str(root), "--scans", "1", "--first-sequence", "1",
                     "--azimuth-steps", "128", "--no-progress"]) == 0     # another sequence of the root
    assert cli.main(["make-synthetic", str(root), "--seed", "-1"]) == 1
    assert "--seed must be >= 0" in capsys.readouterr().err


def test_file_system_refusals_are_one_line_errors(tmp_path, capsys):
    """What the file system refuses (here: a root below a file) is reported like the commands' own
    errors - one line naming the path, exit 1 - not as a traceback."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["make-synthetic", str(afile), "--scans", "1", "--azimuth-steps", "128", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(afile) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
