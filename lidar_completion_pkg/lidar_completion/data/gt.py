"""Ground truth: the dense static map of a sequence and every frame's cropped target, cached on disk.

Map (METHOD.md section 1): every scan of the sequence in the world frame, keeping points with
``1 < semantic < 252`` (no unlabeled, outliers or moving classes) and range > 3.5 m, voxel-subsampled
at 0.1 m keeping the first original point that falls in each voxel. It is accumulated incrementally
through a vectorised open-addressing hash set of packed voxel keys, so building it costs time linear in
the number of scans (the originals re-quantise the whole map after every scan).

Per-frame target: map points within 50 m of the scan pose, moved into the scan frame, z > -4 m, kept
only inside the 10 m voxels that the input scan (3.5 m < range < 50 m, z > -4 m) occupies. The map is
bucketed into 10 m x 10 m columns once, so a crop touches only the columns near the pose.

Cache layout (``OUT/SS/``)::

    map.bin                 float32 (M, 3) world-frame map
    targets/NNNNNN.bin      float32 (K, 3) target of frame NNNNNN in its scan frame
    manifest.jsonl          one JSON record per line, appended as files are written:
                            header (format, config, source fingerprint), map, frame entries
                            (file, points, bytes, sha256)
    manifest.json           the consolidated manifest, written atomically when the build completes

Every file is written to ``*.tmp`` and renamed, and only then recorded in ``manifest.jsonl``; a
rebuild re-verifies sizes and sha256 checksums, so a killed build resumes where it stopped and a
corrupt or partial file is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ConfigError, DatasetError
from ..fileutil import read_jsonl, sha256_file  # noqa: F401 (sha256_file is re-exported)
from . import kitti

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FORMAT = "lidar-completion-gt"
VERSION = 1


@dataclass(frozen=True)
class GTConfig:
    """Parameters of the map and of the per-frame targets (METHOD.md section 1)."""
    voxel_size: float = 0.1       # map voxel (m)
    min_range: float = 3.5        # map and input scan: range > min_range
    input_max_range: float = 50.0  # input scan: range < input_max_range
    crop_radius: float = 50.0     # target: map points within this distance of the scan pose
    z_min: float = -4.0           # target and input scan: z > z_min (scan frame)
    z_max_eval: float = 4.4       # evaluation targets: z < z_max_eval
    view_voxel: float = 10.0      # viewpoint mask cell size (m)
    tile_size: float = 10.0       # map bucketing for crops (m)

    def __post_init__(self):
        for name in ("voxel_size", "crop_radius", "view_voxel", "tile_size", "input_max_range"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"GTConfig.{name} must be positive, found {getattr(self, name)}")

    def to_dict(self) -> Dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Dict) -> "GTConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: float(v) for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------
# filters
# ----------------------------------------------------------------------------------------------
def static_label_mask(semantic: np.ndarray) -> np.ndarray:
    """Points that belong in the map: ``1 < semantic < 252``."""
    sem = np.asarray(semantic).astype(np.int64) & kitti.SEMANTIC_MASK
    return (sem > 1) & (sem < 252)


def range_of(points: np.ndarray) -> np.ndarray:
    p = np.asarray(points)[:, :3].astype(np.float64)
    return np.sqrt((p * p).sum(1))


def map_point_mask(points: np.ndarray, labels: np.ndarray, config: GTConfig = GTConfig()) \
        -> np.ndarray:
    """Points of a scan that enter the map: label filter and range > ``min_range``."""
    return static_label_mask(labels) & (range_of(points) > config.min_range)


def input_mask(points: np.ndarray, config: GTConfig = GTConfig(),
               labels: Optional[np.ndarray] = None) -> np.ndarray:
    """The input-scan filter: ``min_range < range < input_max_range`` and ``z > z_min``; with
    ``labels`` also the map's label filter (training)."""
    r = range_of(points)
    m = (r > config.min_range) & (r < config.input_max_range) & (np.asarray(points)[:, 2] > config.z_min)
    if labels is not None:
        m &= static_label_mask(labels)
    return m


