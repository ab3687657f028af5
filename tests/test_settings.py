"""lidar_completion.settings: one table of the Completer's options, and everything built from it.

Each test fails when a place that exposes the options disagrees with the table: the commands
(complete / evaluate / bag-bench), the node's parameter table, launch/params/completion.yaml and the
launch file's arguments.
"""
import argparse
import ast
from pathlib import Path

import numpy as np
import pytest
import yaml

from lidar_completion.cli import build_parser
from lidar_completion.errors import ConfigError
from lidar_completion.settings import BY_NAME, OPTIONS, CompletionSettings, checkpoint_fallback
from lidar_completion.shipped import shipped_sampling

ROOT = Path(__file__).resolve().parents[1]
#: command -> options it does not take from the table (evaluate's --seed is the frames' base seed)
COMMANDS = {"complete": (), "evaluate": ("seed",), "bag-bench": ()}
ROS_TYPES = {str: "string", int: "integer", float: "double", bool: "bool"}


def subparser(name) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_table_is_consistent_and_checks_values():
    assert [o.name for o in OPTIONS] == list(CompletionSettings.__dataclass_fields__)
    for opt in OPTIONS:
        assert opt.help and opt.type in ROS_TYPES, opt.name
        assert opt.check(opt.default) == opt.default
        if opt.default is None:      # None must have a meaning and a ROS stand-in
            assert opt.ros_unset is not None and opt.none_text(), opt.name
            assert opt.checkpoint_dependent or opt.unset
        if opt.range is not None:
            assert opt.range[0] < opt.range[1]
        if opt.checkpoint_dependent:
            assert opt.check(opt.from_checkpoint) == opt.from_checkpoint
    defaults = CompletionSettings()
    assert defaults.as_dict() == {o.name: o.default for o in OPTIONS}
    for bad in (dict(steps=0), dict(steps=201), dict(steps=2.5), dict(guidance=25.0),
                dict(backend="cuda"), dict(process="ve"), dict(precision="fp8"), dict(seed=-1),
                dict(refine="yes"), dict(min_range=60.0), dict(cuda_graphs="maybe")):
        with pytest.raises(ConfigError, match=next(iter(bad)).split("_")[0]):
            CompletionSettings(**bad)
    s = CompletionSettings(guidance=2, steps=4)
    assert s.guidance == 2.0 and isinstance(s.guidance, float)
    assert s.replace(steps=5).steps == 5 and s.steps == 4
    with pytest.raises(ConfigError, match="unknown"):
        s.replace(stepz=5)


def test_numpy_scalars_are_numbers_and_empty_paths_are_named():
    """Values taken from numpy arrays (np.int64 steps, np.float32 guidance) were refused as "not of
    type int"; an empty checkpoint path was looked up as the folder '.'."""
    s = CompletionSettings(steps=np.int64(4), guidance=np.float32(2.5), n_fps=np.uint16(500), seed=np.int32(7),
                           refine=np.bool_(False))
    assert (s.steps, s.guidance, s.n_fps, s.seed, s.refine) == (4, 2.5, 500, 7, False)
    assert type(s.steps) is int and type(s.guidance) is float and type(s.refine) is bool
    for bad in (dict(steps=np.bool_(True)), dict(steps=np.float64(4.0)), dict(seed=np.int64(2**40))):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            CompletionSettings(**bad)
    with pytest.raises(ConfigError, match="checkpoint is an empty string; leave it unset .*shipped student"):
        CompletionSettings(checkpoint="")
    with pytest.raises(ConfigError, match="device is an empty string; leave it unset .*cpu"):
        CompletionSettings(device=" ")


