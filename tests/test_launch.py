"""launch/completion.launch.py and launch/params/completion.yaml against the node's declarations.

`launch` / `launch_ros` are not installable from PyPI, so the launch file is read with ast and its
generate_launch_description() is run against small stand-ins that record what it builds; the node's
real declarations come from a node process (rclpy) with a stand-in completer.
"""
import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from lidar_completion_pkg import dds
from lidar_completion_pkg.parameters import BUILTIN, BY_NAME, PARAMETERS, check_value

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "completion.launch.py"
PARAMS = ROOT / "launch" / "params" / "completion.yaml"
RVIZ = ROOT / "launch" / "rviz" / "completion.rviz"
ISSUE_ARGUMENTS = {"checkpoint", "input_topic", "output_topic", "steps", "device", "use_sim_time",
                   "params_file", "rviz", "bag"}


def launch_tables():
    tree = ast.parse(LAUNCH.read_text())
    tables = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name) and node.targets[0].id in (
                    "ARGUMENTS", "NODE_PARAMETER_ARGUMENTS"):
            try:
                tables[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # ARGUMENTS holds os.path.join(...) for params_file
                tables[node.targets[0].id] = [
                    (elt.elts[0].value, None, None) for elt in node.value.elts]
    return tables


def yaml_parameters():
    doc = yaml.safe_load(PARAMS.read_text())
    assert list(doc) == ["/**"], "the params file must configure the node through the /** wildcard"
    return doc["/**"]["ros__parameters"]


def test_launch_file_imports_no_ros_at_module_level():
    tree = ast.parse(LAUNCH.read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | \
        {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"launch", "launch_ros", "rclpy", "ament_index_python"}


def test_launch_arguments_are_node_parameters():
    tables = launch_tables()
    names = [a[0] for a in tables["ARGUMENTS"]]
    assert set(names) == ISSUE_ARGUMENTS and len(names) == len(set(names))
    param_args = tables["NODE_PARAMETER_ARGUMENTS"]
    for name, kind in param_args.items():
        assert name in names
        if name in BUILTIN:
            continue
        assert name in BY_NAME, f"launch argument {name} is not a parameter the node declares"
        assert BY_NAME[name].type == kind, f"{name}: launch says {kind}, node {BY_NAME[name].type}"
    assert set(param_args) == ISSUE_ARGUMENTS - {"params_file", "rviz", "bag"}


def test_params_file_matches_declarations_exactly():
    values = yaml_parameters()
    declared = {p.name for p in PARAMETERS}
    assert set(values) - declared == set(), "params file sets parameters the node does not declare"
    assert declared - set(values) == set(), "declared parameters missing from the params file"
    for p in PARAMETERS:
        assert check_value(p.name, values[p.name]) is None, check_value(p.name, values[p.name])
        assert values[p.name] == p.default, f"{p.name}: params file {values[p.name]!r}, " \
                                            f"declared default {p.default!r}"


def test_rviz_config_shows_both_clouds_in_distinct_colours_in_sensor_frame():
    cfg = yaml.safe_load(RVIZ.read_text())
    vm = cfg["Visualization Manager"]
    assert vm["Global Options"]["Fixed Frame"] == "velodyne"
    clouds = {d["Topic"]["Value"]: d for d in vm["Displays"]
              if d["Class"] == "rviz_default_plugins/PointCloud2"}
    assert set(clouds) == {BY_NAME["input_topic"].default, BY_NAME["output_topic"].default}
    colours = {d["Color"] for d in clouds.values()}
    assert len(colours) == 2 and all(d["Color Transformer"] == "FlatColor" for d in clouds.values())
    assert all(d["Topic"]["Reliability Policy"] == "Best Effort" for d in clouds.values())


def test_profile_is_shipped_next_to_the_launch_file_and_in_the_package():
    in_launch = ROOT / "launch" / dds.PROFILE_NAME
    assert in_launch.is_file() and Path(dds.profile_path()).is_file()
    assert in_launch.resolve() == Path(dds.profile_path()).resolve()
    assert 4 * 2**20 <= dds.segment_size_bytes() <= 32 * 2**20  # a few clouds, not more


# ----------------------------------------------------------------------- running the launch function
class _Recorder:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _stub_launch_modules(values):
    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return context[self.name]

    mods = {name: types.ModuleType(name) for name in (
        "launch", "launch.actions", "launch.substitutions", "launch_ros", "launch_ros.actions")}
    mods["launch"].LaunchDescription = _Recorder
    for cls in ("DeclareLaunchArgument", "ExecuteProcess", "OpaqueFunction", "SetEnvironmentVariable"):
        setattr(mods["launch.actions"], cls, type(cls, (_Recorder,), {}))
    mods["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    mods["launch_ros.actions"].Node = type("Node", (_Recorder,), {})
    return mods


def run_launch(monkeypatch, given, environ_profile=None):
    """Evaluate the launch description with the arguments in ``given`` (others at their defaults)."""
    if environ_profile is None:
        monkeypatch.delenv(dds.PROFILE_ENV, raising=False)
    else:
        monkeypatch.setenv(dds.PROFILE_ENV, environ_profile)
    for name, mod in _stub_launch_modules(given).items():
        monkeypatch.setitem(sys.modules, name, mod)
    namespace = {"__file__": str(LAUNCH), "__name__": "completion_launch"}
    exec(compile(LAUNCH.read_text(), str(LAUNCH), "exec"), namespace)
    ld = namespace["generate_launch_description"]()
    entities = ld.args[0]
    declared = {e.kwargs.get("name", e.args[0] if e.args else None): e.kwargs["default_value"]
                for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    context = {**declared, **given}
    opaque = [e for e in entities if type(e).__name__ == "OpaqueFunction"]
    assert len(opaque) == 1
    actions = opaque[0].kwargs["function"](context)
    by_kind = {}
    for a in actions:
        by_kind.setdefault(type(a).__name__, []).append(a)
    return declared, by_kind


def test_command_line_arguments_override_the_params_file(monkeypatch):
    declared, actions = run_launch(monkeypatch, {})
    assert set(declared) == ISSUE_ARGUMENTS
    node, = actions["Node"]
    assert node.kwargs["package"] == "lidar_completion_pkg"
    assert node.kwargs["executable"] == "completion_node"
    params = node.kwargs["parameters"]
    assert Path(params[0]).resolve() == PARAMS.resolve()
    assert params[1] == {}, "arguments not given must not override the params file"
    _, actions = run_launch(monkeypatch, {"steps": "4", "checkpoint": "models/s.pt",
                                          "params_file": "config/mine.yaml", "device": "cuda"})
    params = actions["Node"][0].kwargs["parameters"]
    # launch_ros applies the list in order, later entries win: the file first, then the overrides
    assert params == ["config/mine.yaml", {"checkpoint": "models/s.pt", "steps": 4, "device": "cuda"}]
    assert "ExecuteProcess" not in actions


def test_profile_rviz_and_bag(monkeypatch, tmp_path):
    _, actions = run_launch(monkeypatch, {})
    env, = actions["SetEnvironmentVariable"]
    assert env.args[0] == dds.PROFILE_ENV and Path(env.args[1]).is_file()
    _, actions = run_launch(monkeypatch, {}, environ_profile="/etc/my_profile.xml")
    assert "SetEnvironmentVariable" not in actions, "a profile the user set must be kept"

    _, actions = run_launch(monkeypatch, {"rviz": "true", "bag": "/data/drive.mcap",
                                          "output_topic": "/dense"})
    bag, = actions["ExecuteProcess"]
    assert bag.kwargs["cmd"] == ["ros2", "bag", "play", "/data/drive.mcap", "--clock"]
    node = [n for n in actions["Node"] if n.kwargs["package"] == "lidar_completion_pkg"][0]
    assert node.kwargs["parameters"][1] == {"output_topic": "/dense", "use_sim_time": True}
    rviz, = [n for n in actions["Node"] if n.kwargs["package"] == "rviz2"]
    config = Path(rviz.kwargs["arguments"][1])
    text = config.read_text()
    assert "Value: /dense\n" in text and "Value: /velodyne_points\n" in text
    assert config != RVIZ
    _, actions = run_launch(monkeypatch, {"bag": "/data/drive.mcap", "use_sim_time": "false"})
    assert actions["Node"][0].kwargs["parameters"][1] == {"use_sim_time": False}
    _, actions = run_launch(monkeypatch, {"rviz": "true"})
    assert Path(actions["Node"][1].kwargs["arguments"][1]) == RVIZ


# ------------------------------------------------------------------ the node's real declarations (rclpy)
DUMP_DECLARATIONS = r"""
import json, sys
import rclpy
from lidar_completion_pkg.completion_node import node_class

class StandIn:
    steps, guidance = 8, 3.5
    def complete(self, points):
        return points

rclpy.init(args=sys.argv)
node = node_class()(completer_factory=lambda config: StandIn())
names = node._parameters.keys()
out = {}
for name in names:
    d = node.describe_parameter(name)
    out[name] = {"type": d.type, "read_only": d.read_only, "description": d.description,
                 "value": node.get_parameter(name).value}
node.stop()
node.destroy_node()
rclpy.try_shutdown()
print(json.dumps(out))
"""


def node_declarations(*ros_args):
    pytest.importorskip("rclpy", reason="needs the ROS 2 wheels (pip install .[ros])")
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               ROS_DOMAIN_ID=str(100 + os.getpid() % 100))
    env[dds.PROFILE_ENV] = dds.profile_path()
    proc = subprocess.run([sys.executable, "-c", DUMP_DECLARATIONS, "--ros-args", *ros_args],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.ros
def test_node_declares_exactly_the_table_and_params_file_order_wins(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("/**:\n  ros__parameters:\n    steps: 3\n    input_topic: /points\n")
    decl = node_declarations("--params-file", str(PARAMS), "--params-file", str(override),
                             "-p", "guidance:=2")
    table = {p.name for p in PARAMETERS}
    assert table <= set(decl)
    extras = set(decl) - table
    assert "use_sim_time" in extras and set(BUILTIN) <= extras
    assert all(not e.startswith(("lidar", "qos_", "input", "output")) for e in extras), extras
    for p in PARAMETERS:
        assert decl[p.name]["description"] == p.description
        assert decl[p.name]["read_only"] == (not p.dynamic)
    # the later source wins: override file over the params file, -p over both; ints become doubles
    assert decl["steps"]["value"] == 3 and decl["input_topic"]["value"] == "/points"
    assert decl["guidance"]["value"] == 2.0
    assert decl["output_topic"]["value"] == "/completed_points"
