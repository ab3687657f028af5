"""CUDA graphs for the solver loop: the guided denoiser call captured once, replayed at every step.

Why: on a GPU the few-step student is host-bound. One guided call of the torch backend issues
~1,400 small kernels and waits for the device ~25 times (the noisy points move at every step, so
every step builds new coordinate sets and kernel maps). Replaying a captured graph issues them all
with one host call.

How: the torch backend has a *static* mode (:class:`~lidar_completion.sparse.common.StaticShapes`)
in which every coordinate set has a fixed capacity of rows (padding rows sort last and are nobody's
neighbour), the nearest-cell fallback a fixed number of rows, and every would-be host read becomes
a device flag. :class:`GraphedDenoiser` learns the capacities from one static pass with
upper-bound capacities (every level as many rows as points: always fits), adds a margin, captures
the guided call into a CUDA graph and replays it. After each replay it reads one small tensor (the
flag and the sizes seen): when something did not fit, that call is recomputed by a static pass
with upper-bound capacities (which also measures the true sizes), the capacities grow and the
graph is captured again at the next call. Invalid inputs go to the ordinary path, which raises. The condition is padded to a
capacity of cells (padding cells belong to no real batch element) so that scans with different
numbers of condition cells share a graph.

Results equal the ordinary path's up to float summation order (the static mode convolves with the
gather form). Inference only: batch norm must use running statistics.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from .diffusion.guidance import guided_noise
from .errors import ConfigError
from .sparse.common import PAD_BATCH, StaticShapes, grow_capacity, tensor_version, use_static_shapes

log = logging.getLogger(__name__)

ENV_GRAPHS = "LIDAR_COMPLETION_CUDA_GRAPHS"


def graphs_requested(value: bool | str | None) -> bool | None:
    """``cuda_graphs`` setting: True / False, or None for "auto" (then LIDAR_COMPLETION_CUDA_GRAPHS
    when set: 1/0, on/off, true/false, auto)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        value = os.environ.get(ENV_GRAPHS, "auto")
        if value.strip().lower() in ("", "auto"):
            return None
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    raise ConfigError(f"cuda_graphs must be auto, on or off (or {ENV_GRAPHS}=auto|1|0), got {value!r}")


@dataclass
class _State:
    """Capacities, static buffers and the captured graph for one input shape."""
    caps: dict
    cond_cap: int
    points: torch.Tensor | None = None
    t: torch.Tensor | None = None
    cond: tuple | None = None        # (coords, feats) padded to cond_cap
    uncond: tuple | None = None
    graph: object = None
    weights: tuple = ()              # the weights the graph was captured with (pointers, versions)
    ordinary_faster: bool | None = None   # autotune's finding for this shape (None: not measured)
    out: torch.Tensor | None = None
    summary: torch.Tensor | None = None
    size_keys: list = field(default_factory=list)


