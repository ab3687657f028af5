"""The inference API: one scan in, the completed scene out.

>>> c = Completer.from_checkpoint("student.pt", steps=8, guidance=3.5, seed=0)   # doctest: +SKIP
>>> c = Completer.from_settings(CompletionSettings(steps=4))  # the same options as the CLI / node  # doctest: +SKIP
>>> dense = c.complete(scan)            # (N, >=3) float array -> (M, 3) float32   # doctest: +SKIP

One code path serves the CLI, the ROS node, evaluation and the benchmarks:

1. validation (finite rows of an (N, >=3) real array) and the range / z filters;
2. farthest-point sampling to ``n_fps`` points, tiled ``tile`` times: ``x_init``;
3. the condition encoder, once per scan; the unconditional condition (an all-zero cloud) is cached
   per point count since it does not depend on the scan;
4. the SDE-DPM-Solver++ loop on offsets from ``x_init``, one guided (cond + uncond) denoiser call
   per step;
5. the range / z band post-processing, then optionally the refinement network (x6 points).

Every piece of solver state and randomness belongs to one call: completing scan A then scan B
gives exactly what completing B alone gives with the same seed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .cuda_graphs import GRAPH_BACKENDS, GraphedDenoiser, GraphedEncoder, GraphedRefiner, graphs_requested
from .diffusion import DPMSolverSDE, NoiseSchedule, guided_noise, sample
from .errors import Cancelled, CheckpointError, CloudFormatError, ConfigError, ModelOutputError
from .preprocess import DEFAULTS, as_cloud, filter_scan, make_x_init, postprocess
from .settings import BY_NAME, FPS_MODES, PRECISIONS, CompletionSettings, checkpoint_fallback

__all__ = ["Completer", "CompletionResult", "STAGES", "resolve_device"]

log = logging.getLogger(__name__)

#: Stage names of :attr:`CompletionResult.timings`, in pipeline order.
STAGES = ("preprocess", "encoder", "denoiser", "solver", "postprocess", "refinement")
_PRECISIONS = dict(zip(PRECISIONS, (None, torch.bfloat16, torch.float16)))


def _device_fps_usable(device: torch.device) -> bool:
    """Whether the Triton farthest-point-sampling kernel can run on ``device``."""
    from . import sparse
    if device.type == "cuda":
        return sparse.triton_available() and not sparse.triton_interpreted() and torch.cuda.is_available()
    return device.type == "cpu" and sparse.triton_interpreted()


@dataclass
class CompletionResult:
    """Everything one completion produced."""
    points: np.ndarray             # final cloud (M, 3) float32: refined if refinement ran, else raw
    raw: np.ndarray                # post-processed diffusion output, before refinement (K, 3)
    refined: np.ndarray | None     # refinement output (6 K', 3) or None
    timings: dict = field(default_factory=dict)   # stage -> seconds (see STAGES), plus "total"
    num_input: int = 0             # valid points of the input
    num_filtered: int = 0          # points left after the range / z filters
    num_fps: int = 0               # points after farthest-point sampling
    seed: int | None = None        # the seed the noise was drawn with (reproduces this result)
    steps: int = 0
    guidance: float = 0.0
    process: str = "vp"            # the solver's forward process ("vp" published, "local")
    empty_reason: str | None = None   # when ``points`` is empty: why post-processing kept nothing


def resolve_device(device) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; otherwise whatever torch.device accepts."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        # torch knows more device types (mps, meta, xpu, ...), on which the sparse backends do not run
        raise ConfigError(f"device {device!r}: expected cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use 'cpu'")
    return dev


class _Clock:
    """Accumulates wall time per stage; synchronises CUDA so GPU work lands in the right stage."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times = {s: 0.0 for s in STAGES}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0


