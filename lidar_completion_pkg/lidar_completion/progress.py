"""Progress bars of the long commands (tqdm on stderr).

Where the bar's stream is not a terminal (a log file, CI, `nohup`, a systemd journal) tqdm still
rewrites its line with a carriage return about ten times a second, and each rewrite becomes a line
of the log: a training run's log grew by megabytes per hour. There the bar is redrawn every
``LOG_INTERVAL_S`` seconds instead, which keeps its progress and rate readable in the log.
"""
from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # a closed or file-like stream without isatty
        return False


def progress_bar(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` on stderr (or ``file``), at most one update every
    ``LOG_INTERVAL_S`` seconds where that stream is not a terminal."""
    from tqdm import tqdm

    stream = kwargs.get("file") or sys.stderr
    if not _is_terminal(stream):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, kwargs["mininterval"]))
    return tqdm(iterable, **kwargs)
