"""Ground truth: the dense static map of a sequence and every frame's cropped target, cached on disk.

Map (docs/method.md, "Data and ground truth"): every scan of the sequence in the world frame, keeping points with
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

Every file is written atomically (``lidar_completion.fileutil``) and only then recorded in
``manifest.jsonl``; a rebuild re-verifies sizes and sha256 checksums, so a killed build resumes where
it stopped and a corrupt or partial file is rebuilt. The voxel hash set, the map and its column
index are in :mod:`.voxels`, the rigid transforms in :mod:`.geometry`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from ..errors import ConfigError, DatasetError
from ..fileutil import JsonlWriter, atomic_write, atomic_write_json, read_jsonl, sha256_file, stale_tmp
from . import kitti
from .geometry import inverse_transform, range_of, transform
from .voxels import MapIndex, VoxelMap

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FORMAT = "lidar-completion-gt"
VERSION = 1


@dataclass(frozen=True)
class GTConfig:
    """Parameters of the map and of the per-frame targets (docs/method.md, "Data and ground truth")."""
    voxel_size: float = 0.1       # map voxel (m)
    min_range: float = 3.5        # map and input scan: range > min_range
    input_max_range: float = 50.0  # input scan: range < input_max_range
    crop_radius: float = 50.0     # target: map points within this distance of the scan pose
    z_min: float = -4.0           # target and input scan: z > z_min (scan frame)
    z_max_eval: float = 4.4       # evaluation targets: z < z_max_eval
    view_voxel: float = 10.0      # viewpoint mask cell size (m)
    tile_size: float = 10.0       # map bucketing for crops (m)
    view_mask: str = "origin"     # viewpoint mask grid: VIEW_MASKS

    def __post_init__(self):
        for name in ("voxel_size", "crop_radius", "view_voxel", "tile_size", "input_max_range"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"GTConfig.{name} must be positive, found {getattr(self, name)}")
        if self.view_mask not in VIEW_MASKS:
            raise ConfigError(f"GTConfig.view_mask must be one of {', '.join(VIEW_MASKS)}, found "
                              f"{self.view_mask!r}")

    def to_dict(self) -> Dict:
        out = {k: v if isinstance(v, str) else float(v) for k, v in asdict(self).items()}
        if out["view_mask"] == "origin":
            # left out at its default: the headers of caches built before the choice existed
            # compare equal, and those caches are not rebuilt
            del out["view_mask"]
        return out

    @classmethod
    def from_dict(cls, d: Dict) -> "GTConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (str(v) if k == "view_mask" else float(v)) for k, v in d.items() if k in known})


#: Viewpoint masks: "origin" (ours, the default) - 10 m cells anchored at the scan frame's origin,
#: occupied by the filtered input scan (3.5 m < range < 50 m, z > -4 m); "published" - the rule of
#: the published evaluation (LiDiff's eval_path): cells anchored at the raw scan's lowest corner
#: minus half a cell (Open3D's VoxelGrid.create_from_point_cloud), occupied by the raw scan within
#: 50 m (no near or height limit).
VIEW_MASKS = ("origin", "published")


# ----------------------------------------------------------------------------------------------
# filters
# ----------------------------------------------------------------------------------------------
def static_label_mask(semantic: np.ndarray) -> np.ndarray:
    """Points that belong in the map: ``1 < semantic < 252``."""
    sem = np.asarray(semantic).astype(np.int64) & kitti.SEMANTIC_MASK
    return (sem > 1) & (sem < 252)


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


def evaluation_target(target: np.ndarray, config: GTConfig = GTConfig()) -> np.ndarray:
    """The part of a cached target that evaluation scores: ``z_min < z < z_max_eval`` (scan frame).
    ``evaluate`` and ``evaluate-files`` on a folder of the cache score the same points."""
    z = np.asarray(target)[:, 2]
    return target[(z > config.z_min) & (z < config.z_max_eval)]


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
def viewpoint_mask(points: np.ndarray, scan_points: np.ndarray, cell: float = 10.0,
                   grid_origin=None) -> np.ndarray:
    """True for ``points`` inside a ``cell``-sized voxel that some ``scan_points`` occupy (both in the
    same frame). The grid's cells start at ``grid_origin`` (the frame's origin when None; the
    published rule's: :func:`published_grid_origin`). Dense lookup over the scan's cell bounding
    box: O(N + M)."""
    pts = np.asarray(points)[:, :3]
    out = np.zeros(len(pts), dtype=bool)
    scan = np.asarray(scan_points)[:, :3].astype(np.float64)
    if not len(scan) or not len(pts):
        return out
    shift = np.zeros(3) if grid_origin is None else np.asarray(grid_origin, dtype=np.float64)
    scan = scan - shift
    sc = np.floor(scan / cell).astype(np.int64)
    lo = sc.min(0)
    dims = sc.max(0) - lo + 1
    grid = np.zeros(int(np.prod(dims)), dtype=bool)
    s = sc - lo
    grid[(s[:, 0] * dims[1] + s[:, 1]) * dims[2] + s[:, 2]] = True
    # cell coordinates of the points, clipped into the grid's box (+1 margin cell that stays False)
    flat = np.zeros(len(pts), dtype=np.int64)
    ok = np.ones(len(pts), dtype=bool)
    for axis in range(3):
        c = np.floor((pts[:, axis].astype(np.float64) - shift[axis]) / cell).astype(np.int64) - lo[axis]
        ok &= (c >= 0) & (c < dims[axis])
        flat = flat * dims[axis] + np.clip(c, 0, dims[axis] - 1)
    out[ok] = grid[flat[ok]]
    return out


def published_grid_origin(scan: np.ndarray, config: GTConfig = GTConfig()) -> np.ndarray:
    """Where the published evaluation's viewpoint grid starts: Open3D's
    VoxelGrid.create_from_point_cloud of the raw scan within ``input_max_range`` (no near or height
    limit) puts its origin at the scan's lowest corner minus half a cell, and check_if_included
    floors (p - origin) / cell. Those raw points are also the ones that occupy its cells."""
    raw = np.asarray(scan)[:, :3].astype(np.float64)
    raw = raw[range_of(raw) < config.input_max_range]
    return (raw.min(0) if len(raw) else np.zeros(3)) - config.view_voxel / 2


def frame_target(map_index: MapIndex, pose: np.ndarray, scan: np.ndarray,
                 config: GTConfig = GTConfig(), return_indices: bool = False):
    """The target of one frame: map points within ``crop_radius`` of the pose, in the scan frame,
    z > ``z_min``, inside the 10 m cells the input scan occupies (``config.view_mask``)."""
    if return_indices:
        pts_w, idx = map_index.query(pose[:3, 3], config.crop_radius, return_indices=True)
    else:
        pts_w, idx = map_index.query(pose[:3, 3], config.crop_radius), None
    local = inverse_transform(pts_w, pose)
    inp = np.asarray(scan)[:, :3]
    keep = local[:, 2] > config.z_min
    if config.view_mask == "published":
        # as the published evaluation masks: the raw scan within range, no near or height limit
        view = inp[range_of(inp) < config.input_max_range]
        keep &= viewpoint_mask(local, view, config.view_voxel, published_grid_origin(inp, config))
    else:
        keep &= viewpoint_mask(local, inp[input_mask(inp, config)], config.view_voxel)
    out = local[keep].astype(np.float32)
    if return_indices:
        return out, idx[keep]
    return out


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------
def _array_entry(out: Path, rel: str, arr: np.ndarray, **fields) -> Dict:
    """Write ``arr`` (float32) to ``out/rel`` atomically and return its manifest record."""
    data = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
    atomic_write(out / rel, data, durable=False)   # recorded in the journal only once renamed
    return dict(fields, file=rel, points=int(len(arr)), bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest())


def source_fingerprint(sequence: kitti.SemanticKittiSequence) -> Dict:
    """What the cache depends on: poses, calibration, and the sizes and modification times of all
    scans and labels.

    Why sizes and times, not contents: hashing every scan and label file reads the whole dataset
    (about 80 GB for SemanticKITTI) on each ``build-gt``; relabelled files keep their size (one
    uint32 per point), so the sizes alone would keep a stale cache. A copy that does not keep
    modification times (``cp`` without ``-p``) makes the cache rebuild once; ``--force`` rebuilds at
    any time.
    """
    sizes, mtimes = hashlib.sha256(), hashlib.sha256()
    for i in range(len(sequence)):
        scan = sequence.scan_path(i).stat()
        label = sequence.label_path(i).stat() if sequence.has_labels else None
        # "scan_size,label_size;" per frame (the sizes' digest of caches built before the times)
        sizes.update(f"{scan.st_size},{label.st_size if label else ''};".encode())
        mtimes.update(f"{scan.st_mtime_ns},{label.st_mtime_ns if label else ''};".encode())
    return {
        "frames": len(sequence),
        "poses_sha256": sha256_file(sequence.path / "poses.txt"),
        "calib_sha256": sha256_file(sequence.path / "calib.txt"),
        "sizes_sha256": sizes.hexdigest(),
        "mtimes_sha256": mtimes.hexdigest(),
    }


_SOURCE_PARTS = {"frames": "the number of frames", "poses_sha256": "poses.txt", "calib_sha256": "calib.txt",
                 "sizes_sha256": "the sizes of scan or label files",
                 "mtimes_sha256": "the modification times of scan or label files"}


def _what_changed(old: Dict, new: Dict) -> str:
    """The parts of the cache's header that differ, in words."""
    parts = [k for k in ("format", "version", "config") if old.get(k) != new.get(k)]
    src_old, src_new = old.get("source") or {}, new.get("source") or {}
    parts += [_SOURCE_PARTS.get(k, k) for k in sorted(set(src_old) | set(src_new)) if src_old.get(k) != src_new.get(k)]
    return ", ".join(parts) or "the header"


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

    def check_source(self, sequence: kitti.SemanticKittiSequence) -> None:
        """A :class:`DatasetError` when ``sequence``'s files are not those the cache was built from
        (poses, calibration, the number or sizes of scans and labels): its targets would be stale,
        silently. Other modification times alone are a warning (``build-gt`` rebuilds on them)."""
        old = self.header.get("source") or {}
        now = source_fingerprint(sequence)
        # the times alone (a copy that did not keep them, a `touch`; or a cache built before they
        # were recorded): the files may be the same, so use the cache and say how to be sure
        content = {k: v for k, v in now.items() if k != "mtimes_sha256"}
        if old != now and {k: old.get(k) for k in content} == content:
            if "mtimes_sha256" in old:
                log.warning("%s: the scan / label files of sequence %s have other modification times than "
                            "when its ground truth was built (the same sizes, poses and calibration): a "
                            "copy that did not keep them is fine; if files were rewritten, rebuild it with "
                            "`lidar-completion build-gt` (it rebuilds what changed)", self.dir, self.sequence)
            return
        if old != now:
            raise DatasetError(
                f"the ground-truth cache {self.dir} was built from other files than sequence "
                f"{self.sequence} holds now (changed: {_what_changed({'source': old}, {'source': now})}); "
                f"rebuild it with `lidar-completion build-gt {sequence.root} --sequences {self.sequence}"
                f"{'' if self.dir.parent == default_cache_root(sequence.root) else f' --out {self.dir.parent}'}`")

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


