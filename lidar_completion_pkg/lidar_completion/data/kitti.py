"""SemanticKITTI layout: reading and writing scans, labels, poses, calibration and times.

Layout (docs/method.md, "Data and ground truth")::

    ROOT/sequences/SS/velodyne/NNNNNN.bin    float32 (x, y, z, intensity) per point
    ROOT/sequences/SS/labels/NNNNNN.label    uint32 per point; semantic id = value & 0xFFFF,
                                             instance id = value >> 16
    ROOT/sequences/SS/poses.txt              one 3x4 pose per line (row-major), camera-0 frame
    ROOT/sequences/SS/calib.txt              "KEY: v1 v2 ..." lines; "Tr:" is velodyne -> camera-0
    ROOT/sequences/SS/times.txt              one timestamp (seconds) per line

Poses in the LiDAR frame are ``P_velo = inv(Tr) @ P_cam @ Tr``.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import DatasetError
from ..fileutil import atomic_write

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

SEMANTIC_MASK = 0xFFFF
SCAN_DTYPE = np.float32
LABEL_DTYPE = np.uint32
_FRAME_RE = re.compile(r"^(\d{6})\.bin$")

__all__ = [
    "SEMANTIC_MASK", "semantic_of", "instance_of", "read_scan", "read_labels", "read_calib",
    "calib_tr", "read_poses", "read_times", "cam_to_velo_poses", "velo_to_cam_poses",
    "write_scan", "write_labels", "write_poses", "write_calib", "write_times",
    "sequence_id", "dataset_root", "list_sequences", "SemanticKittiSequence",
]


# ----------------------------------------------------------------------------------------------
# single files
# ----------------------------------------------------------------------------------------------
def semantic_of(labels: np.ndarray) -> np.ndarray:
    """Semantic class ids (lower 16 bits) of raw SemanticKITTI label values."""
    return (np.asarray(labels).astype(np.uint32) & SEMANTIC_MASK).astype(np.uint32)


def instance_of(labels: np.ndarray) -> np.ndarray:
    """Instance ids (upper 16 bits) of raw SemanticKITTI label values."""
    return (np.asarray(labels).astype(np.uint32) >> 16).astype(np.uint32)


def read_scan(path: PathLike) -> np.ndarray:
    """Read a velodyne ``.bin`` file into an (N, 4) float32 array (x, y, z, intensity)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"scan file {path} does not exist")
    size = path.stat().st_size
    if size % 16:
        raise DatasetError(
            f"scan file {path} has {size} bytes; expected a multiple of 16 "
            "(4 float32 values x, y, z, intensity per point)")
    return np.fromfile(path, dtype=SCAN_DTYPE).reshape(-1, 4)


