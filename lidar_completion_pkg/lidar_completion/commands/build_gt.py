"""`lidar-completion build-gt`: ground-truth maps and per-frame target cache."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Build the dense ground truth of SemanticKITTI-layout sequences:

  map     every scan accumulated in the world frame (labels 1 < semantic < 252, range > 3.5 m),
          one point per 0.1 m voxel, built incrementally (time linear in the number of scans);
  target  per frame: map points within 50 m of the scan pose, in the scan frame, z > -4 m, kept
          inside the 10 m voxels the input scan occupies.

Results go to OUT/SS/{map.bin, targets/NNNNNN.bin, manifest.jsonl, manifest.json} with sizes and
sha256 checksums. Re-running resumes an interrupted build and rebuilds missing, partial or corrupt
files; a complete cache is only verified. A sequence whose poses, calibration, or scan and label
files (their sizes or modification times) changed since its cache was built is rebuilt."""

EPILOG = """\
examples:
  lidar-completion build-gt /data/semantickitti/dataset --sequences 00 08
  lidar-completion build-gt data/synth --sequences 00 --out data/synth_gt --verify size"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "build-gt", help="build ground-truth maps and the per-frame target cache (resumable)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_root", metavar="DATASET_ROOT",
                   help="folder containing sequences/SS/{velodyne,labels,poses.txt,calib.txt}")
    p.add_argument("--sequences", nargs="+", metavar="SS", default=None,
                   help="sequence ids, e.g. 00 08 (default: every sequence that has labels)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="cache folder (default: DATASET_ROOT/gt_cache)")
    p.add_argument("--verify", choices=["sha256", "size"], default="sha256",
                   help="how existing cache files are checked before reuse (default: sha256)")
    p.add_argument("--force", action="store_true", help="rebuild everything, ignoring the cache")
    p.add_argument("--voxel-size", type=float, default=0.1, help="map voxel in metres (default 0.1)")
    p.add_argument("--crop-radius", type=float, default=50.0,
                   help="target radius around the scan pose in metres (default 50)")
    p.add_argument("--view-mask", choices=("origin", "published"), default="origin",
                   help="the viewpoint mask's 10 m grid: 'origin' (default) cells from the scan frame's "
                        "origin, occupied by the filtered input scan; 'published' the published "
                        "evaluation's rule (LiDiff's eval_path: Open3D's grid from the raw scan's lowest "
                        "corner minus 5 m, the raw scan within 50 m), for numbers comparable with "
                        "published tables (docs/method.md); a cache built with the other rule is rebuilt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import gt, kitti
    from ..errors import DatasetError
    root = kitti.dataset_root(args.dataset_root)
    sequences = args.sequences
    if not sequences:
        sequences = [s for s in kitti.list_sequences(root)
                     if (root / "sequences" / s / "labels").is_dir()]
        if not sequences:
            raise DatasetError(f"no labelled sequences under {root / 'sequences'}")
    config = gt.GTConfig(voxel_size=args.voxel_size, crop_radius=args.crop_radius, view_mask=args.view_mask)
    results = gt.build_gt(root, sequences, out=args.out, config=config, verify=args.verify,
                          force=args.force, progress=not args.no_progress)
    for st in results:
        if st.frames_built:
            per = (st.map_seconds + st.targets_seconds) / st.frames_built
            print(f"sequence {st.sequence}: {st.frames} frames, built {st.frames_built}, reused "
                  f"{st.frames_reused}; map {st.map_points} points"
                  f"{' (reused)' if st.map_reused else ''}; {per * 1000:.0f} ms per frame; "
                  f"mean target {st.target_points_mean:.0f} points"
                  f"{f' (over the {st.frames_built} built)' if st.frames_reused else ''} -> {st.cache_dir}")
        else:
            rebuilt = "" if st.map_reused else "; the map was missing or damaged and was rebuilt"
            print(f"sequence {st.sequence}: {st.frames} frames, cache complete and verified "
                  f"({st.map_points} map points{rebuilt}) -> {st.cache_dir}")
    return 0
