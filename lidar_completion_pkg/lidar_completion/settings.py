"""The Completer's options, declared once: :class:`CompletionSettings`.

Every option is one field of the dataclass below, with its type, default, allowed values and one
description. The command-line options of ``complete``, ``evaluate`` and ``bag-bench``
(:func:`add_arguments`), the ROS node's parameter table (``lidar_completion_pkg.parameters``),
:func:`lidar_completion.evaluation.evaluate_sequence` and the scripts are all built from it, and
``tests/test_settings.py`` fails when one of them disagrees with it.

``None`` is a value of its own for some options: for the *checkpoint-dependent* ones (steps,
guidance, solver process, point budgets) it means "what the checkpoint names", with a fallback for
files that name nothing (published checkpoints); for ``checkpoint`` it means the shipped student and
for ``seed`` fresh randomness on every call. ROS parameters cannot be null, so each such option also
names the parameter value that stands for ``None`` (``ros_unset``).

>>> s = CompletionSettings(steps=4, seed=0)          # doctest: +SKIP
>>> completer = Completer.from_settings(s)           # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np

from .errors import ConfigError
from .constants import BACKENDS, DEFAULTS, PROCESSES
from .shipped import shipped_sampling

__all__ = ["CompletionSettings", "Option", "OPTIONS", "BY_NAME", "PRECISIONS", "PROCESSES",
           "GRAPH_MODES", "FPS_MODES", "BACKENDS", "add_arguments", "checkpoint_fallback"]

PRECISIONS = ("fp32", "bf16", "fp16")
GRAPH_MODES = ("auto", "on", "off")
FPS_MODES = ("auto", "cpu", "device")
CHECKPOINTS = "the checkpoint's"


@dataclass(frozen=True)
class Option:
    """One Completer option: what :class:`CompletionSettings` declares about a field."""
    name: str
    type: type                       # str, int, float or bool
    default: Any                     # None: see ``unset`` / ``from_checkpoint``
    help: str                        # what it is, without its default
    choices: Optional[tuple] = None  # allowed values (strings)
    range: Optional[tuple] = None    # inclusive (low, high) for numbers
    unset: Optional[str] = None      # what None means, for options that are not checkpoint-dependent
    from_checkpoint: Any = None      # checkpoint-dependent: the value when the checkpoint names none
    ros_unset: Any = None            # the ROS parameter value that stands for None
    runtime: bool = False            # the node accepts changes while it runs
    metavar: Optional[str] = None

    @property
    def checkpoint_dependent(self) -> bool:
        return self.from_checkpoint is not None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def none_text(self) -> str:
        """What ``None`` means for this option, in words."""
        if not self.checkpoint_dependent:
            return self.unset or "none"
        shipped = shipped_sampling().get(self.name)
        parts = [f"shipped student: {_fmt(shipped)}"] if shipped is not None else []
        parts.append(f"a file that names none: {_fmt(self.from_checkpoint)}")
        return f"{CHECKPOINTS} ({'; '.join(parts)})"

    def default_text(self) -> str:
        if self.default is None:
            return self.none_text()
        if self.type is bool:
            return "yes" if self.default else "no"
        return _fmt(self.default)

    def allowed_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.range is not None:
            return f"{_fmt(self.range[0])}..{_fmt(self.range[1])}"
        return ""

    def check(self, value):
        """``value`` converted to the option's type; ConfigError when it is not allowed."""
        if value is None:
            if self.default is None:
                return None
            raise ConfigError(f"{self.name} must be set (default {self.default_text()}), got None")
        expected = self.type
        # numpy's scalars (np.int64 from an array, np.float32) are numbers as Python's are; a
        # boolean (Python's or numpy's) is no number here
        if expected is bool:
            ok = isinstance(value, (bool, np.bool_))
            value = bool(value) if ok else value
        elif expected is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
            value = int(value) if ok else value
        elif expected is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            value = float(value) if ok else value
        else:
            # a path (pathlib.Path, os.PathLike) for the file options, a torch.device for the device:
            # what a Python caller has at hand, taken as the string they stand for
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif type(value).__name__ == "device" and type(value).__module__.startswith("torch"):
                value = str(value)
            ok = isinstance(value, str)
            value = str(value) if ok else value
        if not ok:
            raise ConfigError(f"{self.name} must be of type {expected.__name__}, got {value!r}")
        if expected is str and self.choices is None and not value.strip():
            raise ConfigError(f"{self.name} is an empty string; leave it unset (None) for "
                              f"{self.none_text() if self.default is None else self.default_text()}")
        if expected is float and self.range is None and not math.isfinite(value):
            raise ConfigError(f"{self.name} must be a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.name} must be {self.allowed_text()}, got {value!r}")
        if self.range is not None and not self.range[0] <= value <= self.range[1]:
            raise ConfigError(f"{self.name} must be in {self.allowed_text()}, got {value!r}")
        return value

    def check_flag(self, value):
        """:meth:`check` for a value given as the option's flag: its errors name ``--steps``,
        not ``steps``."""
        try:
            return self.check(value)
        except ConfigError as exc:
            text = str(exc)
            if not text.startswith(self.name + " "):
                raise
            text = text.replace("leave it unset (None) for", "leave the flag out for")
            raise ConfigError(self.flag + text[len(self.name):]) from None


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _opt(default, help: str, type: type, **kw):
    return field(default=default, metadata={"option": dict(help=help, type=type, **kw)})


