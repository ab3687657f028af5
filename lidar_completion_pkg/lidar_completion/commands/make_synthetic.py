"""`lidar-completion make-synthetic`: write a synthetic SemanticKITTI-layout dataset."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import ConfigError

DESCRIPTION = """\
Generate procedural street scenes ray-cast with a Velodyne HDL-64E pattern (64 beams, +2 to -24.9 deg,
120 m range, range noise and dropouts) and write them exactly like SemanticKITTI:

  OUT/sequences/SS/velodyne/NNNNNN.bin   float32 x, y, z, intensity
  OUT/sequences/SS/labels/NNNNNN.label   uint32 semantic | instance << 16 (moving things: ids >= 252)
  OUT/sequences/SS/poses.txt             camera-0 poses (first is identity)
  OUT/sequences/SS/calib.txt             P0..P3 and Tr (velodyne -> camera)
  OUT/sequences/SS/times.txt             10 Hz timestamps

The same --seed, sequence id, --scans and --azimuth-steps always give the same files."""

EPILOG = """\
examples:
  lidar-completion make-synthetic data/synth --sequences 2 --scans 100 --seed 0
  lidar-completion make-synthetic data/synth --sequences 1 --first-sequence 8 --scans 50
  lidar-completion build-gt data/synth --sequences 00 01"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-synthetic", help="write a synthetic SemanticKITTI-format dataset (street scenes)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="dataset root to write (OUT/sequences/SS/...)")
    p.add_argument("--sequences", type=int, default=1, metavar="N",
                   help="number of sequences (default: 1)")
    p.add_argument("--first-sequence", type=int, default=0, metavar="ID",
                   help="id of the first sequence; sequences are numbered ID, ID+1, ... (default: 0)")
    p.add_argument("--scans", type=int, default=100, metavar="M",
                   help="scans per sequence, 0.1 s apart (default: 100)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    p.add_argument("--azimuth-steps", type=int, default=2048, metavar="W",
                   help="columns per sweep; 2048 gives about 120k points per scan like KITTI, "
                        "fewer make smaller, faster scans (default: 2048)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.synthetic import SyntheticConfig, generate_dataset
    if args.sequences < 1:
        raise ConfigError(f"--sequences must be >= 1, found {args.sequences}")
    if args.scans < 1:
        raise ConfigError(f"--scans must be >= 1, found {args.scans}")
    if args.first_sequence < 0 or args.first_sequence + args.sequences > 100:
        raise ConfigError(f"sequence ids must stay within 00..99, found {args.first_sequence}.."
                          f"{args.first_sequence + args.sequences - 1}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, found {args.seed}")
    # never write over an existing sequence: its scans, labels and poses would end up from two
    # generations (fewer scans leave the old ones beyond them), or a real dataset's would be replaced
    root = Path(args.out)
    folders = [root / "sequences" / f"{i:02d}" for i in range(args.first_sequence, args.first_sequence + args.sequences)]
    taken = [d.name for d in folders if d.is_dir() and any(d.iterdir())]
    if taken:
        raise ConfigError(f"{root} already holds sequence(s) {', '.join(taken)}; write to another root, "
                          f"choose other ids with --first-sequence, or delete those sequence folders first")
    config = SyntheticConfig(azimuth_steps=args.azimuth_steps).validate()
    t0 = time.perf_counter()
    ids = generate_dataset(args.out, args.sequences, args.scans, args.seed, config=config,
                           first_sequence=args.first_sequence, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    n = len(ids) * args.scans
    print(f"wrote {len(ids)} sequence(s) ({', '.join(ids)}) x {args.scans} scans to {args.out} "
          f"in {dt:.1f} s ({dt / n:.2f} s per scan)")
    return 0