def rotate(points: np.ndarray, rot: np.ndarray, offset=None) -> np.ndarray:
    """``points @ rot.T + offset`` for (N, 3) points, float64, computed column by column (numpy's
    matmul of a tall (N, 3) array goes through BLAS and is an order of magnitude slower, worse still
    when BLAS threads compete for the cores)."""
    p = np.asarray(points)
    x, y, z = (p[:, i].astype(np.float64) for i in range(3))
    out = np.empty((len(p), 3), dtype=np.float64)
    for i in range(3):
        out[:, i] = x * rot[i, 0] + y * rot[i, 1] + z * rot[i, 2]
        if offset is not None:
            out[:, i] += offset[i]
    return out


def transform(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Apply a 4x4 pose to (N, >=3) points (float64 result, xyz only)."""
    return rotate(np.asarray(points)[:, :3], pose[:3, :3], pose[:3, 3])


def inverse_transform(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points -> the frame of ``pose`` (float64)."""
    rt = pose[:3, :3].T
    return rotate(np.asarray(points)[:, :3], rt, -(rt @ pose[:3, 3]))


# ----------------------------------------------------------------------------------------------
# voxel keys and the incremental hash set
# ----------------------------------------------------------------------------------------------
_KEY_BITS = 21
_KEY_OFFSET = 1 << (_KEY_BITS - 1)
_KEY_MASK = (1 << _KEY_BITS) - 1


def voxel_indices(points: np.ndarray, voxel_size: float) -> np.ndarray:
    """Integer voxel coordinates ``floor(p / voxel_size)`` (int64, (N, 3))."""
    return np.floor(np.asarray(points, dtype=np.float64)[:, :3] / voxel_size).astype(np.int64)


def pack_keys(ijk: np.ndarray) -> np.ndarray:
    """Pack (N, 3) integer voxel coordinates (each within +-2^20) into non-negative int64 keys."""
    ijk = np.asarray(ijk, dtype=np.int64)
    if ijk.size and (ijk.min() < -_KEY_OFFSET or ijk.max() >= _KEY_OFFSET):
        raise DatasetError(f"voxel coordinates out of range (+-{_KEY_OFFSET} voxels): "
                           f"found {ijk.min()}..{ijk.max()}; is the map in metres?")
    u = ijk + _KEY_OFFSET
    return (u[:, 0] << (2 * _KEY_BITS)) | (u[:, 1] << _KEY_BITS) | u[:, 2]


def unpack_keys(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.int64)
    return np.stack([(keys >> (2 * _KEY_BITS)) & _KEY_MASK, (keys >> _KEY_BITS) & _KEY_MASK,
                     keys & _KEY_MASK], 1) - _KEY_OFFSET


_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


class VoxelHashSet:
    """Open-addressing (linear probing) hash set of non-negative int64 keys, vectorised in numpy.

    ``insert`` and ``contains`` take whole arrays; the table doubles when half full, so inserting n
    keys in total costs O(n) amortised.
    """

    EMPTY = -1

    def __init__(self, capacity: int = 1 << 16):
        cap = 1 << max(4, int(math.ceil(math.log2(max(capacity, 16)))))
        self._table = np.full(cap, self.EMPTY, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return len(self._table)

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        shift = np.uint64(64 - int(math.log2(len(self._table))))
        return ((keys.astype(np.uint64) * _HASH_MULT) >> shift).astype(np.int64)

    def _grow(self, needed: int) -> None:
        cap = len(self._table)
        while needed * 2 > cap:
            cap *= 2
        if cap == len(self._table):
            return
        old = self._table[self._table != self.EMPTY]
        self._table = np.full(cap, self.EMPTY, dtype=np.int64)
        self._n = 0
        self._insert_unique(old)

    def insert(self, keys: np.ndarray) -> np.ndarray:
        """Insert ``keys``; returns a bool array, True where a key was not in the set before.
        Duplicates inside ``keys`` are allowed (only the first occurrence counts as new)."""
        keys = np.asarray(keys, dtype=np.int64)
        if keys.size == 0:
            return np.zeros(0, dtype=bool)
        if keys.min() < 0:
            raise ValueError("VoxelHashSet keys must be non-negative")
        uniq, first = np.unique(keys, return_index=True)
        new_u = np.zeros(len(uniq), dtype=bool)
        self._grow(self._n + len(uniq))
        new_u = self._insert_unique(uniq)
        out = np.zeros(len(keys), dtype=bool)
        out[first[new_u]] = True
        return out

    def _insert_unique(self, keys: np.ndarray) -> np.ndarray:
        table = self._table
        mask = len(table) - 1
        new = np.zeros(len(keys), dtype=bool)
        pending = np.arange(len(keys))
        slot = self._hash(keys)
        while pending.size:
            k = keys[pending]
            cur = table[slot]
            done = cur == k
            empty = cur == self.EMPTY
            e_idx = np.flatnonzero(empty)
            if e_idx.size:
                _, first = np.unique(slot[e_idx], return_index=True)
                winners = e_idx[first]
                table[slot[winners]] = k[winners]
                new[pending[winners]] = True
                done[winners] = True
            advance = ~done & ~empty
            slot[advance] = (slot[advance] + 1) & mask
            keep = ~done
            pending, slot = pending[keep], slot[keep]
        self._n += int(new.sum())
        return new

    def contains(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        table = self._table
        mask = len(table) - 1
        out = np.zeros(len(keys), dtype=bool)
        pending = np.arange(len(keys))
        slot = self._hash(keys)
        while pending.size:
            cur = table[slot]
            found = cur == keys[pending]
            out[pending[found]] = True
            cont = ~found & (cur != self.EMPTY)
            pending, slot = pending[cont], (slot[cont] + 1) & mask
        return out

    def keys(self) -> np.ndarray:
        return self._table[self._table != self.EMPTY]


class VoxelMap:
    """Incremental voxel-subsampled map: ``add(points_world)`` keeps, for every voxel not seen
    before, the first point of the batch that falls in it. Points are stored as float32 and voxel
    keys are computed from the float32 values, so stored points and keys always agree."""

    def __init__(self, voxel_size: float = 0.1):
        self.voxel_size = float(voxel_size)
        self._set = VoxelHashSet()
        self._chunks: List[np.ndarray] = []
        self._cache: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self._set)

    def add(self, points_world: np.ndarray) -> int:
        p32 = np.ascontiguousarray(np.asarray(points_world)[:, :3], dtype=np.float32)
        if not len(p32):
            return 0
        keys = pack_keys(voxel_indices(p32, self.voxel_size))
        new = self._set.insert(keys)
        if new.any():
            self._chunks.append(p32[new])
            self._cache = None
        return int(new.sum())

    @property
    def points(self) -> np.ndarray:
        """(M, 3) float32 map points in insertion order."""
        if self._cache is None:
            self._cache = (np.concatenate(self._chunks) if self._chunks
                           else np.zeros((0, 3), np.float32))
            self._chunks = [self._cache]
        return self._cache


def batch_voxel_map(points_world: Sequence[np.ndarray], voxel_size: float = 0.1) -> np.ndarray:
    """Straightforward reference: concatenate everything, keep the first point of every voxel."""
    p = np.concatenate([np.asarray(x)[:, :3] for x in points_world]).astype(np.float32)
    keys = pack_keys(voxel_indices(p, voxel_size))
    _, first = np.unique(keys, return_index=True)
    return p[np.sort(first)]


def sequence_world_points(sequence: kitti.SemanticKittiSequence, frame: int,
                          config: GTConfig = GTConfig()) -> np.ndarray:
    """Map-filtered points of one frame in the world frame (float64)."""
    scan = sequence.scan(frame)
    labels = sequence.labels(frame)
    keep = map_point_mask(scan, labels, config)
    return transform(scan[keep], sequence.pose(frame))


def accumulate_map(sequence: kitti.SemanticKittiSequence, config: GTConfig = GTConfig(),
                   on_frame: Optional[Callable[[int], None]] = None) -> VoxelMap:
    """Build the map of a sequence incrementally (one pass over the scans)."""
    if not sequence.has_labels:
        raise DatasetError(f"sequence {sequence.sequence} has no labels; the ground-truth map needs "
                           "them (label filter 1 < semantic < 252)")
    vmap = VoxelMap(config.voxel_size)
    for i in range(len(sequence)):
        vmap.add(sequence_world_points(sequence, i, config))
        if on_frame is not None:
            on_frame(i)
    return vmap


# ----------------------------------------------------------------------------------------------
# crops
# ----------------------------------------------------------------------------------------------
class MapIndex:
    """The map bucketed into ``tile`` x ``tile`` m columns (sorted once) for radius queries."""

    def __init__(self, points: np.ndarray, tile: float = 10.0):
        self.tile = float(tile)
        pts = np.ascontiguousarray(points[:, :3], dtype=np.float32)
        if len(pts):
            txy = np.floor(pts[:, :2].astype(np.float64) / self.tile).astype(np.int64)
            key = (txy[:, 0] + _KEY_OFFSET) << 32 | (txy[:, 1] + _KEY_OFFSET)
            order = np.argsort(key, kind="stable")
            key = key[order]
            self.points = pts[order]
            self.order = order
            self.tile_keys, self.starts = np.unique(key, return_index=True)
            self.ends = np.append(self.starts[1:], len(key))
        else:
            self.points = pts
            self.order = np.zeros(0, np.int64)
            self.tile_keys = self.starts = self.ends = np.zeros(0, np.int64)

    def query(self, center: np.ndarray, radius: float, return_indices: bool = False):
        """Map points within ``radius`` (3D) of ``center``; with ``return_indices`` also their
        indices in the original map array."""
        cx, cy = float(center[0]), float(center[1])
        t0x, t1x = math.floor((cx - radius) / self.tile), math.floor((cx + radius) / self.tile)
        t0y, t1y = math.floor((cy - radius) / self.tile), math.floor((cy + radius) / self.tile)
        gx, gy = np.meshgrid(np.arange(t0x, t1x + 1), np.arange(t0y, t1y + 1), indexing="ij")
        keys = ((gx.ravel() + _KEY_OFFSET) << 32) | (gy.ravel() + _KEY_OFFSET)
        pos = np.searchsorted(self.tile_keys, keys)
        found = pos < len(self.tile_keys)
        found[found] = self.tile_keys[pos[found]] == keys[found]
        pos = pos[found]
        if len(pos) == 0:
            empty = np.zeros((0, 3), np.float32)
            return (empty, np.zeros(0, np.int64)) if return_indices else empty
        starts, ends = self.starts[pos], self.ends[pos]
        pts = np.concatenate([self.points[a:b] for a, b in zip(starts.tolist(), ends.tolist())])
        c32 = np.asarray(center[:3], dtype=np.float64).astype(np.float32)
        d = pts - c32
        inside = np.einsum("ij,ij->i", d, d) <= np.float32(radius * radius)
        if return_indices:
            sel = np.concatenate([np.arange(a, b) for a, b in zip(starts.tolist(), ends.tolist())])
            return pts[inside], self.order[sel[inside]]
        return pts[inside]


def viewpoint_mask(points: np.ndarray, scan_points: np.ndarray, cell: float = 10.0) -> np.ndarray:
    """True for ``points`` inside a ``cell``-sized voxel that some ``scan_points`` occupy (both in the
    same frame). Dense lookup over the scan's cell bounding box: O(N + M)."""
    pts = np.asarray(points)[:, :3]
    out = np.zeros(len(pts), dtype=bool)
    scan = np.asarray(scan_points)[:, :3]
    if not len(scan) or not len(pts):
        return out
    sc = np.floor(scan.astype(np.float64) / cell).astype(np.int64)
    lo = sc.min(0)
    dims = sc.max(0) - lo + 1
    grid = np.zeros(int(np.prod(dims)), dtype=bool)
    s = sc - lo
    grid[(s[:, 0] * dims[1] + s[:, 1]) * dims[2] + s[:, 2]] = True
    # cell coordinates of the points, clipped into the grid's box (+1 margin cell that stays False)
    flat = np.zeros(len(pts), dtype=np.int64)
    ok = np.ones(len(pts), dtype=bool)
    for axis in range(3):
        c = np.floor(pts[:, axis].astype(np.float64) / cell).astype(np.int64) - lo[axis]
        ok &= (c >= 0) & (c < dims[axis])
        flat = flat * dims[axis] + np.clip(c, 0, dims[axis] - 1)
    out[ok] = grid[flat[ok]]
    return out


def frame_target(map_index: MapIndex, pose: np.ndarray, scan: np.ndarray,
                 config: GTConfig = GTConfig(), return_indices: bool = False):
    """The target of one frame: map points within ``crop_radius`` of the pose, in the scan frame,
    z > ``z_min``, inside the 10 m cells the input scan (range and z filtered) occupies."""
    if return_indices:
        pts_w, idx = map_index.query(pose[:3, 3], config.crop_radius, return_indices=True)
    else:
        pts_w, idx = map_index.query(pose[:3, 3], config.crop_radius), None
    local = inverse_transform(pts_w, pose)
    inp = np.asarray(scan)[:, :3]
    inp = inp[input_mask(inp, config)]
    keep = local[:, 2] > config.z_min
    keep &= viewpoint_mask(local, inp, config.view_voxel)
    out = local[keep].astype(np.float32)
    if return_indices:
        return out, idx[keep]
    return out


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------
def _atomic_write_array(path: Path, arr: np.ndarray) -> Tuple[int, str]:
    data = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
    tmp = _tmp_name(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
    os.replace(tmp, path)
    return len(data), hashlib.sha256(data).hexdigest()


def _tmp_name(path: Path) -> Path:
    """A temporary name private to this process: several processes (a teacher and a refiner started
    together) may verify and rewrite the same cache at once."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _stale_tmp(tmp: Path) -> bool:
    """True for a temporary file whose writer process is gone (or of the old, pid-less naming)."""
    parts = tmp.name.split(".")
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


def _atomic_write_json(path: Path, obj) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def source_fingerprint(sequence: kitti.SemanticKittiSequence) -> Dict:
    """What the cache depends on: poses, calibration and the sizes of all scans and labels."""
    h = hashlib.sha256()
    for i in range(len(sequence)):
        h.update(str(sequence.scan_path(i).stat().st_size).encode())
        h.update(b",")
        if sequence.has_labels:
            h.update(str(sequence.label_path(i).stat().st_size).encode())
        h.update(b";")
    return {
        "frames": len(sequence),
        "poses_sha256": sha256_file(sequence.path / "poses.txt"),
        "calib_sha256": sha256_file(sequence.path / "calib.txt"),
        "sizes_sha256": h.hexdigest(),
    }


class GTCache:
    """Read access to the cache of one sequence (``OUT/SS``)."""

    def __init__(self, cache_root: PathLike, sequence: Union[str, int]):
        self.sequence = kitti.sequence_id(sequence)
        self.dir = Path(cache_root) / self.sequence
        final = self.dir / "manifest.json"
        if final.is_file():
            try:
                manifest = json.loads(final.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise DatasetError(f"{final} is unreadable ({exc}); re-run "
                                   "`lidar-completion build-gt`") from None
            header, map_entry, frames = manifest.get("header"), manifest.get("map"), \
                manifest.get("frames", [])
        else:
            records = read_jsonl(self.dir / "manifest.jsonl")
            if not records:
                raise DatasetError(
                    f"no ground-truth cache for sequence {self.sequence} in {self.dir} "
                    "(expected manifest.json); build it with `lidar-completion build-gt "
                    f"DATASET_ROOT --sequences {self.sequence} --out {Path(cache_root)}`")
            header = records[0] if records[0].get("type") == "header" else None
            map_entry = next((r for r in reversed(records) if r.get("type") == "map"), None)
            frames = [r for r in records if r.get("type") == "frame"]
        if not header or header.get("format") != FORMAT:
            raise DatasetError(f"{self.dir}: not a {FORMAT} cache (header missing or of another "
                               "format)")
        self.header = header
        self.config = GTConfig.from_dict(header.get("config", {}))
        self.n_frames = int(header.get("source", {}).get("frames", 0))
        self.map_entry = map_entry
        self.entries: Dict[int, Dict] = {}
        for rec in frames:
            self.entries[int(rec["frame"])] = rec
        self.complete = final.is_file() and len(self.entries) == self.n_frames

    def __len__(self) -> int:
        return self.n_frames

    def target_path(self, i: int) -> Path:
        return self.dir / "targets" / f"{i:06d}.bin"

    def _load(self, entry: Optional[Dict], what: str, verify: bool) -> np.ndarray:
        if entry is None:
            raise DatasetError(f"{what} of sequence {self.sequence} is not in the cache {self.dir}; "
                               "run `lidar-completion build-gt` (it resumes)")
        path = self.dir / entry["file"]
        if not path.is_file():
            raise DatasetError(f"{path} is missing; re-run `lidar-completion build-gt` to rebuild it")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DatasetError(f"{path} has {size} bytes but the manifest records {entry['bytes']}; "
                               "the file is partial or stale: re-run `lidar-completion build-gt`")
        if verify and sha256_file(path) != entry["sha256"]:
            raise DatasetError(f"{path} fails its sha256 check (corrupt); re-run "
                               "`lidar-completion build-gt`")
        return np.fromfile(path, dtype=np.float32).reshape(-1, 3)

    def load_target(self, i: int, verify: bool = False) -> np.ndarray:
        """(K, 3) float32 target of frame ``i`` in its scan frame (z > z_min, viewpoint-masked)."""
        if not 0 <= i < self.n_frames:
            raise IndexError(f"frame {i} out of range (sequence {self.sequence} has "
                             f"{self.n_frames} frames)")
        return self._load(self.entries.get(i), f"target of frame {i}", verify)

    def load_map(self, verify: bool = False) -> np.ndarray:
        """(M, 3) float32 world-frame map."""
        return self._load(self.map_entry, "the map", verify)


@dataclass
class BuildStats:
    sequence: str
    frames: int = 0
    frames_built: int = 0
    frames_reused: int = 0
    map_points: int = 0
    map_reused: bool = False
    map_seconds: float = 0.0
    targets_seconds: float = 0.0
    target_points_mean: float = 0.0
    cache_dir: str = ""


def _entry_valid(dir_: Path, entry: Dict, verify: str) -> bool:
    path = dir_ / entry.get("file", "")
    try:
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return False
        if verify == "sha256" and sha256_file(path) != entry.get("sha256"):
            return False
    except OSError:
        return False
    return True


def build_sequence(sequence: kitti.SemanticKittiSequence, cache_root: PathLike,
                   config: Optional[GTConfig] = None, verify: str = "sha256", force: bool = False,
                   progress: bool = False, on_frame: Optional[Callable[[str, int], None]] = None,
                   stats: Optional[BuildStats] = None) -> GTCache:
    """Build (or resume, or just verify) the ground-truth cache of one sequence.

    ``verify``: "sha256" (default; re-hash every cached file), "size" (sizes only) - invalid files
    are rebuilt. ``force`` rebuilds everything. ``on_frame(phase, i)`` is called after each frame of
    each phase ("map", "target"). Returns the :class:`GTCache`.
    """
    config = config or GTConfig()
    if verify not in ("sha256", "size"):
        raise ConfigError(f"verify must be 'sha256' or 'size', found {verify!r}")
    if not sequence.has_labels:
        raise DatasetError(f"sequence {sequence.sequence} has no labels ({sequence.path / 'labels'} "
                           "missing); the ground-truth map needs them")
    stats = stats if stats is not None else BuildStats(sequence.sequence)
    stats.frames = len(sequence)
    out = Path(cache_root) / sequence.sequence
    (out / "targets").mkdir(parents=True, exist_ok=True)
    stats.cache_dir = str(out)
    header = {"type": "header", "format": FORMAT, "version": VERSION,
              "sequence": sequence.sequence, "config": config.to_dict(),
              "source": source_fingerprint(sequence)}
    jsonl = out / "manifest.jsonl"
    final = out / "manifest.json"
    records = [] if force else read_jsonl(jsonl)
    if records:
        old = records[0]
        if old.get("type") != "header" or any(old.get(k) != header[k] for k in
                                              ("format", "version", "config", "source")):
            log.info("cache %s was built from other data or parameters; rebuilding", out)
            records = []
    if not records:
        if final.exists():
            final.unlink()
        with open(jsonl, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(header) + "\n")
        records = [header]

    map_entry = next((r for r in reversed(records) if r.get("type") == "map"), None)
    frame_entries: Dict[int, Dict] = {}
    for r in records:
        if r.get("type") == "frame" and 0 <= int(r.get("frame", -1)) < len(sequence):
            frame_entries[int(r["frame"])] = r
    valid = {i for i, e in frame_entries.items() if _entry_valid(out, e, verify)}
    map_ok = map_entry is not None and _entry_valid(out, map_entry, verify)
    todo = [i for i in range(len(sequence)) if i not in valid]
    stats.frames_reused = len(valid)

    bar = None
    if progress and (todo or not map_ok):
        from tqdm import tqdm
        bar = tqdm(total=(0 if map_ok or not todo else len(sequence)) + len(todo), unit="scan",
                   desc=f"build-gt {sequence.sequence}")
    try:
        with open(jsonl, "a", encoding="utf-8") as log_fh:
            def record(rec: Dict) -> None:
                log_fh.write(json.dumps(rec) + "\n")
                log_fh.flush()

            if todo:
                t0 = time.perf_counter()
                if map_ok:
                    map_pts = np.fromfile(out / map_entry["file"], dtype=np.float32).reshape(-1, 3)
                    stats.map_reused = True
                else:
                    if bar is not None:
                        bar.set_postfix_str("map")

                    def tick(i):
                        if bar is not None:
                            bar.update(1)
                        if on_frame is not None:
                            on_frame("map", i)
                    map_pts = accumulate_map(sequence, config, tick).points
                    nbytes, digest = _atomic_write_array(out / "map.bin", map_pts)
                    map_entry = {"type": "map", "file": "map.bin", "points": int(len(map_pts)),
                                 "bytes": nbytes, "sha256": digest}
                    record(map_entry)
                stats.map_seconds = time.perf_counter() - t0
                stats.map_points = int(len(map_pts))
                t0 = time.perf_counter()
                index = MapIndex(map_pts, config.tile_size)
                if bar is not None:
                    bar.set_postfix_str("targets")
                total_pts = 0
                for i in todo:
                    target = frame_target(index, sequence.pose(i), sequence.scan(i), config)
                    rel = f"targets/{i:06d}.bin"
                    nbytes, digest = _atomic_write_array(out / rel, target)
                    entry = {"type": "frame", "frame": i, "file": rel, "points": int(len(target)),
                             "bytes": nbytes, "sha256": digest}
                    record(entry)
                    frame_entries[i] = entry
                    total_pts += len(target)
                    stats.frames_built += 1
                    if bar is not None:
                        bar.update(1)
                    if on_frame is not None:
                        on_frame("target", i)
                stats.targets_seconds = time.perf_counter() - t0
                stats.target_points_mean = total_pts / max(1, len(todo))
                os.fsync(log_fh.fileno())
            else:
                stats.map_points = int(map_entry["points"]) if map_entry else 0
                stats.map_reused = True
    finally:
        if bar is not None:
            bar.close()
    if map_entry is None:  # every frame was valid but the map record was lost: rebuild the map
        map_pts = accumulate_map(sequence, config).points
        nbytes, digest = _atomic_write_array(out / "map.bin", map_pts)
        map_entry = {"type": "map", "file": "map.bin", "points": int(len(map_pts)),
                     "bytes": nbytes, "sha256": digest}
        with open(jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(map_entry) + "\n")
    manifest = {"header": header, "map": map_entry,
                "frames": [frame_entries[i] for i in range(len(sequence))]}
    _atomic_write_json(final, manifest)
    for tmp in out.glob("targets/*.tmp"):
        if _stale_tmp(tmp):
            tmp.unlink(missing_ok=True)
    return GTCache(cache_root, sequence.sequence)


def default_cache_root(dataset_root: PathLike) -> Path:
    return kitti.dataset_root(dataset_root) / "gt_cache"


def build_gt(dataset_root: PathLike, sequences: Iterable[Union[str, int]],
             out: Optional[PathLike] = None, config: Optional[GTConfig] = None,
             verify: str = "sha256", force: bool = False, progress: bool = False) \
        -> List[BuildStats]:
    """Build the ground-truth caches of several sequences under ``out`` (default
    ``DATASET_ROOT/gt_cache``). Resumes interrupted builds; returns one :class:`BuildStats` each."""
    root = kitti.dataset_root(dataset_root)
    cache_root = Path(out) if out is not None else default_cache_root(root)
    ids = [kitti.sequence_id(s) for s in sequences]
    if not ids:
        raise ConfigError("no sequences given")
    seqs = [kitti.SemanticKittiSequence(root, s, require_labels=True) for s in ids]
    results = []
    for seq in seqs:
        st = BuildStats(seq.sequence)
        build_sequence(seq, cache_root, config, verify=verify, force=force, progress=progress,
                       stats=st)
        results.append(st)
    return results


def iter_pairs(dataset_root: PathLike, sequence: Union[str, int],
               cache_root: Optional[PathLike] = None, build: bool = True) \
        -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield ``(scan (N, 4) float32, target (K, 3) float32)`` per frame of a sequence, building the
    cache first when ``build`` (resumes / verifies sizes only)."""
    root = kitti.dataset_root(dataset_root)
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root(root)
    seq = kitti.SemanticKittiSequence(root, sequence, require_labels=build)
    cache = build_sequence(seq, cache_root, verify="size") if build else GTCache(cache_root, sequence)
    for i in range(len(seq)):
        yield seq.scan(i), cache.load_target(i)
