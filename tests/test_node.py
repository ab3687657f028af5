"""The completion node as its own process, over real DDS (Fast DDS from the PyPI wheels).

Each test starts the node (`python -m lidar_completion_pkg.completion_node`, the console entry point's
code) on a random ROS_DOMAIN_ID with localhost-only discovery and the shipped Fast DDS profile, running
the real Completer on a tiny random checkpoint with small preprocessing budgets (a completion takes a
fraction of a second on CPU). This test process publishes clouds and listens with rclpy. Every wait is
bounded and every process is killed in a finally block.
"""
import array
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace as NS

import numpy as np
import pytest

import ros_support as rs

rs.require("rclpy")

from lidar_completion import pointcloud2 as pc  # noqa: E402

pytestmark = pytest.mark.ros

N_FPS, TILE, REFINE_UP = 128, 2, 6
NODE_PARAMS = {"n_fps": N_FPS, "tile": TILE, "steps": 2, "seed": 0, "input_qos_depth": 20, "backend": "torch",
               "diagnostics_period": 0.5}


checkpoint = rs.tiny_checkpoint_fixture()


ros_env, random_domain, _value = rs.ros_env, rs.random_domain, rs.param_value


@contextmanager
def node_process(domain_id, checkpoint, prefix=(), **params):
    """The node as a separate process; stopped with SIGINT (then killed) on exit."""
    params = {**NODE_PARAMS, "checkpoint": str(checkpoint), **params}
    cmd = [*prefix, sys.executable, "-m", "lidar_completion_pkg.completion_node", "--ros-args"]
    for k, v in params.items():
        cmd += ["-p", f"{k}:={_value(v)}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ros_env(domain_id))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def stop_cleanly(proc):
    """SIGINT (Ctrl-C): exit status 0, no traceback; returns the node's log."""
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    return out


class Harness:
    """rclpy participant of this test: publishes input clouds, records outputs and diagnostics."""

    def __init__(self, domain_id, input_topic="/velodyne_points", output_topic="/completed_points",
                 raw_topic=None):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import PointCloud2

        from lidar_completion_pkg.qos import cloud_qos

        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("node_test_harness", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        qos = cloud_qos("best_effort", 20)
        self.pub = self.node.create_publisher(PointCloud2, input_topic, qos)
        self.outputs, self.raw, self.diagnostics = [], [], []
        self.node.create_subscription(PointCloud2, output_topic, self.outputs.append, qos)
        if raw_topic:
            self.node.create_subscription(PointCloud2, raw_topic, self.raw.append, qos)
        self.node.create_subscription(DiagnosticArray, "/diagnostics",
                                      lambda m: self.diagnostics.append(m), 10)
        self.output_topic = output_topic

    def spin(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.05, max(0.0, end - time.monotonic())))

    def wait_for(self, predicate, timeout, what, proc=None):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"node exited ({proc.returncode}) while waiting for {what}:\n"
                                     f"{proc.stdout.read()}")
            self.executor.spin_once(timeout_sec=0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def wait_ready(self, proc, timeout=40):
        self.wait_for(lambda: self.pub.get_subscription_count() > 0 and
                      self.node.count_publishers(self.output_topic) > 0, timeout,
                      "the node's subscription and publisher", proc)
        self.spin(0.5)

    def diag(self):
        """The latest diagnostics of the node as {key: value}, plus level and message."""
        if not self.diagnostics:
            return {}
        status = self.diagnostics[-1].status[0]
        out = {kv.key: kv.value for kv in status.values}
        out["_level"] = status.level[0] if isinstance(status.level, bytes) else int(status.level)
        out["_message"] = status.message
        return out

    def wait_diag(self, predicate, timeout, what, proc=None):
        self.wait_for(lambda: bool(self.diagnostics) and predicate(self.diag()), timeout, what, proc)
        return self.diag()

    def publish(self, msg):
        self.pub.publish(msg)

    def outputs_with(self, sec):
        return [m for m in self.outputs if m.header.stamp.sec == sec]

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


@contextmanager
def harness(domain_id, **kwargs):
    h = Harness(domain_id, **kwargs)
    try:
        yield h
    finally:
        h.close()


def first_roundtrip(h, msg, proc, tries=10, wait=3.0):
    """Publish ``msg`` until the node answers: the first sample may race discovery (best effort).
    Waits ``wait`` s between tries (the first completion includes torch's warm-up)."""
    for _ in range(tries):
        h.publish(msg)
        try:
            h.wait_for(lambda: h.outputs_with(msg.header.stamp.sec), wait, "", proc)
            return
        except AssertionError as exc:
            if "node exited" in str(exc):
                raise
    raise AssertionError(f"no completion for the first cloud after {tries} tries")


def scan(n=3000, seed=0):
    """A scan-like cloud: points 5..30 m around the sensor, ground and walls."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-np.pi, np.pi, n)
    r = rng.uniform(5.0, 30.0, n)
    z = np.where(rng.random(n) < 0.5, -1.7, rng.uniform(-1.7, 2.0, n))
    return np.stack([r * np.cos(a), r * np.sin(a), z], 1).astype(np.float32)


def cloud_msg(points, sec, frame="velodyne_test", nanosec=123):
    from std_msgs.msg import Header
    header = Header(frame_id=frame)
    header.stamp.sec, header.stamp.nanosec = sec, nanosec
    return pc.create_cloud_xyz32(header, points)


def raw_msg(sec, *, fields, data, width, height=1, point_step=12, row_step=None, big=False):
    """A PointCloud2 built field by field (for malformed inputs)."""
    from sensor_msgs.msg import PointCloud2, PointField
    msg = PointCloud2()
    msg.header.frame_id = "velodyne_test"
    msg.header.stamp.sec = sec
    msg.height, msg.width = height, width
    msg.fields = [PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields]
    msg.is_bigendian, msg.point_step = big, point_step
    msg.row_step = width * point_step if row_step is None else row_step
    buf = array.array("B")
    buf.frombytes(data)
    msg.data = buf
    return msg


XYZ = [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1)]


def packed(points):
    return np.asarray(points, dtype="<f4").tobytes()


def check_output(msg, sec, max_points):
    assert msg.header.frame_id == "velodyne_test"
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (sec, 123)
    assert [(f.name, f.offset, f.datatype) for f in msg.fields] == [("x", 0, 7), ("y", 4, 7), ("z", 8, 7)]
    pts = pc.read_points_numpy(msg, skip_nans=False)
    assert 0 < len(pts) <= max_points
    assert np.isfinite(pts).all()
    return pts


# ------------------------------------------------------------------------------------------- tests
def test_completes_with_header_passthrough_runtime_params_and_clean_shutdown(checkpoint):
    domain = random_domain()
    with node_process(domain, checkpoint, publish_raw=True, max_points=2500) as proc, \
            harness(domain, raw_topic="/completed_points_raw") as h:
        h.wait_ready(proc)
        first_roundtrip(h, cloud_msg(scan(3000, 0), sec=1000), proc)
        for i, sec in enumerate((1001, 1002)):
            h.publish(cloud_msg(scan(2000 + 500 * i, i + 1), sec=sec))
            h.wait_for(lambda: h.outputs_with(sec) and len(h.raw) >= 2 + i, 30, f"output {sec}", proc)
        for msg in h.outputs:
            check_output(msg, msg.header.stamp.sec, N_FPS * TILE * REFINE_UP)
        assert {m.header.stamp.sec for m in h.raw} == {1000, 1001, 1002}
        for msg in h.raw:
            check_output(msg, msg.header.stamp.sec, N_FPS * TILE)
        d = h.wait_diag(lambda d: int(d["processed"]) >= 3, 10, "diagnostics", proc)
        assert int(d["subsampled"]) >= 1  # the 3000-point cloud is above max_points=2500
        assert float(d["latency_p50_ms"]) > 0 and float(d["latency_p95_ms"]) >= float(d["latency_p50_ms"])
        assert float(d["input_rate_hz"]) > 0 and d["steps"] == "2"
        assert int(d["rejected"]) == 0 and int(d["failed"]) == 0

        # steps / guidance at run time: valid values are taken, invalid ones refused
        from rclpy.parameter import Parameter
        from rclpy.parameter_client import AsyncParameterClient
        client = AsyncParameterClient(h.node, "lidar_completion")
        assert client.wait_for_services(10.0)

        def set_params(**values):
            future = client.set_parameters([Parameter(k, value=v) for k, v in values.items()])
            h.wait_for(future.done, 10, "set_parameters")
            return [r.successful for r in future.result().results]

        assert set_params(steps=3) == [True]
        assert set_params(guidance=2.0) == [True]
        assert set_params(steps=0) == [False]
        assert set_params(guidance=25.0) == [False]
        assert set_params(max_points=10) == [False]  # read-only while running
        h.publish(cloud_msg(scan(2000, 7), sec=1003))
        h.wait_for(lambda: h.outputs_with(1003), 30, "output after the parameter change", proc)
        d = h.wait_diag(lambda d: d["steps"] == "3" and float(d["guidance"]) == 2.0, 10,
                        "diagnostics showing the new steps and guidance", proc)
        assert int(d["processed"]) >= 4
        log = stop_cleanly(proc)
    assert re.search(r"shut down: processed \d+, dropped \d+, rejected 0, no transform 0, failed 0", log), log


def malformed_inputs():
    good = scan(200, 3)
    nan = [(math.nan, 1.0, 1.0)] * 50
    inf = [(math.inf, -math.inf, 1.0)] * 50
    far = (scan(300, 4) * 10.0)  # every point beyond max_range
    return {
        "empty": dict(fields=XYZ, data=b"", width=0),
        "missing_field": dict(fields=XYZ[:2], data=packed(good), width=200),
        "truncated": dict(fields=XYZ, data=packed(good)[:-7], width=200),
        "point_step_zero": dict(fields=XYZ, data=packed(good), width=200, point_step=0, row_step=2400),
        "row_step_short": dict(fields=XYZ, data=packed(good), width=100, height=2, row_step=600),
        "field_outside_point": dict(fields=XYZ, data=packed(good), width=300, point_step=8),
        "unsupported_datatype": dict(fields=XYZ[:2] + [("z", 8, 9, 1)], data=packed(good), width=200),
        "nan_only": dict(fields=XYZ, data=packed(nan), width=50),
        "inf_only": dict(fields=XYZ, data=packed(inf), width=50),
        "out_of_limits": dict(fields=XYZ, data=packed(far), width=300),
        "too_few_points": dict(fields=XYZ, data=packed(good[:5]), width=5),
    }


def test_malformed_inputs_are_never_published_and_the_node_keeps_answering(checkpoint):
    domain = random_domain()
    cases = malformed_inputs()
    with node_process(domain, checkpoint) as proc, harness(domain) as h:
        h.wait_ready(proc)
        first_roundtrip(h, cloud_msg(scan(2000, 9), sec=10), proc)
        for i, (name, spec) in enumerate(cases.items()):
            bad_sec, good_sec = 100 + i, 200 + i
            h.publish(raw_msg(bad_sec, **spec))
            h.wait_diag(lambda d, n=i + 1: int(d["rejected"]) >= n, 15, f"rejection of {name}", proc)
            h.publish(cloud_msg(scan(1500, i), sec=good_sec))
            h.wait_for(lambda s=good_sec: h.outputs_with(s), 30, f"the good cloud after {name}", proc)
        h.spin(1.0)
        assert not [m for m in h.outputs if 100 <= m.header.stamp.sec < 200], "a bad cloud was published"
        d = h.wait_diag(lambda d: int(d["processed"]) >= len(cases) + 1, 10, "final diagnostics", proc)
        assert int(d["rejected"]) == len(cases) and int(d["failed"]) == 0
        for reason in ("empty", "missing_field", "truncated", "inconsistent_step",
                       "unsupported_datatype", "no_finite_points", "out_of_limits"):
            assert int(d.get(f"count.{reason}", 0)) >= 1, (reason, d)
        log = stop_cleanly(proc)
    assert "rejected input cloud" in log and "truncated PointCloud2" in log


def test_latest_only_burst_drops_and_counts_the_rest(checkpoint):
    domain = random_domain()
    with node_process(domain, checkpoint, steps=4) as proc, harness(domain) as h:
        h.wait_ready(proc)
        first_roundtrip(h, cloud_msg(scan(2000, 5), sec=10), proc)
        h.spin(1.5)  # let any re-sent warm-up cloud finish
        h.diagnostics.clear()
        base = h.wait_diag(lambda d: int(d["processed"]) >= 1, 10, "diagnostics", proc)
        msgs = [cloud_msg(scan(2000, 20 + i), sec=300 + i) for i in range(10)]
        for m in msgs:  # a burst: ~1 ms apart, while one completion takes far longer
            h.publish(m)
        d = h.wait_diag(lambda d: int(d["received"]) - int(base["received"]) == 10 and
                        int(d["processed"]) + int(d["dropped"]) - int(base["processed"]) -
                        int(base["dropped"]) == 10, 30, "the burst to be accounted for", proc)
        h.spin(1.0)
        burst_out = [m for m in h.outputs if 300 <= m.header.stamp.sec < 310]
        assert 1 <= len(burst_out) <= 2
        assert int(d["dropped"]) - int(base["dropped"]) == 10 - len(burst_out)
        assert burst_out[-1].header.stamp.sec == 309  # the newest cloud is the one completed last
        stop_cleanly(proc)


def test_ctrl_c_during_a_long_completion_or_the_warm_up_exits_cleanly(checkpoint):
    """Ctrl-C while a completion (or the warm-up scan) runs: the completion is abandoned at its next
    network pass and the node exits with status 0. Before, the worker finished its scan, and when
    that took over 5 s the interpreter was finalised under a thread inside torch: "terminate called
    without an active exception", exit status 134."""
    long = dict(steps=200, n_fps=2000, tile=10)     # many seconds per scan, even for tiny networks
    domain = random_domain()
    with node_process(domain, checkpoint, warmup=False, **long) as proc, harness(domain) as h:
        h.wait_ready(proc)
        for _ in range(20):   # best effort: the first sample may race discovery
            h.publish(cloud_msg(scan(3000, 1), sec=50))
            try:
                h.wait_diag(lambda d: int(d["received"]) >= 1, 1.5, "", proc)
                break
            except AssertionError as exc:
                if "node exited" in str(exc):
                    raise
        h.spin(1.0)
        d = h.wait_diag(lambda d: int(d["received"]) >= 1, 10, "the cloud to arrive", proc)
        assert int(d["processed"]) == 0, "the completion should still be running"
        t0 = time.monotonic()
        log = stop_cleanly(proc)
    assert time.monotonic() - t0 < 10 and "did not end within" not in log, log
    assert not h.outputs_with(50)
    with node_process(random_domain(), checkpoint, warmup=True, **long) as proc:
        line = ""
        deadline = time.monotonic() + 60
        while "completing a warm-up scan" not in line and time.monotonic() < deadline and \
                proc.poll() is None:
            line = proc.stdout.readline()
        time.sleep(1.0)
        assert proc.poll() is None
        log = stop_cleanly(proc)
    assert "warm-up scan completed" not in log, log


def test_sigterm_during_the_warm_up_exits_at_once_and_diagnostics_go_on_while_it_runs(checkpoint):
    """`docker stop` / systemd send SIGTERM and kill 10 s later: during the warm-up, rclpy's handler
    only shut the context down and the node went on until the warm-up ended (18 s and more on a CPU).
    While it runs, /diagnostics says "warming up" every period (it was silent until ready)."""
    long = dict(steps=200, n_fps=2000, tile=10, diagnostics_period=0.25)
    domain = random_domain()
    with node_process(domain, checkpoint, warmup=True, **long) as proc, harness(domain) as h:
        line, deadline = "", time.monotonic() + 60
        while "completing a warm-up scan" not in line and time.monotonic() < deadline and \
                proc.poll() is None:
            line = proc.stdout.readline()
        h.spin(2.5)
        states = [{kv.key: kv.value for kv in m.status[0].values}.get("state") for m in h.diagnostics]
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert time.monotonic() - t0 < 8, out
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert "warm-up scan completed" not in out and "interrupted while starting" in out, out
    assert "Failed to publish log message to rosout" not in out, out
    assert states.count("warming up") >= 3, states     # 2.5 s at 0.25 s: about 10


def test_unloadable_checkpoint_is_one_fatal_line(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    for path in (bad, tmp_path / "missing.pt"):
        proc = subprocess.run([sys.executable, "-m", "lidar_completion_pkg.completion_node",
                               "--ros-args", "-p", f"checkpoint:={path}"], capture_output=True,
                              text=True, timeout=60, env=ros_env(random_domain()))
        assert proc.returncode == 1
        out = proc.stdout + proc.stderr
        assert "FATAL" in out and f"cannot load {path}" in out and "Traceback" not in out, out
    proc = subprocess.run([sys.executable, "-m", "lidar_completion_pkg.completion_node",
                           "--ros-args", "-p", "steps:=500"], capture_output=True, text=True,
                          timeout=60, env=ros_env(random_domain()))
    assert proc.returncode == 1 and "invalid parameter steps" in proc.stderr + proc.stdout


def _can_mount_small_shm():
    if not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_small_shm(),
                    reason="giving the processes a small /dev/shm needs `unshare -m` and mount rights (root)")
def test_small_shared_memory_warns_and_the_node_still_works(checkpoint, tmp_path):
    """An 8 MB /dev/shm (the profile's segment needs 16 MiB): Fast DDS cannot create the node's
    segment; the node warns, does not crash, and answers over loopback UDP. Every process shares that
    /dev/shm (as in a container): Fast DDS assumes processes on one host share /dev/shm."""
    import json
    import shlex
    py = shlex.quote(sys.executable)
    node = [sys.executable, "-m", "lidar_completion_pkg.completion_node", "--ros-args"]
    for k, v in {**NODE_PARAMS, "checkpoint": str(checkpoint)}.items():
        node += ["-p", f"{k}:={_value(v)}"]
    log, result = tmp_path / "node.log", tmp_path / "listener.json"
    script = f"""
mount -t tmpfs -o size=8m tmpfs /dev/shm || exit 3
{shlex.join(node)} > {log} 2>&1 &
NODE=$!
{py} -m lidar_completion_pkg.probe listen --topic /completed_points --count 3 --timeout 80 --idle 8 \
    --wait-publishers 40 > {result} &
LISTENER=$!
# the node's first answer is lost unless the listener is matched to its publisher before it is sent
i=0
until grep -q '"matched": 1' {result}; do
    i=$((i+1)); [ $i -le 400 ] || exit 5; sleep 0.1
done
{py} -m lidar_completion_pkg.probe publish --count 3 --points 3000 --rate 1 --wait-subscribers 40 \
    > /dev/null || exit 4
wait $LISTENER
kill -INT $NODE
wait $NODE
"""
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=ros_env(random_domain()),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    node_log = log.read_text()
    assert proc.returncode == 0, out + node_log
    assert "MiB free but the Fast DDS profile's segment needs 16 MiB" in node_log, node_log
    assert "Traceback" not in node_log and "shut down: processed 3" in node_log, node_log
    received = json.loads(result.read_text().strip().splitlines()[-1])
    assert received["received"] == 3 and all(0 < n <= N_FPS * TILE * REFINE_UP
                                              for n in received["points"]), received


def test_delivery_of_20_large_clouds_across_processes(tmp_path):
    """20 clouds of 120,000 points, sensor-data QoS, publisher and listener in separate processes."""
    domain = random_domain()
    env = ros_env(domain)
    probe = [sys.executable, "-m", "lidar_completion_pkg.probe"]
    listener = subprocess.Popen(probe + ["listen", "--count", "20", "--timeout", "40", "--idle", "5"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    publisher = None
    try:
        line = listener.stdout.readline()  # {"ready": true} once subscribed
        assert "ready" in line, listener.stderr.read()
        publisher = subprocess.run(probe + ["publish", "--count", "20", "--points", "120000",
                                            "--rate", "10"], capture_output=True, text=True,
                                   timeout=60, env=env)
        assert publisher.returncode == 0, publisher.stderr
        assert '"matched": 1' in publisher.stdout, publisher.stdout
        out, err = listener.communicate(timeout=60)
    finally:
        for p in (listener,):
            if p.poll() is None:
                p.kill()
                p.wait(5)
    import json
    result = json.loads(out.strip().splitlines()[-1])
    assert result["received"] == 20, (result, err)
    assert result["points"] == [120_000] * 20
