"""Where Distillation-DPO's preference term moves a student whose auxiliary networks are exact.

A toy where every score is known in closed form: data and teacher are isotropic Gaussians in d
dimensions, the student is a one-step generator G(z) = mu + s z, and the forward process is the one
the networks are trained on (x_t = x_0 + sigma_t eps). The noise predictor of data N(m, s^2 I) under
it is eps(x) = sigma (x - m) / (s^2 + sigma^2), so the auxiliary network of each side, fitted on that
side's samples, is this formula with m = the side's sample mean - what a perfectly trained auxiliary
network would learn. The preference is the ground truth's: of the two samples of a step (from z and
1.1 z as published, or from two independent draws), the one whose mean is nearer the data's mean c
wins. The teacher is imperfect (its mean m_T is not c), which is what a preference is for.

The student's losses are the trainer's own (``training.losses.vsd_loss`` / ``dpo_loss``, with the
score-distillation share ``vsd_weight`` as ``training/distill.py`` adds it). Printed per objective:
where mu ends after ``--steps`` SGD steps (mean over ``--seeds`` runs), its distance to the data and
to the teacher, and the cosine of the preference term's update with the direction from the winner's
mean to the loser's (+1: the term pushes the student towards its losers).

    python scripts/research/dpo_direction.py                 # the table of docs/experiments/
    python scripts/research/dpo_direction.py --pairs independent --dim 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training.losses import dpo_loss, vsd_loss  # noqa: E402


def eps_gaussian(x: torch.Tensor, mean: torch.Tensor, s: float, sigma: float) -> torch.Tensor:
    """The exact noise predictor of data N(mean, s^2 I) under x_t = x_0 + sigma eps."""
    return sigma * (x - mean) / (s * s + sigma * sigma)


def run(objective: str, seed: int, steps: int = 200, dim: int = 1, teacher: float = 2.0, data: float = 1.0,
        s: float = 0.5, points: int = 256, lr: float = 0.5, pairs: str = "scaled") -> dict:
    """One toy distillation; ``objective``: "vsd", "dpo" (vsd_weight 0) or "dpo+vsd" (vsd_weight 1)."""
    g = torch.Generator().manual_seed(seed)
    m_t, c = torch.full((dim,), teacher), torch.full((dim,), data)
    mu = torch.zeros(dim, requires_grad=True)
    opt = torch.optim.SGD([mu], lr=lr)
    cosines = []
    for _ in range(steps):
        z = torch.randn(points, dim, generator=g)
        sigma = float(torch.rand((), generator=g)) * 0.95 + 0.05
        e = torch.randn(points, dim, generator=g)
        one = mu + s * z
        if objective == "vsd":
            x = one.detach() + sigma * e
            d = eps_gaussian(x, m_t, s, sigma) - eps_gaussian(x, one.detach().mean(0), s, sigma)
            loss = vsd_loss(d, one)
        else:
            other = mu + s * (1.1 * z if pairs == "scaled" else torch.randn(points, dim, generator=g))
            near = [float((a.detach().mean(0) - c).norm()) for a in (one, other)]
            w, lo = (one, other) if near[0] <= near[1] else (other, one)
            xw, xl = w.detach() + sigma * e, lo.detach() + sigma * e     # one (t, eps) for the pair
            dw = eps_gaussian(xw, m_t, s, sigma) - eps_gaussian(xw, w.detach().mean(0), s, sigma)
            dl = eps_gaussian(xl, m_t, s, sigma) - eps_gaussian(xl, lo.detach().mean(0), s, sigma)
            pref = dpo_loss(dw, w, dl, lo)
            step, = torch.autograd.grad(pref, mu, retain_graph=True)
            towards_loser = lo.detach().mean(0) - w.detach().mean(0)
            if float(step.norm()) > 0 and float(towards_loser.norm()) > 0:
                cosines.append(float(torch.dot(-step, towards_loser) / (step.norm() * towards_loser.norm())))
            loss = pref
            if objective == "dpo+vsd":     # vsd_weight 1: half of it on each side's samples
                loss = loss + 0.5 * (vsd_loss(dw, w) + vsd_loss(dl, lo))
        opt.zero_grad()
        loss.backward()
        opt.step()
    mu = mu.detach()
    return {"mu": mu, "to_data": float((mu - c).norm()), "to_teacher": float((mu - m_t).norm()),
            "cos_loser": (sum(cosines) / len(cosines)) if cosines else float("nan"),
            "min_cos_loser": min(cosines) if cosines else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="SGD steps of the student (default 200)")
    p.add_argument("--seeds", type=int, default=5, help="runs per objective, seeds 0.. (default 5)")
    p.add_argument("--dim", type=int, default=1, help="dimensions of the toy (default 1)")
    p.add_argument("--pairs", choices=("scaled", "independent"), default="scaled",
                   help="the pair: z and 1.1 z (published) or two independent draws [scaled]")
    p.add_argument("--teacher", type=float, nargs="+", default=[2.0, 0.0],
                   help="teacher means to try, every coordinate (default 2 0; the data's is 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"| teacher mean | objective | student mean after {a.steps} steps | to the data (1.0) | "
          "to the teacher | cosine of the preference step with winner -> loser (mean / min) |")
    print("|---|---|---|---|---|---|")
    for m_t in a.teacher:
        for objective in ("vsd", "dpo+vsd", "dpo"):
            rs = [run(objective, seed, a.steps, a.dim, m_t, pairs=a.pairs) for seed in range(a.seeds)]
            mean = sum(float(r["mu"].mean()) for r in rs) / len(rs)
            to_data = sum(r["to_data"] for r in rs) / len(rs)
            to_teacher = sum(r["to_teacher"] for r in rs) / len(rs)
            cos = "-" if objective == "vsd" else \
                f"{sum(r['cos_loser'] for r in rs) / len(rs):+.3f} / {min(r['min_cos_loser'] for r in rs):+.3f}"
            name = {"vsd": "score distillation", "dpo+vsd": "Distillation-DPO, vsd_weight 1",
                    "dpo": "Distillation-DPO, vsd_weight 0 (published)"}[objective]
            print(f"| {m_t:g} | {name} | {mean:.3f} | {to_data:.3f} | {to_teacher:.3f} | {cos} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
