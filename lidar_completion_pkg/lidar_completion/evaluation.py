"""Evaluation loop, summaries and plots behind ``lidar-completion evaluate`` / ``evaluate-files``.

One loop serves both commands and Python callers:

* a *source* yields frames in a fixed order (a SemanticKITTI sequence with its ground-truth cache,
  or prediction / ground-truth files paired by stem);
* a *predictor* turns a frame's input scan into the evaluated cloud (the :class:`Completer`, the
  input scan itself for the ``--baseline input`` row, or a prediction file);
* every frame's metrics (:func:`frame_metrics`) are appended as one JSON line to
  ``OUT/frames.jsonl`` as soon as they are known, so an interrupted run resumes where it stopped
  (frames already in the file are skipped; the run's settings in ``OUT/run.json`` must match);
* at the end ``OUT/summary.json``, ``OUT/summary.md`` (the papers' table layout) and the plots
  (``cd_histogram.png``, ``metrics_over_sequence.png``, bird's-eye renders of the three best and three
  worst frames by CD with their ground truth) are written.

Aggregation follows the papers: CD, JSD, EMD and P/R/F are means of per-frame values (frames where a
metric is undefined, or dropped by the published EMD, are left out and counted); IoU accumulates
TP / FP / FN over all frames. Completions are seeded per frame (``seed + frame index``) so a resumed
or partial run gives the same per-frame numbers as a full one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import metrics as M
from .fileutil import read_jsonl, sha256_file
from .errors import CloudFormatError, ConfigError, DatasetError

log = logging.getLogger(__name__)

__all__ = [
    "frame_metrics", "summarize", "summary_markdown", "write_plots", "evaluate_sequence",
    "evaluate_files", "run_evaluation", "read_records", "pair_files", "print_summary", "IOU_VOXEL_SIZES",
    "PRF_THRESHOLDS", "EMD_MODES", "FRAMES_FILE",
]

#: Voxel sizes (m) of the IoU columns.
IOU_VOXEL_SIZES = (0.5, 0.2, 0.1)
#: Thresholds (m) of the single-threshold P/R/F columns.
PRF_THRESHOLDS = (0.05, 0.10)
#: Published P/R/F: normalised Simpson area over 100 thresholds from 0.05 to 0.10 m.
PRF_AUC_THRESHOLDS = np.linspace(0.05, 0.10, 100)
#: Which EMDs to compute per frame: our optimal-transport one, the published variant, both, none.
EMD_MODES = ("both", "ot", "published", "none")
FRAMES_FILE = "frames.jsonl"
RUN_FILE = "run.json"
N_EXTREMES = 3
CLOUD_EXTS = (".bin", ".npy", ".ply", ".pcd")


# ----------------------------------------------------------------------------------- per frame
def _key(v: float) -> str:
    return f"{v:g}"


def _prf_all(d_pred: np.ndarray, d_gt: np.ndarray) -> Dict[str, List[Optional[float]]]:
    """P/R/F at PRF_THRESHOLDS plus the published area variant, from nearest-neighbour distances."""
    out = {_key(t): list(M.prf_from_distances(d_pred, d_gt, t)) for t in PRF_THRESHOLDS}
    if len(d_pred) == 0 or len(d_gt) == 0:
        out["auc"] = [math.nan] * 3
        return out
    from scipy.integrate import simpson
    sp, sg = np.sort(d_pred), np.sort(d_gt)
    # share of distances strictly below each threshold
    p = np.searchsorted(sp, PRF_AUC_THRESHOLDS, side="left") / len(sp)
    r = np.searchsorted(sg, PRF_AUC_THRESHOLDS, side="left") / len(sg)
    f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    dx = PRF_AUC_THRESHOLDS[1] - PRF_AUC_THRESHOLDS[0]
    norm = simpson(np.ones_like(PRF_AUC_THRESHOLDS), dx=dx)
    out["auc"] = [float(simpson(v, dx=dx) / norm) for v in (p, r, f)]
    return out


def frame_metrics(pred, gt, emd: str = "both", workers: int = 1) -> Dict:
    """Every metric of one frame as a JSON-ready dict (NaN for undefined values).

    Keys: n_pred, n_gt, cd, jsd_bev, jsd_3d, emd (+ emd_method, emd_cell, emd_bound),
    emd_published, iou ({"full"|"legacy": {"0.5": [tp, fp, fn], ...}}), prf ({"0.05": [p, r, f],
    "0.1": [...], "auc": [...]}), metric_seconds.
    """
    if emd not in EMD_MODES:
        raise ConfigError(f"emd: expected one of {', '.join(EMD_MODES)}, got {emd!r}")
    t0 = time.perf_counter()
    pred = M._points(pred, "prediction")
    gt = M._points(gt, "ground truth")
    rec: Dict = {"n_pred": int(len(pred)), "n_gt": int(len(gt))}
    d_pred = M.nn_distances(pred, gt, workers)
    d_gt = M.nn_distances(gt, pred, workers)
    rec["cd"] = float(0.5 * (d_pred.mean() + d_gt.mean())) if len(pred) and len(gt) else math.nan
    rec["jsd_bev"] = M.jsd_bev(pred, gt)
    rec["jsd_3d"] = M.jsd_3d(pred, gt)
    if emd in ("both", "ot"):
        value, info = M.emd(pred, gt, return_info=True)
        rec.update(emd=value, emd_method=info["method"], emd_cell=info["cell"],
                   emd_bound=info["error_bound"])
    if emd in ("both", "published"):
        rec["emd_published"] = M.emd_published(pred, gt)
    rec["iou"] = {ext: {_key(v): list(M.iou_counts(pred, gt, v, ext)) for v in IOU_VOXEL_SIZES}
                  for ext in ("full", "legacy")}
    rec["prf"] = _prf_all(d_pred, d_gt)
    rec["metric_seconds"] = time.perf_counter() - t0
    return rec


# ------------------------------------------------------------------------------------- JSON I/O
def _jsonable(obj):
    """NaN/inf -> None, numpy scalars/arrays -> Python, recursively."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _num(v) -> float:
    return math.nan if v is None else float(v)


