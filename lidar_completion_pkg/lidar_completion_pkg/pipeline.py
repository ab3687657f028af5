"""What the plain and the lifecycle completion node share: parameters, the checkpoint and its warm-up,
input handling, the worker thread, frames, publication and diagnostics.

One cloud goes through it like this:

1. the subscription callback (:meth:`CompletionPipeline.on_cloud`) converts the PointCloud2 zero-copy and
   leaves it in a one-slot mailbox (a newer cloud replaces one the worker has not taken: ``dropped``);
2. the worker thread looks up ``model_frame <- cloud frame`` at the cloud's stamp (waiting up to
   ``tf_timeout``), transforms the points, applies the range / z limits and ``max_points`` in the model
   frame and completes them;
3. it transforms the completion into ``target_frame`` at the same stamp and publishes it with that
   ``frame_id`` and the input's stamp. A missing or stale transform drops the scan (``no_transform``,
   counted by reason, throttled warning, WARN on /diagnostics): never a publication in a wrong frame.

Nothing here raises into rclpy: bad input, failed completions and unusable transforms are counted.
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import os
import threading
import time
from typing import Callable, Optional

import numpy as np

from lidar_completion.errors import Cancelled, CheckpointError, CloudFormatError, LidarCompletionError
from lidar_completion.pointcloud2 import create_cloud_xyz32, create_cloud_xyz64, read_points_numpy

from . import dds, frames
from .parameters import BUILTIN, BY_NAME, DYNAMIC, PARAMETERS, STARTUP_ONLY, check_value, completion_settings
from .stats import ACTIVE, WARMING_UP, Mailbox, Stats, Throttle, diagnostic_summary

#: Points of the synthetic warm-up scan (a street-like ring with a ground plane).
WARMUP_POINTS = 30_000

WORKER_THREAD, SETUP_THREAD = "completion-worker", "completion-setup"

#: Distance from a frame's origin (2**17 m) beyond which float32 coordinates step by more than 1.5 cm
#: (round by 8 mm or more): published float32 completions reaching it are warned about.
FLOAT32_PRECISE_M = 131_072.0

#: Seconds for which no path may join model_frame and target_frame before a scan is dropped ahead of
#: its completion rather than after it (the TF cache's length: odometry starting after the LiDAR,
#: the scans of that time are still completed and placed once it comes).
MISSING_GRACE_S = 10.0

# The threads running completer code now. A process must not finalise while one of them is inside
# torch: Python ends such a thread when it next takes the GIL, which unwinds through torch's C++
# frames and aborts ("terminate called without an active exception", exit status 134).
# Thread.is_alive() cannot tell: after a join() that Ctrl-C interrupted, Python 3.11 reports the
# still running thread as stopped (and a second join returns at once).
_BUSY: set = set()
_BUSY_LOCK = threading.Lock()


@contextlib.contextmanager
def _busy():
    me = threading.current_thread()
    with _BUSY_LOCK:
        _BUSY.add(me)
    try:
        yield
    finally:
        with _BUSY_LOCK:
            _BUSY.discard(me)


def busy_threads() -> list:
    """The threads still inside a load, a warm-up or the worker loop (see above)."""
    with _BUSY_LOCK:
        return list(_BUSY)


class StartupError(LidarCompletionError):
    """The node cannot start (bad parameter, unloadable checkpoint): a one-line fatal message."""


def default_completer_factory(config: dict):
    """The real Completer from the node's Completer parameters (``checkpoint`` '' = the shipped
    default student; see lidar_completion.settings)."""
    from lidar_completion.completer import Completer

    return Completer.from_settings(completion_settings(config))


def run_apart(fn: Callable, *args, cancel: Optional[threading.Event] = None, grace: float = 5.0):
    """``fn(*args)`` in a thread of its own that ends with it; its result (or exception) comes back here.

    Interrupted while waiting (Ctrl-C during the load or the warm-up), it sets ``cancel`` (which
    ``fn`` polls, if it can), gives the thread ``grace`` seconds to end and re-raises.

    The node loads its checkpoint and completes the warm-up scan this way, so that the thread that
    builds the node (rclpy's main thread) never runs torch's parallel CPU kernels: with the GNU
    OpenMP runtime of torch's CPU wheels, a thread that has run parallel regions keeps its pool of
    OpenMP threads for as long as it lives, and with that pool left in the main thread the worker
    thread's completions were slower - on a 2-core machine, 2 threads, the shipped student at
    1,000 x 10 points: paced live replay p50 3.54 / 3.79 s against 2.84 / 3.05 s with the set-up
    apart (docs/benchmarks.md, ``benchmarks/cpu_threads.py``). A pool ends with its thread."""
    box: dict = {}
    done = threading.Event()   # not Thread.join: see _BUSY

    def target():
        with _busy():
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                box["error"] = exc
            finally:
                done.set()

    thread = threading.Thread(target=target, name=SETUP_THREAD, daemon=True)
    thread.start()
    try:
        done.wait()
    except BaseException:
        if cancel is not None:
            cancel.set()
        done.wait(grace)
        raise
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------------------------------- parameters
def _descriptor(p):
    from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                    ParameterType)

    ptypes = {"string": ParameterType.PARAMETER_STRING, "integer": ParameterType.PARAMETER_INTEGER,
              "double": ParameterType.PARAMETER_DOUBLE, "bool": ParameterType.PARAMETER_BOOL}
    d = ParameterDescriptor(name=p.name, type=ptypes[p.type], description=p.description,
                            additional_constraints=p.constraints, read_only=not p.dynamic)
    if p.range is not None and p.type == "integer":
        d.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]), step=1)]
    elif p.range is not None and p.type == "double":
        d.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]),
                                                     to_value=float(p.range[1]), step=0.0)]
    return d


def declare_parameters(node) -> dict:
    """Declare every parameter of the table on ``node``; the checked values. Raises StartupError."""
    from rclpy.parameter import Parameter

    config = {}
    overrides = getattr(node, "_parameter_overrides", None)
    for p in PARAMETERS:
        override = overrides.get(p.name) if isinstance(overrides, dict) else None
        if p.type == "double" and override is not None and override.type_ == Parameter.Type.INTEGER:
            # `-p guidance:=4` / `guidance: 4` in YAML mean 4.0
            overrides[p.name] = Parameter(p.name, Parameter.Type.DOUBLE, float(override.value))
        try:
            value = node.declare_parameter(p.name, p.default, _descriptor(p)).value
        except Exception as exc:  # noqa: BLE001 - wrong type / out of range overrides
            raise StartupError(f"invalid parameter {p.name}: {exc}") from None
        problem = check_value(p.name, value)
        if problem:
            raise StartupError(f"invalid parameter: {problem}")
        config[p.name] = value
    if config["min_range"] >= config["max_range"]:
        raise StartupError(f"min_range ({config['min_range']}) must be < max_range "
                           f"({config['max_range']})")
    if config["min_z"] >= config["max_z"]:
        raise StartupError(f"min_z ({config['min_z']}) must be < max_z ({config['max_z']})")
    for name in ("model_frame", "target_frame"):
        config[name] = config[name].strip().lstrip("/")
    for name in ("input_topic", "output_topic", "raw_output_topic"):
        problem = topic_problem(config[name], node.get_name(), node.get_namespace())
        if problem:
            raise StartupError(f"invalid parameter {name} {config[name]!r}: {problem}")
    return config


def topic_problem(name: str, node_name: str, namespace: str) -> Optional[str]:
    """Why ``name`` is not a valid ROS 2 topic name (after expansion for this node), or None.
    Checked with the parameters, before the checkpoint is loaded: rclpy itself would only refuse
    it when the endpoint is created, after the load and the warm-up, with a traceback."""
    from rclpy.expand_topic_name import expand_topic_name
    from rclpy.validate_full_topic_name import validate_full_topic_name
    from rclpy.validate_topic_name import validate_topic_name

    try:
        validate_topic_name(name)
        validate_full_topic_name(expand_topic_name(name, node_name, namespace))
    except Exception as exc:  # noqa: BLE001 - InvalidTopicNameException and its kin
        lines = str(exc).strip().splitlines()
        return lines[0].rstrip(":") if lines else type(exc).__name__
    return None


def _resolved(node, name: str) -> str:
    """``name`` as the node will use it (namespace and remappings applied), or as given where the
    node cannot say (a test's stand-in, an invalid name reported elsewhere)."""
    try:
        return node.resolve_topic_name(name)
    except Exception:  # noqa: BLE001
        return name


def accepts_should_stop(completer) -> bool:
    """Whether ``completer.complete_detailed`` takes ``should_stop`` (the Completer does; a
    completer without it is always left to finish its scan)."""
    method = getattr(completer, "complete_detailed", None)
    if method is None:
        return False
    try:
        return "should_stop" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def warmup_cloud(n: int = WARMUP_POINTS, min_range: float = 3.5, max_range: float = 50.0) -> np.ndarray:
    """A synthetic street-like scan inside the range limits: ground at -1.7 m and walls."""
    rng = np.random.default_rng(0)
    lo, hi = max(min_range + 0.5, 4.0), max(min(max_range - 1.0, 40.0), min_range + 1.0)
    angle = rng.uniform(-np.pi, np.pi, n)
    radius = rng.uniform(lo, hi, n)
    z = np.where(rng.random(n) < 0.5, -1.7, rng.uniform(-1.7, 2.0, n))
    return np.stack([radius * np.cos(angle), radius * np.sin(angle), z], 1).astype(np.float32)


# ------------------------------------------------------------------------------------------ pipeline
class CompletionPipeline:
    """The completion machinery of one node (``node``: rclpy Node or LifecycleNode).

    The node creates its endpoints and assigns ``pub`` / ``raw_pub`` (publishers, or None); the pipeline
    does the rest. ``state`` is what /diagnostics reports (stats.WARMING_UP ... ACTIVE).
    """

    def __init__(self, node, config: dict, state: str = WARMING_UP):
        self.node, self.config, self.state = node, config, state
        self.stats = Stats()
        self.throttle = Throttle(5.0)
        self.mailbox = Mailbox()
        self.completer = None
        self.frames = None
        self.pub = self.raw_pub = None
        from diagnostic_msgs.msg import DiagnosticArray
        # a plain publisher in every node class: /diagnostics reports in every lifecycle state
        self.diag_pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.warmup_s: Optional[float] = None
        self._missing_since: dict = {}   # (target, model) -> when no path joined them first
        self._pending: dict = {}
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._setup_cancel = threading.Event()   # set by Ctrl-C during the load / warm-up
        self._cancellable = False
        self.worker: Optional[threading.Thread] = None

    @property
    def log(self):
        return self.node.get_logger()

    @contextlib.contextmanager
    def heartbeat(self):
        """/diagnostics every ``diagnostics_period`` from a thread of its own while the block runs
        (the load and the warm-up: seconds to minutes in which the executor, busy in them, fires no
        timer), so a watchdog sees ``warming up`` rather than a node gone silent."""
        done = threading.Event()

        def beat():
            while not done.wait(float(self.config["diagnostics_period"])):
                try:
                    self.diag_pub.publish(self.diagnostics())
                except Exception as exc:  # noqa: BLE001 - the context may be going away (a signal)
                    if done.is_set() or not self.node.context.ok():
                        return            # nothing to say: the node is stopping
                    self._warn("diagnostics", f"cannot publish diagnostics: {exc}")

        thread = threading.Thread(target=beat, name="diagnostics-while-starting", daemon=True)
        self.publish_diagnostics()
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=5.0)

    # -- model ------------------------------------------------------------------------------
    def load(self, factory: Optional[Callable] = None) -> None:
        """Build the completer from the parameters; StartupError naming the checkpoint on failure."""
        factory = factory or default_completer_factory
        try:
            self.completer = run_apart(factory, self.config)
        except Exception as exc:  # noqa: BLE001 - every load failure becomes one fatal line
            what = self.config["checkpoint"] or "the shipped default checkpoint"
            if not isinstance(exc, (CheckpointError, OSError)):
                # a setting the completer refuses (device, backend, ...): not the file's fault
                raise StartupError(f"cannot set up the completer with {what}: {exc}") from exc
            hint = "" if self.config["checkpoint"] else \
                " (node parameter: --ros-args -p checkpoint:=/path/model.pt)"
            raise StartupError(f"cannot load {what}: {exc}{hint}") from exc
        self._cancellable = accepts_should_stop(self.completer)
        from rclpy.parameter import Parameter

        resolved = []  # 0 / -1 meant "the checkpoint's default": show the values in use
        for name, cast in (("steps", int), ("guidance", float)):
            value = getattr(self.completer, name, None)
            if self.config[name] == STARTUP_ONLY[name] and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                self.config[name] = cast(value)
                resolved.append(Parameter(name, value=cast(value)))
        if resolved:
            self.node.set_parameters(resolved)

    def warm_up(self) -> Optional[float]:
        """Complete one synthetic scan (graph capture, kernel tuning, allocator growth happen here
        rather than on the first real scan); its duration in seconds, None when skipped or failed."""
        if not self.config["warmup"] or self.completer is None:
            return None
        cloud = warmup_cloud(min_range=self.config["min_range"], max_range=self.config["max_range"])
        self.log.info(f"completing a warm-up scan of {len(cloud)} points (warmup:=false skips it)")
        t0 = time.monotonic()
        self._setup_cancel.clear()
        try:
            if self._cancellable:
                run_apart(lambda: self.completer.complete_detailed(
                    cloud, should_stop=self._setup_cancel.is_set), cancel=self._setup_cancel)
            else:
                run_apart(self.completer.complete, cloud)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up is reported, not fatal
            self.log.warning(f"the warm-up scan failed ({type(exc).__name__}: {exc}); the first real "
                             "scan will be slower")
            return None
        self.warmup_s = time.monotonic() - t0
        self.log.info(f"warm-up scan completed in {self.warmup_s:.2f} s")
        return self.warmup_s

    def release(self, drop_model: bool) -> None:
        """Free accelerator memory: the allocator's cache, and the model itself when ``drop_model``."""
        if drop_model:
            self.completer = None
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - freeing memory must never fail a transition
            pass

    # -- frames and worker ----------------------------------------------------------------------
    def needs_frames(self) -> bool:
        return bool(self.config["model_frame"] or self.config["target_frame"])

    def check_frames(self) -> None:
        """StartupError before anything slow happens when frames are asked for and the transform
        packages are missing."""
        if self.needs_frames():
            try:
                frames.check_transform_packages()
            except frames.FramesUnavailable as exc:
                raise StartupError(str(exc)) from None

    def open_frames(self) -> None:
        """The TF source when ``model_frame`` or ``target_frame`` is set; StartupError when the
        transform packages are missing."""
        if self.needs_frames() and self.frames is None:
            try:
                self.frames = frames.make_frames(self.node, warn=self.log.warning,
                                                 prefer=os.environ.get("LIDAR_COMPLETION_TF"))
            except frames.FramesUnavailable as exc:
                raise StartupError(str(exc)) from None

    def close_frames(self) -> None:
        if self.frames is not None:
            self.frames.close()
            self.frames = None

    def start(self) -> None:
        """Start a worker thread with a stop event and a mailbox of its own (nothing from before is
        completed). A worker that stop() could not wait for (a completer that cannot be cancelled,
        in a long scan) keeps its own, set event and ends after that scan, publishing nothing."""
        if self.worker is not None and self.worker.is_alive() and not self._stop.is_set():
            return
        self._stop = threading.Event()
        self.mailbox = Mailbox()
        self._missing_since = {}     # an activation starts its frames' grace afresh
        self.worker = threading.Thread(target=self._work, args=(self._stop, self.mailbox),
                                       name=WORKER_THREAD, daemon=True)
        self.worker.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the worker: the scan in hand is cancelled at the completer's next network pass
        (finished, but not published, by a completer that cannot be cancelled); True when the
        worker ended within ``timeout`` s."""
        self._stop.set()
        if self.mailbox.close():      # a scan that waited for the worker: never completed
            self.stats.note_cancelled()
        if self.worker is None:
            return True
        self.worker.join(timeout)
        return not self.worker.is_alive()

    def describe(self, input_topic: Optional[str] = None) -> str:
        """One line on what the node does; ``input_topic``: the subscription's resolved name."""
        c = self.config
        steps = getattr(self.completer, "steps", c["steps"])
        guidance = getattr(self.completer, "guidance", c["guidance"])
        where = (f"model frame {c['model_frame'] or '(input frame)'}, target frame "
                 f"{c['target_frame'] or '(input frame)'}")
        if self.frames is not None:
            where += f", transforms from {self.frames.kind}"
        out_topic = getattr(self.pub, "topic_name", None) or c["output_topic"]   # resolved once created
        if input_topic is None:   # not subscribed yet (a configured lifecycle node): as it will be
            input_topic = _resolved(self.node, c["input_topic"])
        return (f"{input_topic} -> {out_topic} with {c['checkpoint'] or 'the default checkpoint'}"
                f" (steps {steps}, guidance {guidance}, device {c['device']}; {where}; Fast DDS "
                f"profile {os.environ.get(dds.PROFILE_ENV) or 'none'})")

    # -- parameters at run time ---------------------------------------------------------------
    def pre_set_parameters(self, params):
        """Integers for parameters of type double become doubles (``ros2 param set ... guidance 4``
        means 4.0, as ``-p guidance:=4`` does at start; rclpy refused it as a wrong type)."""
        from rclpy.parameter import Parameter

        out = []
        for param in params:
            spec = BY_NAME.get(param.name)
            if spec is not None and spec.type == "double" and param.type_ == Parameter.Type.INTEGER:
                param = Parameter(param.name, Parameter.Type.DOUBLE, float(param.value))
            out.append(param)
        return out

    def on_set_parameters(self, params):
        from rcl_interfaces.msg import SetParametersResult

        updates = {}
        for param in params:
            if param.name in BUILTIN or param.name not in BY_NAME:
                continue  # qos_overrides.* are read-only and undeclared names refused by rclpy
            if param.name not in DYNAMIC:
                return SetParametersResult(successful=False, reason=(
                    f"{param.name} is read-only while the node runs; only {', '.join(DYNAMIC)} "
                    "can change (restart the node for the others)"))
            problem = check_value(param.name, param.value, runtime=True)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
            if self.config.get(param.name) == param.value:
                continue   # no change (the load's own resolution of the checkpoint's defaults)
            updates[param.name] = param.value
        if updates:
            with self._pending_lock:
                self._pending.update(updates)
            self.config.update(updates)
            self.log.info(f"parameters changed: {updates} (from the next cloud on)")
        return SetParametersResult(successful=True)

    def _apply_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for name, value in pending.items():
            try:
                setattr(self.completer, name, int(value) if name == "steps" else float(value))
            except Exception as exc:  # noqa: BLE001
                self._warn("settings", f"cannot apply {name}={value}: {exc}")

    # -- input ----------------------------------------------------------------------------------
    def _warn(self, key: str, message: str) -> None:
        suppressed = self.throttle(key)
        if suppressed is not None:
            extra = f" ({suppressed} similar suppressed)" if suppressed else ""
            self.log.warning(message + extra)

    def _reject(self, reason: str, message: str, frame: str = "") -> None:
        self.stats.note_rejected(reason, message)
        where = f" (frame '{frame}')" if frame else ""
        self._warn("reject." + reason, f"rejected input cloud{where}: {message}")

    def on_cloud(self, msg) -> None:
        """Subscription callback: convert, check, hand to the worker. Never raises."""
        t_received = self.stats.note_input()
        frame = ""
        try:
            frame = str(msg.header.frame_id)
            # float64 x, y, z stay float64 until the transform into model_frame: a cloud in a map
            # frame with UTM-sized coordinates would lose up to half a metre to float32 first
            points = read_points_numpy(msg, ("x", "y", "z"), skip_nans=True, dtype="auto")
            if self.mailbox.put((msg.header, points, t_received)):
                self.stats.note_dropped()
        except CloudFormatError as exc:
            self._reject(getattr(exc, "reason", "malformed"), str(exc), frame)
        except Exception as exc:  # noqa: BLE001 - never die on a message
            self._reject("unreadable", f"{type(exc).__name__}: {exc}", frame)

    def _limit(self, points: np.ndarray, frame: str = "") -> Optional[np.ndarray]:
        c = self.config
        r2 = np.einsum("ij,ij->i", points, points)  # squared range, no temporary (N, 3)
        z = points[:, 2]
        keep = (r2 > c["min_range"] ** 2) & (r2 < c["max_range"] ** 2) & (z > c["min_z"]) & \
            (z < c["max_z"])
        n_finite = len(points)
        points = points[keep]
        if len(points) == 0:
            self._reject("out_of_limits", f"none of its {n_finite} finite points lies within "
                         f"{c['min_range']} m < range < {c['max_range']} m and "
                         f"{c['min_z']} m < z < {c['max_z']} m", frame)
            return None
        if len(points) > c["max_points"]:
            self.stats.note_subsampled()
            self._warn("subsampled", f"cloud has {len(points)} points within the limits, more "
                       f"than max_points={c['max_points']}: subsampled evenly to {c['max_points']}")
            index = np.linspace(0, len(points) - 1, c["max_points"]).astype(np.int64)
            points = points[index]
        return np.ascontiguousarray(points, dtype=np.float32)

    def _lookup(self, target: str, source: str, stamp_ns: int) -> Optional[np.ndarray]:
        """target <- source at the stamp, or None (counted, warned) when unavailable."""
        if target == source:
            return None
        if self.frames is None:  # frames were not opened (no frame parameter set): cannot happen
            raise RuntimeError("TF lookups requested without a listener")
        try:
            return self.frames.lookup(target, source, stamp_ns, self.config["tf_timeout"])
        except frames.TransformUnavailable as exc:
            self.stats.note_no_transform(exc.reason, str(exc))
            self._warn("tf." + exc.reason, f"dropped a scan: {exc}")
            raise

    def _early_target(self, target: str, model: str, source: str, to_model, stamp_ns: int):
        """(target <- model at the stamp, True) when known before the completion starts, else
        (None, False): the lookup is then made after it, waiting up to ``tf_timeout``. Taking it
        first matters when a completion outlasts the TF cache (10 s; a CPU's first scans, LiDiff
        at 50 steps): looked up only afterwards, the transform at the stamp had aged out and the
        completed scan was dropped as stale.

        When no path has joined the two frames for ``MISSING_GRACE_S`` (a frame nothing publishes),
        the scan is dropped here, after ``tf_timeout``, instead of being completed (seconds on a
        CPU) and dropped afterwards; within that time (odometry that starts after the LiDAR) it is
        completed and looked up afterwards, as a transform not yet at the stamp is."""
        if target == model:
            return None, True
        if target == source and to_model is not None:
            return frames.rigid_inverse(to_model), True
        if self.frames is None:
            return None, False
        key = (target, model)
        try:
            found = self.frames.lookup(target, model, stamp_ns, 0.0)
        except frames.TransformUnavailable as exc:
            if exc.reason != frames.MISSING:
                # not yet at the stamp (odometry later than the scan): after it; a path exists, so a
                # later spell without one starts its own grace
                self._missing_since.pop(key, None)
                return None, False
            if key not in self._missing_since and len(self._missing_since) >= 64:
                self._missing_since.pop(next(iter(self._missing_since)))  # frame ids that came and went
            first = self._missing_since.setdefault(key, time.monotonic())
            if time.monotonic() - first < MISSING_GRACE_S:
                return None, False
        else:
            self._missing_since.pop(key, None)
            return found, True
        try:
            found = self.frames.lookup(target, model, stamp_ns, self.config["tf_timeout"])
        except frames.TransformUnavailable as exc:
            if exc.reason != frames.MISSING:     # it came meanwhile, not yet at the stamp: after it
                self._missing_since.pop(key, None)
                return None, False
            self.stats.note_no_transform(exc.reason, str(exc))
            self._warn("tf_early." + exc.reason, f"dropped a scan before completing it: {exc}")
            raise
        self._missing_since.pop(key, None)
        return found, True

    # -- worker ---------------------------------------------------------------------------------
    def _work(self, stop: threading.Event, mailbox: Mailbox) -> None:
        with _busy():
            self._serve(stop, mailbox)

    def _serve(self, stop: threading.Event, mailbox: Mailbox) -> None:
        while not stop.is_set():
            item = mailbox.get(timeout=0.2)
            if item is None:
                continue
            if stop.is_set():         # taken as the worker was stopped: not completed
                self.stats.note_cancelled()
                continue
            try:
                self._complete_one(*item, stop=stop)
            except (frames.TransformUnavailable, Cancelled):
                continue
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything
                if stop.is_set():
                    return
                self.stats.note_failed("worker", f"{type(exc).__name__}: {exc}")
                self._warn("worker", f"completion failed unexpectedly: {type(exc).__name__}: {exc}")

    def _complete_one(self, header, points: np.ndarray, t_received: float,
                      stop: Optional[threading.Event] = None) -> None:
        stop = stop if stop is not None else self._stop
        self._apply_pending()
        source = str(header.frame_id).lstrip("/")
        model = self.config["model_frame"] or source
        target = self.config["target_frame"] or source
        stamp_ns = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
        to_model = self._lookup(model, source, stamp_ns)
        if to_model is not None:
            points = frames.apply(to_model, points)
        points = self._limit(points, source)
        if points is None:
            return
        to_target, have_target = self._early_target(target, model, source, to_model, stamp_ns)
        t0 = time.monotonic()
        try:
            if hasattr(self.completer, "complete_detailed"):
                cancel = {"should_stop": stop.is_set} if self._cancellable else {}
                result = self.completer.complete_detailed(points, **cancel)
                out, raw = result.points, getattr(result, "raw", None)
            else:
                out, raw = self.completer.complete(points), None
        except Cancelled:       # deactivate / shutdown: accounted for, not published
            self.stats.note_cancelled()
            return
        except CloudFormatError as exc:
            self._reject(getattr(exc, "reason", "unusable"), str(exc), source)
            return
        except Exception as exc:  # noqa: BLE001
            self.stats.note_failed("completion", f"{type(exc).__name__}: {exc}")
            self._warn("completion", f"completion failed: {type(exc).__name__}: {exc}")
            return
        compute_s = time.monotonic() - t0
        out = self._checked_output(out, "completion")
        if out is not None and stop.is_set():    # finished as the worker was stopped: not published
            self.stats.note_cancelled()
        if out is None or stop.is_set():
            return
        if not have_target:
            to_target = self._lookup(target, model, stamp_ns)
            self._missing_since.pop((target, model), None)     # joined after all: grace ends
        from std_msgs.msg import Header

        if not target:
            # completed and published as it came, but nothing downstream (tf, rviz) can place it
            self._warn("empty_frame", "input clouds have an empty header.frame_id: the completions are "
                                      "published without a frame too (set the driver's frame, or "
                                      "model_frame / target_frame)")
        out_header = Header(stamp=header.stamp, frame_id=target)
        msg = self._output_cloud(out_header, out, to_target, target)
        raw_msg = None
        if self.raw_pub is not None and raw is not None:
            raw = self._checked_output(raw, "raw completion", count=False)
            if raw is not None:
                raw_msg = self._output_cloud(out_header, raw, to_target, target)
        self.pub.publish(msg)
        if raw_msg is not None:
            self.raw_pub.publish(raw_msg)
        age_s = None
        if stamp_ns == 0:
            # an unset stamp: no stamp latency to measure (it would be the clock's whole reading)
            self._warn("zero_stamp", "input clouds have a zero header.stamp (the driver did not set it): "
                                     "the completions carry it too, transforms are looked up as the "
                                     "latest available, and stamp_latency is not measured for them")
        else:
            age_s = (self.node.get_clock().now().nanoseconds - stamp_ns) / 1e9
        self.stats.note_published(t_received, compute_s, age_s)

    def _output_cloud(self, header, points: np.ndarray, to_target, target: str):
        """The completion in target_frame as a PointCloud2: float64 x, y, z with ``output_float64``;
        float32 otherwise, with a warning where float32 rounds the coordinates by 8 mm or more."""
        wide = bool(self.config.get("output_float64", False))
        if to_target is None:        # published in the frame it was completed in: within range
            return create_cloud_xyz32(header, points)
        points = frames.apply(to_target, points, dtype=np.float64 if wide else np.float32)
        if wide:
            return create_cloud_xyz64(header, points)
        # the completion lies within max_range of the sensor, so the sensor's distance from the
        # target frame's origin says how far out it is: no pass over the points
        reach = float(np.linalg.norm(to_target[:3, 3]))
        if reach >= FLOAT32_PRECISE_M:
            step = float(np.spacing(np.float32(reach)))
            self._warn("float32_output",
                       f"the sensor is {reach:.0f} m from the origin of frame '{target}', where float32 "
                       f"coordinates step by {step:.3g} m: set output_float64 to publish float64 x, y, z")
        return create_cloud_xyz32(header, points)

    def _checked_output(self, out, what: str, count: bool = True) -> Optional[np.ndarray]:
        try:
            arr = np.asarray(out, dtype=np.float32)
            if arr.ndim != 2 or arr.shape[1] < 3:
                raise ValueError(f"shape {arr.shape}, expected (M, 3)")
            arr = arr[:, :3]
            finite = np.isfinite(arr).all(axis=1)
            if not finite.all():
                self._warn("nonfinite_output", f"{what} had {int((~finite).sum())} non-finite "
                           "points; they are not published")
                arr = arr[finite]
            if len(arr) == 0:
                raise ValueError("no points")
            return arr
        except (TypeError, ValueError) as exc:
            if count:
                self.stats.note_failed("bad_output", f"unusable {what}: {exc}")
            self._warn("bad_output", f"unusable {what} not published: {exc}")
            return None

    # -- diagnostics ----------------------------------------------------------------------------
    def publish_diagnostics(self) -> None:
        """Publish the status now (the nodes' timer callback; never raises)."""
        try:
            self.diag_pub.publish(self.diagnostics())
        except Exception as exc:  # noqa: BLE001 - diagnostics must not take the node down
            self._warn("diagnostics", f"cannot publish diagnostics: {exc}")

    def diagnostics(self):
        """One DiagnosticArray with this node's status (never raises for a missing completer)."""
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        alive = self.worker.is_alive() if self.state == ACTIVE and self.worker is not None else None
        level, message, values = diagnostic_summary(self.stats.snapshot(), alive, self.state)
        values = values + [("steps", str(getattr(self.completer, "steps", self.config["steps"]))),
                           ("guidance", str(getattr(self.completer, "guidance",
                                                    self.config["guidance"]))),
                           ("device", str(self.config["device"])),
                           ("checkpoint", self.config["checkpoint"] or "default"),
                           ("warmup_s", "n/a" if self.warmup_s is None else f"{self.warmup_s:.3f}"),
                           ("model_frame", self.config["model_frame"] or "(input frame)"),
                           ("target_frame", self.config["target_frame"] or "(input frame)")]
        buffer = getattr(self.frames, "buffer", None)
        if isinstance(buffer, frames.TransformBuffer):   # the own listener (tf2_ros logs its own)
            values.append(("tf_ignored", str(buffer.ignored)))
            if buffer.ignored:
                values.append(("tf_ignored_last", buffer.last_ignored))
        name = self.node.get_fully_qualified_name().lstrip("/")    # "robot1/lidar_completion"
        status = DiagnosticStatus(level=bytes([level]), name=f"{name}: completion",
                                  message=message, hardware_id=str(self.config["device"]),
                                  values=[KeyValue(key=k, value=v) for k, v in values])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.node.get_clock().now().to_msg()
        return array
