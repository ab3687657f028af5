"""Convolution by masked implicit GEMM (Triton): the launcher of :func:`.triton_kernels.implicit_gemm_kernel`.

Output-stationary: each program owns a tile of output rows and channels, gathers its input rows
through the kernel map straight from the feature matrix (nothing is materialised), and writes each
output row once (no atomics). The kernel map comes sorted by neighbour bitmask with one OR-ed mask
per tile (:meth:`.kmap.CoordinateManager.gather_plan`), so a tile only visits the offsets its rows
use. The same kernel serves every convolution of the networks:

* 3x3x3 at stride s: the (M, 27) neighbour table;
* 2x2x2 stride 2: the (M_coarse, 8) child table;
* transposed 2x2x2: the (M_fine, 8) parent table (one entry per row; rows sorted by offset, so a tile
  mostly holds one offset: no padded rows, no writing all 8 children);
* 1x1: no table (``IDENTITY``).

Inputs may be the concatenation of two feature matrices (the decoder's skip connection: two K
segments, never concatenated in memory), and batch norm (eval), the residual add and ReLU run in the
epilogue. Features carry an optional leading group dimension (the two halves of classifier-free
guidance share the kernel map and the weights; grid axis 2).

Tile sizes: a fixed small configuration under the interpreter; on CUDA, a few candidates are timed
the first time a (map kind, rows bucket, channels, dtype) key is seen and the fastest is kept for the
process and in a JSON file under the user's cache folder (:class:`Tuner`). While a CUDA graph is
captured nothing is timed: the cached choice, or the first candidate.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ENV_TUNE = "LIDAR_COMPLETION_TRITON_TUNE"          # 0: no timing, first candidate
ENV_TUNE_CACHE = "LIDAR_COMPLETION_TRITON_CACHE"   # JSON file of tuned choices ('' = none)
ENV_LOOP = "LIDAR_COMPLETION_TRITON_LOOP"          # masked (default) | flat | both: the K loops tried
ENV_WGRAD = "LIDAR_COMPLETION_TRITON_WGRAD"        # compact (default) | dense: the weight gradient's loop
LOOPS = ("masked", "flat", "both")


@dataclass(frozen=True)
class Config:
    bm: int
    bn: int
    bk: int
    warps: int = 4
    stages: int = 2
    pair: bool = False    # two feature groups per program (sharing weight tiles and the table)
    flat: bool = False    # the K loop over listed (offset, chunk) pairs, no branch (pipelinable)

    def key(self) -> str:
        return (f"{self.bm}x{self.bn}x{self.bk}w{self.warps}s{self.stages}" + ("p" if self.pair else "")
                + ("f" if self.flat else ""))

    @staticmethod
    def parse(text: str) -> "Config":
        flat = text.endswith("f")
        text = text[:-1] if flat else text
        pair = text.endswith("p")
        dims, rest = text.rstrip("p").split("w")
        bm, bn, bk = (int(v) for v in dims.split("x"))
        warps, stages = (int(v) for v in rest.split("s"))
        return Config(bm, bn, bk, warps, stages, pair, flat)


def loop_choice() -> str:
    """The K loops the tuner may try (``LIDAR_COMPLETION_TRITON_LOOP``): ``masked`` (a loop over
    all offsets that tests the tile mask; the default: on an H200 the flat loop was at most as
    fast on the heaviest layers), ``flat`` (one branch-free loop over the tile's listed offsets and channel chunks, three
    pipeline stages) or ``both`` (the tuner times both)."""
    value = os.environ.get(ENV_LOOP, "masked").strip().lower() or "masked"
    if value not in LOOPS:
        from ..errors import ConfigError
        raise ConfigError(f"{ENV_LOOP}={value!r}: expected one of {', '.join(LOOPS)}")
    return value


def _pow2(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def shared_bytes(cfg: Config, itemsize: int) -> int:
    """Shared memory the pipelined operand tiles of ``cfg`` take: ``stages`` buffers of the A tile
    (two with ``pair``) and the weight tile. Compiled for sm_90 this is what Triton allocates for
    2-byte operands (128 x 256 x 64 at 3 stages: 144 KiB); 4-byte operands take up to an eighth
    more for the epilogue's layout conversion."""
    return cfg.stages * (cfg.bm * cfg.bk * (2 if cfg.pair else 1) + cfg.bk * cfg.bn) * itemsize


