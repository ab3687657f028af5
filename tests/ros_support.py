"""Helpers of the ROS 2 tests: availability (a failure under CI=true), isolated DDS environments, the
node / `ros2 launch` as processes in their own process group, the `ros2` CLI, a test participant.

Every test gets its own ROS_DOMAIN_ID and localhost-only discovery, and the shipped Fast DDS profile.
Processes are started in a new session and stopped with SIGINT to the whole group (background jobs of a
non-interactive shell ignore SIGINT; SIGTERM to `ros2 launch` can orphan its nodes), then killed if
they do not stop. Every wait is bounded.
"""
from __future__ import annotations

import importlib
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(*modules: str, executables: tuple = ()) -> None:
    """Import ``modules`` and find ``executables`` in the venv's bin/, or skip - under CI=true fail:
    a broken ROS install must not leave CI green. Call at module level."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    missing += [f"{BIN / exe}" for exe in executables if not (BIN / exe).is_file()]
    if not missing:
        return
    why = ("needs the ROS 2 wheels and tools (make setup installs them and builds tf2_msgs; the ROS 2 "
           "CLI tools come from ROS2_CLI_WHEELS, default ../shared/ros2-cli-wheels, else from their "
           "sources on GitHub or ROS2_TOOLS_SOURCES, or with a system ROS 2); missing: " + "; ".join(missing))
    if IN_CI:
        pytest.fail("CI=true: " + why, pytrace=False)
    pytest.skip(why, allow_module_level=True)


def tiny_checkpoint_fixture():
    """A module-scoped ``checkpoint`` fixture: random tiny networks (a completion with small budgets
    takes a fraction of a second on a CPU)."""
    @pytest.fixture(scope="module")
    def checkpoint(tmp_path_factory):
        from lidar_completion.checkpoints import make_random_checkpoint
        path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
        make_random_checkpoint(path)
        return path
    return checkpoint


def random_domain() -> int:
    return random.SystemRandom().randrange(1, 200)


def ros_env(domain_id: int, **extra) -> dict:
    from lidar_completion_pkg import dds

    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RCUTILS_COLORIZED_OUTPUT="0")
    env[dds.PROFILE_ENV] = dds.profile_path()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def param_value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGINT to the process group (Ctrl-C), then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


@contextmanager
def process_group(cmd, env, log_path: Path):
    """``cmd`` in its own session, output to ``log_path``; SIGINT (then SIGKILL) to the group on exit."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            stop_group(proc)


#: `ros2 <verb> <sub> ...` options: no daemon (it would outlive the test), time to discover the node.
NO_DAEMON = ("--no-daemon", "--spin-time", "3")


def ros2(env, *args, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """The venv's `ros2` CLI (pass NO_DAEMON after the sub-command)."""
    return subprocess.run([str(BIN / "ros2"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def ros2_until(env, accept, *args, tries: int = 3) -> subprocess.CompletedProcess:
    """``ros2(*args)`` until it succeeds and ``accept(result)``: a fresh CLI participant now and then
    misses a participant within its spin time ("Node not found"; seen about once in ten calls here,
    when an initial discovery announcement is lost and the next comes 3 s later). The last result."""
    for _ in range(tries):
        result = ros2(env, *args)
        if result.returncode == 0 and accept(result):
            break
    return result


class Participant:
    """An rclpy participant of a test (own context): publishers, recorders, spinning, bounded waits."""

    def __init__(self, domain_id: int, name: str = "test_participant"):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def record(self, msg_type, topic: str, qos) -> list:
        received: list = []
        self.node.create_subscription(msg_type, topic, received.append, qos)
        return received

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.05, max(0.0, end - time.monotonic())))

    def wait_for(self, predicate, timeout: float, what: str, proc=None, log: Path | None = None):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if proc is not None and proc.poll() is not None:
                text = log.read_text(errors="replace") if log else (proc.stdout.read() if proc.stdout else "")
                raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}:\n"
                                     f"{text[-4000:]}")
            self.executor.spin_once(timeout_sec=0.05)
        tail = log.read_text(errors="replace")[-4000:] if log else ""
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")

    def change_state(self, node_name: str, transition: str, timeout: float = 60.0) -> bool:
        """Trigger a lifecycle transition ("configure", "activate", ...) through the node's service."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        client = self.node.create_client(ChangeState, f"{node_name}/change_state")
        try:
            self.wait_for(lambda: client.service_is_ready(), 10, f"{node_name}/change_state")
            request = ChangeState.Request()
            request.transition.id = getattr(Transition, f"TRANSITION_{transition.upper()}")
            future = client.call_async(request)
            self.wait_for(future.done, timeout, f"the {transition} transition")
            return bool(future.result().success)
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


@contextmanager
def participant(domain_id: int, name: str = "test_participant"):
    p = Participant(domain_id, name)
    try:
        yield p
    finally:
        p.close()


def translation_matrix(xyz):
    """4x4 translation (the tests' transforms come from transforms3d, not from the scipy code under test)."""
    import numpy as np
    m = np.eye(4)
    m[:3, 3] = xyz
    return m


def euler_matrix(roll, pitch, yaw):
    """4x4 rotation about the static x, then y, then z axes (tf's ``euler_matrix`` default, 'sxyz')."""
    import numpy as np
    from transforms3d.euler import euler2mat
    m = np.eye(4)
    m[:3, :3] = euler2mat(roll, pitch, yaw, "sxyz")
    return m


def quaternion_xyzw(matrix):
    """The rotation of a 4x4 matrix as a ROS quaternion (x, y, z, w)."""
    from transforms3d.quaternions import mat2quat
    w, x, y, z = mat2quat(matrix[:3, :3])
    return x, y, z, w


def static_transforms(stamp_ns: int, *edges):
    """tf2_msgs/TFMessage of (parent, child, 4x4 matrix) edges."""
    from geometry_msgs.msg import TransformStamped
    from tf2_msgs.msg import TFMessage

    msg = TFMessage()
    for parent, child, m in edges:
        ts = TransformStamped()
        ts.header.frame_id, ts.child_frame_id = parent, child
        ts.header.stamp.sec, ts.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
        ts.transform.translation.x, ts.transform.translation.y, ts.transform.translation.z = \
            (float(v) for v in m[:3, 3])
        q = quaternion_xyzw(m)
        (ts.transform.rotation.x, ts.transform.rotation.y, ts.transform.rotation.z,
         ts.transform.rotation.w) = (float(v) for v in q)
        msg.transforms.append(ts)
    return msg


def latched_qos():
    """/tf_static QoS (tf2's static broadcaster: reliable, transient local)."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def rviz_qos():
    """What an rviz2 PointCloud2 display subscribes with by default: reliable, keep last 5, volatile."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=5, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)