def read_records(path) -> List[Dict]:
    """Per-frame records of a ``frames.jsonl``; a line torn by a kill is ignored."""
    return [rec for rec in read_jsonl(path) if "frame" in rec]


def _repair_tail(path: Path) -> None:
    """End a file whose last line was torn by a kill with a newline, so appends start a new line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":
            fh.write(b"\n")


def _append_record(path: Path, rec: Dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_jsonable(rec), sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- summary
def _stats(values: Sequence[float]) -> Dict:
    a = np.asarray([_num(v) for v in values], dtype=np.float64)
    ok = a[np.isfinite(a)]
    if ok.size == 0:
        return {"mean": None, "std": None, "median": None, "frames": 0, "undefined": int(a.size)}
    return {"mean": float(ok.mean()), "std": float(ok.std()), "median": float(np.median(ok)),
            "frames": int(ok.size), "undefined": int(a.size - ok.size)}


def summarize(records: Sequence[Dict], run: Optional[Dict] = None) -> Dict:
    """Aggregate per-frame records into the summary dict (also written as summary.json)."""
    s: Dict = {"run": dict(run or {}), "frames": len(records),
               "failed_frames": [r["frame"] for r in records if r.get("error")]}
    for name in ("cd", "jsd_bev", "jsd_3d", "emd", "emd_published"):
        if any(name in r for r in records):
            s[name] = _stats([r.get(name) for r in records])
    methods: Dict[str, int] = {}
    for r in records:
        if r.get("emd_method"):
            methods[r["emd_method"]] = methods.get(r["emd_method"], 0) + 1
    if methods:
        s["emd"]["methods"] = methods
        s["emd"]["max_error_bound"] = max((_num(r.get("emd_bound")) for r in records
                                           if r.get("emd_bound") is not None), default=0.0)
    if "emd_published" in s:
        s["emd_published"]["dropped_frames"] = s["emd_published"]["undefined"]
    iou: Dict = {}
    for ext in ("full", "legacy"):
        iou[ext] = {}
        for v in IOU_VOXEL_SIZES:
            k = _key(v)
            tp = sum(int(r["iou"][ext][k][0]) for r in records if "iou" in r)
            fp = sum(int(r["iou"][ext][k][1]) for r in records if "iou" in r)
            fn = sum(int(r["iou"][ext][k][2]) for r in records if "iou" in r)
            union = tp + fp + fn
            iou[ext][k] = {"iou": tp / union if union else None, "tp": tp, "fp": fp, "fn": fn}
    s["iou"] = iou
    prf: Dict = {}
    for k in [_key(t) for t in PRF_THRESHOLDS] + ["auc"]:
        vals = np.asarray([[_num(x) for x in r["prf"][k]] for r in records if "prf" in r],
                          dtype=np.float64).reshape(-1, 3)
        means = [float(np.nanmean(col)) if np.isfinite(col).any() else None for col in vals.T]
        prf[k] = dict(zip(("precision", "recall", "fscore"), means))
    s["prf"] = prf
    total = [r["timings"]["total"] for r in records if r.get("timings", {}).get("total") is not None]
    s["time_per_scan"] = _stats(total) if total else None
    stages: Dict[str, float] = {}
    for r in records:
        for k, v in (r.get("timings") or {}).items():
            if v is not None and k != "seed":
                stages[k] = stages.get(k, 0.0) + float(v)
    if stages and total:
        s["stage_seconds_mean"] = {k: v / len(total) for k, v in stages.items()}
    s["metric_seconds"] = _stats([r.get("metric_seconds") for r in records])
    finite = [r for r in records if r.get("cd") is not None and math.isfinite(_num(r["cd"]))]
    finite.sort(key=lambda r: (_num(r["cd"]), str(r["frame"])))
    # best and worst never share a frame (fewer than 2 N_EXTREMES frames: split them)
    k_best = min(N_EXTREMES, (len(finite) + 1) // 2)
    s["best_frames"] = [r["frame"] for r in finite[:k_best]]
    s["worst_frames"] = [r["frame"] for r in finite[k_best:][::-1][:N_EXTREMES]]
    return s


def _fmt(v, digits=3, scale=1.0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v * scale:.{digits}f}"


def _mean(s: Dict, name: str):
    return (s.get(name) or {}).get("mean")


def summary_markdown(s: Dict) -> str:
    """The summary as Markdown: the papers' table layout, then the published variants, labelled."""
    run = s.get("run", {})
    label = run.get("label") or "model"
    steps = run.get("steps")
    steps_txt = "-" if steps in (None, "") else str(steps)
    t = s.get("time_per_scan")
    time_txt = "-" if not t or t.get("mean") is None else f"{t['mean']:.2f} s"
    iou = s.get("iou", {}).get("full", {})
    prf = s.get("prf", {}).get("auc", {})
    lines = [
        f"# Evaluation: {run.get('title', label)}",
        "",
        f"{s.get('frames', 0)} frames. {run.get('description', '')}".rstrip(),
        "",
        "| model | steps | CD [m] | JSD-BEV (Jensen-Shannon distance, as published) | EMD [m] (W1, ours) "
        "| EMD (published variant) | IoU 0.5 [%] | IoU 0.2 [%] | IoU 0.1 [%] | P [%] | R [%] | F [%] "
        "| time per scan |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| " + " | ".join([
            label, steps_txt, _fmt(_mean(s, "cd")), _fmt(_mean(s, "jsd_bev")), _fmt(_mean(s, "emd")),
            _fmt(_mean(s, "emd_published"), 2),
            _fmt((iou.get("0.5") or {}).get("iou"), 1, 100), _fmt((iou.get("0.2") or {}).get("iou"), 1, 100),
            _fmt((iou.get("0.1") or {}).get("iou"), 1, 100),
            _fmt(prf.get("precision"), 1, 100), _fmt(prf.get("recall"), 1, 100),
            _fmt(prf.get("fscore"), 1, 100), time_txt]) + " |",
        "",
        "Definitions: CD = 0.5 (mean_gt min_pred |g-p| + mean_pred min_gt |p-g|), metres. JSD-BEV = "
        "scipy `jensenshannon` (natural log) of the normalised bird's-eye occupancy of 0.5 m voxels "
        "over [-50, 50]^3 m: the Jensen-Shannon *distance*, which the papers call JSD. EMD (W1, ours) "
        "= Wasserstein-1 in metres between 0.5 m voxel masses (exact OT, or exact OT on merged voxels "
        "with a proven error bound). EMD (published variant) = Distillation-DPO's Sinkhorn with eps = "
        "0.001 and a 1e-9 kernel floor: not an optimal-transport distance (it tracks scene size), "
        "frames with > 130k voxels dropped. IoU over |x|,|y|,|z| <= 50 m with TP/FP/FN accumulated over "
        "frames. P/R/F = normalised area over thresholds 0.05-0.10 m (as published), mean over frames.",
        "",
        "## All metrics",
        "",
        "| metric | value | frames | undefined / dropped |",
        "|---|---|---|---|",
    ]
    names = [("cd", "CD [m]"), ("jsd_bev", "JSD-BEV (Jensen-Shannon distance, as published)"),
             ("jsd_3d", "JSD-3D (Jensen-Shannon distance, raw 200^3 counts)"),
             ("emd", "EMD [m] (Wasserstein-1, ours)"), ("emd_published", "EMD (published variant)")]
    for key, title in names:
        st = s.get(key)
        if not st:
            continue
        value = _fmt(st.get("mean"), 4)
        if st.get("std") is not None:
            value += f" (std {st['std']:.4f}, median {st['median']:.4f})"
        lines.append(f"| {title} | {value} | {st.get('frames', 0)} | {st.get('undefined', 0)} |")
    emd = s.get("emd") or {}
    if emd.get("methods"):
        lines.append(f"| EMD method per frame | {emd['methods']} (largest error bound "
                     f"{_fmt(emd.get('max_error_bound'), 3)} m) | | |")
    for ext, title in (("full", "IoU (full, |x|,|y|,|z| <= 50 m)"),
                       ("legacy", "IoU (legacy ScoreLiDAR / DDPO variant: +-25 / +-10 / +-5 m)")):
        vals = s.get("iou", {}).get(ext, {})
        txt = " / ".join(f"{_fmt((vals.get(_key(v)) or {}).get('iou'), 1, 100)} % @ {v:g} m"
                         for v in IOU_VOXEL_SIZES)
        lines.append(f"| {title} | {txt} | {s.get('frames', 0)} | |")
    for k, pr in s.get("prf", {}).items():
        title = "P / R / F (area 0.05-0.10 m, as published)" if k == "auc" else f"P / R / F @ {k} m"
        txt = " / ".join(f"{_fmt(pr.get(n), 1, 100)} %" for n in ("precision", "recall", "fscore"))
        lines.append(f"| {title} | {txt} | | |")
    if t and t.get("mean") is not None:
        lines.append(f"| time per scan [s] | {t['mean']:.3f} (median {t['median']:.3f}) | "
                     f"{t['frames']} | |")
        stages = s.get("stage_seconds_mean") or {}
        txt = ", ".join(f"{k} {v:.3f}" for k, v in stages.items() if k != "total" and v > 0)
        if txt:
            lines.append(f"| stage means [s] | {txt} | | |")
    ms = s.get("metric_seconds") or {}
    if ms.get("mean") is not None:
        lines.append(f"| metric computation per frame [s] | {ms['mean']:.2f} | | |")
    if s.get("failed_frames"):
        lines += ["", f"{len(s['failed_frames'])} frames could not be completed and are left out: "
                      f"{', '.join(map(str, s['failed_frames'][:20]))}"
                      f"{' ...' if len(s['failed_frames']) > 20 else ''} (see frames.jsonl)."]
    if s.get("best_frames"):
        lines += ["", f"Best frames by CD: {', '.join(map(str, s['best_frames']))}; worst: "
                      f"{', '.join(map(str, s['worst_frames']))}."]
    settings = {k: v for k, v in run.items() if k not in ("title", "description", "label")}
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- plots
def _figure(ncols: int = 1, nrows: int = 1, w: float = 7.0, h: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w * ncols, h * nrows), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def write_plots(records: Sequence[Dict], out, title: str = "") -> List[Path]:
    """cd_histogram.png and metrics_over_sequence.png (matplotlib, Agg, no display needed)."""
    out = Path(out)
    written = []
    cd = np.asarray([_num(r.get("cd")) for r in records])
    fig = _figure()
    ax = fig.subplots()
    ok = cd[np.isfinite(cd)]
    if ok.size:
        ax.hist(ok, bins=min(50, max(5, ok.size // 2)), color="tab:blue", edgecolor="white")
        ax.axvline(ok.mean(), color="tab:red", label=f"mean {ok.mean():.3f} m")
        ax.legend()
    ax.set_xlabel("Chamfer distance per frame [m]")
    ax.set_ylabel("frames")
    ax.set_title(f"{title} - per-frame CD ({ok.size} frames)".strip(" -"))
    fig.tight_layout()
    written.append(out / "cd_histogram.png")
    fig.savefig(written[-1])

    order = sorted(range(len(records)), key=lambda i: (records[i].get("index", i), str(records[i]["frame"])))
    x = np.asarray([records[i].get("index", i) for i in order])
    panels = [("cd", "CD [m]"), ("jsd_bev", "JSD-BEV (JS distance)"), ("emd", "EMD W1 [m]"),
              ("emd_published", "EMD (published variant)"), ("iou05", "IoU 0.5 m (frame)")]
    series = {}
    for key, _ in panels:
        if key == "iou05":
            vals = []
            for i in order:
                tp, fp, fn = records[i]["iou"]["full"]["0.5"] if "iou" in records[i] else (0, 0, 0)
                vals.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
            series[key] = np.asarray(vals)
        elif any(key in r for r in records):
            series[key] = np.asarray([_num(records[i].get(key)) for i in order])
    panels = [p for p in panels if p[0] in series]
    fig = _figure(1, len(panels), 10.0, 2.2)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, name) in zip(axes, panels):
        ax.plot(x, series[key], ".-", ms=3, lw=0.7)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("frame")
    axes[0].set_title(f"{title} - metrics over the sequence".strip(" -"))
    fig.tight_layout()
    written.append(out / "metrics_over_sequence.png")
    fig.savefig(written[-1])
    return written


def _render_frame(path: Path, frame: str, rank: str, pred, gt, inp, cd: float) -> Path:
    from .io import render_comparison_png
    clouds = {}
    if inp is not None:
        clouds["input scan"] = inp
    clouds["prediction"] = pred
    clouds["ground truth"] = gt
    return render_comparison_png(path, clouds, extent=50.0, views=("bev",), size=5.0, point_size=0.2,
                                 title=f"{rank}: frame {frame}, CD {cd:.3f} m")


# ------------------------------------------------------------------------------------- main loop
Predictor = Callable[[str, int, Optional[np.ndarray]], Tuple[np.ndarray, Dict]]


class _Extremes:
    """Keeps the predictions of the current best / worst frames by CD, to render them at the end."""

    def __init__(self, k: int = N_EXTREMES):
        self.k = k
        self.kept: Dict[str, np.ndarray] = {}
        self.scores: Dict[str, float] = {}

    def offer(self, frame: str, cd: float, pred: np.ndarray) -> None:
        if not math.isfinite(cd):
            return
        self.scores[frame] = cd
        ranked = sorted(self.scores, key=lambda f: (self.scores[f], f))
        keep = set(ranked[:self.k]) | set(ranked[-self.k:])
        if frame in keep:
            self.kept[frame] = pred
        for f in list(self.kept):
            if f not in keep:
                del self.kept[f]


def _check_run(out: Path, run: Dict, restart: bool) -> None:
    """run.json: the settings that change per-frame numbers must match those of the records."""
    path = out / RUN_FILE
    frames = out / FRAMES_FILE
    identity = {k: v for k, v in run.items() if k in run.get("identity_keys", ())}
    if restart:
        for p in (frames, path):
            if p.exists():
                p.unlink()
    if path.is_file() and frames.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        old_id = (old or {}).get("identity")
        if old_id is not None and old_id != _jsonable(identity):
            diff = sorted(k for k in set(old_id) | set(identity)
                          if old_id.get(k) != _jsonable(identity).get(k))
            raise ConfigError(
                f"{out} holds results of a different run (settings differ: {', '.join(diff)}); "
                "use another --out, or --restart to discard them")
    elif frames.is_file() and not path.is_file():
        raise ConfigError(f"{frames} exists without {RUN_FILE}: cannot tell which run produced it; "
                          "use another --out, or --restart to discard it")
    _write_json(path, {"identity": identity, "run": run})


def run_evaluation(keys: Sequence[str], load: Callable[[str], Tuple[Optional[np.ndarray], np.ndarray]],
                   predict: Predictor, out, run: Dict, emd: str = "both", plots: bool = True,
                   progress: bool = True, restart: bool = False, metric_workers: int = 1,
                   indices: Optional[Sequence[int]] = None) -> Dict:
    """The shared loop: frames ``keys`` in this order, ``load(key) -> (input or None, gt)``,
    ``predict(key, index, input) -> (cloud, timings)``. Appends to OUT/frames.jsonl (skipping frames
    already there), then writes summary.json, summary.md and the plots; returns the summary dict."""
    from tqdm import tqdm

    if emd not in EMD_MODES:
        raise ConfigError(f"emd: expected one of {', '.join(EMD_MODES)}, got {emd!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = dict(run, emd=emd)
    run.setdefault("identity_keys", [])
    run["identity_keys"] = sorted(set(run["identity_keys"]) | {"emd"})
    _check_run(out, run, restart)
    frames_path = out / FRAMES_FILE
    _repair_tail(frames_path)
    keys = list(keys)
    indices = list(indices) if indices is not None else list(range(len(keys)))
    index_of = dict(zip(keys, indices))
    wanted = set(keys)
    done = {str(r["frame"]): r for r in read_records(frames_path) if str(r["frame"]) in wanted}
    todo = [k for k in keys if k not in done]
    if done:
        log.info("resuming: %d of %d frames already in %s", len(done), len(keys), frames_path)
    extremes = _Extremes()
    new_records: List[Dict] = []
    pending: List[Tuple[str, Future, Dict, np.ndarray]] = []
    workers = max(1, int(metric_workers))

    def finish(item):
        key, fut, base, pred = item
        rec = dict(base)
        rec.update(fut.result())
        _append_record(frames_path, rec)
        new_records.append(_jsonable(rec))
        extremes.offer(key, _num(rec.get("cd")), pred)
        return rec

    bar = tqdm(total=len(keys), initial=len(done), desc=run.get("label", "evaluate"), unit="frame",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    cds = [_num(r.get("cd")) for r in done.values()]
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metrics") as pool:
            for key in todo:
                inp, gt = load(key)
                try:
                    pred, timings = predict(key, index_of[key], inp)
                except CloudFormatError as exc:       # e.g. a scan with too few valid points
                    log.warning("frame %s not evaluated: %s", key, exc)
                    rec = {"frame": key, "index": index_of[key], "error": str(exc)}
                    _append_record(frames_path, rec)
                    new_records.append(rec)
                    bar.update(1)
                    continue
                pred = np.asarray(pred, dtype=np.float32)
                base = {"frame": key, "index": index_of[key], "timings": timings}
                pending.append((key, pool.submit(frame_metrics, pred, gt, emd), base, pred))
                while len(pending) > workers:   # metrics of frame i overlap prediction of i+1
                    rec = finish(pending.pop(0))
                    cds.append(_num(rec.get("cd")))
                    bar.update(1)
                    ok = [c for c in cds if math.isfinite(c)]
                    if ok:
                        bar.set_postfix(cd=f"{np.mean(ok):.3f}")
            while pending:
                finish(pending.pop(0))
                bar.update(1)
    finally:
        bar.close()
    records = [done[k] if k in done else None for k in keys]
    by_key = {r["frame"]: r for r in new_records}
    records = [r if r is not None else by_key[k] for r, k in zip(records, keys)]
    summary = summarize(records, {k: v for k, v in run.items() if k != "identity_keys"})
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    if plots and records:
        try:
            summary["plots"] = [p.name for p in write_plots(records, out, run.get("title", ""))]
            summary["renders"] = _write_renders(summary, records, extremes, load, predict, index_of,
                                                out)
        except ImportError as exc:       # matplotlib missing: results stay valid
            log.warning("plots skipped: %s", exc)
        _write_json(out / "summary.json", summary)
    return summary


def _write_renders(summary, records, extremes, load, predict, index_of, out: Path) -> List[str]:
    by_frame = {str(r["frame"]): r for r in records}
    names = []
    for rank, frames in (("best", summary["best_frames"]), ("worst", summary["worst_frames"])):
        for n, frame in enumerate(frames, 1):
            inp, gt = load(frame)
            pred = extremes.kept.get(frame)
            if pred is None:        # computed by an earlier (resumed) run: recompute, same seed
                pred, _ = predict(frame, index_of[frame], inp)
            path = out / f"bev_{rank}{n}_{frame}.png"
            _render_frame(path, frame, f"{rank} {n}", pred, gt, inp, _num(by_frame[frame]["cd"]))
            names.append(path.name)
    return names


# --------------------------------------------------------------------------- evaluate a sequence

def evaluate_sequence(dataset_root, sequence="08", out="evaluation", checkpoint=None, completer=None,
                      baseline: Optional[str] = None, steps: Optional[int] = None,
                      guidance: Optional[float] = None, refine: bool = True,
                      limit: Optional[int] = None, every: int = 1, seed: int = 0,
                      device: str = "cpu", backend: str = "auto", cache_root=None,
                      build_gt: bool = False, emd: str = "both", plots: bool = True,
                      progress: bool = True, restart: bool = False, metric_workers: int = 1,
                      label: Optional[str] = None, process: Optional[str] = None) -> Dict:
    """Evaluate one SemanticKITTI-layout sequence and return the summary dict.

    The prediction comes from ``completer`` (a :class:`~lidar_completion.completer.Completer`), else
    from ``Completer.from_checkpoint(checkpoint, steps, guidance, refine, device, backend=...,
    process=...)`` (``process`` None: the checkpoint's solver process), or,
    with ``baseline="input"``, is the filtered input scan itself (no model). Ground truth: the
    evaluation targets of the data package's cache (``cache_root``, default DATASET_ROOT/gt_cache;
    ``build_gt=True`` builds a missing cache first). Frames ``0, every, 2 every, ...`` in order, at most
    ``limit``; frame ``i`` is completed with seed ``seed + i``.
    """
    from .data import EvaluationDataset

    if every < 1:
        raise ConfigError(f"every: expected a positive integer, got {every}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit: expected a positive integer, got {limit}")
    if baseline not in (None, "input"):
        raise ConfigError(f"baseline: expected 'input' or none, got {baseline!r}")
    if seed is None:
        seed = 0
    # n_fps=1: the dataset's farthest-point sampling is not needed here (the Completer does its own)
    ds = EvaluationDataset(dataset_root, [sequence], cache_root=cache_root, n_fps=1, tile=1,
                           build=build_gt)
    seq_id = ds.sequences[0].sequence
    frames = list(range(0, len(ds), every))
    if limit is not None:
        frames = frames[:limit]
    if not frames:
        raise DatasetError(f"sequence {seq_id} has no frames to evaluate")

    run: Dict = {"dataset": str(Path(dataset_root).resolve()), "sequence": seq_id, "seed": int(seed),
                 "every": every, "limit": limit}
    identity = ["dataset", "sequence", "seed", "source"]
    if baseline == "input":
        run.update(source="input scan (no model)", label=label or "input scan alone", steps=None)
        predict_fn = None
    else:
        if completer is None:
            from .completer import Completer
            completer = Completer.from_checkpoint(checkpoint, steps=steps, guidance=guidance,
                                                  refine=refine, device=device, backend=backend,
                                                  process=process)
        ckpt = None
        if checkpoint is not None:
            ckpt = {"path": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint)}
        run.update(source="completer", checkpoint=ckpt, steps=completer.steps,
                   guidance=completer.guidance, refine=completer.refine, process=completer.process,
                   device=str(completer.device), completer=repr(completer),
                   label=label or (Path(checkpoint).stem if checkpoint else "model"))
        identity += ["checkpoint", "steps", "guidance", "refine", "process"]
        predict_fn = completer.complete_detailed
    run["identity_keys"] = identity
    run["title"] = f"sequence {seq_id}, {run['label']}"
    run["description"] = ("Ground truth: the cached per-frame targets (z band -4..4.4 m, viewpoint "
                          "mask). Prediction: " + ("the filtered input scan itself."
                                                   if baseline == "input" else
                                                   f"{run['steps']} steps ({run['process']} solver), "
                                                   f"w={run['guidance']:g}, "
                                                   f"refine={run['refine']}, per-frame seed = "
                                                   f"{seed} + frame."))
    cache: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}

    def load(key: str):
        if key in cache:
            return cache[key]
        item = ds.sample(int(key), np.random.default_rng(0))   # eval: no randomness is drawn
        pair = (item["raw_scan"], item["target"])
        cache.clear()
        cache[key] = pair
        return pair

    def predict(key: str, index: int, inp):
        if predict_fn is None:
            return inp, {}
        res = predict_fn(inp, seed=int(seed) + int(index))
        return res.points, dict(res.timings, seed=res.seed)

    keys = [f"{f:06d}" for f in frames]
    return run_evaluation(keys, load, predict, out, run, emd=emd, plots=plots, progress=progress,
                          restart=restart, metric_workers=metric_workers, indices=frames)


# ------------------------------------------------------------------------------ evaluate files
def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def pair_files(pred_dir, gt_dir) -> List[Tuple[str, Path, Path]]:
    """(stem, prediction file, ground-truth file) for every stem present in both folders
    (.bin/.npy/.ply/.pcd), in natural order; raises DatasetError when nothing pairs."""
    found = []
    for d, what in ((Path(pred_dir), "prediction"), (Path(gt_dir), "ground-truth")):
        if not d.is_dir():
            raise DatasetError(f"{what} folder {d} does not exist or is not a folder")
        files: Dict[str, Path] = {}
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix.lower() in CLOUD_EXTS:
                if p.stem in files:
                    raise DatasetError(f"{d}: two clouds share the stem {p.stem!r} "
                                       f"({files[p.stem].name}, {p.name}); keep one")
                files[p.stem] = p
        found.append(files)
    pred, gt = found
    stems = sorted(set(pred) & set(gt), key=_natural)
    if not stems:
        raise DatasetError(f"no file stem is common to {pred_dir} ({len(pred)} clouds) and {gt_dir} "
                           f"({len(gt)} clouds); files are paired by name without extension")
    for name, only in (("prediction", set(pred) - set(gt)), ("ground truth", set(gt) - set(pred))):
        if only:
            log.warning("%d %s files have no partner and are skipped (e.g. %s)", len(only), name,
                        sorted(only, key=_natural)[0])
    return [(s, pred[s], gt[s]) for s in stems]


def evaluate_files(pred_dir, gt_dir, out, input_dir=None, limit: Optional[int] = None,
                   emd: str = "both", plots: bool = True, progress: bool = True,
                   restart: bool = False, metric_workers: int = 1, label: Optional[str] = None) -> Dict:
    """Evaluate completions made elsewhere: PRED_DIR and GT_DIR files paired by stem; the optional
    ``input_dir`` (same stems) only adds the input scan to the renders. Returns the summary dict."""
    from .io import read_cloud

    pairs = pair_files(pred_dir, gt_dir)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit: expected a positive integer, got {limit}")
        pairs = pairs[:limit]
    table = {s: (p, g) for s, p, g in pairs}
    inputs: Dict[str, Path] = {}
    if input_dir is not None:
        for p in Path(input_dir).iterdir():
            if p.is_file() and p.suffix.lower() in CLOUD_EXTS:
                inputs[p.stem] = p
    run = {"pred_dir": str(Path(pred_dir).resolve()), "gt_dir": str(Path(gt_dir).resolve()),
           "source": "files", "label": label or Path(pred_dir).name, "steps": None,
           "identity_keys": ["pred_dir", "gt_dir"]}
    run["title"] = f"{run['label']} (files)"
    run["description"] = f"Predictions from {pred_dir}, ground truth from {gt_dir}, paired by stem."

    def load(key: str):
        gt = read_cloud(table[key][1])
        inp = read_cloud(inputs[key]) if key in inputs else None
        return inp, gt

    def predict(key: str, index: int, inp):
        t0 = time.perf_counter()
        pred = read_cloud(table[key][0])
        return pred, {"read": time.perf_counter() - t0}

    return run_evaluation([s for s, _, _ in pairs], load, predict, out, run, emd=emd, plots=plots,
                          progress=progress, restart=restart, metric_workers=metric_workers)


def print_summary(summary: Dict, out, stream=None) -> None:
    """A few lines for the terminal after a run."""
    stream = stream or sys.stdout
    parts = [f"frames {summary.get('frames', 0)}"]
    for key, name in (("cd", "CD"), ("jsd_bev", "JSD-BEV"), ("emd", "EMD"),
                      ("emd_published", "EMD(published)")):
        if summary.get(key) and summary[key].get("mean") is not None:
            parts.append(f"{name} {summary[key]['mean']:.4f}")
    iou = summary.get("iou", {}).get("full", {}).get("0.5", {}).get("iou")
    if iou is not None:
        parts.append(f"IoU@0.5 {100 * iou:.1f}%")
    print(", ".join(parts), file=stream)
    print(f"results -> {Path(out) / 'summary.md'}", file=stream)