def _same_source(old, now) -> bool:
    """Whether a journal's recorded ``source`` is the data's ``now``. A cache built before the
    files' modification times were recorded (no ``mtimes_sha256``) matches on the rest, as
    GTCache.check_source takes it: it was rebuilt whole (hours on SemanticKITTI), said to be for
    "changed modification times", and its new fingerprint refused every evaluation folder made on
    it. Its header is kept as it is, so that fingerprint does not change either."""
    if old == now:
        return True
    return (isinstance(old, dict) and isinstance(now, dict) and "mtimes_sha256" not in old
            and old == {k: v for k, v in now.items() if k != "mtimes_sha256"})


def _journal(out: Path, header: Dict, force: bool) -> List[Dict]:
    """The records of ``manifest.jsonl`` when it belongs to ``header``; else a fresh journal holding
    only the header (and no consolidated manifest)."""
    jsonl = out / "manifest.jsonl"
    records = [] if force else read_jsonl(jsonl)
    if records:
        old = records[0]
        if old.get("type") != "header" or any(old.get(k) != header[k] for k in
                                              ("format", "version", "config")) \
                or not _same_source(old.get("source"), header["source"]):
            log.info("cache %s was built from other data or parameters (changed: %s); rebuilding",
                     out, _what_changed(old, header))
            records = []
        elif "mtimes_sha256" not in (old.get("source") or {}):
            log.info("cache %s was built before file modification times were recorded: kept as it "
                     "is; a label file rewritten in place with the same size is not noticed in it "
                     "(build-gt --force rebuilds it)", out)
    if not records:
        (out / "manifest.json").unlink(missing_ok=True)
        with JsonlWriter(jsonl, truncate=True) as journal:
            journal.write(header)
        records = [header]
    return records


