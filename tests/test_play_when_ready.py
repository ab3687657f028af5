"""play_when_ready: the launch's bag player starts only once the completion node subscribes.

The waiting logic against a fake ROS graph (other nodes' subscriptions, the node's non-cloud ones,
a node that leaves mid-query, the timeout and its progress lines), the bag check against real bags,
the command line, and the executable against a real ROS graph: the command runs only after a node of
that name subscribes to a PointCloud2 topic, and an interrupted wait plays nothing.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ros_support as rs
from lidar_completion_pkg import play_when_ready as pw

CLOUD = "sensor_msgs/msg/PointCloud2"


class FakeGraph:
    """get_node_names_and_namespaces / get_subscriber_names_and_types_by_node of a scripted graph:
    ``states`` is a list of {(name, namespace): [(topic, [types])]} seen at successive polls."""

    def __init__(self, states, vanished=()):
        self.states, self.poll, self.vanished = states, 0, set(vanished)

    def current(self):
        return self.states[min(self.poll, len(self.states) - 1)]

    def get_node_names_and_namespaces(self):
        return list(self.current())

    def get_subscriber_names_and_types_by_node(self, name, namespace):
        if (name, namespace) in self.vanished:
            raise RuntimeError(f"Node name {name} not found")   # as rclpy's NodeNameNonExistentError
        return self.current()[(name, namespace)]


class Clock:
    def __init__(self, graph=None, step=0.2):
        self.t, self.graph, self.step = 0.0, graph, step

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds
        if self.graph is not None:
            self.graph.poll += 1


def test_waits_for_the_named_nodes_cloud_subscription_only(capsys):
    rviz = {("rviz2", "/"): [("/velodyne_points", [CLOUD])]}     # rviz shows the input: not the node
    warming = {**rviz, ("lidar_completion", "/"): [("/parameter_events", ["rcl_interfaces/msg/ParameterEvent"]),
                                                   ("/tf", ["tf2_msgs/msg/TFMessage"])]}
    ready = {**warming, ("lidar_completion", "/"): warming[("lidar_completion", "/")] +
             [("/points", [CLOUD])]}
    graph = FakeGraph([rviz] * 40 + [warming] * 60 + [ready])
    clock = Clock(graph)
    topics = pw.wait_for_subscription(graph, "lidar_completion", clock=clock, sleep=clock.sleep)
    assert topics == ["/points"]
    assert graph.poll == 100 and clock.t == pytest.approx(20.0)
    # one progress line after 15 s of waiting, naming the node and why it may take long
    lines = [l for l in capsys.readouterr().err.splitlines() if "still waiting" in l]
    assert len(lines) == 1 and "'lidar_completion'" in lines[0] and "warm-up" in lines[0], lines


def test_any_namespace_and_a_node_that_leaves_mid_query():
    other = {("lidar_completion", "/robot1"): [("/robot1/velodyne_points", [CLOUD])],
             ("lidar_completion", "/gone"): [("/gone/points", [CLOUD])]}
    graph = FakeGraph([other], vanished={("lidar_completion", "/gone")})
    assert pw.cloud_subscriptions(graph, "lidar_completion") == ["/robot1/velodyne_points"]
    assert pw.cloud_subscriptions(graph, "lidar") == []


def test_timeout_returns_none_and_no_timeout_waits_on():
    graph = FakeGraph([{}])
    clock = Clock(graph)
    assert pw.wait_for_subscription(graph, "lidar_completion", timeout=3.0, clock=clock,
                                    sleep=clock.sleep) is None
    assert 3.0 <= clock.t < 3.0 + 2 * pw.POLL_S
    late = FakeGraph([{}] * 2000 + [{("lidar_completion", "/"): [("/v", [CLOUD])]}])
    clock = Clock(late)
    assert pw.wait_for_subscription(late, "lidar_completion", clock=clock, sleep=clock.sleep) == ["/v"]
    assert clock.t == pytest.approx(400.0)


def test_command_line(capsys):
    args = pw.parse_args(["--node", "n", "--bag", "b.mcap", "--timeout", "5", "--", "ros2", "bag",
                          "play", "b.mcap", "--node", "x"])
    assert (args.node, args.bag, args.timeout) == ("n", "b.mcap", 5.0)
    assert args.command == ["ros2", "bag", "play", "b.mcap", "--node", "x"]  # after --: untouched
    assert pw.parse_args(["--", "true"]).node == "lidar_completion"
    for bad, says in ((["--node", "n"], "no command to run"), (["--timeout", "-1", "--", "true"],
                                                               "--timeout must be")):
        with pytest.raises(SystemExit):
            pw.parse_args(bad)
        assert says in capsys.readouterr().err


def test_bag_check_names_the_bags_cloud_topics(tmp_path):
    pytest.importorskip("rosbags")
    from lidar_completion.bags.io import write_clouds

    bag = write_clouds(tmp_path / "drive.mcap", [(10**9 * i, np.zeros((4, 3), np.float32))
                                                 for i in range(1, 3)], topic="/kitti/velo")
    assert pw.bag_check(str(bag), ["/kitti/velo"]) is None
    warning = pw.bag_check(str(bag), ["/velodyne_points"])
    assert "no messages on /velodyne_points" in warning and "input_topic:=/kitti/velo" in warning
    assert pw.bag_check(str(bag), ["/velodyne_points", "/kitti/velo"]) is None
    assert "cannot inspect the bag" in pw.bag_check(str(tmp_path / "missing.mcap"), ["/v"])


# ----------------------------------------------------------------------------- against a real graph
GATE = [sys.executable, "-m", "lidar_completion_pkg.play_when_ready"]
MARKER = "import sys; open(sys.argv[1], 'w').write(' '.join(sys.argv[2:]))"


@pytest.mark.ros
def test_runs_the_command_only_once_the_node_subscribes(tmp_path):
    rs.require("rclpy", "sensor_msgs")
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2

    domain = rs.random_domain()
    marker = tmp_path / "played"
    log = tmp_path / "gate.log"
    cmd = GATE + ["--node", "lidar_completion", "--", sys.executable, "-c", MARKER, str(marker),
                  "bag", "--clock"]
    with rs.process_group(cmd, rs.ros_env(domain), log) as proc, \
            rs.participant(domain, "lidar_completion") as node, rs.participant(domain, "rviz2") as rviz:
        rviz.record(PointCloud2, "/velodyne_points", qos_profile_sensor_data)  # another node's
        rviz.spin(3.0)
        assert proc.poll() is None and not marker.exists(), log.read_text()
        node.record(PointCloud2, "/velodyne_points", qos_profile_sensor_data)
        node.wait_for(lambda: proc.poll() is not None, 30, "the gate to run its command", None, log)
    assert proc.returncode == 0, log.read_text()
    assert marker.read_text() == "bag --clock"   # the command, its arguments as given
    text = log.read_text()
    assert "subscribes to /velodyne_points" in text, text


@pytest.mark.ros
def test_interrupted_wait_plays_nothing_and_a_missing_command_is_named(tmp_path):
    rs.require("rclpy", "sensor_msgs")
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2

    domain = rs.random_domain()
    marker = tmp_path / "played"
    log = tmp_path / "gate.log"
    cmd = GATE + ["--", sys.executable, "-c", MARKER, str(marker)]
    with rs.process_group(cmd, rs.ros_env(domain), log) as proc:
        deadline = time.monotonic() + 30
        while "waiting for node" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(20) == 0
    assert not marker.exists() and "nothing played" in log.read_text(), log.read_text()

    log = tmp_path / "missing.log"
    cmd = GATE + ["--node", "lidar_completion", "--", "no-such-player-here", "bag"]
    with rs.process_group(cmd, rs.ros_env(domain), log) as proc, \
            rs.participant(domain, "lidar_completion") as node:
        node.record(PointCloud2, "/points", qos_profile_sensor_data)
        node.wait_for(lambda: proc.poll() is not None, 30, "the gate to give up", None, log)
    assert proc.returncode == 127 and "cannot run 'no-such-player-here'" in log.read_text()