def candidates(rows: int, cin: int, cout: int, interpreted: bool, groups: int = 1, itemsize: int = 2,
               shared_limit: int | None = None) -> list[Config]:
    """Tile configurations worth trying for a convolution of this shape, the default first (at most
    five: each is compiled once per process, and compilation is what the first scan waits for).
    ``tl.dot`` needs every block dimension >= 16; channel counts below that are masked. With an
    even number of feature groups (guidance), pairs of groups per program are tried too. With
    ``shared_limit`` (bytes per block), tiles whose operands (``itemsize`` bytes each, see
    :func:`shared_bytes`, plus an eighth) would not fit are left out."""
    bk = _pow2(min(cin, 64), 16, 64)
    bn = _pow2(cout, 16, 128)
    pair = groups % 2 == 0
    loops = loop_choice()
    if interpreted:     # every program is a Python loop over NumPy blocks: few, large programs
        return [Config(_pow2(rows, 16, 256), bn, bk, 1, 1, pair, loops == "flat")]
    # The defaults, from every convolution of a published-width scan timed per tile configuration
    # on an H200 (benchmarks/gemm_tiles.py, docs/benchmarks.md): 256 output channels run fastest
    # as 128 x 256 tiles, 8 warps, 3 stages (1.24x and 1.6x over 64 x 128 x 64, 4 warps, 2 stages
    # on the two heaviest layers); with several channel chunks per offset a third stage pays
    # (1.2x); one chunk per offset has nothing to overlap in the masked loop.
    stages = 3 if cin > bk else 2
    out = [Config(64, bn, bk, 4, stages), Config(128, bn, bk, 8, 2)]
    if cout > 128 and rows >= 16384:   # (small levels keep smaller tiles: enough programs per SM)
        out.insert(0, Config(128, _pow2(cout, 16, 256), bk, 8, 3))
    if pair:
        out += [Config(64, min(bn, 64), bk, 4, 2, True), Config(128, min(bn, 64), bk, 8, 2, True)]
    else:
        out.append(Config(128, min(bn, 64), bk, 4, 2))
        if rows < 8192:     # small levels: small tiles keep every SM busy
            out.insert(1, Config(32, min(bn, 64), bk, 4, 2))
    flat = [Config(c.bm, c.bn, c.bk, c.warps, 3, c.pair, True) for c in out]
    out = {"masked": out, "flat": flat, "both": out + flat}[loops]
    if shared_limit is not None:
        fits = [c for c in out if shared_bytes(c, itemsize) * 9 // 8 <= shared_limit]
        out = fits or [min(out, key=lambda c: shared_bytes(c, itemsize))]
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=None)
def _shared_limit(device: torch.device) -> int | None:
    """Opt-in shared memory per block of a CUDA device (bytes), None when torch does not say
    (asked once per device: every convolution call wants it)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None)


def _bucket(rows: int) -> int:
    return 1 << max(0, (rows - 1).bit_length())


class Tuner:
    """The fastest tile configuration per key, timed once per process (CUDA events, median of a few
    runs) and remembered in a JSON file so that the next process starts tuned."""

    def __init__(self):
        self._best: dict = {}
        self._lock = threading.Lock()
        self._loaded = False

    @staticmethod
    def cache_path() -> str | None:
        path = os.environ.get(ENV_TUNE_CACHE)
        if path is not None:
            return path or None
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "lidar-completion", "triton-tune.json")

    def _device_tag(self, device: torch.device) -> str:
        import triton
        return f"{torch.cuda.get_device_name(device)}|triton {triton.__version__}"

    def _load(self, tag: str) -> None:
        self._loaded = True
        path = self.cache_path()
        if not path or not os.path.exists(path):
            return
        try:
            with open(path) as fh:
                saved = json.load(fh).get(tag, {})
            self._best.update({tuple(json.loads(k)): Config.parse(v) for k, v in saved.items()})
        except (OSError, ValueError, KeyError) as exc:   # a damaged cache only costs a re-tune
            log.warning("ignoring the Triton tuning cache %s: %s", path, exc)

    def _save(self, tag: str) -> None:
        path = self.cache_path()
        if not path:
            return
        try:
            data = {}
            if os.path.exists(path):
                with open(path) as fh:
                    data = json.load(fh)
            data[tag] = {json.dumps(list(k)): v.key() for k, v in self._best.items()}
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except (OSError, ValueError) as exc:
            log.warning("could not save the Triton tuning cache %s: %s", path, exc)

    def fallback(self, key: tuple, options: list[Config], failed: Config, run) -> Config:
        """Run the first of ``options`` after ``failed`` that launches (each one that cannot get
        its resources fails at launch, before it runs) and remember it for ``key`` in this
        process; RuntimeError when none does."""
        import triton

        rest = options[options.index(failed) + 1:] if failed in options else options
        error = None
        for cfg in rest:
            try:
                run(cfg)
            except triton.runtime.errors.OutOfResources as exc:
                log.debug("tile %s does not fit: %s", cfg.key(), exc)
                error = exc
                continue
            log.info("triton tile %s does not fit this device for %s; using %s", failed.key(), key, cfg.key())
            self._best[key] = cfg
            return cfg
        raise RuntimeError(f"no Triton tile configuration of {[c.key() for c in options]} fits this "
                           f"device's shared memory for convolution {key}") from error

    def choose(self, key: tuple, options: list[Config], run, device: torch.device) -> Config:
        """The configuration for ``key``: remembered, else timed now (``run(config)`` launches one),
        else (no timing allowed) the first option. A remembered choice that is not among
        ``options`` (another K loop setting made it) does not count."""
        hit = self._best.get(key)
        if hit is not None and hit in options:
            return hit
        if len(options) == 1 or device.type != "cuda" or os.environ.get(ENV_TUNE, "1") == "0":
            return options[0]
        tag = self._device_tag(device)
        with self._lock:
            if not self._loaded:
                self._load(tag)
            hit = self._best.get(key)
            if hit is not None and hit in options:
                return hit
            if torch.cuda.is_current_stream_capturing():
                # nothing may be timed (or compiled and loaded) inside a capture: the choice made
                # for the nearest row count of the same convolution (the sizing pass ran it), else
                # the default
                return self._nearest_choice(key, options) or options[0]
            best = min(options, key=lambda cfg: _time(run, cfg))
            self._best[key] = best
            self._save(tag)
            log.debug("triton tile for %s: %s", key, best.key())
            return best


    def _nearest_choice(self, key: tuple, options: list[Config]):
        """The remembered choice (one of ``options``) of the key that differs from ``key`` only in
        its row bucket (position 2), the closest bucket first."""
        near = [(abs(k[2].bit_length() - key[2].bit_length()), k) for k, v in self._best.items()
                if len(k) == len(key) and k[:2] == key[:2] and k[3:] == key[3:] and v in options]
        return self._best[min(near)[1]] if near else None


def _time(run, cfg: Config, reps: int = 5) -> float:
    try:
        run(cfg)     # compile and warm up
    except Exception as exc:   # e.g. out of shared memory for this tile: not a candidate
        log.debug("tile %s failed: %s", cfg.key(), exc)
        return float("inf")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run(cfg)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


TUNER = Tuner()


@dataclass
class Epilogue:
    scale: torch.Tensor | None = None      # (N,) float32, with shift: eval-mode batch norm
    shift: torch.Tensor | None = None
    residual: torch.Tensor | None = None   # (..., M, N), added after the affine map
    relu: bool = False


def _segment(t: torch.Tensor, groups: int) -> tuple[torch.Tensor, int, int]:
    """(tensor, group stride, row stride) of a (M, C) or (G, M, C) feature matrix whose rows are
    contiguous; a matrix without groups is broadcast (group stride 0)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t, 0, t.stride(0)
    if t.shape[0] == 1 and groups > 1:
        return t, 0, t.stride(1)
    return t, t.stride(0), t.stride(1)


