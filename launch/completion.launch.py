"""Launch the LiDAR completion node, optionally managed (lifecycle), with rviz2 and a rosbag2 replay.

    ros2 launch lidar_completion_pkg completion.launch.py device:=cpu
    ros2 launch lidar_completion_pkg completion.launch.py checkpoint:=/path/student.pt steps:=4 \\
        model_frame:=velodyne target_frame:=odom rviz:=true bag:=/data/kitti_08.mcap
    ros2 launch lidar_completion_pkg completion.launch.py lifecycle:=true autostart:=false

Works with a system ROS 2 (colcon) and with `make setup`'s venv (`.venv/bin/ros2 launch ...`; there
rviz2 and `ros2 bag play` are not available). Parameters come from ``params_file`` (default:
params/completion.yaml next to this file); launch arguments given on the command line override it.
Arguments left empty are not passed, so the params file keeps its values. The shipped Fast DDS profile
(fastdds_profile.xml next to this file) is set in FASTDDS_DEFAULT_PROFILES_FILE for every process started
here (node, bag player, rviz2) unless the environment already names one: large best-effort clouds are
lost between processes without it.

``lifecycle:=true`` starts the managed node (lifecycle_completion_node); with ``autostart:=true`` (the
default) the launch drives it through configure (checkpoint + warm-up scan) to active, otherwise it waits
in ``unconfigured`` for `ros2 lifecycle set /lidar_completion configure` (a lifecycle manager's job).

``launch`` and ``launch_ros`` are imported inside generate_launch_description only, so this file can be
read (and its tables checked) without a ROS 2 installation.
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "lidar_completion_pkg"
EXECUTABLE = "completion_node"
LIFECYCLE_EXECUTABLE = "lifecycle_completion_node"
NODE_NAME = "lidar_completion"
PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"
DEFAULT_FIXED_FRAME = "velodyne"

# (name, default, description). An empty default means "not given: keep the params file's value".
# Arguments that are Completer options start with the option's description in lidar_completion.settings
# (tests/test_settings.py checks).
ARGUMENTS = (
    ("checkpoint", "", "checkpoint file (ours, or a published LiDiff / ScoreLiDAR / Distillation-DPO "
                       "file); empty = the params file's value"),
    ("input_topic", "", "input PointCloud2 topic (params file default: /velodyne_points)"),
    ("output_topic", "", "completed PointCloud2 topic (params file default: /completed_points)"),
    ("steps", "", "solver steps per scan; empty = the params file's value"),
    ("device", "", "torch device: cpu, cuda, cuda:N or auto; empty = the params file's value"),
    ("model_frame", "", "TF frame the networks see (gravity-aligned, origin at the LiDAR); params "
                        "file default: empty = the input cloud's frame"),
    ("target_frame", "", "frame the completion is published in; params file default: empty = the "
                         "input cloud's frame"),
    ("use_sim_time", "", "use /clock; empty = true when bag is given, else false"),
    ("params_file", os.path.join(HERE, "params", "completion.yaml"), "node parameters (YAML)"),
    ("lifecycle", "false", "start the managed (lifecycle) node instead of the plain one"),
    ("autostart", "true", "with lifecycle:=true, configure and activate the node at start"),
    ("rviz", "false", "start rviz2 with rviz/completion.rviz (input and completed clouds)"),
    ("fixed_frame", "", "rviz fixed frame; empty = target_frame if given, else velodyne"),
    ("bag", "", "rosbag2 to play with `ros2 bag play --clock` (its cloud topic must be input_topic)"),
)
# Launch arguments that become node parameters (on top of the params file), with their types.
NODE_PARAMETER_ARGUMENTS = {
    "checkpoint": "string", "input_topic": "string", "output_topic": "string", "steps": "integer",
    "device": "string", "model_frame": "string", "target_frame": "string", "use_sim_time": "bool",
}
RVIZ_CONFIG = os.path.join(HERE, "rviz", "completion.rviz")
FASTDDS_PROFILE = os.path.join(HERE, "fastdds_profile.xml")
DEFAULT_TOPICS = {"input_topic": "/velodyne_points", "output_topic": "/completed_points"}


def flag(name, text):
    """A true/false launch argument as a bool."""
    if text.strip().lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"{name} must be true or false, got {text!r}")
    return text.strip().lower() in ("true", "1")


def typed(name, text):
    """A launch argument's text as the node parameter's type."""
    kind = NODE_PARAMETER_ARGUMENTS[name]
    if kind == "integer":
        return int(text)
    if kind == "bool":
        return flag(name, text)
    return text


def node_overrides(values):
    """{parameter: typed value} for the arguments given (non-empty), in ARGUMENTS order."""
    overrides = {}
    for name, _default, _doc in ARGUMENTS:
        if name in NODE_PARAMETER_ARGUMENTS and values.get(name, "") != "":
            overrides[name] = typed(name, values[name])
    if "use_sim_time" not in overrides and values.get("bag", ""):
        overrides["use_sim_time"] = True  # the bag player publishes /clock
    return overrides


def fixed_frame_for(values):
    return values.get("fixed_frame") or values.get("target_frame") or DEFAULT_FIXED_FRAME


def rviz_config_for(values, out_dir):
    """The shipped rviz config, with the topics and the fixed frame replaced when given."""
    topics = {k: values.get(k) or v for k, v in DEFAULT_TOPICS.items()}
    fixed = fixed_frame_for(values)
    if topics == DEFAULT_TOPICS and fixed == DEFAULT_FIXED_FRAME:
        return RVIZ_CONFIG
    with open(RVIZ_CONFIG) as f:
        text = f.read()
    for key, default in DEFAULT_TOPICS.items():
        text = text.replace(f"Value: {default}\n", f"Value: {topics[key]}\n")
    text = text.replace(f"Fixed Frame: {DEFAULT_FIXED_FRAME}\n", f"Fixed Frame: {fixed}\n")
    path = os.path.join(out_dir, "lidar_completion.rviz")
    with open(path, "w") as f:
        f.write(text)
    return path


def generate_launch_description():
    import tempfile

    from launch import LaunchDescription
    from launch.actions import (DeclareLaunchArgument, EmitEvent, ExecuteProcess, OpaqueFunction,
                                RegisterEventHandler, SetEnvironmentVariable)
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import LifecycleNode, Node

    def managed(node, autostart):
        """The lifecycle node, driven configure -> activate when ``autostart``."""
        if not autostart:
            return [node]
        from launch.events import matches_action
        from launch_ros.event_handlers import OnStateTransition
        from launch_ros.events.lifecycle import ChangeState
        from lifecycle_msgs.msg import Transition

        def change(transition):
            return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                               transition_id=transition))

        # activate after the first successful configure only (not after a later deactivate, nor
        # after a configure that follows a cleanup: those belong to whoever drives the node then)
        return [node,
                RegisterEventHandler(OnStateTransition(
                    target_lifecycle_node=node, start_state="configuring", goal_state="inactive",
                    entities=[change(Transition.TRANSITION_ACTIVATE)], handle_once=True)),
                change(Transition.TRANSITION_CONFIGURE)]

    def setup(context, *args, **kwargs):
        values = {name: LaunchConfiguration(name).perform(context) for name, _d, _h in ARGUMENTS}
        actions = []
        if not os.environ.get(PROFILE_ENV) and os.path.isfile(FASTDDS_PROFILE):
            actions.append(SetEnvironmentVariable(PROFILE_ENV, FASTDDS_PROFILE))
        params = [values["params_file"]] if values["params_file"] else []
        params.append(node_overrides(values))  # last wins: command line over the params file
        common = dict(package=PACKAGE, name=NODE_NAME, output="screen", emulate_tty=True,
                      parameters=params)
        if flag("lifecycle", values["lifecycle"]):
            node = LifecycleNode(executable=LIFECYCLE_EXECUTABLE, namespace="", **common)
            actions += managed(node, flag("autostart", values["autostart"]))
        else:
            actions.append(Node(executable=EXECUTABLE, **common))
        if flag("rviz", values["rviz"]):
            config = rviz_config_for(values, tempfile.mkdtemp(prefix="lidar_completion_rviz_"))
            actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
                                arguments=["-d", config]))
        if values["bag"]:
            actions.append(ExecuteProcess(cmd=["ros2", "bag", "play", values["bag"], "--clock"],
                                          output="screen"))
        return actions

    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=doc)
         for name, default, doc in ARGUMENTS] + [OpaqueFunction(function=setup)])