class Completer:
    """Scene completion with a condition encoder, a denoiser and an optional refiner.

    Parameters: ``steps`` solver steps (1..200; 8 for the student); ``guidance`` the CFG weight w
    (3.5 student, 6 teacher; 1 = conditional only); ``refine`` whether to run the refiner;
    ``device`` ("cpu", "cuda", "cuda:1", "auto"); ``seed`` None for fresh randomness on each call or
    an int for the same output for the same input on every call; ``precision`` "fp32" | "bf16" |
    "fp16" (autocast, CUDA only; fp32 elsewhere); pre/post-processing limits with the published
    defaults (``min_range`` 3.5 m, ``max_range`` 50 m, ``min_z`` -4 m, ``n_fps`` 18,000,
    ``tile`` 10; ``post_max_range`` 50 m) and ``min_points``, the fewest filtered input points
    accepted. ``cuda_graphs`` replays each solver step's denoiser call, the refiner and the condition
    encoder from CUDA graphs (:mod:`lidar_completion.cuda_graphs`; CUDA with the torch or Triton
    backend): True always, False never,
    None (auto, or LIDAR_COMPLETION_CUDA_GRAPHS=auto|1|0) where the first scan measures a replay
    faster than an ordinary call. ``fps`` is where farthest-point sampling runs: "cpu"
    (fpsample), "device" (the exact Triton kernel on the Completer's CUDA device, or on the CPU
    under ``TRITON_INTERPRET=1``) or "auto" (the device on CUDA with Triton, else the CPU; a
    failure of the device kernel falls back to the CPU with a warning). ``fps_parts`` > 1 samples
    approximately, in that many azimuth sectors side by side
    (:func:`lidar_completion.preprocess.sector_split`), on the CPU and on the device alike.
    """

    def __init__(self, encoder: torch.nn.Module, denoiser: torch.nn.Module,
                 refiner: torch.nn.Module | None = None, *,
                 steps: int = checkpoint_fallback("steps"),
                 guidance: float = checkpoint_fallback("guidance"),
                 refine: bool = True, device="cpu", seed: int | None = None, precision: str = "fp32",
                 min_range: float | None = DEFAULTS["min_range"],
                 max_range: float | None = DEFAULTS["max_range"],
                 min_z: float | None = DEFAULTS["min_z"], n_fps: int = DEFAULTS["n_fps"],
                 tile: int = DEFAULTS["tile"], post_max_range: float | None = 50.0,
                 min_points: int = 100, schedule: NoiseSchedule | None = None,
                 process: str = checkpoint_fallback("process"),
                 cuda_graphs: bool | str | None = None, fps: str = "auto", fps_parts: int = 1):
        self.device = resolve_device(device)
        self.fps = fps
        self.fps_parts = fps_parts
        self.cuda_graphs = graphs_requested(cuda_graphs)   # True / False / None (auto); checks it
        if self.cuda_graphs is True and self.device.type != "cuda":
            log.info("cuda_graphs on applies on CUDA only; running without graphs on %s", self.device)
        self._graphed: GraphedDenoiser | None = None
        self._graphed_refiner: GraphedRefiner | None = None
        self._graphed_encoder: GraphedEncoder | None = None
        self.encoder = encoder.to(self.device).eval()
        self.denoiser = denoiser.to(self.device).eval()
        self.refiner = refiner.to(self.device).eval() if refiner is not None else None
        self.schedule = schedule or NoiseSchedule()
        self._process = process
        self.steps = steps            # property: builds the solver (it checks ``process``)
        self.guidance = guidance      # property: checks the range
        if refine and self.refiner is None:
            log.warning("refinement requested but no refiner network is loaded; returning the "
                        "unrefined completion")
        self.refine = bool(refine) and self.refiner is not None
        self.seed = seed              # property: None or an integer in --seed's range
        self.precision = precision    # property: checks it
        if precision != "fp32" and self.device.type != "cuda":
            log.info("precision %s applies on CUDA only; running fp32 on %s", precision, self.device)
        self.min_range, self.max_range, self.min_z = min_range, max_range, min_z   # properties
        self.n_fps, self.tile = n_fps, tile   # properties: check the ranges
        if post_max_range is not None and (isinstance(post_max_range, bool) or not isinstance(
                post_max_range, numbers.Real) or not 0 < post_max_range < math.inf):
            raise ConfigError(f"post_max_range must be None or a positive number of metres, got "
                              f"{post_max_range!r} (the completion keeps points within it)")
        self.post_max_range = post_max_range
        self.min_points = max(2, int(min_points))
        self._uncond_cache: dict = {}

    # -- farthest-point sampling ------------------------------------------------------------------
    @property
    def fps(self) -> str:
        return self._fps

    @fps.setter
    def fps(self, value: str):
        if value not in FPS_MODES:
            raise ConfigError(f"fps must be one of {', '.join(FPS_MODES)}, got {value!r}")
        usable = _device_fps_usable(self.device)     # the device is fixed: asked once, not per scan
        if value == "device" and not usable:
            raise ConfigError("fps='device' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the "
                              f"CPU); this Completer runs on {self.device}")
        self._fps = value
        self._fps_usable = usable
        self._fps_failed = False

    @property
    def fps_parts(self) -> int:
        """Azimuth sectors of approximate farthest-point sampling (1: exact)."""
        return self._fps_parts

    @fps_parts.setter
    def fps_parts(self, value: int):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 256:
            raise ConfigError(f"fps_parts must be an integer in 1..256, got {value!r}")
        self._fps_parts = int(value)

    @property
    def fps_on_device(self) -> bool:
        """Whether the next scan's farthest-point sampling runs on the device."""
        if self._fps == "device":
            return True
        return (self._fps == "auto" and not self._fps_failed and self.device.type == "cuda"
                and self._fps_usable)

    def _sample_on_device(self, filtered: np.ndarray):
        """(scan_fps, x_init) as device tensors, sampled by the Triton kernel; None when "auto"
        meets a failure of the kernel (then the CPU samples, now and for later scans)."""
        from .sparse.triton_backend import farthest_point_sample_sectors_device

        pts = torch.from_numpy(filtered).to(self.device)
        try:
            idx = farthest_point_sample_sectors_device(pts, self.n_fps, self.fps_parts)
        except ConfigError:        # a setting to correct (LIDAR_COMPLETION_FPS_CANDIDATES), not a kernel fault
            raise
        except Exception as exc:   # a kernel that timed out, failed to compile or to launch
            if self._fps == "device":
                raise
            log.warning("farthest-point sampling on %s failed (%s); sampling on the CPU from now on",
                        self.device, exc)
            self._fps_failed = True
            return None
        scan_t = pts.index_select(0, idx)
        return scan_t, scan_t.repeat(self.tile, 1)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: CompletionSettings | None = None, **kwargs) -> "Completer":
        """The Completer that :class:`~lidar_completion.settings.CompletionSettings` describe (the
        defaults when None); ``kwargs`` are constructor options the settings do not hold
        (``post_max_range``, ``min_points``, ``schedule``)."""
        s = settings if settings is not None else CompletionSettings()
        held = s.completer_kwargs()
        both = sorted(set(kwargs) & (set(held) | {"checkpoint", "path"}))
        if both:
            raise ConfigError(f"{', '.join(both)} given both in the settings and as keyword argument"
                              f"{'s' if len(both) > 1 else ''}: set {'them' if len(both) > 1 else 'it'} in the "
                              f"settings, e.g. dataclasses.replace(settings, {both[0]}=...)")
        return cls.from_checkpoint(s.checkpoint, **held, **kwargs)

    @classmethod
    def from_checkpoint(cls, path=None, steps: int | None = None, guidance: float | None = None,
                        refine: bool = True, device="cpu", seed: int | None = None,
                        backend: str | None = "auto", refiner_checkpoint=None, allow_pickle=None,
                        process: str | None = None, **kwargs) -> "Completer":
        """Load a checkpoint (ours or a published layout) and build a Completer.

        ``path=None`` takes the shipped student checkpoint. ``steps`` / ``guidance`` left at None
        take the checkpoint's sampling defaults (:mod:`lidar_completion.settings` names the values
        for a checkpoint that names none); so do the point budgets ``n_fps`` / ``tile`` when the
        checkpoint records them and they are not given.
        ``process`` (None: the checkpoint's ``sampling["process"]``, "vp" when it names none, as
        for published checkpoints) picks the solver's forward process (see
        :mod:`lidar_completion.diffusion.sampler`). ``refiner_checkpoint`` takes the refiner from a second file (LiDiff ships ``diff_net.ckpt`` and
        ``refine_net.ckpt``); ``allow_pickle=True`` loads Lightning files that need pickled code. ``backend`` is the
        sparse backend ("auto" | "minkowski" | "torch" | "triton"; "auto" or None honours
        ``LIDAR_COMPLETION_BACKEND``, else takes Triton on CUDA, else torch; MinkowskiEngine only when
        named). Other keyword arguments go to the constructor.
        """
        from . import checkpoints
        if refiner_checkpoint is not None and not refine:
            log.warning("a refiner checkpoint was given with refinement off: it is loaded but not used")
        if path is None:
            path = checkpoints.default_checkpoint_path()   # CheckpointError when none is shipped
        if backend in (None, "", "auto"):
            backend = None   # the sparse package reads LIDAR_COMPLETION_BACKEND, default auto
        dev = resolve_device(device)
        loaded = checkpoints.load_checkpoint(path, device=str(dev), backend=backend,
                                             refiner_path=refiner_checkpoint, allow_pickle=allow_pickle)
        missing = [r for r in ("encoder", "denoiser") if getattr(loaded, r, None) is None]
        if missing:
            raise CheckpointError(f"{path}: holds no {' and no '.join(missing)} network (found "
                                  f"{getattr(loaded, 'kind', 'an unknown')} checkpoint); completion "
                                  "needs a condition encoder and a denoiser")
        sampling = dict(getattr(loaded, "sampling", None) or {})
        given = {"steps": steps, "guidance": guidance, **kwargs}
        for key in ("steps", "guidance", "n_fps", "tile"):   # the file's own settings: blame the file
            if key in sampling and given.get(key) is None:
                try:
                    _guidance(sampling[key]) if key == "guidance" else _whole(key, sampling[key])
                except ConfigError as exc:
                    raise CheckpointError(f"{path or 'the shipped checkpoint'}: its sampling.{key} is not "
                                          f"usable: {exc}") from None
        if steps is None:
            steps = int(sampling.get("steps", checkpoint_fallback("steps")))
        if guidance is None:
            guidance = float(sampling.get("guidance", checkpoint_fallback("guidance")))
        if process is None:
            process = str(sampling.get("process", checkpoint_fallback("process")))
        for key in ("n_fps", "tile"):  # the point budgets the model was trained with
            if kwargs.get(key) is None:    # not given, or None: the checkpoint's, as for steps
                kwargs.pop(key, None)
                if key in sampling:
                    kwargs[key] = int(sampling[key])
        if refine and loaded.refiner is None:
            if "model_refine." in (getattr(loaded, "meta", None) or {}).get("not_loaded", ()):
                # published students and LiDiff files carry no refiner (refine_net.ckpt is its own
                # file), so a Lightning file's model_refine.* is only used when named as the refiner
                log.warning("checkpoint %s carries refiner weights (model_refine.*) that are only used "
                            "when the file is also given as the refiner checkpoint (--refiner-checkpoint "
                            "%s); completions are not refined", path, path)
            else:
                log.warning("checkpoint %s has no refiner; completions are not refined (a refiner can "
                            "come from a second file: --refiner-checkpoint)", path)
            refine = False
        return cls(loaded.encoder, loaded.denoiser, loaded.refiner, steps=steps, guidance=guidance,
                   refine=refine, device=dev, seed=seed, process=process, **kwargs)

    # -- settings -------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self._solver.num_steps

    @steps.setter
    def steps(self, value: int):
        # the range of the CLI and the node, for the API too
        self._solver = DPMSolverSDE(self.schedule, _whole("steps", value), process=self._process)

    @property
    def guidance(self) -> float:
        """The classifier-free guidance weight w (1: conditional only)."""
        return self._guidance

    @guidance.setter
    def guidance(self, value: float):
        self._guidance = _guidance(value)

    @property
    def seed(self) -> int | None:
        """The seed of every completion that names none (None: a fresh one each time, returned as
        the result's ``seed``)."""
        return self._seed

    @seed.setter
    def seed(self, value: int | None):
        self._seed = BY_NAME["seed"].check(value)     # the range --seed and the node take

    @property
    def precision(self) -> str:
        """"fp32", "bf16" or "fp16" (the latter two on CUDA only)."""
        return self._precision

    @precision.setter
    def precision(self, value: str):
        if value not in _PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(_PRECISIONS)}, got {value!r}")
        self._precision = value

    @property
    def min_range(self) -> float | None:
        """Input points closer than this (m) are ignored (None: no limit)."""
        return self._min_range

    @min_range.setter
    def min_range(self, value: float | None):
        self._min_range = _ordered(_limit("min_range", value), getattr(self, "_max_range", None))

    @property
    def max_range(self) -> float | None:
        """Input points farther than this (m) are ignored (None: no limit)."""
        return self._max_range

    @max_range.setter
    def max_range(self, value: float | None):
        self._max_range = _ordered(getattr(self, "_min_range", None), _limit("max_range", value), value=1)

    @property
    def min_z(self) -> float | None:
        """Input points below this height (m) are ignored (None: no limit)."""
        return self._min_z

    @min_z.setter
    def min_z(self, value: float | None):
        self._min_z = _limit("min_z", value)

    @property
    def n_fps(self) -> int:
        """Points farthest-point sampled from the scan (the solver starts from n_fps x tile)."""
        return self._n_fps

    @n_fps.setter
    def n_fps(self, value: int):
        self._n_fps = _whole("n_fps", value)

    @property
    def tile(self) -> int:
        return self._tile

    @tile.setter
    def tile(self, value: int):
        self._tile = _whole("tile", value)

    @property
    def process(self) -> str:
        """The forward process the solver assumes: "vp" (the published LiDiff sampler) or "local"."""
        return self._process

    @process.setter
    def process(self, value: str):
        self._solver = DPMSolverSDE(self.schedule, self._solver.num_steps, process=value)  # checks it
        self._process = value

    @property
    def solver(self) -> DPMSolverSDE:
        return self._solver

    def _autocast(self):
        # CUDA only: on a CPU with native bf16 products the completion was slower in bf16 (its
        # element-wise work and autocast's casts outweigh faster products; docs/benchmarks.md,
        # "Sparse backends on the CPU")
        # fp32 turns off any autocast the caller has open around the call (a caller's bf16 region
        # changed the output of an fp32 Completer and its seed no longer reproduced it)
        dtype = _PRECISIONS[self.precision]
        if dtype is None or self.device.type != "cuda":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=dtype)

    def _generator(self, seed: int | None) -> tuple[torch.Generator, int]:
        gen = torch.Generator(device=self.device)
        if seed is None:
            # fresh, non-deterministic and recorded so the result reproduces: drawn in the range
            # that --seed / CompletionSettings accept (Generator.seed() gives 64 bits, which the
            # logged seed could then not be passed back as)
            low, high = BY_NAME["seed"].range
            seed = low + secrets.randbelow(high - low + 1)
        gen.manual_seed(int(seed))
        return gen, int(seed)

    # -- pipeline pieces ------------------------------------------------------------------------
    def prepare(self, points) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Validated and filtered scan, its FPS subset (on the CPU) and ``x_init``; raises
        CloudFormatError."""
        filtered, n_valid = self.filtered(points)
        scan_fps, x_init = make_x_init(filtered, self.n_fps, self.tile, self.fps_parts)
        return filtered, scan_fps, x_init, n_valid

    def filtered(self, points) -> tuple[np.ndarray, int]:
        """The validated and filtered scan and the number of finite input points; raises
        CloudFormatError when too few points are left."""
        xyz = as_cloud(points)
        n_valid = len(xyz)
        if n_valid == 0:
            raise CloudFormatError("the input cloud has no finite points (empty or all NaN/inf)")
        filtered = filter_scan(xyz, self.min_range, self.max_range, self.min_z)
        if len(filtered) < self.min_points:
            raise CloudFormatError(
                f"too few points to complete: {len(filtered)} of {n_valid} finite points lie within "
                f"{self.min_range} m < range < {self.max_range} m and z > {self.min_z} m; at least "
                f"{self.min_points} are needed{self._outside_limits(xyz)}")
        low, high = float(filtered[:, 2].min()), float(filtered[:, 2].max())
        if high == low:
            # post-processing keeps generated points below the scan's highest point and above its
            # mean height minus 2 standard deviations (preprocess.postprocess): an empty band here
            exc = CloudFormatError(
                f"flat cloud: all {len(filtered)} points in the limits lie at one height (z = {high:g} m), "
                "and the completion keeps only what lies between the scan's mean height minus 2 standard "
                "deviations and its highest point, so nothing would come out (a 2D laser scan or a "
                "cloud projected onto a plane cannot be completed)")
            exc.reason = "flat"
            raise exc
        return filtered, n_valid

    def _outside_limits(self, xyz: np.ndarray) -> str:
        """Where the points outside the limits are, and what that suggests: a cloud in a map frame
        (every point far beyond max_range) or one whose z axis is not up (many in range below min_z)."""
        pts = np.asarray(xyz, dtype=np.float64)
        r = np.linalg.norm(pts, axis=1)
        in_range = (r > self.min_range) & (r < self.max_range)
        counts = [(int((r >= self.max_range).sum()), f"at {self.max_range:g} m or beyond"),
                  (int((r <= self.min_range).sum()), f"within {self.min_range:g} m"),
                  (int((in_range & (pts[:, 2] <= self.min_z)).sum()),
                   f"in range but at z <= {self.min_z:g} m")]
        text = ", ".join(f"{n} {where}" for n, where in counts if n)
        if len(r) and r.min() >= 10 * self.max_range:
            text += (f" (the nearest point is {r.min():.4g} m from the origin: complete the scan in a "
                     "frame centred on the sensor, not a map frame)")
        elif (hint := self.not_z_up(pts)) is not None:
            text += f" ({hint})"
        return "; " + text if text else ""

    def not_z_up(self, points) -> str | None:
        """A hint when the scan's z axis is likely not up: over a fifth of the points within range lie
        more than 5 m below the sensor (a level LiDAR sees the ground 1-3 m down; a camera-style
        frame, z forward, puts what lies behind the sensor there). None otherwise."""
        pts = np.asarray(points, dtype=np.float64)[:, :3]
        pts = pts[np.isfinite(pts).all(axis=1)]
        r = np.linalg.norm(pts, axis=1)
        in_range = (r > self.min_range) & (r < self.max_range)
        low = int((in_range & (pts[:, 2] < -5.0)).sum())
        if low <= 0.2 * max(1, int(in_range.sum())):
            return None
        return (f"{low} of the {int(in_range.sum())} points within range lie more than 5 m below the "
                "sensor: is the scan's z axis up, with its origin at the sensor (the frame the networks "
                "were trained in)?")

    def unconditional(self, num_points: int):
        """The condition of an all-zero cloud of ``num_points`` points (cached; scan-independent)."""
        key = (int(num_points), str(self.device), self.precision)
        cond = self._uncond_cache.get(key)
        if cond is None:
            zeros = torch.zeros(int(num_points), 3, dtype=torch.float32, device=self.device)
            batch = torch.zeros(int(num_points), dtype=torch.long, device=self.device)
            with torch.inference_mode(), self._autocast():
                cond = self.encoder(zeros, batch)
            self._uncond_cache = {key: cond}   # one entry: the point count rarely changes
        return cond

    @property
    def graphs_active(self) -> bool:
        """Whether solver steps replay CUDA graphs (CUDA device, torch or Triton backend, not turned off)."""
        return (self.cuda_graphs is not False and self.device.type == "cuda"
                and getattr(self.denoiser, "backend", None) in GRAPH_BACKENDS)

    def graph_runner(self) -> GraphedDenoiser | None:
        """The CUDA-graph runner of the denoiser when graphs are in use, else None."""
        if not self.graphs_active:
            if self.cuda_graphs and self.device.type == "cuda":
                log.warning("cuda_graphs needs the torch or Triton sparse backend; running without graphs")
                self.cuda_graphs = False
            return None
        dtype = _PRECISIONS[self.precision]
        r = self._graphed
        if r is None or r.guidance != self.guidance or r.autocast != dtype or r.denoiser is not self.denoiser:
            # auto (None): graphs where a replay beats an ordinary call on this machine (measured
            # once per input shape); True: always replay
            r = self._graphed = GraphedDenoiser(self.denoiser, self.guidance, dtype,
                                                autotune=self.cuda_graphs is None)
        return r

    def _points_runner(self, attr: str, net, cls):
        """The graph runner kept in ``attr`` for ``net`` (one call per scan on its points) when
        graphs are in use and ``net`` has a backend with a static mode, else None."""
        if net is None or self.graph_runner() is None or getattr(net, "backend", None) not in GRAPH_BACKENDS:
            return None
        dtype = _PRECISIONS[self.precision]
        r = getattr(self, attr)
        if r is None or r.autocast != dtype or r.net is not net:
            r = cls(net, dtype, autotune=self.cuda_graphs is None)
            setattr(self, attr, r)
        return r

    def refiner_runner(self) -> GraphedRefiner | None:
        """The CUDA-graph runner of the refiner when graphs are in use, else None."""
        return self._points_runner("_graphed_refiner", self.refiner, GraphedRefiner)

    def encoder_runner(self) -> GraphedEncoder | None:
        """The CUDA-graph runner of the condition encoder when graphs are in use, else None."""
        return self._points_runner("_graphed_encoder", self.encoder, GraphedEncoder)

    def encode(self, points: torch.Tensor):
        """The condition of one scan's sampled points (N, 3) on the device."""
        cond = self._replay(self.encoder_runner(), points)
        if cond is not None:
            return cond
        with self._autocast():
            return self.encoder(points, torch.zeros(len(points), dtype=torch.long, device=points.device))

    def _replay(self, runner, *args) -> torch.Tensor | None:
        """``runner(*args)``; None when there is no runner or CUDA graphs fail here (a capture that
        is not possible on this setup): graphs are then turned off and the caller runs the
        ordinary path. Input errors propagate."""
        if runner is None:
            return None
        try:
            return runner(*args)
        except (CloudFormatError, ConfigError):
            raise
        except RuntimeError as exc:
            log.warning("CUDA graphs turned off after an error (%s); running without them", exc)
            self.cuda_graphs = False
            self._graphed = self._graphed_refiner = self._graphed_encoder = None
            return None

    def denoise_guided(self, points: torch.Tensor, t: int, cond, uncond) -> torch.Tensor:
        """Guided noise prediction for one solver step (float32, shape of ``points``)."""
        eps = self._replay(self.graph_runner(), points, t, cond, uncond)
        if eps is not None:
            return eps
        with self._autocast():
            eps = guided_noise(self.denoiser, points, t, cond, uncond, self.guidance)
        return eps.float()

    # -- public API -----------------------------------------------------------------------------
    def complete(self, points) -> np.ndarray:
        """Completed scene (M, 3) float32 for a scan given as an (N, >=3) float array."""
        return self.complete_detailed(points).points

    @torch.inference_mode()
    def complete_detailed(self, points, seed: int | None = None,
                          should_stop: Callable[[], bool] | None = None) -> CompletionResult:
        """Like :meth:`complete`, returning the intermediate clouds and per-stage timings.

        ``seed`` overrides the Completer's seed for this call. ``should_stop()`` is asked before the
        encoder, before every solver step and before the refiner; when it says True the completion
        is abandoned with :class:`~lidar_completion.errors.Cancelled` (a node shutting down stops
        within one network pass instead of finishing a scan nobody will receive).
        """
        def check():
            if should_stop is not None and should_stop():
                raise Cancelled("the completion was cancelled by its caller")

        seed = BY_NAME["seed"].check(seed)       # before any work: a seed --seed would refuse
        clock = _Clock(self.device)
        t_start = time.perf_counter()
        with clock("preprocess"):
            sampled = None
            if self.fps_on_device:
                filtered, n_valid = self.filtered(points)
                sampled = self._sample_on_device(filtered)
            if sampled is None:
                filtered, scan_fps, x_init_np, n_valid = self.prepare(points)
                sampled = (torch.from_numpy(scan_fps).to(self.device), torch.from_numpy(x_init_np).to(self.device))
            scan_t, x_init = sampled
            gen, used_seed = self._generator(self.seed if seed is None else seed)
        check()
        with clock("encoder"):
            # voxel averages of the tiled x_init equal those of the FPS subset: encode the subset
            cond = self.encode(scan_t)
            uncond = self.unconditional(len(scan_t)) if self.guidance != 1.0 else None

        def denoise(x, t):
            check()
            with clock("denoiser"):
                return self.denoise_guided(x, t, cond, uncond)

        loop_start = _now(clock)
        try:
            x0 = sample(denoise, x_init, self._solver, gen)
        except CloudFormatError as exc:   # the scan passed its checks: the networks' values did not
            raise self._solver_error(exc, len(filtered)) from None
        # solver = the loop minus the denoiser calls (noise draws, solver arithmetic)
        clock.times["solver"] = _now(clock) - loop_start - clock.times["denoiser"]

        finite = torch.isfinite(x0).all(dim=-1)
        if not bool(finite.all()):   # (postprocess would drop them silently: an empty completion)
            raise self._model_error(f"{int((~finite).sum())} of {len(finite)} points of the solver's "
                                    "result are not finite")
        with clock("postprocess"):
            raw_t = postprocess(x0, x_init, self.post_max_range)
            raw = raw_t.float().cpu().numpy()
        empty_reason = None
        if not len(raw):     # a result, but rarely what the caller wants: say why (the CLI refuses it)
            empty_reason = self._empty_reason(x0, x_init, filtered)
            log.warning("the completion kept no points: %s", empty_reason)
        refined = None
        if self.refine and self.refiner is not None and len(raw_t) > 0:
            check()
            with clock("refinement"):
                refined = self.refine_points(raw_t).cpu().numpy()
                if not np.isfinite(refined).all():
                    raise self._model_error(f"the refiner made {int((~np.isfinite(refined).all(1)).sum())} "
                                            f"of {len(refined)} points not finite")
                if self.post_max_range:
                    # the refiner moves a point by up to a metre: the completion is cut at the range
                    # again, as the published evaluation cuts completions read from files, so that
                    # what is written, published and scored lies within it
                    far = np.einsum("ij,ij->i", refined, refined) >= self.post_max_range ** 2
                    if far.any():
                        refined = refined[~far]
        times = dict(clock.times)
        times["total"] = time.perf_counter() - t_start
        return CompletionResult(points=refined if refined is not None else raw, raw=raw,
                                refined=refined, timings=times, num_input=n_valid,
                                num_filtered=len(filtered), num_fps=len(scan_t), seed=used_seed,
                                steps=self.steps, guidance=self.guidance, process=self.process,
                                empty_reason=empty_reason)

    def _empty_reason(self, x0: torch.Tensor, x_init: torch.Tensor, filtered: np.ndarray) -> str:
        """Why post-processing (:func:`lidar_completion.preprocess.postprocess`) kept none of the
        solver's points ``x0``: its height band, taken from ``x_init`` (below the sample's highest
        point, above its mean height minus 2 standard deviations), and its range cut."""
        z = x_init[:, 2].double().cpu().numpy()
        low = z.mean() - 2.0 * z.std(ddof=1) if len(z) > 1 else float("nan")
        high = float(z.max())
        n = len(z) // max(1, self.tile)
        span = f"{float(filtered[:, 2].min()):g} .. {float(filtered[:, 2].max()):g} m"
        rule = ("post-processing keeps only points below the highest point of the scan's farthest-point "
                "sample and above its mean height minus 2 standard deviations"
                + (f", within {self.post_max_range:g} m of the sensor" if self.post_max_range else ""))
        if not low < high:
            return (f"{rule}; the sample of {n} point{'' if n == 1 else 's'} (n_fps {self.n_fps}) spans "
                    f"{float(z.min()):g} .. {high:g} m, so that band is empty; the scan's heights span "
                    f"{span}: a larger n_fps samples them")
        pts = x0.double().cpu().numpy()
        in_band = (pts[:, 2] > low) & (pts[:, 2] < high)
        cause = (f"the sample of {n} points (n_fps {self.n_fps}) gives the band {low:.3g} .. {high:.3g} m "
                 f"(the scan's heights span {span})")
        if in_band.any() and self.post_max_range:
            near = float(np.linalg.norm(pts[in_band, :3], axis=1).min())
            return (f"{rule}; {int(in_band.sum())} generated points lie in the band {low:.3g} .. "
                    f"{high:.3g} m, but the nearest of them is {near:.3g} m from the sensor, beyond "
                    f"{self.post_max_range:g} m (the scan is far from its origin: complete it in a frame "
                    "centred on the sensor)")
        return f"{rule}; {cause} and no generated point fell in it"

    def _solver_error(self, exc: CloudFormatError, n_points: int) -> ModelOutputError:
        """What a check of the solver's points found: NaN (the networks' values: their weights or
        the settings), or points beyond the sparse engine's coordinate range - the denoiser's
        predictions grew without bound on this scan. Measured with the shipped student: a 64-beam
        scan thinned to every 8th beam diverges at n_fps 4000 and completes at 3000."""
        if getattr(exc, "reason", None) != "coordinate_range":
            return self._model_error(f"during the solver: {exc}")
        voxel = getattr(getattr(self.denoiser, "config", None), "voxel_size", 0.05)
        where = f"a point reached {exc.extent * voxel / 1000:.3g} km from the sensor"
        return ModelOutputError(
            f"the solver diverged on this scan ({where}): the networks' predictions grew without bound, "
            f"as they can on a scan unlike those the checkpoint was trained on ({n_points} points within "
            f"the limits; a sparser sensor, another mounting?); a smaller n_fps (now {self.n_fps}) or "
            f"another checkpoint may complete it (guidance w = {self.guidance:g}, {self.steps} steps, "
            f"process {self.process})")

    def _model_error(self, what: str) -> ModelOutputError:
        return ModelOutputError(f"the networks produced non-finite values from a valid scan ({what}): "
                                f"check the checkpoint's weights and the settings (guidance w = "
                                f"{self.guidance:g}, {self.steps} steps, process {self.process})")

    def refine_points(self, points: torch.Tensor) -> torch.Tensor:
        """Refiner: (N, 3 k) offsets in metres, k points per input point -> (k N, 3)."""
        off = self._replay(self.refiner_runner(), points)
        if off is None:
            batch = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
            with self._autocast():
                off = self.refiner(points, batch)
        off = off.float()
        if off.ndim != 2 or off.shape[0] != points.shape[0] or off.shape[1] % 3:
            raise ConfigError(f"refiner output must be (N, 3k) for N={points.shape[0]}, got "
                              f"{tuple(off.shape)}")
        k = off.shape[1] // 3
        return (points[:, None, :3].float() + off.view(-1, k, 3)).reshape(-1, 3).contiguous()

    def __repr__(self) -> str:
        return (f"Completer(steps={self.steps}, process={self.process}, guidance={self.guidance}, "
                f"refine={self.refine}, "
                f"device={self.device}, seed={self.seed}, precision={self.precision}, "
                f"n_fps={self.n_fps}, tile={self.tile}, fps={self.fps}, fps_parts={self.fps_parts}, cuda_graphs={self.graphs_active})")


