"""Progress bars in logs: where stderr is not a terminal (a log file, CI, a journal) tqdm rewrote its
line ten times a second, each rewrite a line of the log; there it is redrawn every 30 s instead."""
import io
import time

from lidar_completion.progress import LOG_INTERVAL_S, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _writes(stream, seconds=0.6, step=0.02):
    bar = progress_bar(total=1000, file=stream, desc="x")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        bar.update(1)
        time.sleep(step)
    bar.close()
    return stream.getvalue().count("\r")


def test_a_bar_into_a_log_is_redrawn_rarely_and_into_a_terminal_as_usual():
    for stream, kwargs, expected in ((io.StringIO(), {}, LOG_INTERVAL_S),
                                     (io.StringIO(), {"mininterval": 60}, 60),   # a caller's choice
                                     (Terminal(), {}, 0.1)):
        bar = progress_bar(total=1, file=stream, **kwargs)
        assert bar.mininterval == expected
        bar.close()
    n_log, n_tty = _writes(io.StringIO()), _writes(Terminal())
    assert n_log <= 3 < n_tty, (n_log, n_tty)     # start and close only, against one per 0.1 s
