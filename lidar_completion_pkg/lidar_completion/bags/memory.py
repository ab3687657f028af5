"""Resident-memory sampling of a process (psutil) in a background thread."""
from __future__ import annotations

import os
import threading
import time


class MemorySampler:
    """Sample the RSS of process ``pid`` (this process by default) every ``interval`` seconds.

    ``samples`` holds (time.monotonic_ns(), rss_bytes) pairs; ``peak`` the largest RSS seen. Use as a
    context manager or call start() / stop(). A process that exits ends the sampling quietly.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1, include_children: bool = False):
        import psutil

        self.pid = os.getpid() if pid is None else int(pid)
        self.interval = float(interval)
        self.include_children = include_children
        self._proc = psutil.Process(self.pid)
        self.samples: list[tuple[int, int]] = []
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int | None:
        """Take one sample now (also called by the thread); None when the process is gone."""
        import psutil

        try:
            rss = self._proc.memory_info().rss
            if self.include_children:
                for child in self._proc.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                    except psutil.Error:
                        pass
        except psutil.Error:
            return None
        if rss <= 0:  # an exited (zombie) process reports 0
            return None
        self.samples.append((time.monotonic_ns(), int(rss)))
        self.peak = max(self.peak, int(rss))
        return rss

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sample() is None:
                return
            self._stop.wait(self.interval)

    def start(self) -> "MemorySampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self.sample()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
