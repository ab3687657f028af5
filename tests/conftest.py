import contextlib
import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # test helper modules (lidiff_reference, ...)

# Without CUDA, Triton kernels run in its interpreter, which must be chosen before Triton is first
# imported (tests/test_triton.py runs the Triton backend on CPU tensors that way).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests stop the processes they start (ros2 launch, nodes, players) with SIGINT, as a terminal's
# Ctrl-C does. A suite started as a shell's background job inherits SIGINT ignored and would pass it
# on to every process it starts; a handled signal is reset to the default at exec, so with Python's
# handler here they all start as from a terminal, however the suite was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Two cores are shared by the whole suite; more intra-op threads only add contention.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


# ---- `make test` in two processes (pytest-xdist, --dist loadfile) --------------------------------
# Each test file runs in one worker (its module fixtures are made once), and the files that start
# ROS 2 nodes, players or rclpy contexts all run in the same worker, one after another as in a single
# process: they pick random DDS domains, which two workers could draw alike. (xdist's loadgroup does
# not work with pytest 9: it renames an attribute pytest no longer reads.)
_ROS_SIGNS = ("ros_support", "pytest.mark.ros")
_ros_file_cache: dict = {}


def xdist_scope(rootpath, nodeid: str) -> str:
    """The unit of work of a test for the scheduler: "ros" for a ROS 2 file, else its file."""
    path = nodeid.split("::", 1)[0]
    if path not in _ros_file_cache:
        try:
            text = (rootpath / path).read_text(errors="replace")
        except OSError:
            text = ""
        _ros_file_cache[path] = any(sign in text for sign in _ROS_SIGNS)
    return "ros" if _ros_file_cache[path] else path


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndRos(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(config.rootpath, nodeid)

    return FilesAndRos(config, log)


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to ``n`` (at most the machine's cores) for a while, then restored."""
    before = torch.get_num_threads()
    # the cores are shared by the pytest-xdist workers (`make test` runs 2): each gets its share, as
    # more threads than cores slowed the heaviest fixture 3x (70 s alone, 218 s beside a busy worker)
    share = (os.cpu_count() or 1) // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    torch.set_num_threads(max(1, min(n, share)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def torch_threads():
    """``with torch_threads(n):`` - e.g. 1 to compute exactly as a node started with OMP_NUM_THREADS=1,
    or 2 for heavy work that runs alone in the pytest process (make test pins one thread per process)."""
    return _torch_threads


def available_backends():
    from lidar_completion import sparse
    names = ["torch"]
    if sparse.minkowski_available():
        names.append("minkowski")
    return names


@pytest.fixture(params=available_backends())
def backend(request):
    """Every sparse backend available here (torch always; MinkowskiEngine when built and not hidden)."""
    return request.param