def _build_map(sequence, out: Path, config: GTConfig, tick=None) -> Tuple[np.ndarray, Dict]:
    map_pts = accumulate_map(sequence, config, tick).points
    if len(map_pts) == 0:
        raise DatasetError(f"sequence {sequence.sequence}: no scan point carries a static class label, so "
                           f"the ground-truth map is empty; are its labels ({sequence.path / 'labels'}) all "
                           f"unlabelled (0)?")
    return map_pts, _array_entry(out, "map.bin", map_pts, type="map")


def build_sequence(sequence: kitti.SemanticKittiSequence, cache_root: PathLike,
                   config: Optional[GTConfig] = None, verify: str = "sha256", force: bool = False,
                   progress: bool = False, on_frame: Optional[Callable[[str, int], None]] = None,
                   stats: Optional[BuildStats] = None) -> GTCache:
    """Build (or resume, or just verify) the ground-truth cache of one sequence.

    ``verify``: "sha256" (default; re-hash every cached file), "size" (sizes only) - invalid files
    are rebuilt. ``force`` rebuilds everything. ``on_frame(phase, i)`` is called after each frame of
    each phase ("map", "target"). Returns the :class:`GTCache`. Processes that build the same
    sequence's cache at once take turns (a lock file beside its manifest): the second finds the
    first's cache and verifies it instead of building it again.
    """
    out = Path(cache_root) / kitti.sequence_id(sequence.sequence)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".build.lock", f"sequence {sequence.sequence}'s ground truth in {out}"):
        return _build_sequence(sequence, cache_root, config, verify, force, progress, on_frame, stats)


