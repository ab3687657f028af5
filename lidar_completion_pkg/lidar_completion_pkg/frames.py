"""TF lookups for the node: the transform between two frames at a cloud's stamp, as a 4x4 matrix.

Two sources, one interface (:meth:`lookup` -> 4x4 matrix that maps ``source`` coordinates into
``target``, or :class:`TransformUnavailable` with a ``reason``):

* :class:`Tf2Frames` - ``tf2_ros.Buffer`` + ``TransformListener`` where tf2_ros imports (a system ROS 2);
* :class:`OwnFrames` - the node's own ``/tf`` + ``/tf_static`` listener and buffer where it does not
  (a venv: ``make setup`` builds the ``tf2_msgs`` message package, which PyPI lacks; without it
  :func:`make_frames` raises :class:`FramesUnavailable`): per child frame, the static transform or
  the recent history of dynamic ones (``cache_time`` seconds), interpolated at the requested stamp
  (translation linearly, rotation by spherical linear interpolation), chained through the tree like
  tf2. As in tf2, a stamp outside the buffered span is never extrapolated, stamp 0 means the
  latest time at which the whole path is known (tf2's latest common time), a re-parented frame keeps
  its history (each sample with its parent), and a transform with a non-finite value or a
  quaternion that is not of unit length (its squared norm off by more than 0.01) is ignored.

:func:`make_frames` picks one. :func:`apply` transforms an (N, 3) cloud. The rotation algebra is
scipy's (``scipy.spatial.transform``); nothing here writes quaternion code of its own.
"""
from __future__ import annotations

import bisect
import threading
import time
from typing import Callable, Optional

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from lidar_completion.errors import LidarCompletionError

#: Reasons a transform is unavailable (the node counts dropped scans by them).
MISSING, STALE = "tf_missing", "tf_stale"


class FramesUnavailable(LidarCompletionError):
    """Frames were asked for but the ROS 2 transform packages are not installed."""


#: What a node that transforms clouds needs beside rclpy: the message package of /tf, which PyPI lacks
#: (``make setup`` builds it; a system ROS 2 has it).
TRANSFORM_PACKAGES = ("tf2_msgs",)


def missing_transform_packages() -> list:
    """The packages of :data:`TRANSFORM_PACKAGES` that do not import here."""
    import importlib
    missing = []
    for name in TRANSFORM_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def check_transform_packages() -> None:
    """:class:`FramesUnavailable` naming what is missing when :data:`TRANSFORM_PACKAGES` do not all
    import (they come with a system ROS 2, not from PyPI)."""
    missing = missing_transform_packages()
    if missing:
        raise FramesUnavailable(
            f"model_frame / target_frame need {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed and not on PyPI: use a system ROS 2 "
            "(source it), or run `make setup`, which builds it into the venv (docs/ros2.md); or leave "
            "both parameters empty to publish in the cloud's own frame")


