"""`lidar-completion models`: the three networks and their parameter counts."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("models", help="print the parameter counts of the three networks",
                       description="Build the condition encoder, the denoiser and the refiner (published "
                                   "LiDiff sizes by default) and print their parameter counts.")
    p.add_argument("--config", choices=("full", "tiny"), default="full",
                   help="network widths: the published sizes (full) or the reduced-width family member "
                        "used for tests and the shipped small models (tiny) (default full)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import ConditionEncoder, Denoiser, ModelConfig, Refiner, count_parameters

    cfg = ModelConfig.full() if args.config == "full" else ModelConfig.tiny()
    counts = {"condition_encoder": count_parameters(ConditionEncoder(cfg, "torch")),
              "denoiser": count_parameters(Denoiser(cfg, "torch")),
              "refiner": count_parameters(Refiner(cfg, "torch"))}
    counts["diffusion_total"] = counts["condition_encoder"] + counts["denoiser"]
    if args.json:
        print(json.dumps({"config": cfg.name, "channels": list(cfg.channels), **counts}))
    else:
        print(f"networks ({cfg.name}, channels {list(cfg.channels)}):")
        for k, v in counts.items():
            print(f"  {k:<18} {v:>12,}")
    return 0