@dataclass(frozen=True)
class CompletionSettings:
    """How a scan is completed. Each field's metadata is its :class:`Option` (see :data:`OPTIONS`)."""

    checkpoint: Optional[str] = _opt(
        None, "checkpoint file (ours, or a published LiDiff / ScoreLiDAR / Distillation-DPO file)", str,
        unset="the shipped student", ros_unset="", metavar="P")
    refiner_checkpoint: Optional[str] = _opt(
        None, "take the refinement network from this file (e.g. LiDiff's refine_net.ckpt next to "
        "diff_net.ckpt)", str, unset="the checkpoint's own", ros_unset="", metavar="R")
    trust_checkpoint: bool = _opt(
        False, "allow loading a Lightning file that needs pickled Python objects (runs code from the "
        "file: only for files you trust)", bool)
    steps: Optional[int] = _opt(
        None, "solver steps per scan", int, range=(1, 200), from_checkpoint=8, ros_unset=0,
        runtime=True, metavar="N")
    guidance: Optional[float] = _opt(
        None, "classifier-free guidance weight w (1 = conditional only; published: 6 for LiDiff's "
        "teacher, 3.5 for the Distillation-DPO student; a file that names none gets 6 when it is a "
        "published LiDiff or Distillation-DPO teacher file, else the fallback)", float, range=(0.0, 20.0),
        from_checkpoint=3.5, ros_unset=-1.0, runtime=True, metavar="W")
    process: Optional[str] = _opt(
        None, "the solver's forward process: 'local' (x_t = x_0 + sigma_t eps, what the networks are "
        "trained on) or 'vp' (the published LiDiff sampler)", str, choices=PROCESSES,
        from_checkpoint="vp", ros_unset="")
    refine: bool = _opt(True, "run the x6 refinement network when the checkpoint has one", bool)
    device: str = _opt("cpu", "torch device: cpu, cuda, cuda:N or auto", str)
    backend: str = _opt("auto", "sparse-convolution backend ('auto' honours LIDAR_COMPLETION_BACKEND, "
                        "then takes triton on CUDA, else torch; minkowski (the reference) only when named; "
                        "triton on the CPU needs TRITON_INTERPRET=1 and is slow)", str, choices=BACKENDS)
    precision: str = _opt("fp32", "autocast precision on CUDA (the CPU always runs fp32)", str,
                          choices=PRECISIONS)
    cuda_graphs: str = _opt("auto", "replay the solver steps, the refiner and the encoder from CUDA graphs (CUDA "
                            "with the torch or triton backend; 'auto' honours LIDAR_COMPLETION_CUDA_GRAPHS and "
                            "keeps graphs where they are faster)", str, choices=GRAPH_MODES)
    fps: str = _opt("auto", "where farthest-point sampling of the scan runs: 'cpu' (fpsample), 'device' "
                    "(exact, on the GPU with Triton) or 'auto' (the device on CUDA when Triton is "
                    "installed, else the CPU); both exact, or both approximate alike with fps_parts > 1", str,
                    choices=FPS_MODES)
    fps_parts: int = _opt(1, "farthest-point sampling in this many azimuth sectors side by side, each with a "
                          "share of n_fps by the space it covers: 1 = exact over the whole scan; more = "
                          "fewer sequential steps (faster on the GPU), approximate near the sectors' seams",
                          int, range=(1, 256), metavar="P")
    seed: Optional[int] = _opt(
        None, "noise seed: the same seed gives the same output for the same input", int,
        range=(0, 2**31 - 1), unset="fresh randomness for every scan (the seed used is logged)",
        ros_unset=-1)
    n_fps: Optional[int] = _opt(
        None, "farthest-point-sampling budget of the input scan (smaller = faster)", int,
        range=(1, 100_000), from_checkpoint=DEFAULTS["n_fps"], ros_unset=0, metavar="N")
    tile: Optional[int] = _opt(
        None, "how many times the sampled scan is tiled into x_init", int, range=(1, 100),
        from_checkpoint=DEFAULTS["tile"], ros_unset=0)
    min_range: float = _opt(DEFAULTS["min_range"], "input points closer than this (m) are ignored", float,
                            range=(0.0, 1000.0), metavar="M")
    max_range: float = _opt(DEFAULTS["max_range"], "input points farther than this (m) are ignored (the "
                            "completion itself is kept within 50 m of the sensor, as published)", float,
                            range=(0.1, 1000.0), metavar="M")
    min_z: float = _opt(DEFAULTS["min_z"], "input points below this height (m, in the frame the networks "
                        "see: the node's model_frame, else the scan's own) are ignored", float,
                        range=(-1000.0, 1000.0), metavar="M")

    def __post_init__(self):
        for opt in OPTIONS:
            object.__setattr__(self, opt.name, opt.check(getattr(self, opt.name)))
        if self.min_range >= self.max_range:
            raise ConfigError(f"min_range ({self.min_range:g}) must be < max_range ({self.max_range:g})")

    # -- conversions ------------------------------------------------------------------------------
    def replace(self, **changes) -> "CompletionSettings":
        """A copy with ``changes`` (checked like the constructor's arguments)."""
        unknown = set(changes) - set(BY_NAME)
        if unknown:
            raise ConfigError(f"unknown completion setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return {opt.name: getattr(self, opt.name) for opt in OPTIONS}

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "CompletionSettings":
        """The settings of a command line parsed with :func:`add_arguments` (options it did not add
        keep their defaults; ``overrides`` win)."""
        names = getattr(args, _ADDED, ())
        values = {name: getattr(args, name) for name in names}
        # a value typed on the command line is refused naming its flag (--steps), which the user
        # gave, not the field (steps); ``overrides`` come from the caller's code and keep the field
        typed = [name for name in names if name not in overrides]
        for name in typed:
            BY_NAME[name].check_flag(values[name])
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigError as exc:
            if not (str(exc).startswith("min_range (") and {"min_range", "max_range"} <= set(typed)):
                raise
            raise ConfigError(str(exc).replace("min_range", "--min-range")
                              .replace("max_range", "--max-range")) from None

    def to_ros(self) -> dict:
        """Every option as a ROS parameter value (None as the option's ``ros_unset``)."""
        return {opt.name: opt.ros_unset if getattr(self, opt.name) is None else getattr(self, opt.name)
                for opt in OPTIONS}

    @classmethod
    def from_ros(cls, values: dict) -> "CompletionSettings":
        """From ROS parameter values (``ros_unset`` back to None); names that are not options are
        ignored."""
        kw = {}
        for opt in OPTIONS:
            if opt.name not in values:
                continue
            v = values[opt.name]
            if opt.ros_unset is not None and v == opt.ros_unset:
                v = None
            elif opt.type is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            kw[opt.name] = v
        return cls(**kw)

    def ros_overrides(self, exclude: Iterable[str] = ()) -> list:
        """``name:=value`` for every option that differs from its default (node command lines)."""
        out = []
        for opt in OPTIONS:
            value = getattr(self, opt.name)
            if opt.name in exclude or value == opt.default:
                continue
            ros = self.to_ros()[opt.name]
            out.append(f"{opt.name}:={str(ros).lower() if opt.type is bool else ros}")
        return out

    def completer_kwargs(self) -> dict:
        """Keyword arguments of ``Completer.from_checkpoint`` (besides the checkpoint path); a
        point budget left at None is not passed, so the checkpoint's applies."""
        kw = dict(steps=self.steps, guidance=self.guidance, process=self.process, refine=self.refine,
                  device=self.device, seed=self.seed, backend=self.backend,
                  refiner_checkpoint=self.refiner_checkpoint,
                  allow_pickle=True if self.trust_checkpoint else None, precision=self.precision,
                  cuda_graphs=self.cuda_graphs, fps=self.fps, fps_parts=self.fps_parts, min_range=self.min_range, max_range=self.max_range,
                  min_z=self.min_z)
        kw.update({k: getattr(self, k) for k in ("n_fps", "tile") if getattr(self, k) is not None})
        return kw


OPTIONS: tuple = tuple(Option(name=f.name, default=f.default, **f.metadata["option"])
                       for f in dataclasses.fields(CompletionSettings))
BY_NAME = {opt.name: opt for opt in OPTIONS}


def checkpoint_fallback(name: str):
    """The value of a checkpoint-dependent option for a checkpoint that names none."""
    return BY_NAME[name].from_checkpoint


# ------------------------------------------------------------------------------------ command line
_ADDED = "_completion_settings"   # the parsed namespace's list of the options add_arguments added

def add_arguments(parser, exclude: Iterable[str] = (), only: Optional[Iterable[str]] = None,
                  title: str = "completion settings"):
    """Add one command-line option per Completer option (all of them, or ``only`` these, except
    ``exclude``) to ``parser``, in an argument group; :meth:`CompletionSettings.from_args` reads them
    back. Returns the group."""
    only = set(BY_NAME) if only is None else set(only)
    unknown = (set(exclude) | only) - set(BY_NAME)
    if unknown:
        raise ConfigError(f"unknown completion setting(s): {', '.join(sorted(unknown))}")
    exclude = set(exclude) | (set(BY_NAME) - only)
    parser.set_defaults(**{_ADDED: tuple(opt.name for opt in OPTIONS if opt.name not in exclude)})
    group = parser.add_argument_group(title, "(defaults in brackets; `lidar-completion` reads the "
                                             "same settings as the ROS node's parameters)")
    for opt in OPTIONS:
        if opt.name in exclude:
            continue
        text = opt.help.replace("%", "%%")
        metavar = opt.metavar
        if opt.range is not None:
            text += f"; {opt.allowed_text()}"
        text += f" [{opt.default_text()}]".replace("%", "%%")
        if opt.type is bool:
            group.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction,
                               default=opt.default, help=text)
        else:
            group.add_argument(opt.flag, dest=opt.name, type=opt.type, default=opt.default,
                               choices=opt.choices, metavar=metavar, help=text)
    return group