class TransformUnavailable(LidarCompletionError):
    """No transform between two frames at the requested stamp; ``reason`` is MISSING or STALE."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _matrix(translation, rotation: Rotation) -> np.ndarray:
    """4x4 float64 matrix of a translation and a rotation."""
    m = np.eye(4)
    m[:3, :3] = rotation.as_matrix()
    m[:3, 3] = translation
    return m


def matrix_from_transform(transform) -> np.ndarray:
    """4x4 float64 matrix of a geometry_msgs/Transform (maps child coordinates into the parent)."""
    r, t = transform.rotation, transform.translation
    return _matrix((t.x, t.y, t.z), Rotation.from_quat([r.x, r.y, r.z, r.w]))  # x, y, z, w as ROS


def invalid_transform(transform) -> Optional[str]:
    """Why tf2 would refuse a geometry_msgs/Transform (a non-finite value, or a quaternion whose
    squared norm is off 1 by more than 0.01, as tf2's buffer checks), or None when it is usable."""
    r, t = transform.rotation, transform.translation
    values = np.array([t.x, t.y, t.z, r.x, r.y, r.z, r.w], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return "a non-finite value"
    norm2 = float(values[3:] @ values[3:])
    if abs(norm2 - 1.0) > 0.01:
        return f"a quaternion of length {norm2 ** 0.5:.3g}, not 1"
    return None


def rigid_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 rigid transform (rotation transposed, translation mapped back)."""
    m = np.asarray(matrix, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return out


def apply(matrix: np.ndarray, points: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(N, 3) points mapped by a 4x4 transform, computed in float64 and returned as ``dtype``
    (float32 by default; float64 keeps coordinates far from the frame's origin exact)."""
    m = np.asarray(matrix, dtype=np.float64)
    out = np.asarray(points, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]
    return out.astype(dtype, copy=False)


def _stamp_text(t_ns: int) -> str:
    return "latest" if t_ns == 0 else f"{t_ns / 1e9:.3f} s"


# ------------------------------------------------------------------------------------ own buffer
class TransformBuffer:
    """A tf2-like buffer of static and dynamic transforms (thread-safe; no rclpy)."""

    def __init__(self, cache_time: float = 10.0):
        self.cache_ns = int(cache_time * 1e9)
        self._static: dict[str, tuple[str, np.ndarray]] = {}
        # child -> (sorted stamps, [(translation (3,), quaternion xyzw (4,))], [parent of each sample]):
        # as in tf2, a frame may be re-parented, and each sample keeps the parent it was sent with
        self._dynamic: dict[str, tuple[list, list, list]] = {}
        self._cond = threading.Condition()
        #: transforms ignored as tf2 would (non-finite, not a unit quaternion), and the last reason
        self.ignored = 0
        self.last_ignored = ""

    def set_transform(self, ts, static: bool) -> None:
        """Add one geometry_msgs/TransformStamped."""
        parent = str(ts.header.frame_id).lstrip("/")
        child = str(ts.child_frame_id).lstrip("/")
        if not parent or not child or parent == child:
            return
        why = invalid_transform(ts.transform)
        if why is not None:
            with self._cond:
                self.ignored += 1
                self.last_ignored = f"{parent} -> {child}: {why}"
            return
        with self._cond:
            # as tf2's buffer: a frame once static stays static, and a later /tf message for it
            # replaces its transform; a /tf_static message makes a dynamic frame static
            if static or child in self._static:
                self._static[child] = (parent, matrix_from_transform(ts.transform))
                self._dynamic.pop(child, None)
            else:
                stamp = int(ts.header.stamp.sec) * 1_000_000_000 + int(ts.header.stamp.nanosec)
                r, t = ts.transform.rotation, ts.transform.translation
                sample = (np.array([t.x, t.y, t.z]), np.array([r.x, r.y, r.z, r.w]))
                stamps, samples, parents = self._dynamic.get(child, ([], [], []))
                if stamps and stamp < stamps[-1] - self.cache_ns:
                    # time went back by more than the cache (a bag played again, a simulator
                    # restarted): the newer history would hide every new sample, as it is cut
                    # relative to the newest stamp (tf2_ros's C++ buffer clears itself when ROS
                    # time jumps back)
                    stamps, samples, parents = [], [], []
                i = bisect.bisect_left(stamps, stamp)
                if i < len(stamps) and stamps[i] == stamp:
                    samples[i], parents[i] = sample, parent
                else:
                    stamps.insert(i, stamp)
                    samples.insert(i, sample)
                    parents.insert(i, parent)
                cut = bisect.bisect_left(stamps, stamps[-1] - self.cache_ns)
                self._dynamic[child] = (stamps[cut:], samples[cut:], parents[cut:])
            self._cond.notify_all()

    def set_message(self, msg, static: bool) -> None:
        """Add every transform of a tf2_msgs/TFMessage."""
        for ts in msg.transforms:
            self.set_transform(ts, static)

    # -- lookup -------------------------------------------------------------------------------
    def _parent(self, frame: str, t_ns: int = 0) -> Optional[str]:
        """The frame's parent at t_ns (0: now): a dynamic frame's is that of its sample at or before
        t_ns (as tf2's), its oldest sample's before its history."""
        if frame in self._static:
            return self._static[frame][0]
        if frame in self._dynamic:
            stamps, _samples, parents = self._dynamic[frame]
            return parents[-1] if t_ns == 0 else parents[max(0, bisect.bisect_right(stamps, t_ns) - 1)]
        return None

    def _chain(self, frame: str, t_ns: int = 0) -> list[str]:
        chain = [frame]
        while True:
            parent = self._parent(chain[-1], t_ns)
            if parent is None or parent in chain:
                return chain
            chain.append(parent)

    def _edge(self, child: str, t_ns: int) -> np.ndarray:
        """parent <- child at t_ns (0: latest)."""
        if child in self._static:
            return self._static[child][1]
        stamps, samples, parents = self._dynamic[child]
        if t_ns == 0:
            i = len(stamps) - 1
            translation, quat = samples[i]
        else:
            i = bisect.bisect_left(stamps, t_ns)
            if i < len(stamps) and stamps[i] == t_ns:
                translation, quat = samples[i]
            elif i == 0 or i == len(stamps):
                newest, oldest = stamps[-1], stamps[0]
                if t_ns > newest:
                    what = f"the newest is {(t_ns - newest) / 1e9:.3f} s older than the cloud"
                else:
                    what = f"the oldest kept is {(oldest - t_ns) / 1e9:.3f} s newer than the cloud"
                parent = self._parent(child, t_ns)
                raise TransformUnavailable(STALE, f"transform {parent} -> {child} is not known at "
                                                  f"{_stamp_text(t_ns)} ({what})")
            elif parents[i - 1] != parents[i]:
                # re-parented between the two samples: as tf2, the older one, not interpolated
                translation, quat = samples[i - 1]
            else:
                w = (t_ns - stamps[i - 1]) / (stamps[i] - stamps[i - 1])
                (t0, q0), (t1, q1) = samples[i - 1], samples[i]
                slerp = Slerp([0.0, 1.0], Rotation.from_quat([q0, q1]))   # the shorter arc
                return _matrix(t0 + w * (t1 - t0), slerp(w))
        return _matrix(translation, Rotation.from_quat(quat))

    def _to_root(self, chain: list[str], stop: str, t_ns: int) -> np.ndarray:
        """stop <- chain[0], walking up ``chain`` until ``stop``."""
        m = np.eye(4)
        for child in chain:
            if child == stop:
                break
            m = self._edge(child, t_ns) @ m
        return m

    def _latest_common(self, chains: list[list[str]], stop: str) -> int:
        """tf2's meaning of stamp 0: the newest stamp that every dynamic transform on the path up to
        ``stop`` has reached, so that the edges are taken at one time (0 when the path is static)."""
        newest = [self._dynamic[child][0][-1] for chain in chains
                  for child in chain[:chain.index(stop)] if child not in self._static]
        return min(newest, default=0)

    def lookup_now(self, target: str, source: str, t_ns: int) -> np.ndarray:
        """target <- source at t_ns (0: the latest time the whole path is known at) without waiting;
        raises TransformUnavailable."""
        target, source = target.lstrip("/"), source.lstrip("/")
        if target == source:
            return np.eye(4)
        with self._cond:
            up_source, up_target = self._chain(source), self._chain(target)
            if t_ns == 0:
                common = next((f for f in up_source if f in up_target), None)
                if common is not None:
                    t_ns = self._latest_common([up_source, up_target], common)
            if t_ns != 0:   # the tree at the cloud's time (a frame may have had another parent then)
                up_source, up_target = self._chain(source, t_ns), self._chain(target, t_ns)
            common = next((f for f in up_source if f in up_target), None)
            if common is None:
                known = sorted(set(self._static) | set(self._dynamic) |
                               {p for p, *_ in self._static.values()} |
                               {parents[-1] for *_, parents in self._dynamic.values()})
                ignored = (f"; {self.ignored} transform(s) ignored, the last {self.last_ignored}"
                           if self.ignored else "")
                raise TransformUnavailable(MISSING, f"no transform from '{source}' to '{target}' "
                                                    f"(frames known: {', '.join(known) or 'none'}{ignored})")
            m_source = self._to_root(up_source, common, t_ns)
            m_target = self._to_root(up_target, common, t_ns)
        return rigid_inverse(m_target) @ m_source

    def lookup(self, target: str, source: str, t_ns: int, timeout: float) -> np.ndarray:
        """target <- source at t_ns, waiting up to ``timeout`` s for the transforms to arrive."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                return self.lookup_now(target, source, t_ns)
            except TransformUnavailable:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
            with self._cond:
                self._cond.wait(min(left, 0.05))


class OwnFrames:
    """/tf and /tf_static subscriptions (QoS as tf2_ros's listener) filling a TransformBuffer."""

    kind = "own /tf listener"

    def __init__(self, node, cache_time: float = 10.0):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from tf2_msgs.msg import TFMessage

        self.buffer = TransformBuffer(cache_time)
        dynamic = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
        static = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST,
                            reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._subs = [
            node.create_subscription(TFMessage, "/tf", lambda m: self.buffer.set_message(m, False),
                                     dynamic),
            node.create_subscription(TFMessage, "/tf_static",
                                     lambda m: self.buffer.set_message(m, True), static),
        ]
        self._node = node

    def lookup(self, target: str, source: str, t_ns: int, timeout: float) -> np.ndarray:
        return self.buffer.lookup(target, source, t_ns, timeout)

    def close(self) -> None:
        for sub in self._subs:
            self._node.destroy_subscription(sub)
        self._subs = []


class Tf2Frames:
    """tf2_ros.Buffer and TransformListener (system ROS 2)."""

    kind = "tf2_ros"

    def __init__(self, node, cache_time: float = 10.0):
        import tf2_ros
        from rclpy.duration import Duration

        self._tf2 = tf2_ros
        self._duration = Duration
        self.buffer = tf2_ros.Buffer(cache_time=Duration(seconds=cache_time), node=node)
        self.listener = tf2_ros.TransformListener(self.buffer, node, spin_thread=False)

    def lookup(self, target: str, source: str, t_ns: int, timeout: float) -> np.ndarray:
        from rclpy.time import Time

        if target.lstrip("/") == source.lstrip("/"):
            return np.eye(4)
        try:
            ts = self.buffer.lookup_transform(target, source, Time(nanoseconds=int(t_ns)),
                                              timeout=self._duration(seconds=float(timeout)))
        except self._tf2.ExtrapolationException as exc:
            raise TransformUnavailable(STALE, f"transform {target} <- {source} at "
                                              f"{_stamp_text(t_ns)}: {exc}") from None
        except (self._tf2.LookupException, self._tf2.ConnectivityException,
                self._tf2.TransformException) as exc:
            raise TransformUnavailable(MISSING, f"no transform from '{source}' to '{target}' at "
                                                f"{_stamp_text(t_ns)}: {exc}") from None
        return matrix_from_transform(ts.transform)

    def close(self) -> None:
        unregister = getattr(self.listener, "unregister", None)
        if unregister is not None:
            unregister()


def make_frames(node, cache_time: float = 10.0, prefer: Optional[str] = None,
                warn: Callable[[str], None] = lambda m: None):
    """tf2_ros where it imports (``prefer='own'`` forces our listener), else our own listener.
    :class:`FramesUnavailable` names what is missing when neither can work (``tf2_msgs`` comes with
    a system ROS 2 or ``make setup``, not from PyPI): better said once at start-up
    than as a failure of every scan."""
    check_transform_packages()
    if prefer != "own":
        try:
            return Tf2Frames(node, cache_time)
        except ImportError:
            pass
        except Exception as exc:  # noqa: BLE001 - a broken tf2_ros install: say so, fall back
            warn(f"tf2_ros is installed but unusable ({type(exc).__name__}: {exc}); using the "
                 "node's own /tf listener")
    return OwnFrames(node, cache_time)