def implicit_gemm(segments: tuple, weight: torch.Tensor, plan_for, rows: int, epilogue: Epilogue,
                  out_dtype: torch.dtype, kind: str, interpreted: bool) -> torch.Tensor:
    """One sparse convolution.

    ``segments``: one or two input feature matrices (..., M_in, C_i), concatenated along channels;
    ``weight``: (KVOL, sum C_i, N) in the compute dtype, contiguous (KVOL = 1 for a 1x1);
    ``plan_for(block)``: the gather plan (order, table, tile masks) for tiles of ``block`` rows, or
    None for a 1x1 convolution; ``plan_for(block, listed=True)``: each tile's offsets listed
    (:meth:`.kmap.CoordinateManager.tile_offsets`, for the flat loop); ``rows``: output rows.
    Returns (G, rows, N) or (rows, N)."""
    kvol, cin, n = weight.shape
    grouped = [s.shape[0] for s in segments if s.dim() == 3]
    if epilogue.residual is not None and epilogue.residual.dim() == 3:
        grouped.append(epilogue.residual.shape[0])
    groups = max(grouped) if grouped else 1
    if any(g not in (1, groups) for g in grouped):
        raise ValueError(f"feature groups do not match: {grouped}")
    segs = [_segment(s, groups) for s in segments]
    ca = segs[0][0].shape[-1]
    cb = segs[1][0].shape[-1] if len(segs) > 1 else 0
    if ca + cb != cin:
        raise ValueError(f"convolution expects {cin} input channels, got {ca} + {cb}")
    device = weight.device
    out = torch.empty((groups, rows, n), dtype=out_dtype, device=device)
    if rows == 0:
        return out if grouped else out[0]
    res = epilogue.residual
    if res is not None:
        res, srg, srm = _segment(res, groups)
    else:
        srg = srm = 0
    a, sag, sam = segs[0]
    b, sbg, sbm = segs[1] if len(segs) > 1 else (a, 0, 0)
    affine = epilogue.scale is not None
    dummy = weight
    precision = dot_precision(weight.dtype, device, interpreted)
    dot_f32 = interpreted or weight.dtype == torch.float32

    from . import triton_kernels as K

    def run(cfg: Config):
        plan = plan_for(cfg.bm)
        order, table, tile_masks = plan if plan is not None else (dummy, dummy, dummy)
        flat = cfg.flat and plan is not None
        tile_list = plan_for(cfg.bm, listed=True) if flat else dummy
        grid = (-(-rows // cfg.bm), -(-n // cfg.bn), groups // 2 if cfg.pair else groups)
        K.implicit_gemm_kernel[grid](
            a, b, weight, out, order, table, tile_masks, tile_list,
            epilogue.scale if affine else dummy, epilogue.shift if affine else dummy,
            res if res is not None else dummy,
            rows, ca, cb, n, sag, sam, sbg, sbm, srg, srm,
            KVOL=kvol, IDENTITY=plan is None, HAS_B=len(segs) > 1, AFFINE=affine,
            RESIDUAL=res is not None, RELU=bool(epilogue.relu), DOT_F32=dot_f32, PRECISION=precision,
            PAIR=cfg.pair, FLAT=flat, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, num_warps=cfg.warps,
            num_stages=cfg.stages)

    options = candidates(rows, cin, n, interpreted, groups, weight.element_size(),
                         None if interpreted else _shared_limit(device))
    key = (kind, kvol, _bucket(rows), ca, cb, n, groups, str(weight.dtype), res is not None)
    cfg = TUNER.choose(key, options, run, device)
    import triton

    try:
        run(cfg)
    except triton.runtime.errors.OutOfResources:
        # the estimate let through a tile this device cannot hold (it fails at launch, before
        # anything runs): the next candidate, remembered for the key
        cfg = TUNER.fallback(key, options, cfg, run)
    return out if grouped else out[0]


def dot_precision(dtype: torch.dtype, device: torch.device, interpreted: bool) -> str:
    """``input_precision`` of the fp32 products (bf16 / fp16 operands ignore it). On CUDA: TF32 when
    torch allows it for matrix products (``torch.backends.cuda.matmul.allow_tf32``), otherwise
    ``tf32x3`` - each operand split into a TF32 high and low part, three tensor-core products -
    which keeps fp32 accuracy (about 1e-6 relative per product) at tensor-core speed; Triton's
    ``ieee`` products run on the plain FMA units, 3.5x slower than the torch backend's cuBLAS on an
    H200 (docs/benchmarks.md). The interpreter: ``ieee``."""
    if interpreted or dtype != torch.float32 or device.type != "cuda":
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


@dataclass(frozen=True)
class WGradConfig:
    """Blocks of :func:`weight_gradient`'s kernel: ``br`` rows per product, at most ``bc`` input and
    ``bn`` output channels per program, the rows cut into about ``splits`` programs per offset,
    ``warps`` and pipeline ``stages`` (None: Triton's default)."""
    br: int = 64
    bc: int = 64
    bn: int = 64
    splits: int = 64
    warps: int = 4
    stages: int | None = None

    def key(self) -> str:
        return f"r{self.br}c{self.bc}n{self.bn}s{self.splits}w{self.warps}p{self.stages or '-'}"


WGRAD_DEFAULT = WGradConfig()


def weight_gradient(segments: tuple, grad_out: torch.Tensor, plan, kvol: int, interpreted: bool,
                    rows=None, config: WGradConfig | None = None) -> torch.Tensor:
    """The weight gradient (KVOL, sum C_i, N), float32, of a convolution whose input was ``segments``
    and whose output gradient is ``grad_out`` (..., M_out, N): per offset, the gathered input rows
    transposed times the output gradient rows, over every pair and feature group (row splits add
    with atomics). ``plan``: the forward's gather plan (order, table, tile masks), None for a 1x1;
    ``rows``: the same pairs listed per offset (``CoordinateManager.offset_rows``), which the kernel
    then loops over instead of every row of every offset (the caller leaves them out when
    :func:`weight_gradient_mode` is ``dense``); ``config``: the kernel's blocks (default
    :data:`WGRAD_DEFAULT`; the interpreter takes few large blocks)."""
    from . import triton_kernels as K

    grouped = [t.shape[0] for t in (*segments, grad_out) if t.dim() == 3]
    groups = max(grouped) if grouped else 1
    go, sgg, sgm = _segment(grad_out, groups)
    m, n = go.shape[-2], go.shape[-1]
    cin = sum(t.shape[-1] for t in segments)
    dw = torch.zeros((kvol, cin, n), dtype=torch.float32, device=grad_out.device)
    if m == 0:
        return dw
    compact = plan is not None and rows is not None
    if compact:
        table, order, counts = rows
    else:
        order, table = (plan[0], plan[1]) if plan is not None else (dw, dw)
        counts = dw
    precision = dot_precision(go.dtype, go.device, interpreted)
    cfg = config or WGRAD_DEFAULT
    br = _pow2(m, 16, 512) if interpreted and config is None else cfg.br   # the interpreter: few, large blocks
    bn = _pow2(n, 16, cfg.bn)
    splits_wanted = 1 if interpreted and config is None else cfg.splits
    rows_per_split = max(br, -(-max(1, -(-m // splits_wanted)) // br) * br)   # whole blocks per split
    splits = -(-m // rows_per_split)
    launch = {"num_warps": cfg.warps}
    if cfg.stages is not None:
        launch["num_stages"] = cfg.stages
    offset = 0
    for seg in segments:
        x, sxg, sxm = _segment(seg, groups)
        cx = x.shape[-1]
        bc = _pow2(cx, 16, cfg.bc)
        grid = (kvol, splits, -(-cx // bc) * -(-n // bn))
        K.weight_grad_kernel[grid](
            x, go, dw, order, table, counts, m, cx, offset, cin, n, groups, rows_per_split, sxg, sxm, sgg, sgm,
            KVOL=kvol, IDENTITY=plan is None, COMPACT=compact, DOT_F32=interpreted or go.dtype == torch.float32,
            PRECISION=precision, BR=br, BC=bc, BN=bn, **launch)
        offset += cx
    return dw


def weight_gradient_mode() -> str:
    """``compact`` (default: each offset's pairs listed, the kernel loops over those alone) or
    ``dense`` (every row of every offset, the missing ones masked) from ``LIDAR_COMPLETION_TRITON_WGRAD``:
    the two are kept side by side until a GPU has timed them."""
    mode = os.environ.get(ENV_WGRAD, "compact").strip().lower() or "compact"
    if mode not in ("compact", "dense"):
        from ..errors import ConfigError
        raise ConfigError(f"{ENV_WGRAD}={mode!r}: expected compact or dense")
    return mode
