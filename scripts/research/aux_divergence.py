#!/usr/bin/env python3
"""Did the preference reach Distillation-DPO's auxiliary networks? Measured on a distillation's
training checkpoint, on held-out frames.

Distillation-DPO trains two auxiliary networks, ``aux_w`` on the winners and ``aux_l`` on the
losers, and the student descends ``eps_T - eps_aux_w`` on its winner samples and ascends
``eps_T - eps_aux_l`` on its losers (docs/training.md). The label's only way into the student is
that the two networks differ: where ``aux_w = aux_l`` the objective is score distillation with
per-point weights, and those weights carry no direction towards the ground truth. For every
timestep t of ``--timesteps`` and every frame, with x = the winner sample + sigma_t eps:

* ``score_diff``: RMS over points of |eps_T(x) - eps_aux_w(x)| (the teacher as the distillation
  uses it, with its ``teacher_guidance``): what drives the student;
* ``aux_gap``: RMS of |eps_aux_w(x) - eps_aux_l(x)|: what the preference changed; ``gap_ratio`` is
  aux_gap / score_diff;
* ``cd_x0_w`` / ``cd_x0_l``: the Chamfer distance to the frame's ground truth of each auxiliary
  network's estimate x - sigma_t eps_aux(x). If the winner network had learnt what the label
  says (nearer the ground truth), its estimate would be the nearer one;
* ``cd_sample``: the winner sample's own Chamfer distance.

A score-distillation run (one auxiliary network) reports ``score_diff`` and ``cd_x0_w`` only.

    python scripts/research/aux_divergence.py --run runs/reg/reg2_s0 --run runs/reg/vsd_s0 \\
        --data runs/eval/data --sequence 08 --frames 6 --every 10 --out runs/aux_divergence.json

``--run`` is a training run folder (its config.yaml and the checkpoint its checkpoints/latest.json
names) or ``RUN_FOLDER:CHECKPOINT`` for another of its checkpoints.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lidar_completion import metrics as M  # noqa: E402
from lidar_completion.errors import CheckpointError  # noqa: E402

from training.checkpoint import CheckpointManager, load_state  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import collate  # noqa: E402
from training.distill import DistillTrainer  # noqa: E402

FIELDS = ("score_diff", "aux_gap", "gap_ratio", "cd_x0_w", "cd_x0_l", "cd_sample")


def _checkpoint(spec: str) -> tuple[Path, Path]:
    run, _, ckpt = spec.partition(":")
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"--run {spec}: {run} has no config.yaml (not a training run folder)")
    if ckpt:
        return run, Path(ckpt)
    latest = CheckpointManager(run / "checkpoints").latest_path()
    if latest is None:
        raise SystemExit(f"--run {spec}: no checkpoint in {run / 'checkpoints'} (none written yet?)")
    return run, latest


def trainer_for(run: Path, ckpt: Path, args, work: Path) -> DistillTrainer:
    cfg = load_config(run / "config.yaml", overrides=[
        "device=cpu", "backend=torch", f"threads={args.threads}", f"data.root={args.data}",
        f"data.sequences=['{args.sequence}']", "data.num_workers=0", "data.augment=false",
        "log.tensorboard=false", "log.progress=false", "validation.every_steps=0"])
    if cfg["kind"] != "distill":
        raise SystemExit(f"--run {run}: a {cfg['kind']} run, not a distillation")
    tr = DistillTrainer(cfg, work, hold=False)   # driven step by step, never run whole
    # the networks only: Trainer.load would also restore the optimisers and the data order, and
    # refuses a state written over another dataset (the training drives, not these held-out frames)
    state = load_state(ckpt)
    models = state.get("models", {})
    missing = [n for n in ("student", *tr.aux_names) if n not in models]
    if missing:
        raise CheckpointError(f"{ckpt}: no {', '.join(missing)} in this training checkpoint")
    for name, sd in models.items():
        if name in tr.modules:
            tr.modules[name].load_state_dict(sd)
    for m in tr.modules.values():
        m.eval()
    return tr


def _rms(a: torch.Tensor) -> float:
    return float(((a ** 2).sum(1).mean()).sqrt())


@torch.no_grad()
def measure(tr: DistillTrainer, frames: list, timesteps: list, seed: int) -> dict:
    names = tr.aux_names
    gen = torch.Generator().manual_seed(seed)
    rows = {t: {k: [] for k in FIELDS} for t in timesteps}
    for i in frames:
        batch = collate([tr.dataset[(i, 0, i)]])
        st = tr.sample(batch, with_grad=False)
        G = st.samples[names[0]].detach().float()
        target = batch["target"].numpy()
        cd_sample = M.chamfer_distance(G.numpy(), target)
        for t_val in timesteps:
            t = torch.full((1,), int(t_val), dtype=torch.long)
            sig = tr.sigma(t)[st.xb].view(-1, 1)
            x = G + sig * torch.randn(G.shape, generator=gen)
            e_T = tr.teacher_score(x, st.xb, t, st.cond, st.n_scan).float()
            e_aux = [tr.aux[n](x, st.xb, t, st.cond).float() for n in names]
            r = rows[t_val]
            r["score_diff"].append(_rms(e_T - e_aux[0]))
            r["cd_x0_w"].append(M.chamfer_distance((x - sig * e_aux[0]).numpy(), target))
            r["cd_sample"].append(cd_sample)
            if len(names) > 1:
                r["aux_gap"].append(_rms(e_aux[0] - e_aux[1]))
                r["cd_x0_l"].append(M.chamfer_distance((x - sig * e_aux[1]).numpy(), target))
    out = {}
    for t_val, r in rows.items():
        o = {k: float(np.mean(v)) for k, v in r.items() if v}
        if "aux_gap" in o:
            o["gap_ratio"] = o["aux_gap"] / max(o["score_diff"], 1e-12)
        out[str(t_val)] = o
    return out


def table(results: dict) -> str:
    lines = ["| run | t | " + " | ".join(FIELDS) + " |", "|---" * (len(FIELDS) + 2) + "|"]
    for run, res in results.items():
        for t_val, o in res["timesteps"].items():
            cells = [f"{o[k]:.4f}" if k in o else "-" for k in FIELDS]
            lines.append(f"| {run} | {t_val} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="RUN[:CKPT]",
                   help="a distillation run folder (repeatable); RUN:CKPT for another of its checkpoints")
    p.add_argument("--data", required=True, help="dataset root with the held-out sequence and its gt_cache")
    p.add_argument("--sequence", default="08", help="held-out sequence (default 08)")
    p.add_argument("--frames", type=int, default=6, help="frames 0, every, 2 every, ... (default 6)")
    p.add_argument("--every", type=int, default=10, help="frame spacing (default 10)")
    p.add_argument("--timesteps", default="100,300,500,700,900", help="comma-separated t (default 100,...,900)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noises eps (default 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON with every run's numbers")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
    except ValueError:
        p.error(f"--timesteps must be comma-separated integers, got {args.timesteps!r}")
    if not timesteps or any(not 0 <= t < 1000 for t in timesteps):
        p.error(f"--timesteps must lie in 0..999, got {args.timesteps!r}")
    if args.frames < 1 or args.every < 1:
        p.error("--frames and --every must be >= 1")
    frames = [i * args.every for i in range(args.frames)]
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for spec in args.run:
            run, ckpt = _checkpoint(spec)
            tr = trainer_for(run, ckpt, args, Path(work) / str(len(results)))
            n = len(tr.dataset)
            if frames[-1] >= n:
                raise SystemExit(f"sequence {args.sequence} of {args.data} has {n} frames; frame {frames[-1]} asked")
            results[spec] = {"checkpoint": str(ckpt), "mode": tr.mode, "frames": frames,
                             "timesteps": measure(tr, frames, timesteps, args.seed)}
    print(table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
