"""The node's plain-Python pieces: mailbox, throttle, statistics, parameter checks, Fast DDS set-up."""
import math
import os
import subprocess
import sys
import threading

import pytest

from lidar_completion_pkg import dds
from lidar_completion_pkg.parameters import BY_NAME, DYNAMIC, PARAMETERS, check_value, default_values
from lidar_completion_pkg.stats import ERROR, OK, WARN, Mailbox, Stats, Throttle, diagnostic_summary


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_mailbox_keeps_only_the_newest():
    box = Mailbox()
    assert box.put(1) is False
    assert box.put(2) is True and box.put(3) is True  # 1 and 2 displaced
    assert box.get(0) == 3
    assert box.get(0.01) is None
    got = []
    t = threading.Thread(target=lambda: got.append(box.get(5)))
    t.start()
    box.put(4)
    t.join(5)
    assert got == [4]
    box.close()
    assert box.get(5) is None  # returns at once when closed


def test_throttle_per_key_counts_suppressed():
    clock = FakeClock()
    th = Throttle(5.0, clock)
    assert th("a") == 0 and th("b") == 0
    assert th("a") is None and th("a") is None
    clock.t += 5.1
    assert th("a") == 2 and th("b") == 0


def test_stats_percentiles_rates_and_summary():
    clock = FakeClock()
    st = Stats(clock=clock, rate_window_s=5.0)
    for i in range(11):  # 10 Hz input for one second
        t_in = st.note_input()
        clock.t += 0.05
        st.note_published(t_in, 0.04)
        clock.t += 0.05
    st.note_dropped(3)
    st.note_rejected("truncated", "truncated PointCloud2: ...")
    snap = st.snapshot()
    assert snap["received"] == 11 and snap["processed"] == 11 and snap["dropped"] == 3
    assert math.isclose(snap["latency_p50_ms"], 50.0, rel_tol=1e-6)
    assert math.isclose(snap["input_rate_hz"], 10 / 1.1, rel_tol=1e-6)
    level, message, values = diagnostic_summary(snap)
    kv = dict(values)
    assert level == WARN and "truncated" in message
    assert kv["dropped"] == "3" and kv["rejected"] == "1" and kv["count.truncated"] == "1"
    assert kv["latency_p95_ms"] == "50.000"
    level, _, _ = diagnostic_summary(st.snapshot())  # problems are reported once
    assert level == OK
    assert diagnostic_summary(st.snapshot(), worker_alive=False)[0] == ERROR
    clock.t += 60
    assert st.snapshot()["input_rate_hz"] == 0.0  # decays when the input stops


def test_parameter_table_checks():
    assert len({p.name for p in PARAMETERS}) == len(PARAMETERS)
    assert set(DYNAMIC) == {"steps", "guidance"}
    for name, value in default_values().items():
        assert check_value(name, value) is None
    assert "steps must satisfy" in check_value("steps", 500)
    assert "type integer" in check_value("steps", 2.5)
    assert "type integer" in check_value("steps", True)
    assert check_value("steps", 0) is None and "at run time" in check_value("steps", 0, runtime=True)
    assert "at run time" in check_value("guidance", -1.0, runtime=True)
    assert check_value("guidance", 4) is None  # ints are fine for doubles
    assert "one of" in check_value("qos_reliability", "sometimes")
    assert "unknown parameter" in check_value("stepz", 1)
    for p in PARAMETERS:
        assert p.description and p.type in ("string", "integer", "double", "bool")
        assert (p.range is None) or p.type in ("integer", "double")
    assert BY_NAME["input_topic"].default == "/velodyne_points"
    assert BY_NAME["output_topic"].default == "/completed_points"


def test_configure_environment_sets_the_shipped_profile(monkeypatch):
    monkeypatch.setattr(dds, "shm_free_bytes", lambda directory=dds.SHM_DIR: 2**30)
    env, warnings = {}, []
    assert dds.configure_environment(env, warnings.append) == dds.profile_path()
    assert env[dds.PROFILE_ENV] == dds.profile_path() and warnings == []


def test_configure_environment_keeps_the_users_profile(tmp_path):
    mine = tmp_path / "mine.xml"
    mine.write_text("<dds/>")
    env, warnings = {dds.PROFILE_ENV: str(mine)}, []
    assert dds.configure_environment(env, warnings.append) == str(mine)
    assert env[dds.PROFILE_ENV] == str(mine) and warnings == []
    env = {dds.PROFILE_ENV: str(tmp_path / "missing.xml")}
    dds.configure_environment(env, warnings.append)
    assert len(warnings) == 1 and "does not exist" in warnings[0]


def test_configure_environment_other_rmw_untouched():
    env = {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}
    assert dds.configure_environment(env, print) is None and dds.PROFILE_ENV not in env


def test_configure_environment_warns_when_shared_memory_is_short(monkeypatch):
    monkeypatch.setattr(dds, "shm_free_bytes", lambda directory=dds.SHM_DIR: 8 * 2**20)
    env, warnings = {}, []
    assert dds.configure_environment(env, warnings.append) == dds.profile_path()
    assert len(warnings) == 1 and "8.0 MiB free" in warnings[0] and "--shm-size" in warnings[0]
    monkeypatch.setattr(dds, "shm_free_bytes", lambda directory=dds.SHM_DIR: None)
    warnings.clear()
    dds.configure_environment({}, warnings.append)
    assert "does not exist" in warnings[0]


def test_console_entry_point_help_lists_every_parameter():
    proc = subprocess.run([sys.executable, "-m", "lidar_completion_pkg.completion_node", "--help"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    for p in PARAMETERS:
        assert f" {p.name} (" in proc.stdout
    assert dds.PROFILE_ENV in proc.stdout


def test_node_module_imports_no_ros_until_used():
    code = ("import sys, lidar_completion_pkg.completion_node, lidar_completion_pkg.parameters, "
            "lidar_completion_pkg.dds, lidar_completion.pointcloud2; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('rclpy', 'sensor_msgs', 'std_msgs', 'diagnostic_msgs')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_completer_factory_takes_the_process_from_the_checkpoint_or_the_parameter(tmp_path):
    from lidar_completion.checkpoints import make_random_checkpoint
    from lidar_completion_pkg.completion_node import default_completer_factory

    ckpt = make_random_checkpoint(tmp_path / "c.pt", sampling={"steps": 2, "guidance": 1.0, "process": "local"})
    config = dict(default_values(), checkpoint=str(ckpt), backend="torch")
    assert BY_NAME["process"].default == "" and check_value("process", "ve") is not None
    assert default_completer_factory(config).process == "local"          # '' = the checkpoint's
    assert default_completer_factory(dict(config, process="vp")).process == "vp"