def read_labels(path: PathLike, expected_points: Optional[int] = None) -> np.ndarray:
    """Read a ``.label`` file into an (N,) uint32 array of raw label values.

    With ``expected_points`` the length is checked against the scan it belongs to.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"label file {path} does not exist")
    size = path.stat().st_size
    if size % 4:
        raise DatasetError(f"label file {path} has {size} bytes; expected a multiple of 4 (uint32)")
    labels = np.fromfile(path, dtype=LABEL_DTYPE)
    if expected_points is not None and labels.shape[0] != expected_points:
        raise DatasetError(
            f"label file {path} has {labels.shape[0]} labels but its scan has {expected_points} "
            "points; expected one label per point")
    return labels


def read_calib(path: PathLike) -> Dict[str, np.ndarray]:
    """Parse ``calib.txt`` into {key: float64 array of its values} (``P0``..``P3``, ``Tr``...)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"calibration file {path} does not exist")
    out: Dict[str, np.ndarray] = {}
    with open(path, "r", encoding="ascii", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if ":" not in line:
                raise DatasetError(f"{path}:{lineno}: expected 'KEY: v1 v2 ...', found {line[:60]!r}")
            key, values = line.split(":", 1)
            try:
                out[key.strip()] = np.array([float(v) for v in values.split()], dtype=np.float64)
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: non-numeric value in {line[:60]!r}") from None
    return out


def calib_tr(calib: Dict[str, np.ndarray], source: str = "calib.txt") -> np.ndarray:
    """The 4x4 velodyne -> camera-0 transform from parsed calibration (key ``Tr``)."""
    if "Tr" not in calib:
        raise DatasetError(f"{source} has no 'Tr:' line (velodyne -> camera transform); "
                           f"found keys {sorted(calib)}")
    values = calib["Tr"]
    if values.size != 12:
        raise DatasetError(f"{source}: 'Tr:' has {values.size} values; expected 12 (a 3x4 matrix)")
    tr = np.eye(4)
    tr[:3, :4] = values.reshape(3, 4)
    if abs(np.linalg.det(tr[:3, :3])) < 1e-6:
        raise DatasetError(f"{source}: 'Tr:' rotation is singular")
    return tr


def read_poses(path: PathLike) -> np.ndarray:
    """Read ``poses.txt`` (12 values per line) into (F, 4, 4) float64 camera-frame poses."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"pose file {path} does not exist")
    rows: List[List[float]] = []
    with open(path, "r", encoding="ascii", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 12:
                raise DatasetError(f"{path}:{lineno}: expected 12 values (a 3x4 pose), "
                                   f"found {len(parts)}")
            try:
                rows.append([float(v) for v in parts])
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: non-numeric value in pose line") from None
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    if rows:
        poses[:, :3, :4] = np.asarray(rows, dtype=np.float64).reshape(-1, 3, 4)
    return poses


def read_times(path: PathLike) -> np.ndarray:
    """Read ``times.txt`` into an (F,) float64 array of seconds."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"times file {path} does not exist")
    values: List[float] = []
    with open(path, "r", encoding="ascii", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                values.append(float(line))
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: expected one number, found {line[:40]!r}") \
                    from None
    return np.asarray(values, dtype=np.float64)


def cam_to_velo_poses(poses_cam: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """Camera-0 poses -> LiDAR poses: ``inv(Tr) @ P_cam @ Tr`` for each pose."""
    return np.linalg.inv(tr) @ np.asarray(poses_cam, dtype=np.float64) @ tr


def velo_to_cam_poses(poses_velo: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """LiDAR poses -> camera-0 poses (inverse of :func:`cam_to_velo_poses`)."""
    return tr @ np.asarray(poses_velo, dtype=np.float64) @ np.linalg.inv(tr)


def _write(path: PathLike, data: bytes) -> None:
    atomic_write(path, data, durable=False)   # a dataset is written once; no fsync per scan


def write_scan(path: PathLike, points: np.ndarray) -> None:
    """Write (N, 4) points as a velodyne ``.bin`` (float32)."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 4:
        raise DatasetError(f"write_scan expects an (N, 4) array, found shape {points.shape}")
    _write(path, np.ascontiguousarray(points, dtype=SCAN_DTYPE).tobytes())


def write_labels(path: PathLike, labels: np.ndarray) -> None:
    """Write (N,) raw label values as a ``.label`` file (uint32)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DatasetError(f"write_labels expects an (N,) array, found shape {labels.shape}")
    _write(path, np.ascontiguousarray(labels, dtype=LABEL_DTYPE).tobytes())


def write_poses(path: PathLike, poses: np.ndarray) -> None:
    """Write (F, 4, 4) (or (F, 3, 4)) poses as ``poses.txt`` in KITTI's "%e" format."""
    poses = np.asarray(poses, dtype=np.float64)
    lines = [" ".join(f"{v:.12e}" for v in p[:3, :4].reshape(-1)) for p in poses]
    _write(path, ("\n".join(lines) + "\n").encode("ascii"))


def write_calib(path: PathLike, calib: Dict[str, np.ndarray]) -> None:
    """Write a ``calib.txt``; ``calib`` maps keys (P0..P3, Tr) to arrays (3x4 or flat)."""
    lines = []
    for key, value in calib.items():
        flat = np.asarray(value, dtype=np.float64)
        if flat.shape == (4, 4):
            flat = flat[:3]
        lines.append(f"{key}: " + " ".join(f"{v:.12e}" for v in flat.reshape(-1)))
    _write(path, ("\n".join(lines) + "\n").encode("ascii"))


def write_times(path: PathLike, times: Sequence[float]) -> None:
    """Write ``times.txt`` (one "%e" number per line)."""
    lines = [f"{float(t):.6e}" for t in times]
    _write(path, ("\n".join(lines) + "\n").encode("ascii"))


# ----------------------------------------------------------------------------------------------
# dataset / sequence
# ----------------------------------------------------------------------------------------------
def sequence_id(seq: Union[str, int]) -> str:
    """Normalise a sequence id: 8, "8", "08" -> "08"."""
    text = str(seq).strip()
    if not text.isdigit():
        raise DatasetError(f"sequence id must be a number such as 08, found {seq!r}")
    return f"{int(text):02d}"


def dataset_root(root: PathLike) -> Path:
    """The folder that contains ``sequences/``; accepts that folder or ``.../sequences`` itself."""
    root = Path(root)
    if (root / "sequences").is_dir():
        return root
    if root.name == "sequences" and root.is_dir():
        return root.parent
    if (root / "dataset" / "sequences").is_dir():
        return root / "dataset"
    raise DatasetError(f"{root} is not a SemanticKITTI dataset root: expected a folder with "
                       "'sequences/SS/velodyne/*.bin' inside")


def list_sequences(root: PathLike) -> List[str]:
    """Sequence ids present under a dataset root (folders with a ``velodyne`` directory, named with
    two digits as SemanticKITTI names them). A folder named otherwise (``8`` for ``08``) is left out
    with a warning that says how to name it: no other command could open it under its id."""
    seq_dir = dataset_root(root) / "sequences"
    found = []
    for p in seq_dir.iterdir():
        if not (p.is_dir() and p.name.isdigit() and (p / "velodyne").is_dir()):
            continue
        if p.name != sequence_id(p.name):
            log.warning("%s left out: sequence folders are named with two digits, rename it to %s",
                        p, sequence_id(p.name))
            continue
        found.append(p.name)
    return sorted(found)


def _misnamed_folder(seq_dir: Path, sequence: str) -> Optional[Path]:
    """A folder of ``seq_dir`` that names ``sequence`` with other digits (``8`` or ``008`` for
    ``08``), or None."""
    if not seq_dir.is_dir():
        return None
    return next((p for p in sorted(seq_dir.iterdir()) if p.is_dir() and p.name.isdigit()
                 and p.name != sequence and int(p.name) == int(sequence)), None)


class SemanticKittiSequence:
    """One sequence of a SemanticKITTI-layout dataset.

    Opening checks the layout up front: frames must be ``000000.bin`` .. contiguous, ``poses.txt``
    (and ``times.txt`` when there is one: only a bag of the sequence needs it) must have one entry per scan, ``calib.txt`` must hold ``Tr``, and (when a
    ``labels`` folder exists) every scan needs a label file with one label per point. Errors are
    :class:`DatasetError` with the file and what was expected.

    Attributes: ``root`` (dataset root), ``sequence`` ("08"), ``path`` (the sequence folder),
    ``tr`` (4x4 velo -> cam), ``calib`` (all calibration keys), ``poses_cam`` / ``poses``
    ((F, 4, 4), camera frame / LiDAR frame), ``times`` ((F,) seconds, or None without a
    ``times.txt``), ``has_labels``.
    """

    def __init__(self, root: PathLike, sequence: Union[str, int], require_labels: bool = False,
                 validate: bool = True):
        self.root = dataset_root(root)
        self.sequence = sequence_id(sequence)
        self.path = self.root / "sequences" / self.sequence
        if not self.path.is_dir():
            other = _misnamed_folder(self.root / "sequences", self.sequence)
            if other is not None:
                raise DatasetError(f"sequence {self.sequence}: found the folder {other}, but sequence "
                                   f"folders are named with two digits; rename it to {self.path}")
            available = ", ".join(list_sequences(self.root)) or "none"
            raise DatasetError(f"sequence {self.sequence} not found under {self.root / 'sequences'} "
                               f"(available: {available})")
        velodyne = self.path / "velodyne"
        if not velodyne.is_dir():
            raise DatasetError(f"{velodyne} does not exist; expected the scans of sequence "
                               f"{self.sequence} there")
        names = sorted(os.listdir(velodyne))
        frames = []
        for name in names:
            m = _FRAME_RE.match(name)
            if m:
                frames.append(int(m.group(1)))
        if not frames:
            raise DatasetError(f"{velodyne} holds no NNNNNN.bin scans")
        if frames != list(range(len(frames))):
            missing = sorted(set(range(frames[-1] + 1)) - set(frames))
            raise DatasetError(f"{velodyne}: scans must be numbered 000000.. without gaps; "
                               f"missing {', '.join(f'{m:06d}' for m in missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''}")
        self._n = len(frames)

        self.calib = read_calib(self.path / "calib.txt")
        self.tr = calib_tr(self.calib, str(self.path / "calib.txt"))
        self.poses_cam = read_poses(self.path / "poses.txt")
        if len(self.poses_cam) != self._n:
            raise DatasetError(f"{self.path / 'poses.txt'} has {len(self.poses_cam)} poses but "
                               f"{velodyne} has {self._n} scans; expected one pose per scan")
        self.poses = cam_to_velo_poses(self.poses_cam, self.tr)
        times_path = self.path / "times.txt"
        # only a bag made from the sequence needs the stamps (bag-from-kitti says so): the ground
        # truth, evaluation and training open a sequence without them
        self.times = read_times(times_path) if times_path.is_file() else None
        if self.times is not None and len(self.times) != self._n:
            raise DatasetError(f"{times_path} has {len(self.times)} timestamps but {velodyne} has "
                               f"{self._n} scans; expected one per scan")

        labels_dir = self.path / "labels"
        self.has_labels = labels_dir.is_dir()
        if require_labels and not self.has_labels:
            raise DatasetError(f"{labels_dir} does not exist; sequence {self.sequence} has no "
                               "semantic labels (needed here)")
        if validate:
            self._validate_sizes()

    def _validate_sizes(self) -> None:
        for i in range(self._n):
            scan = self.scan_path(i)
            size = scan.stat().st_size
            if size % 16:
                raise DatasetError(f"scan file {scan} has {size} bytes; expected a multiple of 16")
            if self.has_labels:
                lab = self.label_path(i)
                if not lab.is_file():
                    raise DatasetError(f"label file {lab} is missing for scan {scan.name}")
                lsize = lab.stat().st_size
                if lsize % 4:
                    raise DatasetError(f"label file {lab} has {lsize} bytes; expected a multiple of 4 "
                                       "(one uint32 per point): truncated or not a label file?")
                if lsize * 4 != size:
                    raise DatasetError(
                        f"label file {lab} has {lsize // 4} labels but scan {scan.name} has "
                        f"{size // 16} points; expected one label per point")

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"SemanticKittiSequence({str(self.root)!r}, {self.sequence!r}, frames={self._n})"

    def _check(self, i: int) -> int:
        if not -self._n <= i < self._n:
            raise IndexError(f"frame {i} out of range for sequence {self.sequence} "
                             f"with {self._n} scans")
        return i % self._n

    def scan_path(self, i: int) -> Path:
        return self.path / "velodyne" / f"{self._check(i):06d}.bin"

    def label_path(self, i: int) -> Path:
        return self.path / "labels" / f"{self._check(i):06d}.label"

    def scan(self, i: int) -> np.ndarray:
        """(N, 4) float32 points of frame ``i`` in the LiDAR frame."""
        return read_scan(self.scan_path(i))

    def labels(self, i: int) -> np.ndarray:
        """(N,) uint32 raw labels of frame ``i`` (raises when the sequence has no labels)."""
        if not self.has_labels:
            raise DatasetError(f"sequence {self.sequence} has no labels folder ({self.path})")
        n = self.scan_path(i).stat().st_size // 16
        return read_labels(self.label_path(i), expected_points=n)

    def semantic(self, i: int) -> np.ndarray:
        """(N,) semantic class ids of frame ``i``."""
        return semantic_of(self.labels(i))

    def pose(self, i: int) -> np.ndarray:
        """4x4 LiDAR pose of frame ``i`` (frame -> world)."""
        return self.poses[self._check(i)]

    def scan_world(self, i: int) -> np.ndarray:
        """(N, 3) float64 points of frame ``i`` in the world (sequence) frame."""
        pts = self.scan(i)[:, :3].astype(np.float64)
        pose = self.pose(i)
        return pts @ pose[:3, :3].T + pose[:3, 3]
