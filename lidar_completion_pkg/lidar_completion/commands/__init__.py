"""Sub-commands of the `lidar-completion` CLI.

Each module here defines `register(subparsers)`, which adds one (or more) sub-parsers and sets
`func=<callable(args) -> int>` on them with `set_defaults`. Modules are imported lazily by name so
that a missing optional dependency only disables its own command.
"""
COMMAND_MODULES = [
    "models",          # parameter counts of the three networks
    "complete",        # complete scan files
    "make_synthetic",  # synthetic SemanticKITTI-layout dataset
    "build_gt",        # ground-truth maps + per-frame cache
    "evaluate",        # evaluate a checkpoint on a sequence; evaluate-files
    "bags",            # bag-from-kitti, bag-bench
]
