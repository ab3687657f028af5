#!/usr/bin/env python3
"""How good can a noise prediction be, and how close is a trained denoiser to it?

For held-out frames (training-style target: the viewpoint-masked map crop, tiled) and a few
timesteps t, noise the target as in training, ``x_t = x_0 + sigma_t * eps``, and compare

* the Bayes-optimal prediction given the ground truth itself, ``eps* = (x_t - E[x_0 | x_t]) / sigma_t``
  with ``E[x_0 | x_t]`` the Gaussian-weighted mean of the target points near ``x_t`` (the target is
  a uniform draw from its points, so this is the exact posterior mean up to the k-nearest cut-off).
  A denoiser that only sees the scan cannot beat it; its mean squared error is the floor of the
  "loss/mse" curve of the teacher's training;
* each checkpoint's conditional prediction ``eps_hat``: its MSE, its standard deviation, the scale
  ``c`` that would minimise ``MSE(c * eps_hat, eps)`` (c < 1: the prediction is inflated) and how much of
  the noise its one-step estimate ``x_t - sigma_t * eps_hat`` removes (median distance to x_0).

    python scripts/research/denoiser_floor.py --data runs/eval/data --sequence 08 \\
        --checkpoint runs/default/teacher/teacher.pt --checkpoint lidar_completion_pkg/lidar_completion/weights/student.pt

The LiDiff loss adds ``5 * (std(eps_hat) - 1)^2``; where the Bayes-optimal prediction has a standard
deviation well below 1 (points on a surface: the along-surface part of the noise cannot be
predicted), that term forces a trained denoiser to inflate its prediction.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "lidar_completion_pkg"))

from lidar_completion.checkpoints import load_checkpoint  # noqa: E402
from lidar_completion.errors import LidarCompletionError  # noqa: E402
from lidar_completion.data.dataset import TrainingDataset  # noqa: E402
from lidar_completion.diffusion.schedule import NoiseSchedule  # noqa: E402


class Posterior:
    """Bayes-optimal noise for points x_t = x_0 + sigma eps, x_0 a uniform draw from ``target``.

    The target's distinct points and their KD-tree are built once and serve every t."""

    def __init__(self, target: np.ndarray):
        self.points = np.unique(target, axis=0)
        self.tree = cKDTree(self.points)

    def eps(self, x_t: np.ndarray, sigma: float, k: int) -> np.ndarray:
        """(x_t - E[x_0 | x_t]) / sigma, the posterior mean over the k nearest target points."""
        d, j = self.tree.query(x_t, k=min(k, len(self.points)))
        logw = -(d ** 2) / (2 * sigma ** 2)
        w = np.exp(logw - logw.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        mean = np.einsum("nk,nkc->nc", w, self.points[j])
        return (x_t - mean) / sigma


def posterior_eps(target: np.ndarray, x_t: np.ndarray, sigma: float, k: int) -> np.ndarray:
    """Bayes-optimal noise for x_t given that x_0 is a uniform draw from ``target`` (k nearest)."""
    return Posterior(target).eps(x_t, sigma, k)


def stats(eps_hat: np.ndarray, eps: np.ndarray, sigma: float) -> dict:
    mse = float(((eps_hat - eps) ** 2).mean())
    c = float((eps_hat * eps).sum() / max((eps_hat ** 2).sum(), 1e-12))
    noise = np.linalg.norm(eps, axis=1)
    left = np.linalg.norm(eps - eps_hat, axis=1)
    return {"mse": mse, "std": float(eps_hat.std()), "best_scale": c,
            "noise_removed": float(1 - np.median(left) / np.median(noise)), "sigma": sigma}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", required=True, help="SemanticKITTI-layout root with a built gt_cache")
    ap.add_argument("--sequence", default="08")
    ap.add_argument("--frames", default="0,20,40", help="comma-separated frame indices")
    ap.add_argument("--checkpoint", action="append", default=[], help="a checkpoint with a denoiser "
                    "(repeatable); none: the Bayes floor only")
    ap.add_argument("--t", default="20,50,100,250,500,750,999", help="timesteps")
    ap.add_argument("--scan-points", type=int, default=4000)
    ap.add_argument("--tile", type=int, default=10)
    ap.add_argument("--eval-points", type=int, default=8000, help="points scored per frame and t")
    ap.add_argument("--k", type=int, default=256, help="neighbours in the posterior mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except LidarCompletionError as e:
        print(f"denoiser_floor: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    nets = {}
    for path in args.checkpoint:
        loaded = load_checkpoint(path, backend=args.backend)
        if loaded.denoiser is None or loaded.encoder is None:
            print(f"denoiser_floor: error: {path} holds no denoiser with its condition encoder "
                  f"(it has: {', '.join(r for r in ('encoder', 'denoiser', 'refiner') if getattr(loaded, r))})",
                  file=sys.stderr)
            return 2
        nets[Path(path).name if Path(path).name not in nets else path] = loaded
    ds = TrainingDataset(args.data, [args.sequence], n_fps=args.scan_points, tile=args.tile,
                         target_points=args.scan_points * args.tile, augment=False)
    sched = NoiseSchedule()
    ts = [int(t) for t in args.t.split(",")]
    rng = np.random.default_rng(args.seed)
    rows = {name: {t: [] for t in ts} for name in ["bayes", *nets]}
    frames = [int(f) for f in args.frames.split(",")]
    for f in frames:
        s = ds.sample(f, np.random.default_rng([args.seed, f]))
        x0 = s["target"].astype(np.float64)
        posterior = Posterior(x0)
        scan = torch.from_numpy(s["scan"])
        with torch.no_grad():   # the condition does not depend on t: encode once per frame
            conds = {name: net.encoder(scan, None) for name, net in nets.items()}
        sel = rng.choice(len(x0), min(args.eval_points, len(x0)), replace=False)
        for t in ts:
            sigma = float(sched.noise_std(torch.tensor([t]))[0])
            eps = rng.standard_normal(x0.shape)
            x_t = x0 + sigma * eps
            rows["bayes"][t].append(stats(posterior.eps(x_t[sel], sigma, args.k), eps[sel], sigma))
            for name, net in nets.items():
                with torch.no_grad():
                    eh = net.denoiser(torch.from_numpy(x_t).float(), None, torch.tensor([t]), conds[name])
                rows[name][t].append(stats(eh.numpy().astype(np.float64)[sel], eps[sel], sigma))
        print(f"frame {f} done", file=sys.stderr)
    out = {}
    print(f"{len(frames)} frames of sequence {args.sequence}, {args.eval_points} points each")
    print(f"{'denoiser':28s} {'t':>4s} {'sigma':>6s} {'MSE':>6s} {'std':>6s} {'best c':>7s} {'noise removed':>13s}")
    for name, per_t in rows.items():
        out[name] = {}
        for t in ts:
            m = {k: float(np.mean([r[k] for r in per_t[t]])) for k in per_t[t][0]}
            out[name][t] = m
            print(f"{name[:28]:28s} {t:4d} {m['sigma']:6.3f} {m['mse']:6.3f} {m['std']:6.3f} "
                  f"{m['best_scale']:7.2f} {100 * m['noise_removed']:12.1f}%")
        mean = float(np.mean([out[name][t]["mse"] for t in ts]))
        print(f"{name[:28]:28s} mean MSE over these t: {mean:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
