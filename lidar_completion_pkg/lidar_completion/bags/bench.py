"""Offline bag benchmark: complete every cloud of a topic in this process and measure it.

Per scan: decode (CDR -> numpy), the completer's own stages (``CompletionResult.timings``, its
"total" reported as "completer total"), encode (numpy -> PointCloud2 -> CDR); end-to-end = decode +
complete + encode. Throughput is completed scans per second of wall time. Memory is this process's
RSS, sampled in the background (peak, timeline, growth), plus the CUDA allocator's peak when the
completer runs on a GPU.

Before timing, the completer completes the first usable scan once (the warm-up, reported on its own):
the one-time costs of a first call (lazy initialisation, kernel compilation and tuning, CUDA graph
capture, allocator growth) would otherwise land in the first scan's latency, the mean, the p95 and
the throughput. The node does the same with a synthetic scan before it subscribes (its ``warmup``
parameter); here the bag's own scan is at hand, with the size and extent of the scans timed.
"""
from __future__ import annotations

import itertools
import logging
import time

from ..errors import CloudFormatError, LidarCompletionError
from . import report as rep
from .io import CLOUD_TYPE, BagReader, BagWriter, decode_cloud, make_cloud, serialize, warm_up
from .memory import MemorySampler

log = logging.getLogger(__name__)

TF_TOPICS = ("/tf", "/tf_static")
OUTPUT_TOPIC = "/completed_points"
#: Scans the warm-up reads ahead at most, looking for one the completer accepts (they are kept in
#: memory until the benchmark times them).
WARMUP_TRIES = 20


def _gpu_peak_mb(device: str | None):
    if not device or not str(device).startswith("cuda"):
        return None
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**20


def bench_offline(bag_path, topic: str, completer, *, write_bag=None, write_storage: str = "mcap",
                  output_topic: str = OUTPUT_TOPIC, limit: int | None = None, progress: bool = True,
                  meta: dict | None = None, warmup: bool = True) -> dict:
    """Run ``completer.complete_detailed`` on every PointCloud2 of ``topic``; return the report dict.

    ``write_bag`` writes the input clouds (same topic), the completed clouds (``output_topic``, the
    input's header) and /tf, /tf_static into a new bag for rviz. Scans that cannot be decoded or
    completed, and messages lost to a truncated bag, are counted as dropped with a reason.
    ``warmup``: complete the first usable scan once before timing (``report["warmup"]``), outside
    every statistic; False times the first call like the others.
    """
    from ..progress import progress_bar

    meta = dict(meta or {})
    device = meta.get("device") or str(getattr(completer, "device", "cpu"))
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.reset_peak_memory_stats(device)
    scans: list[dict] = []
    warm_up()
    with BagReader(bag_path) as bag:
        bag.require_topic(topic, CLOUD_TYPE)
        expected = bag.expected_count(topic)
        if limit is not None:
            expected = min(expected, int(limit)) if expected is not None else None
        topics = [topic] + ([t for t in TF_TOPICS if t in bag.topics] if write_bag else [])
        messages = bag.messages(topics)
        ahead: list = []  # messages read for the warm-up: benchmarked afterwards like the rest
        warm = {"enabled": bool(warmup), "scan": None, "seconds": None, "error": None}
        if warmup:
            warm.update(_warm_up_completer(messages, ahead, topic, completer, limit))
        writer = BagWriter(write_bag, write_storage) if write_bag else None
        sampler = MemorySampler(interval=0.05).start()
        t_start, t_start_ns = time.perf_counter(), time.monotonic_ns()
        bar = progress_bar(total=expected, desc="bag-bench", unit="scan", disable=not progress)
        interrupted = False
        try:
            index = 0
            for raw in itertools.chain(ahead, messages):
                if raw.topic != topic:
                    writer.write_raw(raw.topic, raw.msgtype, raw.data, raw.log_time_ns)
                    continue
                if limit is not None and index >= int(limit):
                    break
                scans.append(_one_scan(raw, index, completer, writer, topic, output_topic, t_start))
                index += 1
                bar.update(1)
        except KeyboardInterrupt:
            # Ctrl-C: the scans measured so far make a report of their own (marked interrupted)
            # instead of being lost with the run (hours of a CPU benchmark on a long bag)
            interrupted = True
            log.warning("interrupted after %d scan(s): reporting those", len(scans))
        finally:
            bar.close()
            wall = time.perf_counter() - t_start
            sampler.stop()
            if writer is not None:
                writer.close()
        problems = list(bag.problems)
    if expected is not None and len(scans) < expected and not interrupted:
        for i in range(len(scans), expected):
            scans.append({"index": i, "status": "dropped", "reason": "unreadable (damaged or truncated bag)",
                          "stamp_ns": None, "t_s": None, "points_in": None, "points_out": None,
                          "latency_ms": None})
    report = {"mode": "offline", "bag": str(bag_path), "topic": topic, **meta, "device": device,
              "scans": scans, "bag_problems": problems, "wall_s": wall, "warmup": warm,
              "interrupted": interrupted}
    rep.finish(report)
    stage_names: list[str] = []
    for s in scans:
        for k in s.get("stages_ms") or {}:
            if k not in stage_names:
                stage_names.append(k)
    report["stages_ms"] = {k: rep.stats((s.get("stages_ms") or {}).get(k) for s in scans
                                        if s["status"] == "completed") for k in stage_names}
    report["throughput_hz"] = report["completed"] / wall if wall > 0 else float("nan")
    samples = [((t - t_start_ns) / 1e9, rss / 2**20) for t, rss in sampler.samples]
    report["memory_samples"] = samples
    report["memory"] = {"process": "bench process", "peak_rss_mb": sampler.peak / 2**20,
                        "start_rss_mb": samples[0][1] if samples else None,
                        "end_rss_mb": samples[-1][1] if samples else None,
                        "growth_mb_per_min": rep.growth_per_min(samples),
                        "gpu_peak_mb": _gpu_peak_mb(device)}
    if write_bag:
        report["written_bag"] = str(write_bag)
    return report


