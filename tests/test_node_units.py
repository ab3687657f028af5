"""The node's plain-Python pieces: mailbox, throttle, statistics and diagnostics, parameter checks,
Fast DDS set-up, the TF buffer (against transforms3d's rotations), the ament layout of the venv."""
import contextlib
import math
import os
import subprocess
import sys
import threading
import time
import warnings as warnings_module
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

import ros_support as rs
from lidar_completion_pkg import dds
from lidar_completion_pkg.parameters import BY_NAME, DYNAMIC, PARAMETERS, check_value, default_values
from lidar_completion_pkg.stats import ERROR, OK, WARN, Mailbox, Stats, Throttle, diagnostic_summary

ROOT = Path(__file__).resolve().parents[1]


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
    # counted once, but WARN until a completion is published again: a problem recurring slower
    # than the report period (every scan failing on a CPU) read OK in most reports
    level, message, _ = diagnostic_summary(st.snapshot())
    assert level == WARN and "no completion published since" in message and "truncated" in message
    t_in = st.note_input()
    st.note_published(t_in, 0.04)
    level, message, _ = diagnostic_summary(st.snapshot())
    assert level == OK and message == "ready, completing"
    assert diagnostic_summary(st.snapshot(), worker_alive=False)[0] == ERROR
    clock.t += 60
    snap = st.snapshot()
    assert snap["input_rate_hz"] == 0.0  # decays when the input stops
    level, message, values = diagnostic_summary(snap)
    assert level == OK and message == "ready, no cloud for 60 s"
    assert dict(values)["last_input_age_s"] == "60.000"
    # a drop, then the sensor stops (a bag's end): WARN while clouds come, then idle at OK
    st.note_input()
    st.note_rejected("truncated", "truncated PointCloud2: ...")
    st.snapshot()
    assert diagnostic_summary(st.snapshot())[0] == WARN
    clock.t += 6
    level, message, _ = diagnostic_summary(st.snapshot())
    assert level == OK and message == "ready, no cloud for 6 s"


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
    assert "one of" in check_value("output_qos_reliability", "sometimes")
    assert "unknown parameter" in check_value("stepz", 1)
    for p in PARAMETERS:
        assert p.description and p.type in ("string", "integer", "double", "bool")
        assert (p.range is None) or p.type in ("integer", "double")
    # relative, so that a node in a namespace has topics of its own (at the root: /velodyne_points)
    assert BY_NAME["input_topic"].default == "velodyne_points"
    assert BY_NAME["output_topic"].default == "completed_points"


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


def test_console_entry_point_refuses_arguments_outside_ros_args_and_says_its_version():
    """`lidar-completion-node -p steps:=4` (no --ros-args) and `--version` started the node (load and
    warm-up: a minute on a CPU) with its default settings; refused at once now, exit status 2."""
    from lidar_completion import __version__

    def run(*args):
        return subprocess.run([sys.executable, "-m", "lidar_completion_pkg.completion_node", *args],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})

    proc = run("-p", "steps:=4")
    assert proc.returncode == 2 and "unknown argument(s) -p steps:=4" in proc.stderr, proc.stderr
    assert "--ros-args" in proc.stderr
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"completion_node {__version__}", proc.stdout


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


def test_diagnostics_report_state_readiness_and_both_latencies():
    from lidar_completion_pkg.stats import ACTIVE, INACTIVE, UNCONFIGURED, WARMING_UP

    clock = FakeClock()
    st = Stats(clock=clock)
    level, message, values = diagnostic_summary(st.snapshot(), None, WARMING_UP)
    kv = dict(values)
    assert level == OK and "warming up" in message and kv["ready"] == "false"
    assert kv["state"] == WARMING_UP
    for state in (UNCONFIGURED, INACTIVE):
        level, message, values = diagnostic_summary(st.snapshot(), None, state)
        assert level == OK and state in message and dict(values)["ready"] == "false"
    level, message, values = diagnostic_summary(st.snapshot(), True, ACTIVE)
    assert message == "ready, waiting for clouds" and dict(values)["ready"] == "true"
    t_in = st.note_input()
    clock.t += 0.25
    st.note_published(t_in, 0.2, stamp_age_s=0.4)  # the cloud was stamped 0.15 s before receipt
    st.note_no_transform("tf_stale", "transform odom -> base_link is not known at ...")
    level, message, values = diagnostic_summary(st.snapshot(), True, ACTIVE)
    kv = dict(values)
    assert level == WARN and "untransformable" in message and "odom -> base_link" in message
    assert kv["latency_p50_ms"] == "250.000" and kv["stamp_latency_p50_ms"] == "400.000"
    assert kv["no_transform"] == "1" and kv["count.tf_stale"] == "1"


def test_warmup_cloud_lies_within_the_limits():
    from lidar_completion_pkg.pipeline import WARMUP_POINTS, warmup_cloud

    for lo, hi in ((3.5, 50.0), (1.0, 10.0), (20.0, 80.0)):
        pts = warmup_cloud(min_range=lo, max_range=hi)
        r = np.linalg.norm(pts, axis=1)
        assert pts.shape == (WARMUP_POINTS, 3) and pts.dtype == np.float32
        assert (r > lo).all() and (r < hi).all()


def _fake_node(warnings: list, now_ns: int = 0):
    """What CompletionPipeline asks of its node: publishers (none), parameters, a logger whose
    warnings go to ``warnings``, a clock that reads ``now_ns``."""
    return NS(create_publisher=lambda *a, **k: None, set_parameters=lambda params: None,
              get_logger=lambda: NS(info=lambda m: None, warning=warnings.append),
              get_clock=lambda: NS(now=lambda: NS(nanoseconds=now_ns)),
              get_name=lambda: "lidar_completion", get_fully_qualified_name=lambda: "/lidar_completion")


def _loaded_pipeline(completer, warnings: list, now_ns: int = 0):
    """A CompletionPipeline on a fake node (warnings into ``warnings``) with ``completer`` loaded and
    its publisher replaced: (pipeline, the list of published messages)."""
    from lidar_completion_pkg import pipeline as P

    sent = []
    pipe = P.CompletionPipeline(_fake_node(warnings, now_ns=now_ns), default_values())
    pipe.load(lambda config: completer)
    pipe.pub = NS(publish=sent.append)
    return pipe, sent


