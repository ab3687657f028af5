"""`lidar-completion`: one entry point, thin sub-commands over the core modules."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .commands import COMMAND_MODULES
from .errors import LidarCompletionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lidar-completion",
        description="Few-step diffusion LiDAR scene completion (LiDiff networks distilled with "
                    "Distillation-DPO): complete scans, build ground truth, evaluate, benchmark bags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'lidar-completion <command> --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(f"commands.{name}"):
                continue  # command not part of this installation
            raise
        module.register(sub)
    return parser


def add_threads_argument(parser, where: str = "this process") -> None:
    """``--threads N``: torch's intra-op threads (see :func:`apply_threads`)."""
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"CPU threads of the networks ({where}); on a machine shared with other work, "
                             "fewer threads than cores keep the time per scan steady [torch's choice: "
                             "one per core]")


def apply_threads(threads) -> None:
    """Set the threads ``--threads`` asked for (None: leave torch's choice); ConfigError below 1."""
    if threads is None:
        return
    if threads < 1:
        from .errors import ConfigError
        raise ConfigError(f"--threads must be >= 1, found {threads}")
    import os
    # OpenMP runtimes other than torch's (MinkowskiEngine's) read the variable when they load
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)


def describe_os_error(exc: OSError, path=None) -> str:
    """``<reason>: <path>`` (both paths for a rename) for an OSError, else its text.

    ``path``: the file being written, named instead of the private temporary name an atomic write
    (:func:`lidar_completion.fileutil.atomic_write`) failed on, or of no name at all (a full disk
    fails ``write()``, which names no file): the user knows the path they gave, not ours."""
    if path is not None and exc.strerror:
        names = [n for n in (exc.filename, exc.filename2) if n is not None]
        if all(str(n) == str(path) or _is_tmp_of(n, path) for n in names):
            return f"{exc.strerror}: {path}"
    if exc.strerror and exc.filename is not None:
        paths = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"{exc.strerror}: {paths}"
    return str(exc) or type(exc).__name__


def unwritable_folder(folder):
    """Why files cannot be written into ``folder`` (an existing one, or one to be created with the
    folders above it that are missing), or None. Tried with a probe file (or folder) that is removed
    at once, not read from the permission bits: root passes ``os.access`` where creating a file
    still fails (/proc, /sys, a read-only mount), and a command should fail before its work, not
    after it when it writes its results."""
    import os
    import tempfile
    from pathlib import Path

    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))  # "." / "/" exist
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        if existing == folder:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
            os.close(fd)
            os.unlink(probe)
        else:                           # folders to create: the first of them must be creatable
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-probe-"))
    except OSError as exc:
        return f"cannot create files in {existing} ({exc.strerror or exc})"
    return None


def pacing_problem(args, timeouts) -> str | None:
    """Why a replay's ``--rate`` (finite, > 0) or one of its ``timeouts`` (attribute names of
    seconds: finite, >= 0) cannot be taken, or None. Shared by bag-bench --live and the replay it
    runs: nan passed "rate <= 0" and played forever or nothing."""
    import math

    if not (args.rate > 0 and math.isfinite(args.rate)):
        return f"--rate must be a finite number > 0, found {args.rate}"
    for name in timeouts:
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):
            return f"--{name.replace('_', '-')} must be a finite number of seconds >= 0, found {value}"
    return None


def _is_tmp_of(name, path) -> bool:
    """Whether ``name`` is a temporary name of ``path`` (``<path>.<pid>.tmp``)."""
    from pathlib import Path
    name, path = Path(name), Path(path)
    return (name.parent == path.parent and name.name.startswith(path.name + ".")
            and name.suffix == ".tmp")


def _silence_stdout() -> None:
    """Point stdout's file descriptor at devnull (its reader is gone)."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):   # no file descriptor (a replaced sys.stdout): nothing to flush
        pass


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = int(args.func(args) or 0)
        if sys.stdout is not None:   # (None when started with stdout closed: `... >&-`)
            sys.stdout.flush()   # a closed pipe fails here, not in the interpreter's exit (status 120)
        return rc
    except LidarCompletionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # stdout's reader went away (`lidar-completion evaluate ... | head -1`): no one reads the
        # rest, so stop quietly as a process killed by SIGPIPE would, with the shell's status for it
        # (128 + SIGPIPE). The output still buffered goes to devnull, or the exit's flush fails too
        _silence_stdout()
        return 141
    except OSError as exc:
        # what the file system refuses (a folder where a file goes, no permission, a full disk):
        # one line naming the path, as for the command's own errors
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
