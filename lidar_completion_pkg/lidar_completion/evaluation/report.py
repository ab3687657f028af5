"""The evaluation's report: the summary of per-frame records (``summary.json``), its Markdown table
(``summary.md``, the papers' layout), the plots and renders, and the lines printed after a run.

Aggregation follows the papers: CD, JSD, EMD and P/R/F are means of per-frame values (frames where a
metric is undefined, or dropped by the published EMD, are left out and counted); IoU accumulates
TP / FP / FN over all frames. Metric definitions: :mod:`lidar_completion.metrics`.

An empty prediction (0 points) of a non-empty target is a complete miss, not a frame without a score:
its recall and F-score are 0 and count in the means, its precision is undefined (no predicted point
to check; ``null`` in the record, left out of the precision mean), and CD, JSD and EMD, undefined for
an empty cloud, leave it out of their means. Such frames are counted (``empty_predictions``) next to
every mean they are missing from, and :func:`print_summary` warns about them.

A failed frame (its completion or its prediction file could not be made or read; the record holds
the ``error``) has no metric at all: ``frames`` counts the frames evaluated, ``failed_frames`` names
the failed ones, and the commands exit 1 when there are any.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..metrics import IOU_EXTENTS, IOU_VOXEL_SIZES, PRF_THRESHOLDS

__all__ = ["summarize", "summary_markdown", "write_plots", "render_frame", "print_summary", "jsonable",
           "N_EXTREMES", "score_empty_prediction", "is_empty_prediction"]

#: Best and worst frames by CD named in the summary and rendered.
N_EXTREMES = 3


def jsonable(obj):
    """NaN/inf -> None, numpy scalars/arrays -> Python, recursively."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def num(v) -> float:
    """A record's number (None -> NaN)."""
    return math.nan if v is None else float(v)


def _key(v: float) -> str:
    return f"{v:g}"


def _stats(values: Sequence[float]) -> Dict:
    a = np.asarray([num(v) for v in values], dtype=np.float64)
    ok = a[np.isfinite(a)]
    if ok.size == 0:
        return {"mean": None, "std": None, "median": None, "frames": 0, "undefined": int(a.size)}
    return {"mean": float(ok.mean()), "std": float(ok.std()), "median": float(np.median(ok)),
            "frames": int(ok.size), "undefined": int(a.size - ok.size)}


def is_empty_prediction(rec: Dict) -> bool:
    """Whether a frame's record scores an empty prediction (0 points) against a non-empty target."""
    return not rec.get("error") and rec.get("n_pred") == 0 and (rec.get("n_gt") or 0) > 0


def score_empty_prediction(rec: Dict) -> Dict:
    """``rec`` with the P/R/F of an empty prediction scored as a miss: recall 0 and F 0 (no target
    point is found), precision None (undefined: there is no predicted point to check). The metric
    functions return NaN for every value of an empty cloud; left so, the frame would drop out of the
    P/R/F means and a model that predicts nothing would look perfect. Records of other frames, and
    records already scored (e.g. read back on a resume), are returned unchanged."""
    if not is_empty_prediction(rec) or "prf" not in rec:
        return rec
    return dict(rec, empty_prediction=True, prf={k: [None, 0.0, 0.0] for k in rec["prf"]})


def summarize(records: Sequence[Dict], run: Optional[Dict] = None) -> Dict:
    """Aggregate per-frame records into the summary dict (also written as summary.json)."""
    # records of runs made before empty predictions were scored hold NaN P/R/F for them
    records = [score_empty_prediction(r) for r in records]
    empty = [r["frame"] for r in records if is_empty_prediction(r)]
    failed = [r["frame"] for r in records if r.get("error")]
    # "frames": the frames evaluated; a frame that failed (no completion, an unreadable prediction)
    # has no metric and is counted apart, in "failed_frames", not as evaluated
    s: Dict = {"run": dict(run or {}), "frames": len(records) - len(failed),
               "failed_frames": failed,
               "empty_predictions": {"count": len(empty), "frames": empty}}
    scored = [r for r in records if not r.get("error")]    # a failed frame is in no metric's count
    for name in ("cd", "jsd_bev", "jsd_3d", "emd", "emd_published"):
        if any(name in r for r in records):
            s[name] = _stats([r.get(name) for r in scored])
            # how many of the frames left out of this mean are empty predictions (undefined there)
            s[name]["empty_predictions"] = len(empty)
            # and which frames are left out for another reason (e.g. JSD: no point in its cube)
            s[name]["undefined_frames"] = [r["frame"] for r in scored if not math.isfinite(num(r.get(name)))
                                           and not is_empty_prediction(r)]
    methods: Dict[str, int] = {}
    for r in records:
        if r.get("emd_method"):
            methods[r["emd_method"]] = methods.get(r["emd_method"], 0) + 1
    if methods:
        s["emd"]["methods"] = methods
        s["emd"]["max_error_bound"] = max((num(r.get("emd_bound")) for r in records
                                           if r.get("emd_bound") is not None), default=0.0)
    if "emd_published" in s:
        # the frames the published code drops (> 130,000 voxels), not those undefined for an empty cloud
        s["emd_published"]["dropped_frames"] = sum(
            1 for r in scored if not math.isfinite(num(r.get("emd_published")))
            and r.get("n_pred") != 0 and r.get("n_gt") != 0)
    # IoU sums TP / FP / FN over the frames that have them: these are its frames
    s["iou_frames"] = sum(1 for r in records if "iou" in r)
    iou: Dict = {}
    for ext in IOU_EXTENTS:
        lacking = [r["frame"] for r in records if "iou" in r and ext not in r["iou"]]
        if lacking:      # a variant added since some of these frames were scored: not summed over part
            s.setdefault("iou_not_scored", {})[ext] = lacking
            continue
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
        vals = np.asarray([[num(x) for x in r["prf"][k]] for r in records if "prf" in r],
                          dtype=np.float64).reshape(-1, 3)
        means = [float(np.nanmean(col)) if np.isfinite(col).any() else None for col in vals.T]
        prf[k] = dict(zip(("precision", "recall", "fscore"), means))
        # frames in each mean: precision leaves out the empty predictions, recall and F count them
        prf[k]["frames"] = dict(zip(("precision", "recall", "fscore"),
                                    (int(np.isfinite(col).sum()) for col in vals.T)))
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
    finite = [r for r in records if r.get("cd") is not None and math.isfinite(num(r["cd"]))]
    finite.sort(key=lambda r: (num(r["cd"]), str(r["frame"])))
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


# why a metric is undefined on a frame whose clouds are not empty (empty predictions are counted apart)
UNDEFINED_WHY = {"jsd_bev": ": no point of the prediction or of the target inside the +-50 m cube",
                 "jsd_3d": ": no point of the prediction or of the target inside the +-50 m cube"}


def _frame_list(frames: Sequence, most: int = 10) -> str:
    return ", ".join(map(str, frames[:most])) + (" ..." if len(frames) > most else "")


def empty_prediction_note(s: Dict) -> str:
    """One sentence on the frames whose prediction was empty ("" when there are none)."""
    empty = (s.get("empty_predictions") or {}).get("frames") or []
    if not empty:
        return ""
    names = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
    return (f"{len(empty)} of {s.get('frames', 0)} frames had an empty prediction (0 points: {names}); "
            "recall and F count them as 0, precision, CD, JSD and EMD are undefined for an empty "
            "cloud and leave them out of their means")


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
    failed = s.get("failed_frames") or []
    counted = f"{s.get('frames', 0)} frames evaluated" + (
        f", {len(failed)} failed (left out, listed below)" if failed else "")
    lines = [
        f"# Evaluation: {run.get('title', label)}",
        "",
        f"{counted}. {run.get('description', '')}".rstrip(),
        "",
        "| model | steps | CD [m] | JSD-BEV (Jensen-Shannon distance, as published) | EMD [m] (W1, ours) "
        "| EMD (published variant) | IoU 0.5 [%] (±50 m) | IoU 0.2 [%] (±50 m) | IoU 0.1 [%] (±50 m) "
        "| P [%] | R [%] | F [%] "
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
    ]
    note = empty_prediction_note(s)
    if note:
        lines += [f"**Warning: {note}.**", ""]
    lines += [
        "Definitions: CD = 0.5 (mean_gt min_pred |g-p| + mean_pred min_gt |p-g|), metres. JSD-BEV = "
        "scipy `jensenshannon` (natural log) of the normalised bird's-eye occupancy of 0.5 m voxels "
        "over [-50, 50]^3 m: the Jensen-Shannon *distance*, which the papers call JSD. EMD (W1, ours) "
        "= Wasserstein-1 in metres between 0.5 m voxel masses (exact OT, or exact OT on merged voxels "
        "with a proven error bound). EMD (published variant) = Distillation-DPO's Sinkhorn with eps = "
        "0.001 and a 1e-9 kernel floor: not an optimal-transport distance (it tracks scene size), "
        "frames with > 130k voxels dropped. IoU (±50 m) over the voxels round(p / v) whose centre lies "
        "within |x|,|y|,|z| <= 50 m, TP/FP/FN accumulated over frames; the variant of the published "
        "tables (LiDiff's code of 2024, ScoreLiDAR, Distillation-DPO), which only covers ±25 / ±10 / "
        "±5 m, is under All metrics.  P/R/F = normalised area over thresholds 0.05-0.10 m (as published), mean over frames.",
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
        undefined = str(st.get("undefined", 0))
        if st.get("empty_predictions"):
            undefined += f" (of which {st['empty_predictions']} empty predictions)"
        if st.get("dropped_frames"):
            undefined += f" (of which {st['dropped_frames']} dropped: > 130k voxels)"
        if st.get("undefined_frames"):
            undefined += f" (frames {_frame_list(st['undefined_frames'])}{UNDEFINED_WHY.get(key, '')})"
        lines.append(f"| {title} | {value} | {st.get('frames', 0)} | {undefined} |")
    emd = s.get("emd") or {}
    if emd.get("methods"):
        lines.append(f"| EMD method per frame | {emd['methods']} (largest error bound "
                     f"{_fmt(emd.get('max_error_bound'), 3)} m) | | |")
    # "|" inside a table cell must be escaped, or Markdown splits the row there
    for ext, title in (("full", r"IoU (full: voxel centres within \|x\|, \|y\|, \|z\| <= 50 m)"),
                       ("legacy", "IoU (legacy: the published tables' variant, LiDiff 2024 / ScoreLiDAR / "
                                  "DDPO code: +-25 / +-10 / +-5 m)"),
                       ("lidiff2025", "IoU (LiDiff's code since June 2025: coordinates binned over "
                                      "[-50, 50]^3 m)")):
        if ext not in s.get("iou", {}):
            lacking = (s.get("iou_not_scored") or {}).get(ext)
            if lacking:   # say why the row has no value rather than leave it out unexplained
                lines.append(f"| {title} | not summed: {len(lacking)} frame{'' if len(lacking) == 1 else 's'} "
                             f"({_frame_list(lacking)}) were scored before this variant existed; "
                             "evaluate again with --restart | | |")
            continue
        vals = s.get("iou", {}).get(ext, {})
        txt = " / ".join(f"{_fmt((vals.get(_key(v)) or {}).get('iou'), 1, 100)} % @ {v:g} m"
                         for v in IOU_VOXEL_SIZES)
        lines.append(f"| {title} | {txt} | {s.get('iou_frames', s.get('frames', 0))} | |")
    for k, pr in s.get("prf", {}).items():
        title = "P / R / F (area 0.05-0.10 m, as published)" if k == "auc" else f"P / R / F @ {k} m"
        txt = " / ".join(f"{_fmt(pr.get(n), 1, 100)} %" for n in ("precision", "recall", "fscore"))
        counts = pr.get("frames") or {}
        frames = " / ".join(str(counts.get(n, "-")) for n in ("precision", "recall", "fscore")) \
            if counts else ""
        lines.append(f"| {title} | {txt} | {frames} | |")
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
        lines += ["", f"{len(s['failed_frames'])} frames could not be completed (or their prediction "
                      "read) and are left out: "
                      f"{', '.join(map(str, s['failed_frames'][:20]))}"
                      f"{' ...' if len(s['failed_frames']) > 20 else ''} (see frames.jsonl)."]
    if s.get("best_frames"):
        lines += ["", f"Best frames by CD: {', '.join(map(str, s['best_frames']))}; worst: "
                      f"{', '.join(map(str, s['worst_frames']))}."]
    # (the ground-truth files without a prediction are named in the description, at most ten)
    settings = {k: v for k, v in run.items()
                if k not in ("title", "description", "label", "gt_without_prediction")}
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))]
    return "\n".join(lines) + "\n"


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
    cd = np.asarray([num(r.get("cd")) for r in records])
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
            series[key] = np.asarray([num(records[i].get(key)) for i in order])
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


def render_frame(path: Path, frame: str, rank: str, pred, gt, inp, cd: float) -> Path:
    from ..io import render_comparison_png
    clouds = {}
    if inp is not None:
        clouds["input scan"] = inp
    clouds["prediction"] = pred
    clouds["ground truth"] = gt
    return render_comparison_png(path, clouds, extent=50.0, views=("bev",), size=5.0, point_size=0.2,
                                 title=f"{rank}: frame {frame}, CD {cd:.3f} m")


def print_summary(summary: Dict, out, stream=None) -> None:
    """A few lines for the terminal after a run."""
    stream = stream or sys.stdout
    n_empty = (summary.get("empty_predictions") or {}).get("count", 0)
    failed = summary.get("failed_frames") or []
    parts = [f"frames {summary.get('frames', 0)}" + (f" evaluated, {len(failed)} failed" if failed else "")]
    for key, name in (("cd", "CD"), ("jsd_bev", "JSD-BEV"), ("emd", "EMD"),
                      ("emd_published", "EMD(published)")):
        st = summary.get(key) or {}
        if key == "cd" and st and n_empty:    # the mean is over the other frames: say so beside it
            mean = "-" if st.get("mean") is None else f"{st['mean']:.4f}"
            n = st.get("frames", 0)
            parts.append(f"CD {mean} (over {n} frame{'' if n == 1 else 's'}; {n_empty} with an empty "
                         "prediction left out)")
        elif st.get("mean") is not None:
            parts.append(f"{name} {st['mean']:.4f}")
    iou = summary.get("iou", {}).get("full", {}).get("0.5", {}).get("iou")
    if iou is not None:
        parts.append(f"IoU@0.5 {100 * iou:.1f}%")
    fscore = summary.get("prf", {}).get("auc", {}).get("fscore")
    if n_empty and fscore is not None:   # the headline number that does count the empty frames
        parts.append(f"F {100 * fscore:.1f}%")
    print(", ".join(parts), file=stream)
    if n_empty:
        print(f"warning: {empty_prediction_note(summary)}", file=sys.stderr)
    for key, name in (("cd", "CD"), ("jsd_bev", "JSD-BEV"), ("jsd_3d", "JSD-3D"), ("emd", "EMD")):
        other = (summary.get(key) or {}).get("undefined_frames") or []
        if other:   # left out of the mean printed above, not as empty predictions: name them
            print(f"warning: {name} is undefined on {len(other)} frame{'' if len(other) == 1 else 's'} "
                  f"({_frame_list(other)}){UNDEFINED_WHY.get(key, '')}; its mean is over the others",
                  file=sys.stderr)
    missing = (summary.get("run") or {}).get("gt_without_prediction") or []
    if missing:
        print(f"warning: {len(missing)} ground-truth file{'' if len(missing) == 1 else 's'} had no "
              f"prediction and {'is' if len(missing) == 1 else 'are'} not in the means "
              f"({_frame_list(missing)})", file=sys.stderr)
    for ext, lacking in (summary.get("iou_not_scored") or {}).items():
        print(f"warning: IoU '{ext}' is not in the summary: {len(lacking)} frame"
              f"{'' if len(lacking) == 1 else 's'} ({_frame_list(lacking)}) were scored before it "
              "existed; --restart scores every frame again", file=sys.stderr)
    print(f"results -> {Path(out) / 'summary.md'}", file=stream)
