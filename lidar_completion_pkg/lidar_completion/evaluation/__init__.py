"""Evaluation behind ``lidar-completion evaluate`` / ``evaluate-files`` and the scripts.

* :mod:`.runner` - the loop (:func:`run_evaluation`), its options (:class:`EvalOptions`) and the
  resumable per-frame store (``OUT/frames.jsonl``, ``OUT/run.json``);
* :mod:`.sources` - a SemanticKITTI-layout sequence with its ground-truth cache
  (:func:`evaluate_sequence`) or files paired by stem (:func:`evaluate_files`);
* :mod:`.report` - ``summary.json``, ``summary.md`` (the papers' table layout), plots and renders.

Every metric is defined in :mod:`lidar_completion.metrics` (:func:`~lidar_completion.metrics.frame_metrics`
is one frame's record). Completions are seeded per frame (``seed + frame index``) so a resumed or
partial run gives the same per-frame numbers as a full one.
"""
from ..metrics import frame_metrics  # noqa: F401
from .report import print_summary, summarize, summary_markdown, write_plots  # noqa: F401
from .runner import FRAMES_FILE, EvalOptions, read_records, run_evaluation  # noqa: F401
from .sources import (BIN_FORMATS, FileSource, SequenceSource, evaluate_files,  # noqa: F401
                      evaluate_sequence, gt_cache_targets, pair_files)

__all__ = ["EvalOptions", "run_evaluation", "read_records", "evaluate_sequence", "evaluate_files",
           "SequenceSource", "FileSource", "pair_files", "summarize", "summary_markdown",
           "write_plots", "print_summary", "frame_metrics", "FRAMES_FILE", "BIN_FORMATS",
           "gt_cache_targets"]
