"""Launch the LiDAR completion node, optionally managed (lifecycle), with rviz2 and a rosbag2 replay.

    ros2 launch lidar_completion_pkg completion.launch.py device:=cpu
    ros2 launch lidar_completion_pkg completion.launch.py checkpoint:=/path/student.pt steps:=4 \\
        model_frame:=velodyne target_frame:=odom rviz:=true bag:=/data/kitti_08.mcap
    ros2 launch lidar_completion_pkg completion.launch.py lifecycle:=true autostart:=false
    ros2 launch lidar_completion_pkg completion.launch.py namespace:=front   # /front/velodyne_points

Works with a system ROS 2 (colcon) and with `make setup`'s venv (`.venv/bin/ros2 launch ...`; there
rviz2 is not available and ``rviz:=true`` stops the launch with the reason before anything starts,
and ``bag:=...`` plays the bag with this package's player instead of `ros2 bag play`). Parameters come from ``params_file`` (default: params/completion.yaml
next to this file); launch arguments given on the command line override it. Arguments left empty are
not passed, so the params file keeps its values. Every other node parameter can be given as
``name:=value`` too (``guidance:=4.0 n_fps:=8000``): typed as the node declares it, over the params
file. A name that is neither is named in a warning (with the nearest valid name): a typo must not
go unnoticed, but launch hands an included file all of the includer's configurations, so a launch
file with arguments of its own can include this one. The shipped Fast DDS profile (fastdds_profile.xml next to this file)
is set in FASTDDS_DEFAULT_PROFILES_FILE for every process started here (node, bag player, rviz2)
unless the environment already names one: large best-effort clouds are lost between processes
without it.

``lifecycle:=true`` starts the managed node (lifecycle_completion_node); with ``autostart:=true`` (the
default) the launch drives it through configure (checkpoint + warm-up scan) to active, otherwise it waits
in ``unconfigured`` for `ros2 lifecycle set /lidar_completion configure` (a lifecycle manager's job).

``bag:=BAG`` plays a rosbag2 with ``ros2 bag play BAG --clock`` (and ``bag_args``), started only once
the node subscribes to its input (play_when_ready: the node warms up first, seconds on a CPU, and the
bag's first scans would be published to nobody), with ``use_sim_time`` true unless given. Without
rosbag2 (or with ``bag_player:=own``) this package's player (lidar_completion_pkg.replay) plays it:
the node's input topic and /tf, /tf_static, no /clock (``use_sim_time`` then stays false). When the
player ends the node keeps running, or the launch ends with ``exit_after_bag:=true`` (once the node
has finished the scans it received, at most SETTLE_S later); when the node exits during a replay,
the launch ends.

``namespace:=NS`` starts the node as /NS/<node_name>: its default topics are relative, so it reads
/NS/velodyne_points and publishes /NS/completed_points (two sensors: one launch per namespace, or an
including file with PushRosNamespace). Absolute topic names (``input_topic:=/points``) stay as given.

``launch`` and ``launch_ros`` are imported inside generate_launch_description only, so this file can be
read (and its tables checked) without a ROS 2 installation.
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "lidar_completion_pkg"
EXECUTABLE = "completion_node"
LIFECYCLE_EXECUTABLE = "lifecycle_completion_node"
PLAYER_GATE_EXECUTABLE = "play_when_ready"  # runs the bag player once the node subscribes
SETTLE_S = 60  # exit_after_bag: at most this long for the node to finish the scans it received
# exit statuses of a player stopped by SIGINT / SIGTERM (a shell's 128 + N, or Python's -N)
INTERRUPTED = (130, 143, -2, -15)
NODE_NAME = "lidar_completion"
PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"
DEFAULT_FIXED_FRAME = "velodyne"

# (name, default, description). An empty default means "not given: keep the params file's value".
# Arguments that are Completer options start with the option's description in lidar_completion.settings
# (tests/test_settings.py checks).
ARGUMENTS = (
    ("checkpoint", "", "checkpoint file (ours, or a published LiDiff / ScoreLiDAR / Distillation-DPO "
                       "file); empty = the params file's value"),
    ("input_topic", "", "input PointCloud2 topic (params file default: velodyne_points, relative: "
                        "/velodyne_points at the root, /NS/velodyne_points with namespace:=NS)"),
    ("output_topic", "", "completed PointCloud2 topic (params file default: completed_points, "
                         "relative like input_topic)"),
    ("namespace", "", "namespace of the node (and of its relative topics); empty = the root, or "
                      "an including file's PushRosNamespace"),
    ("node_name", "lidar_completion", "name of the node"),
    ("steps", "", "solver steps per scan; empty = the params file's value"),
    ("device", "", "torch device: cpu, cuda, cuda:N or auto; empty = the params file's value"),
    ("model_frame", "", "TF frame the networks see (gravity-aligned, origin at the LiDAR); params "
                        "file default: empty = the input cloud's frame"),
    ("target_frame", "", "frame the completion is published in; params file default: empty = the "
                         "input cloud's frame"),
    ("use_sim_time", "", "use /clock; empty = true when `ros2 bag play` plays bag, else false"),
    ("params_file", os.path.join(HERE, "params", "completion.yaml"),
     "node parameters (YAML); any node parameter can also be given as name:=value, over this file"),
    ("lifecycle", "false", "start the managed (lifecycle) node instead of the plain one"),
    ("autostart", "true", "with lifecycle:=true, configure and activate the node at start"),
    ("rviz", "false", "start rviz2 with rviz/completion.rviz (input and completed clouds)"),
    ("fixed_frame", "", "rviz fixed frame; empty = target_frame if given, else velodyne"),
    ("bag", "", "rosbag2 to play with `ros2 bag play --clock` once the node subscribes (its cloud "
                "topic must be input_topic)"),
    ("bag_player", "auto", "who plays bag: ros2 (`ros2 bag play --clock`), own (this package's "
                           "player, no rosbag2 needed: clouds and /tf, no /clock) or auto (ros2 when "
                           "installed, else own)"),
    ("bag_args", "", "more arguments for the bag player, shell-quoted, e.g. \"--rate 0.2\""),
    ("exit_after_bag", "false", "end the launch when the bag player ends (default: the node keeps "
                                "running)"),
)
# Launch arguments that become node parameters (on top of the params file), with their types.
NODE_PARAMETER_ARGUMENTS = {
    "checkpoint": "string", "input_topic": "string", "output_topic": "string", "steps": "integer",
    "device": "string", "model_frame": "string", "target_frame": "string", "use_sim_time": "bool",
}
RVIZ_CONFIG = os.path.join(HERE, "rviz", "completion.rviz")
FASTDDS_PROFILE = os.path.join(HERE, "fastdds_profile.xml")
DEFAULT_TOPICS = {"input_topic": "velodyne_points", "output_topic": "completed_points"}
RVIZ_TOPICS = {"input_topic": "/velodyne_points", "output_topic": "/completed_points"}  # in RVIZ_CONFIG
# Launch configurations that launch / launch_ros set themselves (an including file's PushRosNamespace,
# SetParameter, SetRemap; a user's emulate_tty): not launch arguments, never an error.
FRAMEWORK_CONFIGURATIONS = ("ros_namespace", "global_params", "ros_remaps", "emulate_tty")
RVIZ_MISSING = ("rviz:=true needs rviz2, and there is no package 'rviz2' here (the venv of `make "
                "setup` has none): launch it with a system ROS 2 that has rviz2 (`apt install "
                "ros-<distro>-rviz2`), or run rviz2 on another machine (docs/ros2.md, section 8), or "
                "leave rviz:=false")
BAG_MISSING = ("bag:=... needs `ros2 bag` (rosbag2: the ros2bag package and `ros2` on the PATH) or, "
               "for bag_player:=own, the rosbags package; {missing}: install rosbag2 with a system "
               "ROS 2 (`apt install ros-<distro>-rosbag2`) or this package's Python dependencies "
               "(`pip install rosbags`), or replay the bag with `lidar-completion bag-bench BAG "
               "--live` (docs/bags.md)")
BAG_PLAYERS = ("auto", "ros2", "own")
INPUT_TOPIC_PLACEHOLDER = "{input_topic}"   # play_when_ready puts the node's input topic there


def flag(name, text):
    """A true/false launch argument as a bool."""
    if text.strip().lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"{name} must be true or false, got {text!r}")
    return text.strip().lower() in ("true", "1")


def parse_value(name, kind, text):
    """``text`` as a value of a node parameter of type ``kind`` (the table's "string", "integer",
    "double", "bool"). Typed here, not by launch_ros's YAML reading, so that e.g. a double given as
    ``4`` stays a double and a string that reads as a number or a bool stays a string."""
    if kind == "bool":
        return flag(name, text)
    try:
        if kind == "integer":
            return int(text)
        if kind == "double":
            return float(text)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind == 'integer' else 'a number'}, "
                         f"got {text!r}") from None
    return text


def typed(name, text):
    """A launch argument's text as the node parameter's type."""
    return parse_value(name, NODE_PARAMETER_ARGUMENTS[name], text)


def node_overrides(values, bag_clock=True):
    """{parameter: typed value} for the arguments given (non-empty), in ARGUMENTS order.
    ``bag_clock``: the bag player publishes /clock (`ros2 bag play --clock`; this package's does not)."""
    overrides = {}
    for name, _default, _doc in ARGUMENTS:
        if name in NODE_PARAMETER_ARGUMENTS and values.get(name, "") != "":
            overrides[name] = typed(name, values[name])
    if "use_sim_time" not in overrides and values.get("bag", "") and bag_clock:
        overrides["use_sim_time"] = True
    return overrides


def extra_arguments(configurations):
    """{name: text} of the launch configurations that are not arguments of this file (``name:=value``
    given on the command line for a name it does not declare), in the order given."""
    declared = {name for name, _d, _h in ARGUMENTS}
    return {k: v for k, v in configurations.items()
            if k not in declared and k not in FRAMEWORK_CONFIGURATIONS and not k.startswith("anon")
            and isinstance(v, str)}  # (AnonName's "anon<name>" entries; launch_ros keeps lists too)


def parameter_overrides(extra, parameter_types):
    """({parameter: typed value} of the extra arguments that are node parameters, a warning naming
    the others with the valid names, or None). ``parameter_types``: {name: type} of the node's
    parameters. The others are not refused: they may be an including launch file's own arguments
    (launch hands an included file every configuration of its includer)."""
    unknown = [name for name in extra if name not in parameter_types]
    warning = None
    if unknown:
        import difflib
        known = [name for name, _d, _h in ARGUMENTS] + sorted(set(parameter_types) -
                                                              set(NODE_PARAMETER_ARGUMENTS))
        named = [repr(n) + "".join(f" (did you mean '{m}'?)"
                                   for m in difflib.get_close_matches(n, known, 1)) for n in unknown]
        warning = (
            f"ignored launch argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(named)}: not an argument of this launch file nor a "
            f"parameter of the node. Launch arguments: {', '.join(n for n, _d, _h in ARGUMENTS)}; "
            f"node parameters (name:=value; `lidar-completion-node --help` describes them): "
            f"{', '.join(sorted(set(parameter_types) - set(NODE_PARAMETER_ARGUMENTS)))}")
    typed = {name: parse_value(name, parameter_types[name], text) for name, text in extra.items()
             if name in parameter_types}
    return typed, warning


def rviz2_available():
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    try:
        get_package_share_directory("rviz2")
    except PackageNotFoundError:
        return False
    return True


def ros2_bag_available():
    """`ros2 bag play` can run: the ros2bag verb is importable and a `ros2` is on the PATH."""
    import importlib.util
    import shutil
    return importlib.util.find_spec("ros2bag") is not None and shutil.which("ros2") is not None


def own_player_available():
    """This package's bag player can run: rosbags (which reads the bag) is importable."""
    import importlib.util
    return importlib.util.find_spec("rosbags") is not None


def choose_bag_player(values, ros2_bag=ros2_bag_available, own=own_player_available):
    """"ros2" or "own" for ``bag_player`` (auto: ros2 when installed), None when that one cannot run;
    ValueError for a value that is not a player."""
    wanted = values.get("bag_player", "auto") or "auto"
    if wanted not in BAG_PLAYERS:
        raise ValueError(f"bag_player must be one of {', '.join(BAG_PLAYERS)}, got {wanted!r}")
    if wanted in ("auto", "ros2") and ros2_bag():
        return "ros2"
    if wanted in ("auto", "own") and own():
        return "own"
    return None


def check_tools(values, rviz2=rviz2_available, ros2_bag=ros2_bag_available, own=own_player_available):
    """The bag player to use (None without ``bag``), or RuntimeError with what is missing for ``rviz``
    / ``bag``, raised before any action exists: a launch whose rviz2 or bag player cannot start would
    otherwise fail after the node started (and leave it running without its launch)."""
    problems = []
    player = None
    if flag("rviz", values["rviz"]) and not rviz2():
        problems.append(RVIZ_MISSING)
    if values.get("bag_args", "") and not values["bag"]:
        problems.append("bag_args:=... given without bag:=...")
    if values["bag"]:
        try:
            split_bag_args(values)
            flag("exit_after_bag", values.get("exit_after_bag", "false"))
            player = choose_bag_player(values, ros2_bag, own)
            if player is None:
                wanted = values.get("bag_player", "auto") or "auto"
                missing = {"auto": "neither is available here", "ros2": "`ros2 bag` is not available "
                           "here (the venv of `make setup` has none)",
                           "own": "rosbags is not installed"}[wanted]
                problems.append(BAG_MISSING.format(missing=missing))
            elif not os.path.exists(values["bag"]):
                problems.append(f"bag:={values['bag']}: no such file or directory")
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise RuntimeError("; and ".join(problems))
    return player


def split_bag_args(values):
    """``bag_args`` as a list (ValueError naming a bad one)."""
    import shlex
    try:
        return shlex.split(values.get("bag_args", ""))
    except ValueError as exc:
        raise ValueError(f"bag_args:={values['bag_args']!r} cannot be split into arguments: "
                         f"{exc}") from None


def node_namespace(values, pushed=""):
    """The node's absolute namespace: ``namespace`` (absolute, or under an including file's
    PushRosNamespace ``pushed``), "/" for none. An includer that pushes its namespace and also
    passes it on as ``namespace`` (nav2's bringup does both) gets it once, not /robot1/robot1:
    launch hands an included file the includer's configurations."""
    ns = (values.get("namespace") or "").strip()
    pushed = (pushed or "").strip("/")
    if not ns.startswith("/"):
        ns = ns.strip("/")
        if ns and (pushed == ns or pushed.endswith("/" + ns)):
            ns = ""
        ns = "/".join(part for part in (pushed, ns) if part)
    return "/" + ns.strip("/")


def resolved_topic(values, key, pushed=""):
    """Topic ``key`` (input_topic / output_topic, the argument or the default) as the node resolves
    it: absolute names as given, relative ones in the node's namespace, ~ under its name."""
    topic = values.get(key) or DEFAULT_TOPICS[key]
    if topic.startswith("/"):
        return topic
    ns = node_namespace(values, pushed).rstrip("/")
    if topic.startswith("~"):
        return f"{ns}/{values.get('node_name') or NODE_NAME}{topic[1:]}"
    return f"{ns}/{topic}"


def node_full_name(values, pushed=""):
    return node_namespace(values, pushed).rstrip("/") + "/" + (values.get("node_name") or NODE_NAME)


def bag_play_arguments(values, player="ros2", events=None, python="python3", pushed=""):
    """The player's command line: `ros2 bag play BAG --clock`, or this package's player (``python
    -m lidar_completion_pkg.replay --no-node``, on the node's input topic, its record of what it
    published and received in ``events``), each with ``bag_args``."""
    extra = split_bag_args(values)
    if player == "ros2":
        return ["ros2", "bag", "play", values["bag"], "--clock", *extra]
    return [python, "-m", "lidar_completion_pkg.replay", values["bag"], "--no-node",
            "--topic", INPUT_TOPIC_PLACEHOLDER,
            "--output-topic", resolved_topic(values, "output_topic", pushed),
            "--events", events or os.devnull, "--no-progress", *extra]


def player_command(values, gate, player="ros2", events=None, python="python3", pushed=""):
    """The bag player behind its gate (``gate``: the play_when_ready executable): the player starts
    once the node subscribes, so the bag's first scans are not published while it still warms up;
    with exit_after_bag the gate ends only once the node has finished the scans it received."""
    settle = ["--settle", str(SETTLE_S)] if flag("exit_after_bag", values.get("exit_after_bag", "false")) else []
    return [gate, "--node", node_full_name(values, pushed), "--bag", values["bag"], *settle, "--",
            *bag_play_arguments(values, player, events, python, pushed)]


def fixed_frame_for(values):
    return values.get("fixed_frame") or values.get("target_frame") or DEFAULT_FIXED_FRAME


def rviz_config_for(values, out_dir, pushed=""):
    """The shipped rviz config, with the topics (as the node resolves them) and the fixed frame
    replaced where they differ from its own."""
    topics = {k: resolved_topic(values, k, pushed) for k in DEFAULT_TOPICS}
    fixed = fixed_frame_for(values)
    if topics == RVIZ_TOPICS and fixed == DEFAULT_FIXED_FRAME:
        return RVIZ_CONFIG
    with open(RVIZ_CONFIG) as f:
        text = f.read()
    for key, default in RVIZ_TOPICS.items():
        text = text.replace(f"Value: {default}\n", f"Value: {topics[key]}\n")
    text = text.replace(f"Fixed Frame: {DEFAULT_FIXED_FRAME}\n", f"Fixed Frame: {fixed}\n")
    path = os.path.join(out_dir, "lidar_completion.rviz")
    with open(path, "w") as f:
        f.write(text)
    return path


def generate_launch_description():
    import sys
    import tempfile

    from launch import LaunchDescription
    from launch.actions import (DeclareLaunchArgument, EmitEvent, ExecuteProcess, LogInfo,
                                OpaqueFunction, RegisterEventHandler, SetEnvironmentVariable)
    from launch.event_handlers import OnProcessExit
    from launch.events import Shutdown
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import LifecycleNode, Node
    from launch_ros.parameter_descriptions import ParameterValue
    from launch_ros.substitutions import ExecutableInPackage

    def bag_replay(values, node, which, pushed):
        """The bag player (started when the node subscribes) and what its end, or the node's, does."""
        events = os.path.join(tempfile.mkdtemp(prefix="lidar_completion_bag_"), "events.json")
        cmd = player_command(values, ExecutableInPackage(PLAYER_GATE_EXECUTABLE, PACKAGE), which,
                             events, sys.executable, pushed)
        player = ExecuteProcess(cmd=cmd, name="bag_player", output="screen")
        exit_after = flag("exit_after_bag", values["exit_after_bag"])
        node_exited = []

        def after_player(event, context):
            if node_exited or getattr(context, "is_shutdown", False):
                return []   # the launch is ending anyway (Ctrl-C, or the node's exit below)
            if event.returncode in INTERRUPTED:
                # a signal, not a failed replay: a terminal's Ctrl-C reaches the player beside the
                # launch (whose own shutdown may not have begun yet), or someone stopped the player
                said = f"the bag player was interrupted (exit status {event.returncode})"
                if exit_after:
                    return [LogInfo(msg=said + ": ending the launch (exit_after_bag:=true)"),
                            EmitEvent(event=Shutdown(reason="the bag player was interrupted"))]
                return [LogInfo(msg=said)]
            if exit_after and event.returncode != 0:
                # an exception is how a launch ends with a non-zero exit status (launch logs it as
                # "Caught exception in launch ...: <message>" and shuts down): a batch replay failed
                raise RuntimeError(f"the bag player failed (exit status {event.returncode}); ending the "
                                   "launch (exit_after_bag:=true)")
            if exit_after:
                return [LogInfo(msg=f"the bag player has ended (exit status {event.returncode}) and "
                                    "the node has had its time for the scans it received: ending the "
                                    "launch (exit_after_bag:=true)"),
                        EmitEvent(event=Shutdown(reason="the bag player ended"))]
            return [LogInfo(msg=f"the bag player has ended (exit status {event.returncode}); the node "
                                "keeps running (Ctrl-C ends the launch, exit_after_bag:=true ends it "
                                "with the bag)")]

        def after_node(event, context):
            # nothing left to play to: the gate would otherwise wait forever for a subscription
            node_exited.append(event.returncode)
            if getattr(context, "is_shutdown", False):
                return []   # (a second Shutdown would fail in launch_ros: "Cannot shutdown a ROS adapter")
            if event.returncode == 0:
                # stopped cleanly: a Ctrl-C that reached the node before the launch's own shutdown
                # began (a terminal signals the whole process group), or a managed shutdown
                return [EmitEvent(event=Shutdown(reason="the completion node ended during a bag replay"))]
            # the replay failed: the launch shuts down and exits with status 1 (see after_player)
            raise RuntimeError(f"the completion node exited (exit status {event.returncode}) during the "
                               "bag replay; ending the launch")

        return [player,
                RegisterEventHandler(OnProcessExit(target_action=player, on_exit=after_player)),
                RegisterEventHandler(OnProcessExit(target_action=node, on_exit=after_node))]

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
        # An exception raised here ends the launch with its message before any action returned runs.
        # So the tools are checked here: the rviz2 Node action looks for its package only when it
        # runs, after the completion node has started (which then outlived the failed launch).
        which = check_tools(values)
        pushed = context.launch_configurations.get("ros_namespace") or ""
        # exit_with_parent: launch stopped by SIGTERM (systemd, docker stop) exits without stopping
        # the processes it started; the node then notices it was adopted and shuts down
        overrides = {"exit_with_parent": True, **node_overrides(values, bag_clock=which == "ros2")}
        extra = extra_arguments(context.launch_configurations)
        actions = []
        if extra:
            # (imported only here: the table pulls in torch, a second the plain launch need not pay)
            from lidar_completion_pkg.parameters import BUILTIN, BY_NAME
            types = {name: p.type for name, p in BY_NAME.items() if name not in BUILTIN}
            more, warning = parameter_overrides(extra, types)
            if warning:
                import launch.logging
                launch.logging.get_logger("launch").warning(warning)
            overrides.update(more)
            if more:
                actions.append(LogInfo(msg="node parameters given as launch arguments, over the params "
                                           "file: " + ", ".join(f"{k}={v!r}" for k, v in more.items())))
        if not os.environ.get(PROFILE_ENV) and os.path.isfile(FASTDDS_PROFILE):
            actions.append(SetEnvironmentVariable(PROFILE_ENV, FASTDDS_PROFILE))
        params = [values["params_file"]] if values["params_file"] else []
        # last wins: command line over the params file. Strings as ParameterValue(str): launch_ros
        # reads a plain string as YAML (a topic "on" would become a bool, a checkpoint "2024" an int)
        params.append({k: ParameterValue(v, value_type=str) if isinstance(v, str) else v
                       for k, v in overrides.items()})
        common = dict(package=PACKAGE, name=values["node_name"] or NODE_NAME, output="screen",
                      emulate_tty=True, parameters=params,
                      namespace=node_namespace(values, pushed))
        if flag("lifecycle", values["lifecycle"]):
            node = LifecycleNode(executable=LIFECYCLE_EXECUTABLE, **common)
            actions += managed(node, flag("autostart", values["autostart"]))
        else:
            node = Node(executable=EXECUTABLE, **common)
            actions.append(node)
        if flag("rviz", values["rviz"]):
            config = rviz_config_for(values, tempfile.mkdtemp(prefix="lidar_completion_rviz_"), pushed)
            actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
                                arguments=["-d", config]))
        if not values["bag"]:      # (a replay has its own handler of the node's end)
            def after_node(event, context):
                # a managed node's shutdown transition ends its process (finalized): nothing is
                # left to run, so the launch ends too, with status 0, as a supervisor expects
                if event.returncode != 0 or getattr(context, "is_shutdown", False):
                    return []
                return [EmitEvent(event=Shutdown(reason="the completion node ended"))]
            actions.append(RegisterEventHandler(OnProcessExit(target_action=lambda action: action is node,
                                                              on_exit=after_node)))
        if values["bag"]:
            if which == "own":
                actions.append(LogInfo(msg="bag:= played by this package's player (bag_player:=own: "
                                           "clouds and /tf, no /clock, so use_sim_time is not turned on)"))
            actions += bag_replay(values, node, which, pushed)
        return actions

    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=doc)
         for name, default, doc in ARGUMENTS] + [OpaqueFunction(function=setup)])