def test_choices_come_from_the_modules_that_use_them():
    from lidar_completion.diffusion.sampler import PROCESSES
    from lidar_completion.sparse import BACKENDS
    assert tuple(BY_NAME["backend"].choices) == tuple(BACKENDS)
    assert tuple(BY_NAME["process"].choices) == tuple(PROCESSES)
    for name in BACKENDS:
        assert CompletionSettings(backend=name).backend == name
    for name in PROCESSES:
        assert CompletionSettings(process=name).process == name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_expose_every_option_as_the_table_says(command):
    parser = subparser(command)
    actions = {a.dest: a for a in parser._actions}
    for opt in OPTIONS:
        if opt.name in COMMANDS[command]:
            continue
        a = actions.get(opt.name)
        assert a is not None, f"{command} has no {opt.flag}"
        assert opt.flag in a.option_strings
        assert a.default == opt.default, f"{command} {opt.flag}: default {a.default!r}"
        assert opt.help.replace("%", "%%") in a.help and opt.default_text() in a.help
        if opt.type is bool:
            assert isinstance(a, argparse.BooleanOptionalAction)
        else:
            assert a.type is opt.type
            assert (a.choices is None) == (opt.choices is None)
            if opt.choices is not None:
                assert tuple(a.choices) == tuple(opt.choices)
    # the options the command takes from the table are exactly the table's (minus its exclusions)
    args = parser.parse_args(_minimal(command))
    assert set(args._completion_settings) == {o.name for o in OPTIONS} - set(COMMANDS[command])


def _minimal(command):
    return {"complete": ["in.bin", "-o", "out.ply"], "evaluate": ["data"],
            "bag-bench": ["bag"]}[command]


def test_command_line_round_trip():
    parser = build_parser()
    args = parser.parse_args(["complete", "in.bin", "-o", "out.ply", "--steps", "3", "--no-refine",
                              "--guidance", "2.5", "--backend", "torch", "--n-fps", "300",
                              "--process", "local", "--seed", "7"])
    s = CompletionSettings.from_args(args)
    assert (s.steps, s.refine, s.guidance, s.backend, s.n_fps, s.process, s.seed) == \
        (3, False, 2.5, "torch", 300, "local", 7)
    assert s.tile is None and s.checkpoint is None      # the checkpoint's / the shipped student
    with pytest.raises(SystemExit):
        parser.parse_args(["complete", "in.bin", "-o", "o.ply", "--backend", "cuda"])
    # values out of range are refused with the option's name (one error line from the CLI)
    args = parser.parse_args(["complete", "in.bin", "-o", "out.ply", "--steps", "0"])
    with pytest.raises(ConfigError, match="steps must be in 1..200"):
        CompletionSettings.from_args(args)
    # evaluate's --seed is the frames' base seed, not the Completer's
    args = parser.parse_args(["evaluate", "data", "--seed", "5", "--steps", "2"])
    assert args.seed == 5 and CompletionSettings.from_args(args).seed is None


def test_shipped_defaults_are_shown_as_the_checkpoints():
    """The help names the checkpoint-dependent defaults as such, with the shipped manifest's values
    (the drift this table fixes: the help said 3.5 where the shipped student samples with 2)."""
    shipped = shipped_sampling()
    assert shipped, "the shipped manifest names no sampling defaults"
    help_text = subparser("complete").format_help().replace("\n", " ")
    help_text = " ".join(help_text.split())
    for name in ("steps", "guidance", "process", "n_fps", "tile"):
        opt = BY_NAME[name]
        assert opt.checkpoint_dependent and opt.default is None
        value = shipped[name]
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        text = opt.none_text()
        assert text.startswith("the checkpoint's") and f"shipped student: {shown}" in text
        assert " ".join(text.split()) in help_text
    assert f"shipped student: {shipped['guidance']:g}" in BY_NAME["guidance"].none_text()


def test_from_checkpoint_uses_the_tables_fallbacks(tmp_path):
    from lidar_completion.checkpoints import DEFAULT_SAMPLING, make_random_checkpoint
    from lidar_completion.completer import Completer
    assert DEFAULT_SAMPLING == {"steps": checkpoint_fallback("steps"),
                                "guidance": checkpoint_fallback("guidance")}
    bare = make_random_checkpoint(tmp_path / "bare.pt", sampling={})   # names no sampling defaults
    c = Completer.from_settings(CompletionSettings(checkpoint=str(bare), backend="torch"))
    assert (c.steps, c.guidance, c.process, c.n_fps, c.tile) == tuple(
        checkpoint_fallback(k) for k in ("steps", "guidance", "process", "n_fps", "tile"))
    c = Completer.from_settings(CompletionSettings(checkpoint=str(bare), backend="torch", steps=2,
                                                   guidance=1.0, process="local", n_fps=100, tile=3,
                                                   refine=False, seed=4, min_z=-3.0))
    assert (c.steps, c.guidance, c.process, c.n_fps, c.tile, c.refine, c.seed, c.min_z) == \
        (2, 1.0, "local", 100, 3, False, 4, -3.0)