class GraphedDenoiser:
    """Guided noise predictions ``eps(points, t)`` for one scan at a time, by CUDA graph replay.

    ``denoiser``: a torch-backend :class:`~lidar_completion.models.networks.Denoiser` in eval mode;
    ``guidance``: the CFG weight; ``autocast``: None or the autocast dtype; ``use_graphs=False`` runs
    the same static passes eagerly (what the tests do on the CPU); ``margin``: capacity over the
    sizes seen; ``autotune``: after the first capture for a shape, time a replay against an ordinary
    call and keep the faster for that shape. Counters: ``captures``, ``replays``, ``fallbacks`` (calls whose capacities did not
    fit, recomputed by a sizing pass, and invalid inputs, passed to the ordinary path).
    """

    def __init__(self, denoiser: torch.nn.Module, guidance: float, autocast: torch.dtype | None = None,
                 use_graphs: bool = True, margin: float = 1.5, autotune: bool = False):
        if getattr(denoiser, "backend", None) != "torch":
            raise ConfigError("CUDA graphs need the torch sparse backend (MinkowskiEngine reads the "
                              "host inside every layer)")
        self.denoiser = denoiser
        self.guidance = float(guidance)
        self.autocast = autocast
        self.use_graphs = bool(use_graphs)
        self.margin = float(margin)
        self.autotune = bool(autotune) and self.use_graphs
        self._states: dict = {}
        self.captures = self.replays = self.fallbacks = 0
        self.tuning: tuple | None = None    # (seconds per replay, per ordinary call) once measured

    # -- public ---------------------------------------------------------------------------------
    def __call__(self, points: torch.Tensor, t: int, cond, uncond) -> torch.Tensor:
        """The guided noise prediction, float32, shape of ``points``; a fresh tensor."""
        if self.denoiser.training:
            raise RuntimeError("GraphedDenoiser is for inference; the denoiser is in training mode")
        points = points.float().contiguous()
        key = (points.shape[0], points.device, self.autocast, None if uncond is None else uncond.coords.shape[0],
               cond.feats.shape[1], cond.feats.dtype)
        st = self._states.get(key)
        n_cond = cond.coords.shape[0]
        if st is not None and n_cond > st.cond_cap:     # more condition cells than ever: re-plan
            st = None
        if st is None:
            st = _State(caps={}, cond_cap=grow_capacity(n_cond, 1.25, 256))
            self._states = {key: st}      # one shape at a time: a robot's scans share N
            self._load(st, points, t, cond, uncond)
            return self._sizing_pass(st, points, t, cond, uncond)
        if st.ordinary_faster:
            return self._ordinary(points, t, cond, uncond)
        self._load(st, points, t, cond, uncond)
        if self.use_graphs:
            weights = self._weights_stamp()
            if st.graph is not None and st.weights != weights:   # moved or updated in place
                st.graph = st.out = st.summary = None
            if st.graph is None:
                self._capture(st)
                st.weights = weights
                if self.autotune and st.ordinary_faster is None:
                    return self._tune(st, points, t, cond, uncond)
            st.graph.replay()
            self.replays += 1
            out, summary = st.out, st.summary
        else:
            out, summary = self._static_pass(st)
        ok, _ = self._read(st, summary)
        if ok:
            return out.clone()
        # something did not fit (or the input is invalid): the sizes past the first overflow are
        # not the true ones, so measure them all again; capture again next time
        st.graph = st.out = st.summary = None
        return self._sizing_pass(st, points, t, cond, uncond, overflow=True)

    def _sizing_pass(self, st: _State, points, t, cond, uncond, overflow: bool = False) -> torch.Tensor:
        """A static pass with every capacity at its upper bound (it always fits): this call's result
        and the true sizes, from which the capacities grow (never shrink). ``overflow``: called
        because a replay did not fit. An invalid input goes to the ordinary path, which raises the
        right error."""
        old = st.caps
        st.caps = {}
        out, summary = self._static_pass(st)
        ok, sizes = self._read(st, summary)
        if overflow or not ok:
            self.fallbacks += 1
        if not ok:
            st.caps = old
            return self._ordinary(points, t, cond, uncond)
        st.caps = {k: max(old.get(k, 0), grow_capacity(v, self.margin)) for k, v in sizes.items()}
        return out.clone()

    def _tune(self, st: _State, points, t, cond, uncond) -> torch.Tensor:
        """Time a replay against an ordinary call on this input and keep the faster for this shape
        (a large network at a large budget keeps the GPU busy either way, and its static pass
        pads more work than the launches it saves). Returns the replay's result."""
        st.graph.replay()                       # the first launch uploads the graph
        ok, _ = self._read(st, st.summary)
        t0 = time.perf_counter()
        st.graph.replay()
        ok, _ = self._read(st, st.summary)
        t_graph = time.perf_counter() - t0
        self.replays += 2
        if not ok:       # did not fit: no verdict yet; measure sizes again and capture again
            st.graph = st.out = st.summary = None
            return self._sizing_pass(st, points, t, cond, uncond, overflow=True)
        out = st.out.clone()
        t_ord = float("inf")
        for _ in range(2):                      # the first ordinary call may warm kernels up
            torch.cuda.synchronize(points.device)
            t0 = time.perf_counter()
            self._ordinary(points, t, cond, uncond)
            torch.cuda.synchronize(points.device)
            t_ord = min(t_ord, time.perf_counter() - t0)
        st.ordinary_faster = t_ord < t_graph
        self.tuning = (t_graph, t_ord)
        log.info("CUDA graph replay %.1f ms vs ordinary call %.1f ms for %d points: %s", 1e3 * t_graph,
                 1e3 * t_ord, points.shape[0], "ordinary calls" if st.ordinary_faster else "graphs")
        if st.ordinary_faster:
            st.graph = st.out = st.summary = None    # free the graph's memory
        return out

    @property
    def replaying(self) -> bool:
        """Whether the current shape runs by graph replay (False before the first capture, and
        where autotune found the ordinary call faster)."""
        return any(st.graph is not None and not st.ordinary_faster for st in self._states.values())

    # -- pieces ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        # the autocast weight cache must stay off while capturing (torch.cuda.graph's rule)
        return torch.autocast(self._device_type(), dtype=self.autocast, cache_enabled=False)

    def _weights_stamp(self) -> tuple:
        """Storage and version of every parameter and buffer: the graph holds their addresses and
        values derived from them (batch-norm affine maps), so any change means a new capture."""
        d = self.denoiser
        return tuple((t.data_ptr(), tensor_version(t)) for t in (*d.parameters(), *d.buffers()))

    def _device_type(self) -> str:
        return next(self.denoiser.parameters()).device.type

    def _ordinary(self, points, t, cond, uncond) -> torch.Tensor:
        ctx = contextlib.nullcontext() if self.autocast is None else torch.autocast(
            self._device_type(), dtype=self.autocast)
        with ctx:
            return guided_noise(self.denoiser, points, t, cond, uncond, self.guidance).float()

    def _load(self, st: _State, points, t, cond, uncond) -> None:
        """Copy this call's inputs into the state's static buffers (allocated on first use)."""
        dev = points.device
        if st.points is None:
            st.points = torch.empty_like(points)
            st.t = torch.zeros(1, dtype=torch.long, device=dev)
            c = cond.feats.shape[1]
            coords = torch.zeros(st.cond_cap, 4, dtype=torch.long, device=dev)
            coords[:, 0] = PAD_BATCH
            st.cond = (coords, torch.zeros(st.cond_cap, c, dtype=cond.feats.dtype, device=dev))
            if uncond is not None:
                st.uncond = (torch.empty_like(uncond.coords), torch.empty_like(uncond.feats))
        st.points.copy_(points)
        st.t.fill_(int(t))
        e = cond.coords.shape[0]
        coords, feats = st.cond
        coords[:e].copy_(cond.coords)
        coords[e:, 0] = PAD_BATCH
        coords[e:, 1:] = 0
        feats[:e].copy_(cond.feats)
        feats[e:] = 0
        if uncond is not None:
            st.uncond[0].copy_(uncond.coords)
            st.uncond[1].copy_(uncond.feats)

    def _static_pass(self, st: _State):
        from .models.networks import Condition
        plan = StaticShapes(st.caps)
        uncond = None if st.uncond is None else Condition(*st.uncond)
        with use_static_shapes(plan), self._autocast():
            eps = guided_noise(self.denoiser, st.points, st.t, Condition(*st.cond), uncond, self.guidance)
        st.size_keys, summary = plan.summary()
        return eps.float(), summary

    def _read(self, st: _State, summary: torch.Tensor) -> tuple[bool, dict]:
        values = summary.tolist()            # the one host read of the call
        return (not values[0]), dict(zip(st.size_keys, values[1:]))

    def _capture(self, st: _State) -> None:
        device = st.points.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):    # warm-up: allocations and constant tensors outside the graph
            self._static_pass(st)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, summary = self._static_pass(st)
        st.graph, st.out, st.summary = graph, out, summary
        self.captures += 1