def test_load_and_warm_up_run_apart_from_the_thread_that_builds_the_node():
    """The checkpoint is loaded and the warm-up scan completed in passing threads of their own
    (pipeline.run_apart: no OpenMP pool is left in the node's main thread), and what fails there
    still reaches the caller: a load error as StartupError, a warm-up error as a warning."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion_pkg import pipeline as P

    seen, warnings = [], []

    class Fake:
        steps, guidance = 8, 2.0

        def complete(self, pts):
            seen.append(("complete", threading.current_thread()))
            if len(seen) > 2:
                raise RuntimeError("out of memory")
            return pts

    def factory(config):
        seen.append(("load", threading.current_thread()))
        return Fake()

    pipe = P.CompletionPipeline(_fake_node(warnings), default_values())
    pipe.load(factory)
    assert pipe.warm_up() is not None and pipe.warmup_s > 0
    assert [what for what, _ in seen] == ["load", "complete"]
    for _, thread in seen:
        assert thread is not threading.current_thread() and thread.name == "completion-setup"
        assert not thread.is_alive()
    # a failing warm-up: reported, not raised; a failing load: StartupError naming the cause
    assert pipe.warm_up() is None and "out of memory" in warnings[-1]

    def broken(config):
        raise FileNotFoundError("student.pt is missing")

    with pytest.raises(P.StartupError, match="student.pt is missing"):
        pipe.load(broken)
    assert P.run_apart(sum, [1, 2, 3]) == 6


# ------------------------------------------------------------------------------ frames (no rclpy)
def _ts(parent, child, matrix, t_ns=0):
    x, y, z, w = rs.quaternion_xyzw(matrix)
    sec, nanosec = divmod(int(t_ns), 10**9)
    return NS(header=NS(frame_id=parent, stamp=NS(sec=sec, nanosec=nanosec)), child_frame_id=child,
              transform=NS(translation=NS(x=matrix[0, 3], y=matrix[1, 3], z=matrix[2, 3]),
                           rotation=NS(x=x, y=y, z=z, w=w)))


def test_transform_buffer_chains_static_transforms_like_tf2():
    from lidar_completion_pkg import frames

    euler_matrix, translation_matrix, inverse_matrix = rs.euler_matrix, rs.translation_matrix, np.linalg.inv

    buf = frames.TransformBuffer()
    map_a = translation_matrix((10.0, -2.0, 0.5))
    a_b = translation_matrix((0.3, 0.0, 1.7)) @ euler_matrix(0.2, -0.4, 2.0)
    map_c = euler_matrix(0.0, 0.0, -1.0)
    for parent, child, m in (("map", "a", map_a), ("a", "b", a_b), ("/map", "c", map_c)):
        buf.set_transform(_ts(parent, child, m), static=True)
    np.testing.assert_allclose(buf.lookup_now("map", "b", 5), map_a @ a_b, atol=1e-12)
    np.testing.assert_allclose(buf.lookup_now("b", "map", 5), inverse_matrix(map_a @ a_b), atol=1e-12)
    # through the common ancestor: c <- b = inv(map <- c) @ (map <- b)
    np.testing.assert_allclose(buf.lookup_now("c", "b", 0), inverse_matrix(map_c) @ map_a @ a_b,
                               atol=1e-12)
    np.testing.assert_array_equal(buf.lookup_now("b", "/b", 1), np.eye(4))
    with pytest.raises(frames.TransformUnavailable, match="no transform from 'nowhere' to 'map'.*"
                                                          "frames known: a, b, c, map") as err:
        buf.lookup_now("map", "nowhere", 1)
    assert err.value.reason == frames.MISSING
    pts = np.array([[1.0, 2.0, 3.0], [-4.0, 0.5, 0.0]], np.float32)
    expected = (map_a @ a_b @ np.c_[pts, np.ones(2)].T).T[:, :3]
    np.testing.assert_allclose(frames.apply(buf.lookup_now("map", "b", 0), pts), expected, atol=1e-5)


def test_transform_buffer_interpolates_and_never_extrapolates():
    from lidar_completion_pkg import frames

    euler_matrix, translation_matrix = rs.euler_matrix, rs.translation_matrix

    buf = frames.TransformBuffer(cache_time=10.0)
    s = 10**9
    buf.set_transform(_ts("odom", "base", np.eye(4), 1 * s), static=False)
    buf.set_transform(_ts("odom", "base", translation_matrix((2.0, 0, 0)) @ euler_matrix(0, 0, np.pi / 2),
                          2 * s), static=False)
    half = buf.lookup_now("odom", "base", int(1.5 * s))
    np.testing.assert_allclose(half, translation_matrix((1.0, 0, 0)) @ euler_matrix(0, 0, np.pi / 4),
                               atol=1e-12)
    np.testing.assert_allclose(buf.lookup_now("odom", "base", 0)[:3, 3], (2.0, 0, 0))  # 0 = latest
    for t, words in ((3 * s, "newest is 1.000 s older than the cloud"),
                     (s // 2, "oldest kept is 0.500 s newer than the cloud")):
        with pytest.raises(frames.TransformUnavailable, match=words) as err:
            buf.lookup_now("odom", "base", t)
        assert err.value.reason == frames.STALE
    buf.set_transform(_ts("odom", "base", np.eye(4), 20 * s), static=False)  # 1 s and 2 s age out
    with pytest.raises(frames.TransformUnavailable):
        buf.lookup_now("odom", "base", int(1.5 * s))


def test_transform_buffer_stamp_zero_is_the_latest_common_time_like_tf2():
    """Stamp 0 takes every transform of the path at one time, the newest that all of them have
    reached (tf2's latest common time), not each at its own newest sample."""
    from lidar_completion_pkg import frames

    s = 10**9
    buf = frames.TransformBuffer()
    for t, x in ((1, 0.0), (3, 4.0)):               # map -> odom: newest at 3 s
        buf.set_transform(_ts("map", "odom", rs.translation_matrix((x, 0, 0)), t * s), static=False)
    for t, y in ((1, 0.0), (2, 1.0)):               # odom -> base: newest at 2 s
        buf.set_transform(_ts("odom", "base", rs.translation_matrix((0, y, 0)), t * s), static=False)
    buf.set_transform(_ts("base", "lidar", rs.translation_matrix((0, 0, 2.0))), static=True)
    at_two = buf.lookup_now("map", "lidar", 2 * s)
    np.testing.assert_allclose(at_two[:3, 3], (2.0, 1.0, 2.0))          # odom interpolated at 2 s
    np.testing.assert_allclose(buf.lookup_now("map", "lidar", 0), at_two)
    np.testing.assert_allclose(buf.lookup_now("lidar", "map", 0), np.linalg.inv(at_two), atol=1e-12)
    # a static path has no time: stamp 0 is simply its transform
    np.testing.assert_allclose(buf.lookup_now("base", "lidar", 0)[:3, 3], (0, 0, 2.0))


def test_transform_buffer_mixes_static_and_dynamic_frames_as_tf2_does():
    """A frame on /tf_static that later comes on /tf too: the newer message wins and the frame stays
    static (time-independent); a dynamic frame that comes on /tf_static becomes static."""
    from lidar_completion_pkg import frames

    s = 10**9
    buf = frames.TransformBuffer()
    buf.set_transform(_ts("base", "lidar", rs.translation_matrix((0, 0, 1.0))), static=True)
    buf.set_transform(_ts("base", "lidar", rs.translation_matrix((0, 0, 2.0)), 5 * s), static=False)
    for t in (0, 1 * s, 99 * s):
        np.testing.assert_allclose(buf.lookup_now("base", "lidar", t)[:3, 3], (0, 0, 2.0))
    buf.set_transform(_ts("odom", "base", rs.translation_matrix((1.0, 0, 0)), 1 * s), static=False)
    buf.set_transform(_ts("odom", "base", rs.translation_matrix((3.0, 0, 0))), static=True)
    for t in (0, 1 * s, 99 * s):
        np.testing.assert_allclose(buf.lookup_now("odom", "base", t)[:3, 3], (3.0, 0, 0))


def test_transform_buffer_keeps_the_history_of_a_reparented_frame_as_tf2_does():
    """A frame re-parented (base under odom_a until 2 s, then under odom_b): each sample keeps the
    parent it came with, so a cloud stamped before the switch is transformed through the tree of its
    time (the history used to be dropped: tf_stale for every scan still in flight); between two
    samples of different parents the older one is taken, not interpolated (tf2's rule)."""
    from lidar_completion_pkg import frames

    s, T = 10**9, rs.translation_matrix
    buf = frames.TransformBuffer()
    buf.set_transform(_ts("map", "odom_a", T((0, 0, 0))), static=True)
    buf.set_transform(_ts("map", "odom_b", T((0, 100.0, 0))), static=True)
    for t, x in ((1, 1.0), (2, 2.0)):
        buf.set_transform(_ts("odom_a", "base", T((x, 0, 0)), t * s), static=False)
    for t, x in ((3, 10.0), (4, 20.0)):
        buf.set_transform(_ts("odom_b", "base", T((x, 0, 0)), t * s), static=False)
    for t, want in ((1.5, (1.5, 0, 0)), (2.0, (2.0, 0, 0)), (2.5, (2.0, 0, 0)), (3.0, (10.0, 100.0, 0)),
                    (3.5, (15.0, 100.0, 0)), (0, (20.0, 100.0, 0))):
        np.testing.assert_allclose(buf.lookup_now("map", "base", int(t * s))[:3, 3], want, err_msg=str(t))
    # odom_a <- base: the direct edge at 1.5 s; at 3.5 s the path runs through odom_b and map
    np.testing.assert_allclose(buf.lookup_now("odom_a", "base", int(1.5 * s))[:3, 3], (1.5, 0, 0))
    np.testing.assert_allclose(buf.lookup_now("odom_a", "base", int(3.5 * s))[:3, 3], (15.0, 100.0, 0))
    with pytest.raises(frames.TransformUnavailable, match="not known at") as err:
        buf.lookup_now("map", "base", int(0.5 * s))
    assert err.value.reason == frames.STALE


def test_transform_buffer_lookup_waits_for_a_late_transform():
    from lidar_completion_pkg import frames

    buf = frames.TransformBuffer()
    timer = threading.Timer(0.1, lambda: buf.set_transform(_ts("map", "late", np.eye(4)), static=True))
    timer.start()
    try:
        np.testing.assert_array_equal(buf.lookup("map", "late", 7, timeout=5.0), np.eye(4))
    finally:
        timer.cancel()
    with pytest.raises(frames.TransformUnavailable):
        buf.lookup("map", "never", 7, timeout=0.05)


# ------------------------------------------------------------------------- ament layout of the venv
def test_ament_install_lays_the_package_out_in_a_prefix(tmp_path):
    from lidar_completion_pkg import ament_install as ai

    prefix, bin_dir = tmp_path / "prefix", tmp_path / "prefix" / "bin"
    bin_dir.mkdir(parents=True)
    for exe in ai.EXECUTABLES:
        (bin_dir / exe).write_text("#!/bin/sh\necho node\n")
        (bin_dir / exe).chmod(0o755)
    site = tmp_path / "site"
    assert ai.install(prefix, site_packages=site) == []
    assert (prefix / "share/ament_index/resource_index/packages" / ai.PACKAGE).is_file()
    share = prefix / "share" / ai.PACKAGE
    assert (share / "package.xml").resolve() == (ROOT / "lidar_completion_pkg" / "package.xml").resolve()
    launch = share / "launch"
    assert launch.is_dir() and not launch.is_symlink()  # ros2 launch does not search linked dirs
    assert (launch / "completion.launch.py").resolve() == (ROOT / "launch" / "completion.launch.py")
    assert (launch / "params" / "completion.yaml").is_file()
    for exe in ai.EXECUTABLES:
        link = prefix / "lib" / ai.PACKAGE / exe
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert subprocess.run([str(link)], capture_output=True, text=True).stdout == "node\n"
    assert ai.install(prefix, site_packages=site) == []  # idempotent
    # the .pth puts sys.prefix on AMENT_PREFIX_PATH, once, after what is sourced (a colcon overlay
    # of this package found the launch files of the venv's copy before)
    code = ("import os, sys; exec(open(sys.argv[1]).read()); "
            "print(os.environ['AMENT_PREFIX_PATH'] == os.pathsep.join(['/opt/ros/x', sys.prefix]))")
    for start in ("/opt/ros/x", os.pathsep.join(["/opt/ros/x", sys.prefix])):
        out = subprocess.run([sys.executable, "-c", code, str(site / ai.PTH_NAME)], text=True,
                             capture_output=True, env={**os.environ, "AMENT_PREFIX_PATH": start}).stdout
        assert out.strip() == "True", (start, out)
    (bin_dir / ai.EXECUTABLES[0]).unlink()
    assert "console script" in ai.install(prefix, site_packages=site)[0]


def test_the_venv_is_an_ament_prefix_for_the_package():
    """What `make setup` did: `ros2 pkg` finds the executables, with no environment set up by hand."""
    rs.require("ament_index_python", executables=("ros2",))
    env = {k: v for k, v in os.environ.items() if k != "AMENT_PREFIX_PATH"}
    proc = subprocess.run([str(rs.BIN / "ros2"), "pkg", "executables", "lidar_completion_pkg"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["lidar_completion_pkg", "completion_node", "lidar_completion_pkg",
                                   "lifecycle_completion_node", "lidar_completion_pkg", "play_when_ready"]


def test_frames_without_the_transform_packages_say_what_to_do(monkeypatch):
    """tf2_msgs is not on PyPI: asking for frames without it is one clear error (what is missing,
    where it comes from, how to run without frames), not a traceback. tf_transformations is not
    needed (the rotations are scipy's)."""
    from lidar_completion_pkg import frames
    monkeypatch.setitem(sys.modules, "tf_transformations", None)
    monkeypatch.setitem(sys.modules, "tf2_msgs", None)           # import tf2_msgs -> ImportError
    assert frames.missing_transform_packages() == ["tf2_msgs"]
    with pytest.raises(frames.FramesUnavailable) as info:
        frames.make_frames(node=None)
    msg = str(info.value)
    assert "need tf2_msgs, which is not installed" in msg and "not on PyPI" in msg, msg
    assert "make setup" in msg and "docs/ros2.md" in msg and "empty" in msg, msg


def test_transform_buffer_ignores_what_tf2_refuses():
    """Like tf2's buffer: a transform with a NaN or a quaternion that is not of unit length is ignored
    (it used to be normalised, a zero quaternion taken as no rotation), and a lookup that fails for
    want of it says that transforms were ignored and why."""
    from lidar_completion_pkg import frames

    buf = frames.TransformBuffer()
    good = _ts("map", "base", rs.translation_matrix((1.0, 2.0, 3.0)))
    buf.set_transform(good, static=True)
    zero = _ts("map", "lidar", np.eye(4))
    zero.transform.rotation = NS(x=0.0, y=0.0, z=0.0, w=0.0)
    nan = _ts("map", "cam", np.eye(4))
    nan.transform.translation.x = float("nan")
    long = _ts("map", "imu", np.eye(4))
    long.transform.rotation = NS(x=0.0, y=0.0, z=0.0, w=1.02)    # |q|^2 = 1.0404
    almost = _ts("map", "gps", rs.translation_matrix((0.0, 0.0, 1.0)))
    almost.transform.rotation = NS(x=0.0, y=0.0, z=0.0, w=1.004)  # within tf2's 0.01: kept
    for ts in (zero, nan, long, almost):
        buf.set_transform(ts, static=True)
    assert buf.ignored == 3
    np.testing.assert_allclose(buf.lookup_now("map", "gps", 0), rs.translation_matrix((0, 0, 1.0)),
                               atol=1e-12)   # normalised
    for ts, why in ((zero, "a quaternion of length 0, not 1"), (nan, "a non-finite value"),
                    (long, "a quaternion of length 1.02, not 1")):
        assert frames.invalid_transform(ts.transform) == why
        with pytest.raises(frames.TransformUnavailable) as err:
            buf.lookup_now("base", ts.child_frame_id, 0)
        assert err.value.reason == frames.MISSING
        assert "3 transform(s) ignored, the last map -> imu: a quaternion of length 1.02" in str(err.value)
    assert frames.invalid_transform(good.transform) is None
    np.testing.assert_allclose(buf.lookup_now("base", "map", 0),
                               rs.translation_matrix((-1.0, -2.0, -3.0)), atol=1e-12)


def test_transform_buffer_interpolates_rotation_on_the_shorter_arc():
    """q and -q are one rotation: halfway between a turn of +170 degrees about z and one of -170
    degrees (written with w of either sign) is a turn of 180 degrees, not of 0."""
    from lidar_completion_pkg import frames

    s = 10**9
    for flip in (1.0, -1.0):
        buf = frames.TransformBuffer()
        buf.set_transform(_ts("odom", "base", rs.euler_matrix(0, 0, np.radians(170)), 1 * s), static=False)
        second = _ts("odom", "base", rs.euler_matrix(0, 0, np.radians(-170)), 2 * s)
        r = second.transform.rotation
        second.transform.rotation = NS(x=flip * r.x, y=flip * r.y, z=flip * r.z, w=flip * r.w)
        buf.set_transform(second, static=False)
        np.testing.assert_allclose(buf.lookup_now("odom", "base", int(1.5 * s)), rs.euler_matrix(0, 0, np.pi),
                                   atol=1e-9)


def test_node_asked_for_frames_without_the_packages_stops_before_loading(tmp_path):
    """The node process exits 1 with that message before it loads a model (a checkpoint path that
    does not exist is never reached), and starts without frames as before."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    hide = ("import sys; sys.modules['tf2_msgs'] = None; sys.modules['tf2_ros'] = None; "
            "from lidar_completion_pkg.completion_node import main; sys.exit(main(sys.argv))")
    args = ["--ros-args", "-p", "target_frame:=odom", "-p", f"checkpoint:={tmp_path / 'absent.pt'}"]
    env = rs.ros_env(rs.random_domain(), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", hide, *args], capture_output=True, text=True, timeout=120,
                          env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "FATAL" in out and "target_frame need tf2_msgs" in out and "Traceback" not in out, out
    assert "absent.pt" not in out, out


def test_lifecycle_configure_without_the_packages_fails_and_holds_nothing(tmp_path, monkeypatch):
    """The managed node's configure fails with the same message and stays unconfigured; when the
    failure comes after the model was loaded (the frames opened last), the model is released."""
    rclpy = pytest.importorskip("rclpy")
    pytest.importorskip("lifecycle_msgs")
    pytest.importorskip("diagnostic_msgs")
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from lidar_completion.checkpoints import make_random_checkpoint
    from lidar_completion_pkg.lifecycle_node import LifecycleCompletionNode
    from lidar_completion_pkg.pipeline import CompletionPipeline
    from lidar_completion_pkg.stats import UNCONFIGURED

    ckpt = make_random_checkpoint(tmp_path / "tiny.pt", sampling={"steps": 1, "guidance": 1.0, "n_fps": 100,
                                                                 "tile": 2, "process": "local"})
    monkeypatch.setitem(sys.modules, "tf2_msgs", None)
    monkeypatch.setitem(sys.modules, "tf2_ros", None)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=rs.random_domain())
    try:
        for late in (False, True):
            if late:   # the early check passes: load and warm-up happen, the frames fail last
                monkeypatch.setattr(CompletionPipeline, "check_frames", lambda self: None)
            node = LifecycleCompletionNode(context=context, parameter_overrides=[
                Parameter("target_frame", value="odom"), Parameter("checkpoint", value=str(ckpt)),
                Parameter("backend", value="torch")])
            try:
                assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
                assert node.pipeline.state == UNCONFIGURED and node.pipeline.completer is None
            finally:
                node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def test_diagnostics_go_on_under_sim_time_without_a_clock():
    """With use_sim_time and no /clock publisher (a paused bag, a simulator not started yet), the
    diagnostics timer stopped with ROS time, and a watcher of /diagnostics took the node for dead;
    it runs on the steady clock."""
    rclpy = pytest.importorskip("rclpy")
    pytest.importorskip("lifecycle_msgs")
    diagnostic_msgs = pytest.importorskip("diagnostic_msgs.msg")
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from lidar_completion_pkg.lifecycle_node import LifecycleCompletionNode

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=rs.random_domain())
    try:
        node = LifecycleCompletionNode(context=context, parameter_overrides=[
            Parameter("use_sim_time", value=True), Parameter("diagnostics_period", value=0.2)])
        got = []
        node.create_subscription(diagnostic_msgs.DiagnosticArray, "/diagnostics", got.append, 10)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        try:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and len(got) < 3:
                executor.spin_once(timeout_sec=0.1)
        finally:
            executor.shutdown()
            node.destroy_node()
        assert len(got) >= 3, f"{len(got)} diagnostics in 3 s at a 0.2 s period under sim time"
    finally:
        rclpy.shutdown(context=context)


def test_a_whole_number_for_a_double_parameter_is_taken_at_run_time():
    """`ros2 param set /lidar_completion guidance 4` means 4.0, as `-p guidance:=4` does at start
    (rclpy refused it: "Wrong parameter type, expected '3' got '2'"); a string is still refused."""
    pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter

    with _lifecycle_node() as node:
        result, = node.set_parameters([Parameter("guidance", Parameter.Type.INTEGER, 4)])
        assert result.successful, result.reason
        assert node.get_parameter("guidance").value == 4.0
        assert node.pipeline.config["guidance"] == 4.0
        result, = node.set_parameters([Parameter("guidance", Parameter.Type.STRING, "nan")])
        assert not result.successful


@contextlib.contextmanager
def _lifecycle_node(overrides=()):
    """A LifecycleCompletionNode (unconfigured: nothing loaded) in a context of its own, with
    ``overrides`` as its start-up parameters; destroyed and shut down after the block."""
    rclpy = pytest.importorskip("rclpy")
    pytest.importorskip("lifecycle_msgs")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion_pkg.lifecycle_node import LifecycleCompletionNode

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=rs.random_domain())
    try:
        node = LifecycleCompletionNode(context=context, parameter_overrides=list(overrides))
        try:
            yield node
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def test_a_configured_lifecycle_node_names_its_input_topic_as_it_will_subscribe():
    """The 'configured:' line showed the relative input topic as given ('velodyne_points'), the
    'active:' line the resolved one: both say the resolved name now."""
    with _lifecycle_node() as node:
        line = node.pipeline.describe()
    assert line.startswith("/velodyne_points -> "), line


def test_only_real_parameter_changes_are_logged_and_applied():
    """The load sets steps / guidance from "the checkpoint's" (0 / -1) to the values in use through
    the node's parameters; that is no change asked for, and the node logged "parameters changed:
    {'steps': 8}" at every start. A set to the value in use changes nothing; another value is logged
    and applied from the next cloud on."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from rclpy.parameter import Parameter

    from lidar_completion_pkg import pipeline as P

    infos, holder = [], {}

    def set_parameters(params):
        return [holder["pipe"].on_set_parameters(params)]

    node = NS(create_publisher=lambda *a, **k: None, set_parameters=set_parameters,
              get_logger=lambda: NS(info=infos.append, warning=lambda m: None),
              get_clock=lambda: NS(now=lambda: NS(nanoseconds=0)))
    holder["pipe"] = pipe = P.CompletionPipeline(node, default_values())
    assert pipe.config["steps"] == 0 and pipe.config["guidance"] < 0   # "the checkpoint's"
    pipe.load(lambda config: NS(steps=8, guidance=2.0, complete=lambda pts: pts))
    assert pipe.config["steps"] == 8 and pipe.config["guidance"] == 2.0
    assert not [m for m in infos if "parameters changed" in m], infos
    assert not pipe._pending
    assert pipe.on_set_parameters([Parameter("steps", value=8)]).successful
    assert not [m for m in infos if "parameters changed" in m] and not pipe._pending
    assert pipe.on_set_parameters([Parameter("steps", value=4), Parameter("guidance", value=2.0)]).successful
    assert [m for m in infos if "parameters changed" in m] == \
        ["parameters changed: {'steps': 4} (from the next cloud on)"]
    assert pipe._pending == {"steps": 4} and pipe.config["steps"] == 4


def test_clouds_without_a_frame_are_completed_with_a_warning():
    """An empty header.frame_id (no frames asked of the node) is completed as it came, but no longer
    silently: nothing downstream can place a cloud without a frame."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion_pkg import pipeline as P

    warnings = []

    class Fake:
        steps, guidance = 1, 1.0

        def complete(self, pts):
            return pts + np.float32(0.5)

    pipe, sent = _loaded_pipeline(Fake(), warnings, now_ns=7 * 10**9)
    points = P.warmup_cloud(500)
    header = NS(frame_id="", stamp=NS(sec=5, nanosec=0))
    pipe._complete_one(header, points, time.monotonic())
    assert len(sent) == 1 and sent[0].header.frame_id == ""
    assert any("empty header.frame_id" in w for w in warnings), warnings
    warnings.clear()
    pipe._complete_one(NS(frame_id="velodyne", stamp=NS(sec=6, nanosec=0)), points, time.monotonic())
    assert len(sent) == 2 and sent[1].header.frame_id == "velodyne" and not warnings
    before = pipe.stats.snapshot()
    assert before["stamp_latency_p50_ms"] == pytest.approx(1500.0)   # now 7 s, stamps 5 and 6 s
    # a zero stamp (the driver never set it): completed with a warning, kept out of the stamp latency
    pipe._complete_one(NS(frame_id="velodyne", stamp=NS(sec=0, nanosec=0)), points, time.monotonic())
    assert len(sent) == 3 and any("zero header.stamp" in w for w in warnings), warnings
    assert pipe.stats.snapshot()["stamp_latency_p95_ms"] == before["stamp_latency_p95_ms"]


def test_map_frame_clouds_keep_their_precision_through_the_node():
    """A float64 cloud in a UTM-sized map frame was read as float32 before the transform into
    model_frame, and the completion published as float32: both sides off by up to 0.25 m, silently.
    Now the networks get the scan at float64 precision, output_float64 publishes float64 x, y, z,
    and a float32 completion that far out comes with a warning naming the parameter."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion.pointcloud2 import FLOAT32, FLOAT64, create_cloud, make_field, read_points_numpy
    from lidar_completion_pkg import frames

    east, north = 452_317.25, 5_411_883.75                 # the sensor in the map frame (UTM)
    rng = np.random.default_rng(0)
    a, r = rng.uniform(-np.pi, np.pi, 3000), rng.uniform(5.0, 40.0, 3000)
    local = np.stack([r * np.cos(a), r * np.sin(a), rng.uniform(-1.8, 2.0, 3000)], axis=1)
    world = local + [east, north, 1.8]
    fields = [make_field(n, 8 * i, FLOAT64, 1, NS) for i, n in enumerate("xyz")]
    msg = create_cloud(NS(frame_id="map", stamp=NS(sec=5, nanosec=0)), fields, world, msg_factory=NS)

    class Identity:
        steps, guidance = 1, 1.0

        def complete(self, pts):
            self.seen = np.array(pts, dtype=np.float64)
            return np.asarray(pts, dtype=np.float32)

    for wide in (False, True):
        warnings, ident = [], Identity()
        pipe, sent = _loaded_pipeline(ident, warnings, now_ns=6 * 10**9)
        pipe.config.update(model_frame="velodyne", target_frame="map", output_float64=wide)
        pipe.frames = frames.TransformBuffer()
        pipe.frames.set_transform(_ts("map", "velodyne", rs.translation_matrix((east, north, 1.8))),
                                  static=True)
        pipe.on_cloud(msg)
        header, points, t_received = pipe.mailbox.get(timeout=1)
        pipe._complete_one(header, points, t_received)
        assert np.abs(ident.seen - local).max() < 1e-5          # float32 around the sensor only
        assert len(sent) == 1 and sent[0].header.frame_id == "map"
        assert {f.datatype for f in sent[0].fields} == {FLOAT64 if wide else FLOAT32}
        error = np.abs(read_points_numpy(sent[0], dtype="float64") - world).max()
        if wide:
            assert error < 1e-5 and not warnings, warnings
        else:
            assert 0.01 < error < 0.5                           # float32 at 5,400 km: 0.5 m steps
            assert len(warnings) == 1 and "set output_float64" in warnings[0], warnings


def test_flat_and_out_of_limits_clouds_are_rejected_input_naming_their_frame():
    """A cloud at one height (a 2D laser scan published as PointCloud2) is refused by the completer
    before it runs and counted as rejected input ('flat'), not as a failed completion; a cloud with
    nothing in the limits likewise ('out_of_limits'); both warnings name the frame."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion.completer import Completer
    from lidar_completion_pkg import pipeline as P

    warnings = []

    class Fake:
        steps, guidance = 1, 1.0
        filtered = Completer.filtered                # the real checks of the input
        min_range, max_range, min_z, min_points = 3.0, 80.0, -4.0, 100

        def complete(self, pts):
            self.filtered(pts)
            return pts

    pipe, sent = _loaded_pipeline(Fake(), warnings)
    flat = P.warmup_cloud(2000)
    flat[:, 2] = -1.5
    pipe._complete_one(NS(frame_id="laser", stamp=NS(sec=5, nanosec=0)), flat, time.monotonic())
    assert not sent and pipe.stats.rejected == 1 and pipe.stats.failed == 0
    assert pipe.stats.reasons["flat"] == 1
    assert any("frame 'laser'" in w and "flat cloud" in w for w in warnings), warnings
    far = P.warmup_cloud(2000) + np.float32(500.0)
    far[0] = 3e38                              # r^2 overflows float32: out of range, no numpy warning
    with warnings_module.catch_warnings():
        warnings_module.simplefilter("error")
        pipe._complete_one(NS(frame_id="velodyne", stamp=NS(sec=6, nanosec=0)), far, time.monotonic())
    assert not sent and pipe.stats.rejected == 2 and pipe.stats.reasons["out_of_limits"] == 1
    assert any("frame 'velodyne'" in w and "none of its 2000" in w for w in warnings), warnings
    pipe._complete_one(NS(frame_id="velodyne", stamp=NS(sec=7, nanosec=0)), P.warmup_cloud(2000),
                       time.monotonic())
    assert len(sent) == 1 and pipe.stats.rejected == 2


# ------------------------------------------------------------------ stopping, restarting, late TF
def _wait(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_stop_cancels_the_completion_in_hand():
    """Ctrl-C and deactivate stop the worker within one network pass of a completer that takes
    ``should_stop`` (the Completer); nothing of the abandoned scan is published or counted as a
    failure. Before, the worker finished the scan, and a process exiting under it aborted."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion.errors import Cancelled
    from lidar_completion_pkg import pipeline as P

    started = threading.Event()

    class Slow:
        steps, guidance = 200, 1.0

        def complete_detailed(self, pts, seed=None, should_stop=None):
            started.set()
            for _ in range(3000):            # 30 s unless cancelled
                if should_stop is not None and should_stop():
                    raise Cancelled("cancelled")
                time.sleep(0.01)
            return NS(points=pts, raw=None)

    warnings = []
    pipe, sent = _loaded_pipeline(Slow(), warnings)
    assert pipe._cancellable
    pipe.start()
    pipe.mailbox.put((NS(frame_id="velodyne", stamp=NS(sec=5, nanosec=0)), P.warmup_cloud(500),
                      time.monotonic()))
    assert started.wait(10)
    t0 = time.monotonic()
    assert pipe.stop(timeout=5.0)
    assert time.monotonic() - t0 < 2.0
    assert not sent and pipe.stats.failed == 0 and not warnings
    # accounted for: received = processed + dropped + rejected + no_transform + failed + cancelled
    assert pipe.stats.cancelled == 1 and pipe.stats.snapshot()["cancelled"] == 1
    from lidar_completion_pkg.live_bench import counters_of, unfinished
    values = dict(diagnostic_summary(dict(pipe.stats.snapshot(), received=1), None)[2])
    assert values["cancelled"] == "1" and unfinished(counters_of(values)) == 0


def test_a_scan_waiting_for_the_worker_at_stop_is_counted_as_cancelled():
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion_pkg import pipeline as P

    pipe, sent = _loaded_pipeline(NS(steps=8, guidance=2.0, complete=lambda pts: pts), [])
    pipe.mailbox.put((NS(frame_id="velodyne", stamp=NS(sec=5, nanosec=0)), P.warmup_cloud(500),
                      time.monotonic()))
    pipe.stats.note_input()
    assert pipe.stop(timeout=1.0)            # no worker ever took it
    assert not sent and pipe.stats.cancelled == 1


def test_a_worker_left_in_a_long_scan_is_replaced_on_start():
    """A deactivate whose wait ran out (a completer that cannot be cancelled, in a long scan) left the
    re-activated lifecycle node without a worker: start() returned early on the old one, which then
    ended. Now each worker has its own stop event and mailbox: the new one completes the next scan,
    the old one ends after its scan without publishing it."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion_pkg import pipeline as P

    release, calls = threading.Event(), []

    class Uncancellable:
        steps, guidance = 8, 1.0

        def complete(self, pts):
            calls.append(threading.current_thread())
            if len(calls) == 1:
                release.wait(10)            # the long first scan
                return pts + np.float32(1.0)
            return pts + np.float32(2.0)

    warnings = []
    pipe, sent = _loaded_pipeline(Uncancellable(), warnings)
    assert not pipe._cancellable
    item = (NS(frame_id="velodyne", stamp=NS(sec=5, nanosec=0)), P.warmup_cloud(500), time.monotonic())
    pipe.start()
    old = pipe.worker
    pipe.mailbox.put(item)
    assert _wait(lambda: len(calls) == 1)
    assert not pipe.stop(timeout=0.05)          # still in its scan
    pipe.start()
    assert pipe.worker is not old and pipe.worker.is_alive()
    pipe.mailbox.put(item)
    assert _wait(lambda: len(sent) == 1)
    release.set()
    old.join(5)
    assert not old.is_alive() and pipe.worker.is_alive()
    assert len(sent) == 1 and calls[1] is pipe.worker
    np.testing.assert_allclose(pc_xyz(sent[0]), item[1] + 2.0)
    assert pipe.stop(timeout=5.0)


def pc_xyz(msg):
    from lidar_completion.pointcloud2 import read_points_numpy
    return read_points_numpy(msg, ("x", "y", "z"))


def test_the_target_transform_is_taken_before_a_long_completion():
    """With target_frame reached through a dynamic transform (odom), a completion that outlasted
    the TF cache found the transform at the scan's stamp aged out, and the finished scan was dropped
    as tf_stale. The target transform known at the start is taken then."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion_pkg import frames
    from lidar_completion_pkg import pipeline as P

    odom_base = np.eye(4)
    odom_base[:3, 3] = (100.0, -20.0, 0.0)

    class Frames:
        known = True

        def lookup(self, target, source, t_ns, timeout):
            assert (target, source) == ("odom", "velodyne")
            if not self.known:
                raise frames.TransformUnavailable(frames.STALE, "aged out of the cache")
            return odom_base

    tf = Frames()

    class Slow:
        steps, guidance = 8, 1.0

        def complete(self, pts):
            tf.known = False                    # the sample at the stamp leaves the cache meanwhile
            return pts

    warnings = []
    pipe, sent = _loaded_pipeline(Slow(), warnings)
    pipe.config.update(model_frame="velodyne", target_frame="odom")
    pipe.frames = tf
    points = P.warmup_cloud(500)
    pipe._complete_one(NS(frame_id="velodyne", stamp=NS(sec=5, nanosec=0)), points, time.monotonic())
    assert len(sent) == 1 and sent[0].header.frame_id == "odom", warnings
    np.testing.assert_allclose(pc_xyz(sent[0]), points + np.float32([100.0, -20.0, 0.0]), atol=1e-4)
    assert pipe.stats.no_transform == 0
    # not known before (odometry later than the scan): looked up afterwards, as before
    tf.known = False
    late = Slow()
    late.complete = lambda pts: (setattr(tf, "known", True), pts)[1]
    pipe.completer = late
    pipe._complete_one(NS(frame_id="velodyne", stamp=NS(sec=6, nanosec=0)), points, time.monotonic())
    assert len(sent) == 2 and pipe.stats.no_transform == 0


def test_a_scan_whose_target_frame_has_no_transform_is_dropped_before_completing():
    """Clouds in a frame with no path to target_frame were completed (seconds each on a CPU) and
    only then dropped as tf_missing. Once no path has joined the frames for MISSING_GRACE_S, the
    scan is dropped first, after tf_timeout; before that (odometry starting after the LiDAR), and
    for a transform known but not yet at the stamp, the completion goes first as before."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion_pkg import frames
    from lidar_completion_pkg import pipeline as P

    waits = []

    class Frames:
        reason = frames.MISSING
        late = None      # the reason of a second lookup (something came during the wait)

        def lookup(self, target, source, t_ns, timeout):
            waits.append(timeout)
            reason = self.late if (timeout and self.late) else self.reason
            raise frames.TransformUnavailable(reason, f"no transform from '{source}' to '{target}'")

    class Counting:
        steps, guidance = 8, 1.0
        calls = 0

        def complete(self, pts):
            Counting.calls += 1
            return pts

    warnings = []
    pipe, sent = _loaded_pipeline(Counting(), warnings)
    pipe.config.update(model_frame="", target_frame="base_link", tf_timeout=0.05)
    pipe.frames = tf = Frames()
    points = P.warmup_cloud(500)
    header = NS(frame_id="velodyne_b", stamp=NS(sec=5, nanosec=0))

    def one():
        with pytest.raises(frames.TransformUnavailable):
            pipe._complete_one(header, points, time.monotonic())

    one()          # missing for the first time: completed, then dropped (it may still come)
    assert Counting.calls == 1 and waits == [0.0, 0.05] and pipe.stats.no_transform == 1
    pipe._missing_since[("base_link", "velodyne_b")] -= P.MISSING_GRACE_S   # missing for that long
    waits.clear()
    one()          # asked at once, then waited tf_timeout for a path: dropped, not completed
    assert Counting.calls == 1 and not sent and waits == [0.0, 0.05]
    assert pipe.stats.no_transform == 2 and pipe.stats.reasons[frames.MISSING] == 2
    assert any("before completing it" in w and "velodyne_b" in w for w in warnings), warnings
    # a transform that came during that wait but not yet at the stamp: completed, looked up after
    tf.late = frames.STALE
    one()
    assert Counting.calls == 2 and ("base_link", "velodyne_b") not in pipe._missing_since
    # known but not at the stamp: completed first, looked up afterwards (and dropped there)
    tf.reason, tf.late = frames.STALE, None
    one()
    assert Counting.calls == 3 and pipe.stats.reasons[frames.STALE] == 2
    # missing at start-up (its grace begins), then a path that lags the scans for a long time: a
    # later spell without a path has a grace of its own (the first spell's start, kept, made it
    # drop at once)
    pipe._missing_since.clear()
    tf.reason = frames.MISSING
    one()
    tf.reason = frames.STALE
    one()
    for key in pipe._missing_since:
        pipe._missing_since[key] -= 60.0
    tf.reason = frames.MISSING
    one()
    assert Counting.calls == 6


def test_diagnostics_count_the_transforms_the_own_listener_ignored():
    """A TF publisher sending broken transforms (NaN, not a unit quaternion) shows up on /diagnostics:
    how many the node's own listener ignored, and the last one with its reason."""
    pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from lidar_completion_pkg import frames

    class Fake:
        steps, guidance = 8, 2.0

        def complete(self, pts):
            return pts

    from builtin_interfaces.msg import Time

    pipe, _sent = _loaded_pipeline(Fake(), [])
    pipe.node.get_name = lambda: "lidar_completion"
    pipe.node.get_clock = lambda: NS(now=lambda: NS(to_msg=Time))
    values = lambda: {kv.key: kv.value for kv in pipe.diagnostics().status[0].values}  # noqa: E731
    assert "tf_ignored" not in values()                      # no frames asked for
    pipe.frames = NS(buffer=frames.TransformBuffer(), lookup=None)
    assert values()["tf_ignored"] == "0" and "tf_ignored_last" not in values()
    bad = _ts("odom", "base", np.eye(4))
    bad.transform.rotation = NS(x=0.0, y=0.0, z=0.0, w=0.0)
    pipe.frames.buffer.set_transform(bad, static=False)
    pipe.frames.buffer.set_transform(bad, static=True)
    assert values()["tf_ignored"] == "2"
    assert values()["tf_ignored_last"] == "odom -> base: a quaternion of length 0, not 1"


def test_transform_buffer_starts_over_when_time_jumps_back():
    """A bag played again (or a simulator restarted) sends transforms older than the buffered ones by
    more than the cache: they were cut off at once, and every scan of the replay was tf_stale."""
    from lidar_completion_pkg import frames

    translation_matrix = rs.translation_matrix

    buf = frames.TransformBuffer(cache_time=10.0)
    s = 10**9
    for t in range(100, 111):
        buf.set_transform(_ts("odom", "base", translation_matrix((t, 0, 0)), t * s), static=False)
    for t in range(0, 6):
        buf.set_transform(_ts("odom", "base", translation_matrix((t, 0, 0)), t * s), static=False)
    np.testing.assert_allclose(buf.lookup_now("odom", "base", int(3.5 * s))[:3, 3], (3.5, 0, 0))
    with pytest.raises(frames.TransformUnavailable):
        buf.lookup_now("odom", "base", 105 * s)      # the old run's history is gone
    # an out-of-order sample within the cache is still merged, not a reset
    buf.set_transform(_ts("odom", "base", translation_matrix((2.5, 0, 0)), int(2.5 * s)), static=False)
    np.testing.assert_allclose(buf.lookup_now("odom", "base", 1 * s)[:3, 3], (1.0, 0, 0))


def test_bad_topic_names_and_settings_stop_the_node_before_the_checkpoint_loads():
    """An invalid topic name was refused by rclpy only when the endpoint was created, after the load
    and the warm-up, with a traceback; a setting the completer refuses (device) was reported as a
    checkpoint problem with a hint to set `checkpoint`."""
    rclpy = pytest.importorskip("rclpy")
    pytest.importorskip("diagnostic_msgs")
    from rclpy.parameter import Parameter

    from lidar_completion.errors import ConfigError
    from lidar_completion_pkg import pipeline as P
    from lidar_completion_pkg.node import CompletionNode

    loads = []
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=rs.random_domain())
    try:
        for name, value in (("output_topic", "bad topic"), ("input_topic", "/a//b"),
                            ("raw_output_topic", "1abc")):
            with pytest.raises(P.StartupError, match=f"invalid parameter {name} '{value}'"):
                CompletionNode(completer_factory=loads.append, context=context,
                               parameter_overrides=[Parameter(name, value=value)])
        assert not loads
    finally:
        rclpy.shutdown(context=context)

    def refuses_device(config):
        raise ConfigError("unknown device 'gpu'")

    pipe = P.CompletionPipeline(_fake_node([]), default_values())
    with pytest.raises(P.StartupError) as err:
        pipe.load(refuses_device)
    assert "unknown device 'gpu'" in str(err.value) and "checkpoint:=" not in str(err.value)
    with pytest.raises(P.StartupError, match=r"checkpoint:="):
        pipe.load(lambda config: (_ for _ in ()).throw(FileNotFoundError("student.pt")))


def test_parameters_the_node_does_not_have_are_named():
    """rclpy ignores a -p for a parameter that is not declared (`-p step:=4` for steps) silently."""
    from lidar_completion_pkg.node import warn_unknown_parameters

    said = []
    node = NS(_parameter_overrides={"step": 4, "steps": 4, "use_sim_time": True,
                                    "qos_overrides./velodyne_points.subscription.depth": 1,
                                    "guidanse": 2.0},
              has_parameter=lambda name: name == "steps", get_logger=lambda: NS(warning=said.append))
    warn_unknown_parameters(node)
    assert len(said) == 1 and "2 parameter(s) this node does not have: guidanse, step" in said[0]
    said.clear()
    warn_unknown_parameters(NS(_parameter_overrides={"steps": 4}, has_parameter=lambda n: True,
                               get_logger=lambda: NS(warning=said.append)))
    assert not said


def test_lifecycle_reports_while_configuring_and_exits_when_finalized():
    """/diagnostics goes on while configure loads and warms up (the executor, busy in the transition,
    fires no timer: a watchdog saw one message, then nothing for as long as the warm-up took), and
    after shutdown it says finalized and the node is finished (the entry point exits)."""
    rclpy = pytest.importorskip("rclpy")
    pytest.importorskip("lifecycle_msgs")
    diagnostic_msgs = pytest.importorskip("diagnostic_msgs.msg")
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from lidar_completion_pkg.lifecycle_node import LifecycleCompletionNode

    def slow_load(config):
        time.sleep(1.5)
        return NS(steps=8, guidance=2.0, complete=lambda pts: pts)

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=rs.random_domain())
    try:
        node = LifecycleCompletionNode(completer_factory=slow_load, context=context, parameter_overrides=[
            Parameter("diagnostics_period", value=0.2), Parameter("warmup", value=False)])
        listener = rclpy.create_node("listener", context=context)
        got = []
        listener.create_subscription(diagnostic_msgs.DiagnosticArray, "/diagnostics", lambda m: got.append(
            (time.monotonic(), {kv.key: kv.value for kv in m.status[0].values})), 50)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(listener)
        spinning = threading.Thread(target=lambda: [executor.spin_once(timeout_sec=0.05)
                                                    for _ in iter(context.ok, False)], daemon=True)
        spinning.start()
        try:
            time.sleep(1.0)                                       # discovery
            t0 = time.monotonic()
            assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
            t1 = time.monotonic()
            during = [v["state"] for t, v in got if t0 < t < t1]
            assert during.count("warming up") >= 3, during      # 1.5 s at 0.2 s: about 7
            assert not node.finished
            assert node.trigger_shutdown() == TransitionCallbackReturn.SUCCESS
            assert node.finished and context.ok()     # the entry point's loop ends; others go on
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not any(v["state"] == "finalized" for _, v in got):
                time.sleep(0.05)
            assert any(v["state"] == "finalized" for _, v in got), [v["state"] for _, v in got]
        finally:
            executor.shutdown()
            rclpy.try_shutdown(context=context)
            spinning.join(timeout=5.0)
            node.destroy_node()
            listener.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_a_real_node_names_a_parameter_it_does_not_have(capfd):
    """The same with rclpy's own node: a -p for a name the node does not declare lands in its
    overrides, unused (rclpy says nothing); the node's warning names it."""
    pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter

    with _lifecycle_node([Parameter("step", value=4), Parameter("steps", value=4)]) as node:
        assert node.get_parameter("steps").value == 4 and not node.has_parameter("step")
    err = capfd.readouterr().err
    assert "ignored 1 parameter(s) this node does not have: step " in err, err