def _guidance(value) -> float:
    """``value`` as a guidance weight within the CLI's and the node's range; ConfigError else."""
    low, high = BY_NAME["guidance"].range
    w = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else float("nan")
    if not low <= w <= high:   # (NaN fails every comparison)
        raise ConfigError(f"guidance must be a number in {low:g}..{high:g}, got {value!r}")
    return w


def _limit(name: str, value) -> float | None:
    """``value`` as one of the input filter's limits (None: no limit); ConfigError else."""
    return None if value is None else BY_NAME[name].check(value)


def _ordered(low: float | None, high: float | None, value: int = 0) -> float | None:
    """``(low, high)[value]`` when min_range < max_range (or either is None); ConfigError else."""
    if low is not None and high is not None and not low < high:
        raise ConfigError(f"min_range must be below max_range, got {low:g} and {high:g} m (change "
                          f"max_range first to raise both)")
    return (low, high)[value]


def _whole(name: str, value) -> int:
    """``value`` as an integer within the CLI's and the node's range of ``name``; ConfigError else."""
    low, high = BY_NAME[name].range
    try:
        whole = isinstance(value, numbers.Real) and not isinstance(value, bool) and int(value) == value
    except (ValueError, OverflowError):   # NaN, inf
        whole = False
    if not whole or not low <= int(value) <= high:
        raise ConfigError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def _now(clock: _Clock) -> float:
    if clock.cuda:
        torch.cuda.synchronize()
    return time.perf_counter()
