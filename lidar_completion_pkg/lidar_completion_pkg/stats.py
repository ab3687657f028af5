"""Counters, latency percentiles, the latest-only mailbox and throttled warnings of the node.

Plain Python (no rclpy), shared by the subscription callback and the worker thread: every method takes
the lock it needs.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

# DiagnosticStatus levels (diagnostic_msgs/msg/DiagnosticStatus)
OK, WARN, ERROR = 0, 1, 2


class Mailbox:
    """One slot holding the newest item: putting into a full slot replaces (drops) the older item."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Any = None
        self._full = False
        self._closed = False

    def put(self, item) -> bool:
        """Store ``item``; True when it displaced an item the worker had not taken yet."""
        with self._cond:
            displaced = self._full
            self._item, self._full = item, True
            self._cond.notify()
            return displaced

    def get(self, timeout: Optional[float] = None):
        """The newest item, or None after ``timeout`` seconds or when closed."""
        with self._cond:
            if not self._full and not self._closed:
                self._cond.wait(timeout)
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            return item

    def close(self) -> bool:
        """No more items; True when one was left that nobody will take (it is discarded)."""
        with self._cond:
            self._closed = True
            left, self._item, self._full = self._full, None, False
            self._cond.notify_all()
            return left


class Throttle:
    """At most one message per ``period`` seconds per key; reports how many were suppressed."""

    def __init__(self, period: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.period, self.clock = float(period), clock
        self._last: dict = {}
        self._suppressed: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, key: str) -> Optional[int]:
        """None when a message for ``key`` should be suppressed now, else the count suppressed since."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period:
                self._suppressed[key] += 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)


class Stats:
    """What /diagnostics reports: counts, latency p50/p95 (from receipt and from the header stamp to
    publication), input and output rates."""

    def __init__(self, window: int = 200, rate_window_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.rate_window_s = rate_window_s
        self._lock = threading.Lock()
        self.received = 0
        self.processed = 0      # completions published
        self.dropped = 0        # replaced in the mailbox by a newer cloud before the worker took them
        self.rejected = 0       # malformed / unusable input, never completed
        self.failed = 0         # completion or publication raised, or gave an unusable result
        self.subsampled = 0     # clouds above max_points, subsampled then completed
        self.no_transform = 0   # dropped: the transform to model_frame / target_frame was missing or stale
        self.cancelled = 0      # abandoned mid-completion by deactivate / shutdown, not published
        self.reasons: collections.Counter = collections.Counter()
        self.last_problem = ""
        self._latencies: collections.deque = collections.deque(maxlen=window)
        self._compute: collections.deque = collections.deque(maxlen=window)
        self._ages: collections.deque = collections.deque(maxlen=window)
        self._arrivals: collections.deque = collections.deque()
        self._outputs: collections.deque = collections.deque()
        self._problems_since_report = 0
        # a problem since the last published completion: /diagnostics stays WARN until one is
        # published, not only in the one report after each problem (on a CPU a problem recurring
        # every few seconds otherwise showed as OK in most reports)
        self._unpublished_problem = False
        self._last_arrival: Optional[float] = None

    def _trim(self, q: collections.deque, now: float) -> None:
        while q and now - q[0] > self.rate_window_s:
            q.popleft()

    def note_input(self) -> float:
        now = self.clock()
        with self._lock:
            self.received += 1
            self._last_arrival = now
            self._arrivals.append(now)
            self._trim(self._arrivals, now)
        return now

    def note_dropped(self, n: int = 1) -> None:
        with self._lock:
            self.dropped += n

    def note_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def note_subsampled(self) -> None:
        with self._lock:
            self.subsampled += 1

    def _note_problem(self, counter: str, reason: str, message: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)
            self.reasons[reason] += 1
            self.last_problem = message
            self._problems_since_report += 1
            self._unpublished_problem = True

    def note_rejected(self, reason: str, message: str) -> None:
        self._note_problem("rejected", reason, message)

    def note_no_transform(self, reason: str, message: str) -> None:
        self._note_problem("no_transform", reason, message)

    def note_failed(self, reason: str, message: str) -> None:
        self._note_problem("failed", reason, message)

    def note_published(self, t_received: float, compute_s: float,
                       stamp_age_s: Optional[float] = None) -> None:
        """One completion published: ``stamp_age_s`` = publication time minus the header stamp."""
        now = self.clock()
        with self._lock:
            self.processed += 1
            self._unpublished_problem = False
            self._latencies.append(now - t_received)
            if stamp_age_s is not None:
                self._ages.append(stamp_age_s)
            self._compute.append(compute_s)
            self._outputs.append(now)
            self._trim(self._outputs, now)

    @staticmethod
    def _rate(q: collections.deque, now: float, window: float) -> float:
        """Events per second over the last ``window`` seconds (decays to 0 when events stop)."""
        if len(q) < 2:
            return 0.0
        return (len(q) - 1) / max(now - q[0], 1e-9)

    def snapshot(self) -> dict:
        """Current figures (and resets the 'problems since the last report' counter)."""
        now = self.clock()
        with self._lock:
            self._trim(self._arrivals, now)
            self._trim(self._outputs, now)
            lat = np.asarray(self._latencies, dtype=float) * 1e3
            comp = np.asarray(self._compute, dtype=float) * 1e3
            ages = np.asarray(self._ages, dtype=float) * 1e3
            snap = {
                "received": self.received, "processed": self.processed, "dropped": self.dropped,
                "rejected": self.rejected, "failed": self.failed, "subsampled": self.subsampled,
                "no_transform": self.no_transform, "cancelled": self.cancelled,
                "latency_p50_ms": _percentile(lat, 50), "latency_p95_ms": _percentile(lat, 95),
                "stamp_latency_p50_ms": _percentile(ages, 50),
                "stamp_latency_p95_ms": _percentile(ages, 95),
                "completion_p50_ms": _percentile(comp, 50),
                "input_rate_hz": self._rate(self._arrivals, now, self.rate_window_s),
                "output_rate_hz": self._rate(self._outputs, now, self.rate_window_s),
                "reasons": dict(self.reasons), "last_problem": self.last_problem,
                "problems_since_report": self._problems_since_report,
                "problem_since_published": self._unpublished_problem,
                "last_input_age_s": (now - self._last_arrival if self._last_arrival is not None
                                     else float("nan")),
            }
            self._problems_since_report = 0
        return snap


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


#: Node states in /diagnostics (``state``); only ACTIVE is ``ready``.
WARMING_UP, UNCONFIGURED, INACTIVE, ACTIVE = "warming up", "unconfigured", "inactive", "active"
FINALIZED = "finalized"
_STATE_MESSAGES = {
    FINALIZED: "finalized (lifecycle): shut down, the process exits",
    WARMING_UP: "warming up (loading the checkpoint, completing a synthetic scan); not subscribed yet",
    UNCONFIGURED: "unconfigured (lifecycle): configure to load the checkpoint",
    INACTIVE: "inactive (lifecycle): configured and warmed up; activate to subscribe",
}


def diagnostic_summary(snap: dict, worker_alive: Optional[bool] = True,
                       state: str = ACTIVE, idle_after_s: float = 5.0) -> tuple[int, str, list]:
    """(level, message, [(key, value str)]) of one DiagnosticStatus from a :meth:`Stats.snapshot`.

    ``state``: ACTIVE (subscribed, ``ready`` true) or WARMING_UP / UNCONFIGURED / INACTIVE;
    ``worker_alive`` None when no worker is expected to run (not active). A scan dropped since
    the last published completion keeps the level at WARN while clouds come; no cloud for
    ``idle_after_s`` seconds says so in the message, at level OK (the sensor stopped, a bag ended).
    """
    if worker_alive is False:
        level, message = ERROR, "completion worker stopped"
    elif snap["problems_since_report"]:
        level, message = WARN, f"{snap['problems_since_report']} scan(s) dropped as unusable, " \
                               f"untransformable or failed: {snap['last_problem']}"[:300]
    elif (snap.get("problem_since_published") and state == ACTIVE
          and not snap.get("last_input_age_s", 0.0) > idle_after_s):
        level, message = WARN, f"no completion published since the last scan dropped: " \
                               f"{snap['last_problem']}"[:300]
    elif state != ACTIVE:
        level, message = OK, _STATE_MESSAGES.get(state, state)
    elif snap["received"] == 0:
        level, message = OK, "ready, waiting for clouds"
    elif snap.get("last_input_age_s", 0.0) > idle_after_s:
        level, message = OK, f"ready, no cloud for {snap['last_input_age_s']:.0f} s"
    else:
        level, message = OK, "ready, completing"

    def fmt(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    keys = ("latency_p50_ms", "latency_p95_ms", "stamp_latency_p50_ms", "stamp_latency_p95_ms",
            "completion_p50_ms", "input_rate_hz", "output_rate_hz", "last_input_age_s",
            "received", "processed",
            "dropped", "rejected", "no_transform", "failed", "cancelled", "subsampled")
    values = [("ready", "true" if state == ACTIVE else "false"), ("state", state)]
    values += [(k, fmt(snap[k])) for k in keys]
    values += [(f"count.{reason}", str(n)) for reason, n in sorted(snap["reasons"].items())]
    values.append(("last_problem", snap["last_problem"]))
    return level, message, values
