"""The evaluation loop and its resumable store.

:func:`run_evaluation` takes frames in a fixed order from a *source* (``load(key) -> (input or None,
ground truth)``) and a *predictor* (``predict(key, index, input) -> (cloud, timings)``), computes
each frame's metrics (:func:`lidar_completion.metrics.frame_metrics`) on worker threads while the
next frame is predicted (``metric_workers=0``: after it, so that the timed completions run alone),
and appends each record to ``OUT/frames.jsonl`` as soon as it is known
(:class:`RunStore`). An interrupted run resumes where it stopped: frames already in the file are
skipped, provided the settings that change per-frame numbers (``OUT/run.json``) match; a folder
whose run.json lacks one of them (written by an earlier version) is refused, not guessed at. A
prediction that is not a finite cloud is recorded as a failed frame; an empty one is scored
(:func:`~.report.score_empty_prediction`).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CloudFormatError, ConfigError, EmptyFrameError
from ..fileutil import JsonlWriter, atomic_write, atomic_write_json, hold_folder, read_jsonl, release_folder
from ..metrics import EMD_MODES, frame_metrics
from ..settings import BY_NAME
from .report import (N_EXTREMES, jsonable, num, render_frame, score_empty_prediction, summarize,
                     summary_markdown, write_plots)

__all__ = ["EvalOptions", "RunStore", "run_evaluation", "read_records", "FRAMES_FILE", "RUN_FILE",
           "Predictor"]

log = logging.getLogger(__name__)

FRAMES_FILE = "frames.jsonl"
RUN_FILE = "run.json"
Predictor = Callable[[str, int, Optional[np.ndarray]], Tuple[np.ndarray, Dict]]


@dataclass(frozen=True)
class EvalOptions:
    """How an evaluation runs (what is evaluated is the source's and the settings' business).

    ``limit``: at most this many frames (after ``every``); ``every``: every K-th frame; ``seed``: frame
    i is completed with ``seed + i``; ``emd``: which EMDs (``metrics.EMD_MODES``); ``plots``: PNG plots
    and renders; ``progress``: a progress bar; ``restart``: discard the records already in OUT;
    ``metric_workers``: threads computing metrics while the next frame is completed, or 0: each
    frame's metrics are computed after its completion, before the next one starts (the time per scan
    is then the completion's alone; with threads, on a machine of few cores, it includes the CPU
    the metrics take from it); ``label``: the model's name in the table.
    """
    limit: Optional[int] = None
    every: int = 1
    seed: int = 0
    emd: str = "both"
    plots: bool = True
    progress: bool = True
    restart: bool = False
    metric_workers: int = 1
    label: Optional[str] = None

    def __post_init__(self):
        for name in ("every", "metric_workers") + (("limit",) if self.limit is not None else ()):
            value = getattr(self, name)
            low = 0 if name == "metric_workers" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.emd not in EMD_MODES:
            raise ConfigError(f"emd: expected one of {', '.join(EMD_MODES)}, got {self.emd!r}")
        seed = 0 if self.seed is None else int(self.seed)
        BY_NAME["seed"].check(seed)        # the seeds a Completer (and `complete --seed`) accepts
        object.__setattr__(self, "seed", seed)


def read_records(path) -> List[Dict]:
    """Per-frame records of a ``frames.jsonl``; a line torn by a kill is ignored."""
    return [rec for rec in read_jsonl(path) if "frame" in rec]


class RunStore:
    """``OUT/frames.jsonl`` (one record per frame, appended and fsync'ed as it is computed) and
    ``OUT/run.json`` (the settings the records were computed with)."""

    def __init__(self, out, run: Dict, restart: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.frames = self.out / FRAMES_FILE
        self._check(run, restart)
        self._writer = JsonlWriter(self.frames, durable=True, sort_keys=True)

    def _check(self, run: Dict, restart: bool) -> None:
        """The settings that change per-frame numbers must match those of the records in OUT."""
        path = self.out / RUN_FILE
        identity = {k: v for k, v in run.items() if k in run.get("identity_keys", ())}
        if restart:      # the records and every output made from them
            for p in (self.frames, path, *(self.out / n for n in REPORT_FILES), *stale_renders(self.out)):
                if p.exists():
                    p.unlink()
        if path.is_file() and self.frames.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = None
            old_id = (old or {}).get("identity")
            new_id = jsonable(identity)
            if old_id is not None and old_id != new_id:
                diff = sorted(k for k in set(old_id) | set(new_id) if old_id.get(k) != new_id.get(k))
                # A setting the earlier run did not record cannot be assumed to have had today's
                # default (an old run made with --n-fps 200 recorded no n_fps): such folders are
                # refused rather than resumed into, so two settings never mix in one summary.
                missing = sorted(k for k in new_id if k not in old_id)
                why = (f"; {', '.join(missing)} not recorded there (written by an earlier version), "
                       "so its results cannot be matched to this run" if missing else "")
                raise ConfigError(
                    f"{self.out} holds results of a different run (settings differ: {', '.join(diff)}"
                    f"{why}); use another --out, or --restart to discard them")
        elif self.frames.is_file() and not path.is_file():
            raise ConfigError(f"{self.frames} exists without {RUN_FILE}: cannot tell which run produced "
                              "it; use another --out, or --restart to discard it")
        atomic_write_json(path, jsonable({"identity": identity, "run": run}), indent=2, sort_keys=True)

    def records(self, keys: Sequence[str]) -> Dict[str, Dict]:
        """The records already stored for ``keys``, by frame."""
        wanted = set(keys)
        return {str(r["frame"]): r for r in read_records(self.frames) if str(r["frame"]) in wanted}

    def append(self, rec: Dict) -> Dict:
        rec = jsonable(rec)
        self._writer.write(rec)
        return rec

    def write_summary(self, summary: Dict) -> None:
        atomic_write_json(self.out / "summary.json", jsonable(summary), indent=2, sort_keys=True)

    def close(self) -> None:
        self._writer.close()


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


def run_evaluation(keys: Sequence[str], load: Callable[[str], Tuple[Optional[np.ndarray], np.ndarray]],
                   predict: Predictor, out, run: Dict, options: EvalOptions = EvalOptions(),
                   indices: Optional[Sequence[int]] = None,
                   signature: Optional[Callable[[str], Dict]] = None) -> Dict:
    """The shared loop: frames ``keys`` in this order, ``load(key) -> (input or None, gt)``,
    ``predict(key, index, input) -> (cloud, timings)``. Appends to OUT/frames.jsonl (skipping frames
    already there), then writes summary.json, summary.md and the plots; returns the summary dict.
    ``options``: emd, plots, progress, restart and metric_workers apply here. ``signature(key)``
    (optional) describes the files a frame was read from; it is stored with the frame's record, and
    a stored record whose signature differs from the frame's now is computed again. One evaluation
    writes into OUT at a time (ConfigError for a second one, before it reads or deletes anything)."""
    keys = list(keys)
    indices = list(indices) if indices is not None else list(range(len(keys)))
    if indices:
        # frame i is completed with seed + i: the last frame's seed must be one the Completer takes
        # (and the one frames.jsonl records must be one `complete --seed` can be given back)
        last = options.seed + max(indices)
        high = BY_NAME["seed"].range[1]
        if last > high:
            raise ConfigError(f"seed {options.seed}: frame {max(indices)} would be completed with seed "
                              f"{last}, above {high}; give a seed <= {high - max(indices)}")
    held = hold_folder(out, "evaluation")      # (after the checks: a refused run leaves no folder)
    try:
        return _run_evaluation(keys, load, predict, out, run, options, indices, signature)
    finally:
        release_folder(held)


def _run_evaluation(keys, load, predict, out, run: Dict, options: EvalOptions, indices, signature) -> Dict:
    from ..progress import progress_bar

    # metric_workers changes no frame's numbers, only what its time per scan includes
    run = dict(run, emd=options.emd, metric_workers=options.metric_workers)
    run["identity_keys"] = sorted(set(run.get("identity_keys", [])) | {"emd"})
    store = RunStore(out, run, options.restart)
    index_of = dict(zip(keys, indices))
    done = store.records(keys)
    signatures = {k: jsonable(signature(k)) for k in keys} if signature is not None else {}
    changed = [k for k in done if k in signatures and done[k].get("files") != signatures[k]]
    for k in changed:
        del done[k]
    if changed:
        log.info("%d frame(s) scored before have other files now (size or modification time), "
                 "scored again: %s", len(changed), ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""))
    todo = [k for k in keys if k not in done]
    if done:
        log.info("resuming: %d of %d frames already in %s", len(done), len(keys), store.frames)
    extremes = _Extremes()
    new_records: List[Dict] = []
    pending: List[Tuple[str, Future, Dict, np.ndarray]] = []
    workers = options.metric_workers

    def tagged(key) -> Dict:
        return {"files": signatures[key]} if key in signatures else {}

    def fail(key, exc):
        log.warning("frame %s not evaluated: %s", key, exc)
        rec = store.append(dict({"frame": key, "index": index_of[key], "error": str(exc)}, **tagged(key)))
        new_records.append(rec)
        return rec

    def serially(fn, *args) -> Future:
        """``fn(*args)`` computed now, as a finished Future (``metric_workers=0``)."""
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:      # raised again by finish(), as from a worker thread
            fut.set_exception(exc)
        return fut

    def finish(item):
        key, fut, base, pred = item
        try:
            metrics = fut.result()
        except CloudFormatError as exc:   # a cloud the metrics refuse: that frame fails, not the run
            return fail(key, CloudFormatError(f"frame {key}: {exc}"))
        rec = store.append(score_empty_prediction(dict(base, **metrics)))
        new_records.append(rec)
        extremes.offer(key, num(rec.get("cd")), pred)
        return rec

    bar = progress_bar(total=len(keys), initial=len(done), desc=run.get("label", "evaluate"),
                       unit="frame", disable=not options.progress, dynamic_ncols=True, file=sys.stderr)
    cds = [num(r.get("cd")) for r in done.values()]
    try:
        with ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="metrics") as pool:
            submit = pool.submit if workers else serially
            for key in todo:
                try:
                    inp, gt = load(key)
                except EmptyFrameError as exc:   # this frame has nothing to score: the frame fails
                    fail(key, exc)
                    bar.update(1)
                    continue
                try:
                    pred, timings = predict(key, index_of[key], inp)
                    pred = _checked_prediction(pred)
                except CloudFormatError as exc:       # e.g. a scan with too few valid points
                    fail(key, exc)
                    bar.update(1)
                    continue
                base = dict({"frame": key, "index": index_of[key], "timings": timings}, **tagged(key))
                pending.append((key, submit(frame_metrics, pred, gt, options.emd), base, pred))
                # metrics of frame i overlap the prediction of i+1 (none pending with 0 workers)
                while len(pending) > workers:
                    rec = finish(pending.pop(0))
                    cds.append(num(rec.get("cd")))
                    bar.update(1)
                    ok = [c for c in cds if math.isfinite(c)]
                    if ok:
                        bar.set_postfix(cd=f"{np.mean(ok):.3f}", refresh=False)   # drawn at the bar's pace
            while pending:
                finish(pending.pop(0))
                bar.update(1)
    finally:
        bar.close()
        store.close()
    by_key = {r["frame"]: r for r in new_records}
    records = [done[k] if k in done else by_key[k] for k in keys]
    summary = summarize(records, {k: v for k, v in run.items() if k != "identity_keys"})
    store.write_summary(summary)
    atomic_write(store.out / "summary.md", summary_markdown(summary))
    if not (options.plots and records):
        # plots and renders of an earlier run into OUT would sit beside a summary they no longer
        # show (a resumed run of more frames with --no-plots)
        for stale in (*(store.out / n for n in PLOT_FILES), *stale_renders(store.out)):
            if stale.exists():
                stale.unlink()
    if options.plots and records:
        try:
            summary["plots"] = [p.name for p in write_plots(records, store.out, run.get("title", ""))]
            summary["renders"] = _write_renders(summary, records, extremes, load, predict, index_of,
                                                store.out)
        except ImportError as exc:       # matplotlib missing: results stay valid
            log.warning("plots skipped: %s", exc)
        store.write_summary(summary)
    return summary


def _checked_prediction(pred) -> np.ndarray:
    """``pred`` as float32 (N, 3); a CloudFormatError (that frame is recorded as failed) when it is
    not a cloud or holds NaN / inf: the metrics would raise in a worker thread and end the run."""
    pred = np.asarray(pred, dtype=np.float32)
    if pred.size == 0:       # an empty completion is scored (recall 0), whatever its shape
        return np.zeros((0, 3), dtype=np.float32)
    if pred.ndim != 2 or pred.shape[1] < 3:
        raise CloudFormatError(f"the prediction is not an (N, 3) cloud: shape {pred.shape}")
    pred = np.ascontiguousarray(pred[:, :3])
    bad = int((~np.isfinite(pred)).any(axis=1).sum())
    if bad:
        raise CloudFormatError(f"the prediction has {bad} of {len(pred)} points with NaN/inf "
                               "coordinates")
    return pred


# what a run writes beside frames.jsonl and run.json, made anew from the records at its end
PLOT_FILES = ("cd_histogram.png", "metrics_over_sequence.png")
REPORT_FILES = ("summary.json", "summary.md") + PLOT_FILES


def stale_renders(out: Path) -> List[Path]:
    """The best / worst frame renders in ``out`` (named after their frame, so a later run whose best
    frames are others would leave them beside its own)."""
    return sorted(p for pattern in ("bev_best*_*.png", "bev_worst*_*.png") for p in out.glob(pattern)
                  if p.is_file())


def _write_renders(summary, records, extremes, load, predict, index_of, out: Path) -> List[str]:
    by_frame = {str(r["frame"]): r for r in records}
    for p in stale_renders(out):
        p.unlink()
    names = []
    for rank, frames in (("best", summary["best_frames"]), ("worst", summary["worst_frames"])):
        for n, frame in enumerate(frames, 1):
            inp, gt = load(frame)
            pred = extremes.kept.get(frame)
            if pred is None:        # computed by an earlier (resumed) run: recompute, same seed
                pred, _ = predict(frame, index_of[frame], inp)
            path = out / f"bev_{rank}{n}_{frame}.png"
            render_frame(path, frame, f"{rank} {n}", pred, gt, inp, num(by_frame[frame]["cd"]))
            names.append(path.name)
    return names
