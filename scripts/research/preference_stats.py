#!/usr/bin/env python3
"""Does a Distillation-DPO preference carry information? Statistics of the pairs each preference
option (training/preference.py) makes, on training scans, without training.

For every option (a list of ``distill.*`` overrides) and every scan, the distillation's own code
(:meth:`training.distill.DistillTrainer.sample`) draws the pair, ranks it and measures the spread of
``--spread-samples`` independent one-step samples. Per option the script reports

* ``margin``: mean |metric(loser) - metric(winner)|;
* ``spread``: mean |metric(a) - metric(b)| over independent one-step samples of the same scan;
* ``margin / spread``;
* ``second won``: the share of scans where the pair's second sample won (0 or 1: the pair's
  construction decides, not the scene); with ``pair_regions`` the share of regions;
* ``agree cd / iou / jsd_bev``: the share of pairs whose winner (as the distillation uses it: a
  whole sample or, with ``pair_regions``, the mosaic of regional winners) CD, IoU at 0.5 m and
  JSD-BEV rank ahead of its loser (a label that only reflects noise in one metric is not shared
  by the others; 100 % for the metric itself).

    python scripts/research/preference_stats.py --data runs/default/data --sequence 00 --scans 12 \\
        --teacher lidar_completion_pkg/lidar_completion/weights/teacher.pt \\
        --option published: --option "independent:pair_noise=independent noise_scale=1.0" \\
        --out runs/preference_stats.json

``--student CKPT`` samples with another student (default: the teacher's copy, where a distillation
starts). Each option's name is before the colon; its overrides (``key=value`` of ``distill.``) after.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lidar_completion import metrics as M  # noqa: E402

from training.config import load_config  # noqa: E402
from training.data import collate  # noqa: E402
from training.distill import DistillTrainer  # noqa: E402

OTHER = {"cd": lambda p, t: M.chamfer_distance(p, t), "iou": lambda p, t: -M.iou(p, t, 0.5),
         "jsd_bev": lambda p, t: M.jsd_bev(p, t)}     # all: lower is better


def parse_option(text: str) -> tuple[str, list]:
    name, _, rest = text.partition(":")
    return name, [f"distill.{kv}" for kv in rest.split()]


def trainer_for(args, overrides: list) -> DistillTrainer:
    cfg = load_config(ROOT / "training" / "configs" / "tiny_distill_dpo.yaml", overrides=[
        "device=cpu", "backend=torch", f"threads={args.threads}", "data.kind=synthetic",
        f"data.root={args.data}", f"data.sequences=['{args.sequence}']", "data.num_workers=0",
        f"data.scan_points={args.scan_points}", f"data.target_points={10 * args.scan_points}",
        "log.tensorboard=false", "log.progress=false", f"distill.teacher={args.teacher}",
        "distill.refiner=null", "distill.spread_every_steps=1", f"distill.spread_samples={args.spread_samples}",
        "train.batchnorm=frozen", *overrides])
    tr = DistillTrainer(cfg, args.work, hold=False)   # several on one work folder, none run whole
    if args.student:
        from lidar_completion.checkpoints import load_checkpoint
        tr.student.load_state_dict(load_checkpoint(args.student, backend="torch").denoiser.state_dict())
    tr.record = True
    return tr


def option_stats(tr: DistillTrainer, scans: list) -> dict:
    rows = []
    for i in scans:
        batch = collate([tr.dataset[(i, 0, i)]])
        rec: dict = {}
        st = tr.sample(batch, with_grad=False, rec=rec)
        # the winner and loser as the distillation uses them (whole samples, or region mosaics)
        gw, gl = rec["side_samples"]["aux_w"].numpy(), rec["side_samples"]["aux_l"].numpy()
        tgt = batch["target"].numpy()
        agree = {k: float(fn(gw, tgt) <= fn(gl, tgt)) for k, fn in OTHER.items()}
        regional = rec.get("first_rows") is not None
        rows.append({"scan": i, "m1": float(rec["m1"][0]), "m2": float(rec["m2"][0]),
                     "first": bool(rec["first"][0]), "second_won": float(st.logs["metric/switch"]),
                     "margin": st.logs["metric/margin"], "spread": st.logs["metric/spread"],
                     "winner": st.logs["metric/winner"], **{f"agree_{k}": v for k, v in agree.items()},
                     **({"regions": st.logs["metric/regions"]} if regional else {})})
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("margin", "spread", "winner")}
    out["margin_over_spread"] = out["margin"] / out["spread"]
    # whole-scan pairs: the share of scans the second sample won; region pairs: of regions
    out["second_won"] = float(np.mean([r["second_won"] for r in rows]))
    for k in OTHER:
        out[f"agree_{k}"] = float(np.mean([r[f"agree_{k}"] for r in rows]))
    out["scans"] = rows
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a synthetic/SemanticKITTI-layout root with its gt_cache")
    ap.add_argument("--sequence", default="00")
    ap.add_argument("--scans", type=int, default=12, help="scans 0, step, 2 step, ... of the sequence")
    ap.add_argument("--step", type=int, default=5)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", default=None)
    ap.add_argument("--option", action="append", required=True, metavar="NAME:KEY=VALUE ...")
    ap.add_argument("--spread-samples", type=int, default=4)
    ap.add_argument("--scan-points", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/preference_stats_work")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    out = Path(args.out)
    if out.exists():
        results = json.loads(out.read_text())
    print("| option | metric | winner | margin | spread | margin / spread | second won | agree cd | agree iou | agree jsd_bev |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for text in args.option:
        name, overrides = parse_option(text)
        if name not in results:
            tr = trainer_for(args, overrides)
            scans = list(range(0, len(tr.dataset), args.step))[:args.scans]
            results[name] = dict(option_stats(tr, scans), overrides=overrides,
                                 metric=tr.cfg["distill"]["metric"])
            out.write_text(json.dumps(results, indent=1))
        r = results[name]
        print(f"| {name} | {r['metric']} | {r['winner']:.4f} | {r['margin']:.4f} | {r['spread']:.4f} | "
              f"{r['margin_over_spread']:.2f} | {100 * r['second_won']:.0f} % | {100 * r['agree_cd']:.0f} % | "
              f"{100 * r['agree_iou']:.0f} % | {100 * r['agree_jsd_bev']:.0f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