@contextlib.contextmanager
def _locked(path: Path, what: str):
    """An exclusive lock on ``path`` for the block (fcntl.flock: released when the process ends,
    however it ends). Waits, saying so, while another process holds it; where the file system
    does not lock, the block runs unlocked."""
    try:
        import fcntl
        fh = open(path, "a+b")
    except (ImportError, OSError) as exc:     # no fcntl (Windows), a read-only cache: no lock
        log.debug("no lock on %s (%s)", path, exc)
        yield
        return
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building %s; waiting for it", what)
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:                # a file system without flock
            log.debug("no lock on %s (%s)", path, exc)
        yield
    finally:
        fh.close()


def _built_config(out: Path) -> Optional[GTConfig]:
    """The settings a cache in ``out`` was (or is being) built with: its journal's first record,
    read alone (the journal holds a record per frame), or None."""
    try:
        with open(out / "manifest.jsonl", encoding="utf-8") as fh:
            header = json.loads(fh.readline())
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("type") != "header":
        return None
    return GTConfig.from_dict(header.get("config") or {})


def _build_sequence(sequence, cache_root, config, verify, force, progress, on_frame, stats) -> GTCache:
    out = Path(cache_root) / sequence.sequence
    if config is None:
        # no settings asked for (training, validation, evaluate --build-gt): those the cache was
        # built with, not the defaults, which would rebuild a `build-gt --view-mask published` cache
        config = _built_config(out) or GTConfig()
    if verify not in ("sha256", "size"):
        raise ConfigError(f"verify must be 'sha256' or 'size', found {verify!r}")
    if not sequence.has_labels:
        raise DatasetError(f"sequence {sequence.sequence} has no labels ({sequence.path / 'labels'} "
                           "missing); the ground-truth map needs them")
    stats = stats if stats is not None else BuildStats(sequence.sequence)
    stats.frames = len(sequence)
    (out / "targets").mkdir(parents=True, exist_ok=True)
    stats.cache_dir = str(out)
    header = {"type": "header", "format": FORMAT, "version": VERSION,
              "sequence": sequence.sequence, "config": config.to_dict(),
              "source": source_fingerprint(sequence)}
    records = _journal(out, header, force)
    header = records[0]     # the journal's own: an older cache's is kept (and with it its fingerprint)
    map_entry = next((r for r in reversed(records) if r.get("type") == "map"), None)
    frame_entries = {int(r["frame"]): r for r in records
                     if r.get("type") == "frame" and 0 <= int(r.get("frame", -1)) < len(sequence)}
    valid = {i for i, e in frame_entries.items() if _entry_valid(out, e, verify)}
    map_ok = map_entry is not None and _entry_valid(out, map_entry, verify)
    todo = [i for i in range(len(sequence)) if i not in valid]
    stats.frames_reused = len(valid)
    stats.map_reused = map_ok
    stats.map_points = int(map_entry["points"]) if map_entry else 0

    bar = None
    if progress and todo:
        from ..progress import progress_bar
        bar = progress_bar(total=(0 if map_ok else len(sequence)) + len(todo), unit="scan",
                           desc=f"build-gt {sequence.sequence}")

    def tick(phase, i):
        if bar is not None:
            bar.update(1)
        if on_frame is not None:
            on_frame(phase, i)

    try:
        with JsonlWriter(out / "manifest.jsonl") as journal:
            if todo:
                t0 = time.perf_counter()
                if map_ok:
                    map_pts = np.fromfile(out / map_entry["file"], dtype=np.float32).reshape(-1, 3)
                else:
                    if bar is not None:
                        bar.set_postfix_str("map", refresh=False)
                    map_pts, map_entry = _build_map(sequence, out, config, lambda i: tick("map", i))
                    journal.write(map_entry)
                stats.map_seconds = time.perf_counter() - t0
                stats.map_points = int(len(map_pts))
                t0 = time.perf_counter()
                index = MapIndex(map_pts, config.tile_size)
                if bar is not None:
                    bar.set_postfix_str("targets", refresh=False)
                total_pts = 0
                for i in todo:
                    scan = sequence.scan(i)
                    target = frame_target(index, sequence.pose(i), scan, config)
                    if not len(target):
                        # cached like any frame (the cache covers the sequence), but said now:
                        # evaluation and training leave such a frame out when they reach it
                        log.warning("sequence %s frame %d (%s, %d points): %s; evaluation and "
                                    "training will leave this frame out", sequence.sequence, i,
                                    sequence.scan_path(i), len(scan),
                                    "the target is empty" if input_mask(scan, config).any() else
                                    "no point passes the input filter")
                    frame_entries[i] = _array_entry(out, f"targets/{i:06d}.bin", target, type="frame",
                                                    frame=i)
                    journal.write(frame_entries[i])
                    total_pts += len(target)
                    stats.frames_built += 1
                    tick("target", i)
                stats.targets_seconds = time.perf_counter() - t0
                stats.target_points_mean = total_pts / max(1, len(todo))
                journal.sync()
            if not todo and not map_ok:
                # every frame was valid but the map is missing, damaged or its record lost: rebuild it
                # (it is not needed for the targets, but it is part of what the cache promises)
                map_pts, map_entry = _build_map(sequence, out, config)
                stats.map_points = int(len(map_pts))
                journal.write(map_entry)
    finally:
        if bar is not None:
            bar.close()
    manifest = {"header": header, "map": map_entry,
                "frames": [frame_entries[i] for i in range(len(sequence))]}
    atomic_write_json(out / "manifest.json", manifest, indent=1)
    for tmp in (*out.glob("targets/*.tmp"), *out.glob("*.tmp")):   # (map.bin's of a killed build)
        if stale_tmp(tmp):
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
