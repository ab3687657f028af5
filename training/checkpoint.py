"""Training-state checkpoints: atomic, integrity-checked, rotated.

File layout: ``MAGIC`` line, the SHA-256 of the payload as 64 hex digits and a newline, then the
payload (a ``torch.save`` archive loadable with ``weights_only=True``). Writes go through
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
from lidar_completion.fileutil import atomic_write, atomic_write_json

MAGIC = b"LIDAR-COMPLETION-TRAIN-STATE v1\n"
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


def save_state(path: str | os.PathLike, state: dict) -> str:
    """Write a training state atomically; returns the payload's SHA-256."""
    state = dict(state)
    state.setdefault("format", FORMAT)
    buf = io.BytesIO()
    torch.save(_to_safe(state), buf)
    payload = buf.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    atomic_write(path, [MAGIC, digest.encode("ascii") + b"\n", payload])
    return digest


def load_state(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and verify a training state; raises CheckpointError when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint {path} does not exist")
    data = path.read_bytes()
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
    rotation keeping the newest ``keep`` files."""

    def __init__(self, folder: str | os.PathLike, keep: int = 3):
        self.folder = Path(folder)
        self.keep = max(1, int(keep))

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{int(step):09d}.ckpt"

    def save(self, state: dict) -> Path:
        step = int(state["step"])
        path = self.path_for(step)
        digest = save_state(path, state)
        pointer = {"file": path.name, "step": step, "sha256": digest}
        atomic_write_json(self.folder / LATEST, pointer, indent=1)
        self._rotate()
        return path

    def _rotate(self) -> None:
        files = sorted(p for p in self.folder.glob("step_*.ckpt") if _NAME.match(p.name))
        for p in files[:-self.keep]:
            try:
                p.unlink()
            except OSError:
                pass

    def latest_path(self) -> Path | None:
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        try:
            info = json.loads(pointer.read_text(encoding="utf-8"))
            return self.folder / info["file"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{pointer} is corrupt: expected JSON with a 'file' entry ({exc})") from exc

    def resolve(self, resume) -> Path | None:
        """``resume`` True -> the latest checkpoint of this folder (None if there is none);
        a path -> that file (or the latest of that folder)."""
        if resume is True:
            return self.latest_path()
        p = Path(resume)
        if p.is_dir():
            return CheckpointManager(p).latest_path() or CheckpointManager(p / "checkpoints").latest_path()
        return p