def _warm_up_completer(messages, ahead: list, topic: str, completer, limit) -> dict:
    """Complete the first usable scan of ``topic`` once, untimed by the benchmark; the messages read
    on the way are appended to ``ahead``. Returns the ``warmup`` entries of the report."""
    scans, refused = 0, None
    for raw in messages:
        ahead.append(raw)
        if raw.topic != topic:
            continue
        if limit is not None and scans >= int(limit):
            break
        cloud = decode_cloud(raw, scans, ("x", "y", "z"))
        scans += 1
        if cloud.error:
            continue  # the first usable scan warms up: an unusable one exercises nothing
        log.info("warm-up: completing scan %d once before timing", cloud.index)
        t0 = time.perf_counter()
        try:
            completer.complete_detailed(cloud.points)
        except CloudFormatError as exc:
            # refused before the networks ran (nothing in the limits, too few points: a sensor
            # spinning up, a garage): it warmed nothing up, so the next scan is tried
            refused = (cloud.index, exc)
            if scans < WARMUP_TRIES:
                continue
            break
        except LidarCompletionError as exc:
            log.warning("the warm-up completion of scan %d failed (%s): the first completed scan's "
                        "one-time costs are in the statistics", cloud.index, exc)
            return {"scan": cloud.index, "error": str(exc)}
        return {"scan": cloud.index, "seconds": time.perf_counter() - t0}
    if refused is not None:
        log.warning("no scan to warm up with: the completer refused the usable ones (the last, scan "
                    "%d: %s)", *refused)
        return {"scan": refused[0], "error": str(refused[1])}
    return {"error": "no usable scan to warm up with"}


def _one_scan(raw, index, completer, writer, topic, output_topic, t_start) -> dict:
    t0 = time.perf_counter()
    cloud = decode_cloud(raw, index, ("x", "y", "z"))
    t1 = time.perf_counter()
    rec = {"index": index, "stamp_ns": cloud.stamp_ns, "t_s": t0 - t_start, "points_in": cloud.n_points,
           "points_out": None, "latency_ms": None}
    if writer is not None and cloud.stamp_ns is not None:
        # the input as it came, unless it is not even a PointCloud2 (no header: it did not
        # deserialize): copied, it would make the new bag unreadable for other tools (as the live
        # replay, which cannot publish it, leaves it out)
        writer.write_raw(topic, raw.msgtype, raw.data, raw.log_time_ns)
    if cloud.error:
        return {**rec, "status": "dropped", "reason": f"unusable message: {cloud.error}"}
    try:
        result = completer.complete_detailed(cloud.points)
    except LidarCompletionError as exc:
        log.warning("scan %d not completed: %s", index, exc)
        return {**rec, "status": "dropped", "reason": f"completion failed: {exc}"}
    t2 = time.perf_counter()
    out = make_cloud(result.points, cloud.stamp_ns, cloud.frame_id)     # the input's header, as it is
    data = serialize(out)
    t3 = time.perf_counter()
    if writer is not None:
        writer.write_raw(output_topic, CLOUD_TYPE, data, raw.log_time_ns)
    stages = {"decode": (t1 - t0) * 1e3}
    # the completer's "total" is its own view of "complete": named apart from the end-to-end total
    stages.update({("completer total" if k == "total" else str(k)): float(v) * 1e3
                   for k, v in (getattr(result, "timings", None) or {}).items()})
    stages["complete"] = (t2 - t1) * 1e3
    stages["encode"] = (t3 - t2) * 1e3
    return {**rec, "status": "completed", "points_out": int(len(result.points)),
            "latency_ms": (t3 - t0) * 1e3, "stages_ms": stages}
