"""`python -m lidar_completion_pkg.replay`: what it cannot use is refused before the node starts and
the bag plays, and an events file that cannot be written is one error line, not a traceback."""
import json
import os
from pathlib import Path

import pytest

from lidar_completion_pkg import replay

UNWRITABLE = Path("/proc")     # no one creates files here, root included


@pytest.fixture
def no_replay(monkeypatch):
    """Playing the bag (or starting rclpy, a node) fails the test; the process-wide settings main()
    makes (signal handlers, the DDS environment) are left out."""
    def run(self):
        raise AssertionError("the replay ran")

    monkeypatch.setattr(replay.Replay, "run", run)
    monkeypatch.setattr(replay.signal, "signal", lambda *args: None)
    monkeypatch.setattr("lidar_completion_pkg.dds.configure_environment", lambda *args, **kw: None)


@pytest.mark.parametrize("argv, words", [
    (["--rate", "nan"], "--rate must be a finite number > 0, found nan"),
    (["--rate", "inf"], "--rate must be a finite number > 0, found inf"),
    (["--rate", "0"], "--rate must be a finite number > 0, found 0.0"),
    (["--limit", "-1"], "--limit must be >= 1, found -1"),
    (["--limit", "0"], "--limit must be >= 1, found 0"),
    (["--ready-timeout", "-1"], "--ready-timeout must be a finite number of seconds >= 0"),
    (["--drain-timeout", "nan"], "--drain-timeout must be a finite number of seconds >= 0"),
    (["--busy-timeout", "inf"], "--busy-timeout must be a finite number of seconds >= 0"),
    (["--memory-interval", "0"], "--memory-interval must be a finite number of seconds > 0"),
])
def test_values_out_of_range_are_refused_before_the_replay(tmp_path, capsys, no_replay, argv, words):
    """--limit -1 played nothing and exited 0; --rate nan was taken (nan slips through "rate <= 0")."""
    events = tmp_path / "e.json"
    assert replay.main(["bag", "--events", str(events), "--no-node", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {words}" or err.startswith(f"error: {words}"), err
    assert "\n" not in err and not events.exists()


@pytest.mark.parametrize("case", ["folder", "unwritable"])
def test_an_events_path_that_cannot_be_written_is_refused_before_the_replay(tmp_path, capsys,
                                                                           no_replay, case):
    """--events on a folder, or in a read-only one, ran the whole replay and then failed with a
    traceback (IsADirectoryError, PermissionError), losing what it measured."""
    if case == "unwritable" and not (UNWRITABLE / "self").exists():
        pytest.skip("needs Linux's /proc")
    events = {"folder": tmp_path, "unwritable": UNWRITABLE / "e.json"}[case]
    assert replay.main(["bag", "--events", str(events), "--no-node"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --events {events}: ") and "\n" not in err, err
    assert ("is a folder" if case == "folder" else f"cannot create files in {UNWRITABLE}") in err


def test_an_events_file_that_fails_at_the_end_is_one_error_line(tmp_path, capsys, monkeypatch,
                                                                no_replay):
    """The folder of --events replaced by a file during the replay: one line, exit status 1."""
    events = tmp_path / "out" / "e.json"

    def run(self):
        (tmp_path / "out").write_text("in the way")     # mkdir of the events' folder now fails

    monkeypatch.setattr(replay.Replay, "run", run)
    assert replay.main(["bag", "--events", str(events), "--no-node"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write the events (--events {events}): ") and "\n" not in err, err


def test_valid_values_reach_the_replay(tmp_path, monkeypatch, no_replay):
    ran = []
    monkeypatch.setattr(replay.Replay, "run", lambda self: ran.append(True))
    events = tmp_path / "new" / "e.json"
    assert replay.main(["bag", "--events", str(events), "--no-node", "--limit", "1", "--rate", "2",
                        "--ready-timeout", "0"]) == 0
    assert ran and json.loads(events.read_text())["error"] is None


def test_the_launch_files_player_without_a_record_passes_the_checks(monkeypatch):
    """The launch file runs this player with --events /dev/null (no record kept): the writability
    check of the events' folder must not refuse it where /dev takes no new files (a non-root user,
    as the check says for /dev here; root may create files there)."""
    import lidar_completion.cli as cli

    monkeypatch.setattr(cli, "unwritable_folder", lambda folder: f"cannot create files in {folder}")
    args = replay.build_parser().parse_args(["bag", "--no-node", "--events", os.devnull])
    assert replay._check_args(args) is None
    other = replay.build_parser().parse_args(["bag", "--no-node", "--events", "/dev/e.json"])
    assert "cannot create files in /dev" in replay._check_args(other)
