"""Rank-0 logging: TensorBoard scalars and bird's-eye renders, a JSON-lines metrics file, tqdm.

Every rank holds a :class:`RunLogger`; only rank 0 writes. ``metrics.jsonl`` in the run folder gets one
line per logged step (the same scalars as TensorBoard), which tests and scripts read without
TensorBoard.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from lidar_completion.fileutil import JsonlWriter, atomic_write

log = logging.getLogger(__name__)


def aside_folder(out) -> Path:
    """A new folder ``<out>/earlier/<time>`` (``-2``, ``-3`` ... when that one exists) for what an
    earlier run, or an abandoned continuation of this one, left in the run folder."""
    base = Path(out) / "earlier" / time.strftime("%Y%m%d-%H%M%S")
    aside, n = base, 1
    while aside.exists():
        n += 1
        aside = base.with_name(f"{base.name}-{n}")
    aside.mkdir(parents=True)
    return aside


class RunLogger:
    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool = True, progress: bool = True,
                 total_steps: int | None = None, initial_step: int = 0, desc: str = "train"):
        self.enabled = bool(enabled)
        self.out = Path(out_dir)
        self.writer = None
        self.bar = None
        self._jsonl = None
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        # resumed: the time column goes on from the last record kept, instead of restarting at 0
        elapsed = self._start_logs(int(initial_step))
        self._jsonl = JsonlWriter(self.out / "metrics.jsonl")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # resumed: TensorBoard drops the events after the checkpoint's step, as _start_logs does
            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"),
                                        purge_step=int(initial_step) + 1 if initial_step else None)
        if progress:
            from lidar_completion.progress import progress_bar
            self.bar = progress_bar(total=total_steps, initial=initial_step, desc=desc,
                                    dynamic_ncols=True, unit="step", smoothing=0.1)
        self._t0 = time.time() - elapsed

    def _start_logs(self, initial_step: int) -> float:
        """A run from step 0 moves the logs and the best weights (``best/``) of an earlier run in
        this folder (one that left no checkpoint) to ``earlier/<time>/``, instead of appending to
        them or leaving another run's weights beside this one's; a resumed run drops the records
        after its checkpoint's step (a run killed between checkpoints logged them, and the resumed
        one logs those steps again). Returns the ``time`` of the last record kept (0 if none)."""
        jsonl, tb = self.out / "metrics.jsonl", self.out / "tensorboard"
        if initial_step == 0:
            # best/ too: a release script takes <out>/best/<kind>.pt before <out>/<kind>.pt
            earlier = [p for p in (jsonl, tb, self.out / "best") if p.exists()]
            if earlier:
                aside = aside_folder(self.out)
                for p in earlier:
                    p.rename(aside / p.name)
                log.warning("%s held the logs%s of an earlier run that left no checkpoint: moved to %s",
                            self.out, " and best weights" if (aside / "best").exists() else "", aside)
            return 0.0
        if not jsonl.exists():
            return 0.0
        kept, dropped, elapsed = [], 0, 0.0
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1          # a line torn by the kill
                continue
            if isinstance(rec, dict) and int(rec.get("step", 0)) > initial_step:
                dropped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("time"), (int, float)):
                elapsed = max(elapsed, float(rec["time"]))
            kept.append(line + "\n")
        if dropped:
            atomic_write(jsonl, [t.encode("utf-8") for t in kept])
        return elapsed

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None and np.isscalar(float(v))}
        if self.writer is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
        rec = {"step": int(step), "time": round(time.time() - self._t0, 3)}
        rec.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
        self._jsonl.write(rec)

    def progress(self, n: int = 1, postfix: dict | None = None) -> None:
        if self.bar is not None:
            # Non-finite values are placeholders (e.g. the student's loss during the distillation's
            # auxiliary-only warm-up: no student update, so no loss); a real NaN/inf loss never gets
            # here - the trainer's guard stops the run first. "nan" on the bar would read as divergence.
            shown = {k: f"{float(v):.4g}" for k, v in (postfix or {}).items()
                     if v is not None and math.isfinite(float(v))}
            if postfix is not None:
                # before update(), which draws the bar: the values shown are the step's just counted
                self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)

    def bev(self, step: int, tag: str, clouds: dict, extent: float | None = None) -> None:
        """Bird's-eye scatter of several clouds side by side (name -> (N, 3) array)."""
        if not self.enabled or self.writer is None:
            return
        fig = render_bev(clouds, extent=extent)
        self.writer.add_figure(tag, fig, global_step=step, close=True)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self.enabled = False


def render_bev(clouds: dict, extent: float | None = None, max_points: int = 60000):
    """A matplotlib figure with one bird's-eye panel per cloud (points coloured by height)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = max(1, len(clouds))
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    if extent is None:
        allp = [np.asarray(c)[:, :2] for c in clouds.values() if len(c)]
        extent = float(np.percentile(np.abs(np.concatenate(allp)), 99)) if allp else 1.0
        extent = max(extent, 1.0)
    rng = np.random.default_rng(0)
    for ax, (name, pts) in zip(axes[0], clouds.items()):
        pts = np.asarray(pts, dtype=np.float32)
        if len(pts) > max_points:
            pts = pts[rng.choice(len(pts), max_points, replace=False)]
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], c=pts[:, 2], s=0.2, cmap="viridis", linewidths=0)
        ax.set_title(f"{name} ({len(pts)} pts)", fontsize=9)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig
