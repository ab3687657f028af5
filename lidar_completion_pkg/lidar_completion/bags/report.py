"""Benchmark reports: report.json, report.md, PNG plots (matplotlib Agg) and the one-line summary.

A report is a plain dict (JSON-serialisable) built by the offline bench or the live bench; every input
scan appears in ``scans`` with ``status`` "completed" or "dropped" (and a ``reason`` when dropped), so
``completed + dropped == total`` always holds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

REPORT_JSON, REPORT_MD = "report.json", "report.md"
PLOT_LATENCY_HIST = "latency_hist.png"
PLOT_OVER_TIME = "latency_memory_over_time.png"
PLOT_POINTS = "points_in_out.png"


def stats(values: Iterable[float]) -> dict:
    """n, mean, min, p50, p95, max of finite values (NaN entries when there are none)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        nan = float("nan")
        return {"n": 0, "mean": nan, "min": nan, "p50": nan, "p95": nan, "max": nan}
    return {"n": int(arr.size), "mean": float(arr.mean()), "min": float(arr.min()),
            "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "max": float(arr.max())}


MIN_GROWTH_SPAN_S = 10.0


def growth_per_min(samples: Sequence[tuple[float, float]], min_span: float = MIN_GROWTH_SPAN_S) -> float:
    """Memory growth in MB per minute: the least-squares slope of (t_s, mb) samples over the second
    half of the run, so that warm-up (allocator pools, lazy initialisation) does not count as
    growth. NaN for runs shorter than ``min_span`` seconds, where a slope says nothing."""
    if len(samples) < 2:
        return float("nan")
    t = np.asarray([s[0] for s in samples], dtype=np.float64)
    m = np.asarray([s[1] for s in samples], dtype=np.float64)
    if t.max() - t.min() < min_span:
        return float("nan")
    late = t >= t.min() + (t.max() - t.min()) / 2
    if late.sum() < 2:
        return float("nan")
    slope = np.polyfit(t[late], m[late], 1)[0]
    return float(slope * 60.0)


def drop_reasons(scans: Sequence[dict]) -> dict:
    out: dict[str, int] = {}
    for s in scans:
        if s["status"] != "completed":
            out[s.get("reason") or "unknown"] = out.get(s.get("reason") or "unknown", 0) + 1
    return out


def summary_line(report: dict) -> str:
    """``p50_ms=<x> p95_ms=<y> dropped=<n>/<total>`` (the last line the CLI prints)."""
    lat = report["latency_ms"]
    return (f"p50_ms={_fmt(lat['p50'])} p95_ms={_fmt(lat['p95'])} "
            f"dropped={report['dropped']}/{report['total']}")


def _fmt(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "nan"
    return f"{x:.{digits}f}"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _show(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _setting(value) -> str:
    """A setting of the run as report.md shows it (None: the checkpoint's or the library's default)."""
    return "default" if value is None else str(value)


def warmup_text(report: dict) -> str | None:
    """The warm-up as the report states it (None when the report has no warm-up entry)."""
    warm = report.get("warmup")
    if warm is None:
        return None
    if warm.get("by") == "node":
        if _finite(warm.get("seconds")):
            return (f"{_fmt(warm['seconds'], 2)} s (the node's: one synthetic scan before it subscribed; "
                    "not in the statistics)")
        return "none reported by the node (its warmup parameter is false, or the warm-up failed: node.log)"
    if not warm.get("enabled"):
        return "off (--no-warmup): the first scan's one-time costs are in the statistics"
    if warm.get("error"):
        return f"failed ({warm['error']}): the first completed scan's one-time costs are in the statistics"
    return (f"{_fmt(warm['seconds'], 2)} s (scan {warm['scan']} completed once before timing; not in "
            "the statistics)")


def node_counters_text(live: dict) -> str:
    """The node's /diagnostics counters of a live report, with their age when they may be stale
    (the last /diagnostics before the end did not count every scan yet)."""
    counters = live.get("node_counters")
    if not counters:
        return "n/a"
    text = ", ".join(f"{k} {v}" for k, v in counters.items())
    if live.get("node_counters_current", True):
        return text
    age = live.get("node_counters_age_s")
    when = f"as of {age:.1f} s before the end" if _finite(age) else "of unknown age"
    return f"{text} ({when}: no later /diagnostics arrived, so the last scans may be missing)"


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def markdown(report: dict) -> str:
    mode = report["mode"]
    lat, mem = report["latency_ms"], report.get("memory", {})
    lines = [f"# Bag benchmark ({mode})", ""]
    lines += ["| | |", "|---|---|"]
    rows = [("bag", f"`{report['bag']}`"), ("topic", f"`{report['topic']}`"),
            ("checkpoint", f"`{report.get('checkpoint') or 'default'}`"),
            ("steps", _show(report.get("steps"))), ("guidance", _show(report.get("guidance"))),
            ("budget", ", ".join(f"{k} {_setting(report.get(k))}"
                                 for k in ("n_fps", "tile", "refine", "backend", "seed", "threads"))),
            ("device", report.get("device")),
            ("scans", report["total"]), ("completed", report["completed"]),
            ("dropped", f"{report['dropped']} ({_fmt(100.0 * report['drop_rate'])} %)"),
            ("throughput", f"{_fmt(report['throughput_hz'], 2)} scans/s")]
    if report.get("interrupted"):
        rows.append(("interrupted", f"yes: stopped after {report['total']} scan(s), which the figures "
                                    "cover"))
    if warmup_text(report) is not None:
        rows.append(("warm-up", warmup_text(report)))
    if mode == "live":
        live = report["live"]
        paced = ", paced: each scan after the node answered the previous" if live.get("paced") else ""
        rows += [("replay rate", f"{live['rate']}x{paced} ({_fmt(live['input_hz'], 2)} Hz input)"),
                 ("node keeps up", ("yes" if live["keeps_up"] else "no") + (
                     f" ({_fmt(report['throughput_hz'], 2)} scans/s sustained against the drive's "
                     f"{_fmt(live.get('drive_hz'), 1)} Hz)" if live.get("paced") else "")),
                 ("node counters (/diagnostics)", node_counters_text(live)),
                 ("no output, not explained by the node", live.get("unexplained_missing")),
                 ("node ready after", f"{_fmt(live.get('ready_s'), 2)} s")]
    rows += [("peak RSS", f"{_fmt(mem.get('peak_rss_mb'))} MB ({mem.get('process', 'this process')})"),
             ("RSS start / end", f"{_fmt(mem.get('start_rss_mb'))} / {_fmt(mem.get('end_rss_mb'))} MB"),
             ("RSS growth (second half of the run)",
              f"{_fmt(mem.get('growth_mb_per_min'), 2)} MB/min" if _finite(mem.get("growth_mb_per_min"))
              else f"n/a (runs shorter than {MIN_GROWTH_SPAN_S:.0f} s)")]
    if mem.get("gpu_peak_mb") is not None:
        rows.append(("peak GPU memory", f"{_fmt(mem['gpu_peak_mb'])} MB"))
    lines += [f"| {k} | {v} |" for k, v in rows]
    what = "end-to-end (decode, complete, encode)" if mode == "offline" else "publish-to-receipt"
    lines += ["", f"## Latency, {what} [ms]", "", "| | n | mean | p50 | p95 | max |",
              "|---|---|---|---|---|---|",
              f"| total | {lat['n']} | {_fmt(lat['mean'])} | {_fmt(lat['p50'])} | {_fmt(lat['p95'])} "
              f"| {_fmt(lat['max'])} |"]
    for stage, s in (report.get("stages_ms") or {}).items():
        lines.append(f"| {stage} | {s['n']} | {_fmt(s['mean'])} | {_fmt(s['p50'])} | {_fmt(s['p95'])} "
                     f"| {_fmt(s['max'])} |")
    if report.get("drop_reasons"):
        lines += ["", "## Dropped scans", ""]
        lines += [f"- {reason}: {n}" for reason, n in report["drop_reasons"].items()]
    if report.get("bag_problems"):
        lines += ["", "## Bag problems", ""]
        lines += [f"- {p}" for p in report["bag_problems"]]
    lines += ["", "## Plots", "", f"![latency histogram]({PLOT_LATENCY_HIST})",
              f"![latency and memory over time]({PLOT_OVER_TIME})", f"![points in vs out]({PLOT_POINTS})",
              "", "`" + summary_line(report) + "`", ""]
    return "\n".join(lines)


def plot_all(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    scans = report["scans"]
    done = [s for s in scans if s["status"] == "completed"]
    lost = [s for s in scans if s["status"] != "completed"]
    what = "end-to-end" if report["mode"] == "offline" else "publish-to-receipt"
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    lat = [s["latency_ms"] for s in done]
    if lat:
        ax.hist(lat, bins=min(30, max(5, len(lat))), color="tab:blue", alpha=0.8)
        for q, style in (("p50", "--"), ("p95", ":")):
            ax.axvline(report["latency_ms"][q], color="k", linestyle=style,
                       label=f"{q} {report['latency_ms'][q]:.1f} ms")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no completed scans", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"{what} latency [ms]")
    ax.set_ylabel("scans")
    ax.set_title(f"Latency ({report['completed']}/{report['total']} completed)")
    fig.tight_layout()
    paths.append(out_dir / PLOT_LATENCY_HIST)
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    timed = [s for s in done if s.get("t_s") is not None]
    ax1.plot([s["t_s"] for s in timed], [s["latency_ms"] for s in timed], ".-", label="completed")
    drops = [s for s in lost if s.get("t_s") is not None]
    if drops:
        ax1.plot([s["t_s"] for s in drops], [0.0] * len(drops), "rx", label="dropped")
    ax1.set_ylabel(f"{what} [ms]")
    ax1.legend(loc="upper right")
    mem = report.get("memory_samples") or []
    ax2.plot([m[0] for m in mem], [m[1] for m in mem], "-", color="tab:green")
    ax2.set_ylabel(f"RSS [MB] ({report.get('memory', {}).get('process', 'process')})")
    ax2.set_xlabel("time since start [s]")
    fig.tight_layout()
    paths.append(out_dir / PLOT_OVER_TIME)
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    idx = [s["index"] for s in scans]
    ax.plot(idx, [s.get("points_in") or 0 for s in scans], "o-", label="points in")
    ax.plot([s["index"] for s in done], [s.get("points_out") or 0 for s in done], "s-", label="points out")
    ax.set_xlabel("scan index")
    ax.set_ylabel("points")
    ax.legend()
    ax.set_title("Points in vs out")
    fig.tight_layout()
    paths.append(out_dir / PLOT_POINTS)
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


#: What a live run writes into its report folder besides the report: its events and the node's log.
LIVE_EVENTS, NODE_LOG = "live_events.json", "node.log"
LIVE_FILES = (LIVE_EVENTS, NODE_LOG)


def write_report(report: dict, out_dir) -> dict:
    """Write report.json, report.md and the three PNG plots into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if report.get("mode") == "offline":
        # a live run's own files, left by an earlier run into the same folder, would sit beside an
        # offline report that they do not belong to
        for name in LIVE_FILES:
            (out_dir / name).unlink(missing_ok=True)
    plots = plot_all(report, out_dir)
    (out_dir / REPORT_JSON).write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    (out_dir / REPORT_MD).write_text(markdown(report))
    return {"json": out_dir / REPORT_JSON, "md": out_dir / REPORT_MD, "plots": plots}


def finish(report: dict) -> dict:
    """Fill the summary fields shared by both modes from ``report['scans']``."""
    scans = report["scans"]
    completed = sum(1 for s in scans if s["status"] == "completed")
    report["total"] = len(scans)
    report["completed"] = completed
    report["dropped"] = len(scans) - completed
    report["drop_rate"] = (report["dropped"] / len(scans)) if scans else 0.0
    report["latency_ms"] = stats(s["latency_ms"] for s in scans if s["status"] == "completed")
    report["drop_reasons"] = drop_reasons(scans)
    return report
