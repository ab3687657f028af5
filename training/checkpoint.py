"""Training-state checkpoints: atomic, integrity-checked, rotated, optionally split into parts.

File layout: ``MAGIC`` line, the SHA-256 of the payload as 64 hex digits and a newline, then the
payload (a ``torch.save`` archive loadable with ``weights_only=True``). With a part size
(``checkpoint.part_mib``; a GPU run here may hand back only a few files of at most 16 MiB each) the
payload is cut into ``NAME.part000``, ``NAME.part001``, ... of at most that size each (the header
counts in the first), and ``NAME`` itself becomes a small index: ``PARTS_MAGIC``, then one line per
part with its SHA-256 and size, then the SHA-256 of the whole payload. Loading joins the parts and
checks every digest, so a resume from parts is bit-exact on any machine. Writes go through
``lidar_completion.fileutil.atomic_write`` (a temporary file in the same folder, fsync'ed, renamed
over the final name, the folder fsync'ed). ``latest.json`` (also written atomically, after the
checkpoint) names the newest complete checkpoint, so an interruption at any moment leaves the
previous good one in place.

A checkpoint whose header, digest or archive is wrong is refused with a :class:`CheckpointError`
that says what was expected and what was found.

These are *training* states (weights, optimisers, step, RNG, data position). The inference
checkpoints the completer loads are exported at the end of training with
``lidar_completion.checkpoints.save_checkpoint``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from lidar_completion.errors import CheckpointError
from lidar_completion.fileutil import atomic_write, atomic_write_json, stale_tmp

MAGIC = b"LIDAR-COMPLETION-TRAIN-STATE v1\n"
PARTS_MAGIC = b"LIDAR-COMPLETION-TRAIN-STATE-PARTS v1\n"
FORMAT = "lidar-completion-training-state"
LATEST = "latest.json"
_NAME = re.compile(r"^step_(\d{9})\.ckpt$")


def _to_safe(obj):
    """Make RNG states loadable with weights_only=True (numpy arrays -> tensors)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_safe(v) for v in obj)
    if isinstance(obj, list):
        return [_to_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def _from_safe(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj and "dtype" in obj:
            return obj["__ndarray__"].numpy().astype(obj["dtype"])
        return {k: _from_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_from_safe(v) for v in obj)
    if isinstance(obj, list):
        return [_from_safe(v) for v in obj]
    return obj


def _part_name(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.part{i:03d}")


def state_files(path: str | os.PathLike) -> list[Path]:
    """The files a checkpoint consists of: ``path`` and, for a split one, its parts."""
    path = Path(path)
    files = [path]
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(len(PARTS_MAGIC)) == PARTS_MAGIC:
                pattern = re.compile(re.escape(path.name) + r"\.part\d{3}")
                files += sorted(p for p in path.parent.glob(path.name + ".part*") if pattern.fullmatch(p.name))
    return files


def save_state(path: str | os.PathLike, state: dict, part_bytes: int | None = None) -> str:
    """Write a training state atomically; returns the payload's SHA-256. ``part_bytes``: split the
    file into parts of at most that many bytes (the parts first, the index last, so an interrupted
    write leaves no index that names missing parts)."""
    path = Path(path)
    state = dict(state)
    state.setdefault("format", FORMAT)
    buf = io.BytesIO()
    torch.save(_to_safe(state), buf)
    payload = buf.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    head = MAGIC + digest.encode("ascii") + b"\n"
    if not part_bytes or len(head) + len(payload) <= part_bytes:
        atomic_write(path, [head, payload])
        for stale in state_files(path)[1:]:
            stale.unlink()
        return digest
    if part_bytes < 2 * len(head):
        raise CheckpointError(f"checkpoint part size {part_bytes} bytes is too small")
    data = memoryview(bytes(head) + bytes(payload))
    lines = [PARTS_MAGIC]
    n_parts = -(-len(data) // part_bytes)
    for i in range(n_parts):
        chunk = data[i * part_bytes:(i + 1) * part_bytes]
        atomic_write(_part_name(path, i), chunk)
        lines.append(f"{hashlib.sha256(chunk).hexdigest()} {len(chunk)}\n".encode("ascii"))
    for stale in state_files(path)[1:]:
        if stale.name > _part_name(path, n_parts - 1).name:
            stale.unlink()
    lines.append(f"total {digest}\n".encode("ascii"))
    atomic_write(path, lines)
    return digest


def _join_parts(path: Path, index: bytes) -> bytes:
    rows = index[len(PARTS_MAGIC):].decode("ascii", errors="replace").splitlines()
    if not rows or not rows[-1].startswith("total "):
        raise CheckpointError(f"{path} is corrupt: the parts index is truncated (no 'total' line)")
    chunks = []
    for i, row in enumerate(rows[:-1]):
        try:
            want, size = row.split()
            size = int(size)
        except ValueError:
            raise CheckpointError(f"{path} is corrupt: parts index line {i + 2} reads {row!r}") from None
        part = _part_name(path, i)
        if not part.is_file():
            raise CheckpointError(f"{path} names {part.name}, which is missing: copy every .part file "
                                  "of the checkpoint next to it")
        chunk = part.read_bytes()
        if len(chunk) != size or hashlib.sha256(chunk).hexdigest() != want:
            raise CheckpointError(f"{part} is corrupt (truncated or modified): expected {size} bytes with "
                                  f"SHA-256 {want}, found {len(chunk)} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def load_state(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and verify a training state (one file or an index with its parts); raises
    CheckpointError when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint {path} does not exist")
    data = path.read_bytes()
    if data.startswith(PARTS_MAGIC):
        data = _join_parts(path, data)
    head = len(MAGIC)
    if data[:head] != MAGIC:
        raise CheckpointError(
            f"{path} is not a training checkpoint: expected it to start with {MAGIC!r}, found "
            f"{data[:head]!r} (inference checkpoints are loaded with lidar_completion.checkpoints)")
    hexd = data[head:head + 65]
    if len(hexd) != 65 or hexd[-1:] != b"\n" or not re.fullmatch(rb"[0-9a-f]{64}", hexd[:64]):
        raise CheckpointError(f"{path} is corrupt: the SHA-256 header line is damaged or truncated")
    payload = memoryview(data)[head + 65:]
    found = hashlib.sha256(payload).hexdigest()
    if found != hexd[:64].decode("ascii"):
        raise CheckpointError(
            f"{path} is corrupt (truncated or modified): payload SHA-256 expected {hexd[:64].decode()} "
            f"found {found} over {len(payload)} bytes; resume from an older checkpoint in "
            f"{path.parent} or start again")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # the digest matched, so this is a format problem
        raise CheckpointError(f"{path} has a valid digest but its archive cannot be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, found "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}")
    return _from_safe(state)


class CheckpointManager:
    """Numbered checkpoints ``step_000000100.ckpt`` in ``folder``, a ``latest.json`` pointer, and
    rotation keeping the newest ``keep`` files of the run that writes them."""

    def __init__(self, folder: str | os.PathLike, keep: int = 3, part_bytes: int | None = None):
        self.folder = Path(folder)
        self.keep = max(1, int(keep))
        self.part_bytes = part_bytes

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{int(step):09d}.ckpt"

    def step_files(self) -> list[Path]:
        """The numbered checkpoints in the folder, by step."""
        return sorted(p for p in self.folder.glob("step_*.ckpt") if _NAME.match(p.name))

    def save(self, state: dict) -> Path:
        step = int(state["step"])
        path = self.path_for(step)
        digest = save_state(path, state, self.part_bytes)
        pointer = {"file": path.name, "step": step, "sha256": digest}
        atomic_write_json(self.folder / LATEST, pointer, indent=1)
        self._rotate(step)
        return path

    def _rotate(self, step: int) -> None:
        """Delete the checkpoints of steps before ``step`` beyond the newest ``keep`` (``step``'s own
        included). Those of later steps - a run resumed from an older checkpoint of its folder -
        are left alone: they are not this run's past, and the one just written must survive."""
        files = [p for p in self.step_files() if int(_NAME.match(p.name).group(1)) <= step]
        for p in files[:-self.keep]:
            for f in state_files(p)[::-1]:    # parts, then the index
                try:
                    f.unlink()
                except OSError:
                    pass
        # what a killed run was writing (a checkpoint-sized file nothing reads): gone with it
        for tmp in self.folder.glob("*.tmp"):
            if stale_tmp(tmp):
                tmp.unlink(missing_ok=True)

    def latest_path(self) -> Path | None:
        """The checkpoint ``latest.json`` names; without that file, the numbered checkpoint of the
        highest step (e.g. step files copied back from another machine without their pointer)."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            files = self.step_files()
            return files[-1] if files else None
        try:
            info = json.loads(pointer.read_text(encoding="utf-8"))
            return self.folder / info["file"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{pointer} is corrupt: expected JSON with a 'file' entry ({exc})") from exc

    def holds_checkpoints(self) -> bool:
        """Whether the folder holds a checkpoint pointer or a numbered checkpoint."""
        return (self.folder / LATEST).is_file() or bool(self.step_files())

    def resolve(self, resume) -> Path | None:
        """``resume`` True -> the latest checkpoint of this folder (None if there is none);
        a path -> that file (or the latest of that folder)."""
        if resume is True:
            return self.latest_path()
        p = Path(resume)
        if p.is_dir():
            return CheckpointManager(p).latest_path() or CheckpointManager(p / "checkpoints").latest_path()
        return p
