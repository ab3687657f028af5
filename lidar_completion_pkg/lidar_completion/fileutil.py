"""File helpers shared by the ground-truth cache, the evaluation, the checkpoints and training.

* :func:`atomic_write` / :func:`atomic_write_json`: a file is written under a temporary name
  private to this process (:func:`tmp_name`) in the same folder, then renamed over its final name,
  so a reader sees the old file or the new one, never a part; a failure leaves no temporary file.
* :class:`JsonlWriter` / :func:`read_jsonl`: append-only JSON-lines journals (one record per line)
  that a killed writer cannot spoil: a torn last line is ended before the next append and skipped
  by the reader.
* :func:`stale_tmp`: whether a temporary file left in a folder belongs to a writer that is gone.
* :func:`hold_folder` / :func:`release_folder`: one writer per output folder (an evaluation, a
  training run), so that two processes started on one folder cannot mix their records.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Callable, Iterable, Union

log = logging.getLogger(__name__)

Data = Union[bytes, bytearray, memoryview, str, Iterable[bytes], Callable]


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ atomic writes
def tmp_name(path) -> Path:
    """The temporary name :func:`atomic_write` uses for ``path``: private to this process, since
    several processes (a teacher and a refiner started together) may rewrite one cache at once."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def stale_tmp(tmp) -> bool:
    """True for a temporary file whose writer process is gone (or of a naming without a writer id)."""
    parts = Path(tmp).name.split(".")
    try:
        pid = int(parts[-2])
    except (ValueError, IndexError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def fsync_dir(path) -> None:
    """fsync a folder (its entries: a rename in it), where the platform allows it."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ folder locks
#: The lock file of an output folder held by :func:`hold_folder` (it names the writer: host:pid).
LOCK_NAME = ".lock"


def hold_folder(folder, what: str):
    """An exclusive lock (fcntl.flock on ``folder/.lock``, which names the holder's host and pid) for
    one writer of ``folder``: a :class:`FolderHold` to pass to :func:`release_folder`; the lock also
    ends with the process, however it ends.
    ConfigError naming the holder when another process has it: two evaluations, or two training
    runs, started on one folder checked it before either had written, then both wrote, mixing two
    runs' records (or one run's files deleted under the other by --restart). Where the file system
    cannot lock (or without fcntl), None: the folder is used unguarded, as before."""
    from .errors import ConfigError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
        fh = open(folder / LOCK_NAME, "a+", encoding="utf-8")
    except (ImportError, OSError) as exc:
        log.debug("no lock on %s (%s)", folder, exc)
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        raise ConfigError(f"{folder} is being written by another {what} (host:process "
                          f"{holder or 'unknown'}): let it finish, or write this one elsewhere") from None
    except OSError as exc:          # a file system without flock
        fh.close()
        log.warning("cannot lock %s (%s): another process writing into it would not be noticed",
                    folder, exc)
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{socket.gethostname()}:{os.getpid()}\n")
    fh.flush()
    return FolderHold(fh)


class FolderHold:
    """The lock :func:`hold_folder` took. A copy (``copy.deepcopy`` of a trainer that keeps it, a
    pickle) holds nothing: only the original releases the folder."""

    def __init__(self, fh):
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __deepcopy__(self, memo):
        return FolderHold(None)

    def __reduce__(self):
        return (FolderHold, (None,))


def release_folder(hold) -> None:
    """Ends the hold of :func:`hold_folder` (None: nothing held)."""
    if hold is not None:
        hold.release()


def atomic_write(path, data: Data, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path``.

    ``data``: bytes, a str (UTF-8), an iterable of bytes chunks, or a callable that writes into the
    binary file object it is given (``lambda f: torch.save(obj, f)``). The parent folder is created.
    ``durable``: fsync the file before the rename and the folder after it (off for bulk caches whose
    journal records the file only after the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            elif isinstance(data, str):
                fh.write(data.encode("utf-8"))
            elif isinstance(data, (bytes, bytearray, memoryview)):
                fh.write(data)
            else:
                for chunk in data:
                    fh.write(chunk)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_json(path, obj, **dump_kwargs) -> Path:
    """:func:`atomic_write` of ``json.dumps(obj, **dump_kwargs)`` and a newline."""
    return atomic_write(path, json.dumps(obj, **dump_kwargs) + "\n")


# ---------------------------------------------------------------------------------- JSON-lines
def read_jsonl(path) -> list:
    """The dict records of a JSON-lines file (none when it does not exist). A line torn by a killed
    writer is skipped with a warning instead of failing the reader."""
    path = Path(path)
    records = []
    if not path.is_file():
        return records
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: ignoring a torn line (interrupted write)", path)
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


class JsonlWriter:
    """An append-only JSON-lines journal, one record per :meth:`write`.

    Opening it ends a last line torn by a killed writer with a newline, so that the next record
    starts a line of its own (``truncate=True`` starts the file afresh instead). Each record is
    flushed; ``durable=True`` also fsyncs it, else :meth:`sync` does on demand. A context manager.
    """

    def __init__(self, path, truncate: bool = False, durable: bool = False, sort_keys: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.durable = durable
        self.sort_keys = sort_keys
        if not truncate:
            _end_torn_line(self.path)
        self._fh = open(self.path, "w" if truncate else "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=self.sort_keys) + "\n")
        self._fh.flush()
        if self.durable:
            os.fsync(self._fh.fileno())

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _end_torn_line(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":
            fh.write(b"\n")