# ------------------------------------------------------------------------------------ the node
def test_node_parameters_are_generated_from_the_table():
    from lidar_completion_pkg.parameters import (BY_NAME as NODE, COMPLETER_PARAMETERS, DYNAMIC,
                                                 STARTUP_ONLY, check_value, completion_settings,
                                                 default_values)
    assert [p.name for p in COMPLETER_PARAMETERS] == [o.name for o in OPTIONS]
    for opt in OPTIONS:
        p = NODE[opt.name]
        assert p.type == ROS_TYPES[opt.type]
        assert p.default == (opt.ros_unset if opt.default is None else opt.default)
        assert p.description.lower().startswith(opt.help.lower())
        assert (opt.name in DYNAMIC) == opt.runtime
        if opt.choices is not None:
            assert set(opt.choices) <= set(p.choices)
        if opt.range is not None:
            assert p.range[0] <= opt.range[0] and p.range[1] == opt.range[1]
            assert check_value(opt.name, opt.range[1]) is None
            too_big = opt.range[1] + (1 if opt.type is int else 0.5)
            assert check_value(opt.name, too_big) is not None
        if opt.default is None:
            assert opt.none_text() in p.description
            assert check_value(opt.name, opt.ros_unset) is None              # at start-up
            if opt.runtime:
                assert "at run time" in check_value(opt.name, opt.ros_unset, runtime=True)
                assert STARTUP_ONLY[opt.name] == opt.ros_unset
    # values between the sentinel and the option's range are refused (guidance -0.5)
    assert check_value("guidance", -0.5) is not None and check_value("guidance", 0.0) is None
    # the node's values back to settings: the defaults, and a round trip through ROS values
    assert completion_settings(default_values()) == CompletionSettings()
    s = CompletionSettings(checkpoint="m.pt", steps=4, guidance=2.0, process="local", seed=3,
                           n_fps=100, refine=False, cuda_graphs="off")
    ros = dict(default_values(), **s.to_ros())
    assert all(check_value(k, v) is None for k, v in ros.items())
    assert completion_settings(ros) == s
    assert completion_settings(dict(default_values(), guidance=4)).guidance == 4.0   # int for double
    assert s.ros_overrides(exclude=("checkpoint", "steps")) == [
        "guidance:=2.0", "process:=local", "refine:=false", "cuda_graphs:=off", "seed:=3", "n_fps:=100"]


def test_params_file_holds_the_generated_completer_section():
    from lidar_completion_pkg.parameters import COMPLETER_PARAMETERS, yaml_entry
    text = (ROOT / "launch" / "params" / "completion.yaml").read_text()
    section = "".join(yaml_entry(p) for p in COMPLETER_PARAMETERS)
    assert section in text, ("launch/params/completion.yaml: the Completer section differs from the "
                             "table; regenerate it with `python -m lidar_completion_pkg.parameters`")
    values = yaml.safe_load(text)["/**"]["ros__parameters"]
    for p in COMPLETER_PARAMETERS:
        assert values[p.name] == p.default


def test_launch_arguments_that_are_options_agree_with_the_table():
    tree = ast.parse((ROOT / "launch" / "completion.launch.py").read_text())
    tables = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            tables[node.targets[0].id] = node.value
    arguments = {}
    for elt in tables["ARGUMENTS"].elts:
        name, _default, doc = elt.elts
        if isinstance(doc, ast.Constant):
            arguments[name.value] = doc.value
    kinds = ast.literal_eval(tables["NODE_PARAMETER_ARGUMENTS"])
    options = [n for n in arguments if n in BY_NAME]
    assert {"checkpoint", "steps", "device"} <= set(options)
    for name in options:
        opt = BY_NAME[name]
        assert kinds[name] == ROS_TYPES[opt.type], name
        assert arguments[name].startswith(opt.help), (name, arguments[name])
