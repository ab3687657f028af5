"""Triton sparse backend: the torch backend's kernel maps, convolutions as fused Triton kernels.

Coordinates, voxelisation, kernel-map building (on the device, once per coordinate set, shared by
every layer and both guidance halves) and static mode are the torch backend's (:mod:`.kmap`,
:mod:`.static`). The convolutions run :func:`.conv_implicit_gemm.implicit_gemm`.

Fusion without changing the networks: a convolution returns a *pending* tensor (the convolution not
yet run). Eval-mode batch norm, a residual add and ReLU applied to it are recorded in its epilogue,
and a concatenation of two tensors stays two segments; the kernel runs when something reads the
features (the next convolution, the modulation, slicing). So ``conv -> BN -> ReLU`` is one kernel,
``conv -> BN (+ identity or the 1x1 branch) -> ReLU`` of a residual block is one kernel (plus the
1x1 branch's own), and the decoder's skip concatenation is never materialised.

Training (autograd recording through the weights or features) runs the same kernel without fusion
through an autograd function: the input gradient is the implicit GEMM over the transposed map
(which is another map of the same pass: 3x3x3 onto itself with mirrored offsets, stride-2 onto the
transposed convolution's map and back), the weight gradient a gather-GEMM per offset over that
offset's pairs alone (``CoordinateManager.offset_rows``). Batch norm
with batch statistics and ReLU run as torch operations then.
"""
from __future__ import annotations

import os

import torch

from ..errors import CloudFormatError, ConfigError
from . import triton_refusal, triton_interpreted
from . import conv_implicit_gemm as igemm
from .conv_implicit_gemm import Epilogue
from .coords import Field
from .layers import BatchNorm, Convolution, ConvolutionTranspose, frozen
from .nearest import nearest_cell as _nearest_cell
from .torch_backend import TORCH_ENGINE, SparseTensorBase, TorchBackend, broadcast_groups, voxelize_points

_KINDS = {1: "identity", 3: "conv3", 2: "down"}
ENV_MAPS = "LIDAR_COMPLETION_TRITON_MAPS"   # 0: kernel maps and lattice search from torch operations
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Pending:
    """A convolution that has not run yet and the element-wise work fused after it."""

    __slots__ = ("conv", "kind", "in_stride", "segments", "epilogue", "dtype")

    def __init__(self, conv, kind: str, in_stride: int, segments: tuple, epilogue: Epilogue, dtype):
        self.conv, self.kind, self.in_stride = conv, kind, in_stride
        self.segments, self.epilogue, self.dtype = segments, epilogue, dtype

    def with_epilogue(self, **changes) -> "Pending":
        e = self.epilogue
        fields = dict(scale=e.scale, shift=e.shift, residual=e.residual, relu=e.relu)
        fields.update(changes)
        return Pending(self.conv, self.kind, self.in_stride, self.segments, Epilogue(**fields), self.dtype)

    @property
    def takes_affine(self) -> bool:
        e = self.epilogue
        return e.scale is None and e.residual is None and not e.relu

    @property
    def takes_residual(self) -> bool:
        return self.epilogue.residual is None and not self.epilogue.relu

    def run(self, manager, out_stride: int) -> torch.Tensor:
        conv, kind, dtype = self.conv, self.kind, self.dtype
        cin, cout = conv.in_channels, conv.out_channels
        kvol = 1 if kind == "identity" else conv.kernel_size ** 3
        weight = conv.derived(f"igemm-{dtype}", lambda w: w.reshape(kvol, cin, cout).to(dtype).contiguous())
        rows = len(manager.level(out_stride))
        return igemm.implicit_gemm(self.segments, weight, _plans(manager, kind, self.in_stride), rows,
                                   self.epilogue, dtype, kind, triton_interpreted())


def _plans(manager, kind: str, stride: int):
    """``plan_for(block, listed=False)`` of :func:`.conv_implicit_gemm.implicit_gemm` for a map of
    ``kind`` at ``stride``: the gather plan, or with ``listed`` each tile's offsets (None for 1x1)."""
    def plan_for(block, listed=False):
        if kind == "identity":
            return None
        if listed:
            return manager.tile_offsets(kind, stride, block)
        return manager.gather_plan(kind, stride, block)
    return plan_for


# the gather plan that carries a convolution's input gradient back: (kind, stride of the plan) as a
# function of the forward's kind and input stride
_TRANSPOSED = {"conv3": lambda s: ("conv3", s), "down": lambda s: ("up", 2 * s),
               "up": lambda s: ("down", s // 2), "identity": lambda s: ("identity", s)}
_PLAN_BLOCK = 64


def _transposed_weight(kind: str, w: torch.Tensor) -> torch.Tensor:
    """Weights (KVOL, N, C) of the convolution that maps an output gradient back to the input:
    each offset's matrix transposed, and for 3x3x3 the offsets mirrored (the output row that reads
    input i at offset k is the neighbour of i at offset -k, i.e. index 26 - k)."""
    wt = w.transpose(1, 2)
    return (wt.flip(0) if kind == "conv3" else wt).contiguous()


class _ImplicitGemmConv(torch.autograd.Function):
    """A Triton convolution that autograd can differentiate: the input gradient is the same implicit
    GEMM over the transposed map (mirrored, transposed weights), the weight gradient a gather-GEMM
    per offset (:func:`.conv_implicit_gemm.weight_gradient`)."""

    @staticmethod
    def forward(ctx, pending: "Pending", manager, out_stride: int, weight: torch.Tensor, *segments):
        ctx.pending, ctx.manager = pending, manager
        ctx.save_for_backward(weight, *segments)
        return pending.run(manager, out_stride)

    @staticmethod
    def backward(ctx, grad_out):
        weight, *segments = ctx.saved_tensors
        p, manager = ctx.pending, ctx.manager
        interpreted = triton_interpreted()
        kvol = 1 if p.kind == "identity" else p.conv.kernel_size ** 3
        w = weight.reshape(kvol, p.conv.in_channels, p.conv.out_channels)
        grad_out = grad_out.contiguous()
        grads = [None] * len(segments)
        if any(ctx.needs_input_grad[4:]):
            kind, stride = _TRANSPOSED[p.kind](p.in_stride)
            rows = len(manager.level(p.in_stride))
            grad_in = igemm.implicit_gemm((grad_out,), _transposed_weight(p.kind, w).to(grad_out.dtype),
                                          _plans(manager, kind, stride), rows, Epilogue(), grad_out.dtype, kind,
                                          interpreted)
            start = 0
            for i, seg in enumerate(segments):
                c = seg.shape[-1]
                g = grad_in[..., start:start + c]
                start += c
                if seg.dim() < g.dim():          # a feature set broadcast over the groups
                    g = g.sum(0)
                grads[i] = g.to(seg.dtype) if ctx.needs_input_grad[4 + i] else None
        dw = None
        if ctx.needs_input_grad[3]:
            plan = rows = None
            if p.kind != "identity":
                plan = manager.gather_plan(p.kind, p.in_stride, _PLAN_BLOCK)
                if igemm.weight_gradient_mode() == "compact":
                    rows = manager.offset_rows(p.kind, p.in_stride, _PLAN_BLOCK)
            dw = igemm.weight_gradient(tuple(segments), grad_out, plan, kvol, interpreted, rows)
            dw = dw.reshape(weight.shape).to(weight.dtype)
        return (None, None, None, dw, *grads)


class TritonSparseTensor(SparseTensorBase):
    """Features (..., M, C) on ``manager.levels[stride]``: materialised, two segments of a pending
    concatenation, or a pending convolution (see the module docstring)."""

    __slots__ = ("_feats", "_segments", "_pending")

    def __init__(self, feats: torch.Tensor | None, stride: int, manager, segments: tuple | None = None,
                 pending: Pending | None = None):
        self._feats = feats
        self._segments = segments
        self._pending = pending
        self.stride = stride
        self.manager = manager

    @property
    def feats(self) -> torch.Tensor:
        if self._feats is None:
            if self._pending is not None:
                self._feats = self._pending.run(self.manager, self.stride)
                self._pending = None
            else:
                self._feats = torch.cat(broadcast_groups(*self._segments), dim=-1)
            self._segments = None
        return self._feats

    @property
    def pending(self) -> Pending | None:
        return self._pending

    def segments(self) -> tuple:
        """The input of a convolution reading this tensor: its segments, concatenated by the kernel."""
        if self._feats is None and self._pending is None:
            return self._segments
        return (self.feats,)


def _compute_dtype(segments: tuple, device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = segments[0].dtype
        for s in segments[1:]:
            dtype = torch.promote_types(dtype, s.dtype)
    return dtype if dtype in _DTYPES else None


class TritonEngine:
    """What the layers compute on the Triton backend (see :mod:`.layers`)."""

    name = "triton"

    @property
    def maps(self):
        """The map-building kernels (:mod:`.triton_kmap`) the coordinate managers of this engine
        use, or None with ``LIDAR_COMPLETION_TRITON_MAPS=0`` (torch operations then, as on the
        torch backend: for comparisons)."""
        if os.environ.get(ENV_MAPS, "1").strip() == "0":
            return None
        from . import triton_kmap
        return triton_kmap

    @staticmethod
    def _check_device(device: torch.device) -> None:
        why = triton_refusal(device)
        if why is not None:
            raise ConfigError(why)

    def _pending_conv(self, conv, x, kind: str, out_stride: int):
        """A pending convolution of ``x`` (at inference), the convolution run at once through the
        differentiable :class:`_ImplicitGemmConv` (while autograd records), or None where the
        torch algorithms must run (an unsupported dtype)."""
        segments = x.segments()
        device = segments[0].device
        dtype = _compute_dtype(segments, device)
        if dtype is None:
            return None
        self._check_device(device)
        pending = Pending(conv, kind, x.stride, segments, Epilogue(), dtype)
        if frozen(conv.kernel, *segments):
            return TritonSparseTensor(None, out_stride, x.manager, pending=pending)
        out = _ImplicitGemmConv.apply(pending, x.manager, out_stride, conv.kernel, *segments)
        return TritonSparseTensor(out, out_stride, x.manager)

    def convolution(self, conv: Convolution, x):
        kind = _KINDS[conv.kernel_size]
        out = self._pending_conv(conv, x, kind, x.stride * (2 if kind == "down" else 1))
        return out if out is not None else TORCH_ENGINE.convolution(conv, x)

    def transposed(self, conv: ConvolutionTranspose, x):
        out = self._pending_conv(conv, x, "up", x.stride // 2)
        return out if out is not None else TORCH_ENGINE.transposed(conv, x)

    @staticmethod
    def batch_norm(bn: BatchNorm, x):
        p = getattr(x, "pending", None)
        if p is not None and p.takes_affine and bn.uses_running_stats and frozen(*bn.parameters()):
            shift, scale = bn.affine(torch.float32)
            return TritonSparseTensor(None, x.stride, x.manager, pending=p.with_epilogue(scale=scale, shift=shift))
        return TORCH_ENGINE.batch_norm(bn, x)

    @staticmethod
    def relu(x):
        p = getattr(x, "pending", None)
        if p is not None and not p.epilogue.relu:
            return TritonSparseTensor(None, x.stride, x.manager, pending=p.with_epilogue(relu=True))
        return TORCH_ENGINE.relu(x)

    @staticmethod
    def add(a, b):
        for first, second in ((a, b), (b, a)):   # the sum is symmetric: fuse into whichever is pending
            p = first.pending
            if p is not None and p.takes_residual:
                res = second.feats
                if frozen(res):
                    return TritonSparseTensor(None, a.stride, a.manager, pending=p.with_epilogue(residual=res))
        return a.replace(a.feats + b.feats)

    @staticmethod
    def cat(a, b):
        sa, sb = a.segments(), b.segments()
        if len(sa) == 1 and len(sb) == 1:
            return TritonSparseTensor(None, a.stride, a.manager, segments=(sa[0], sb[0]))
        return a.replace(torch.cat(broadcast_groups(a.feats, b.feats), dim=-1))


TRITON_ENGINE = TritonEngine()


def _planes(coords: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(4, n) float64 planes b, x, y, z of (n, 3) coordinates and their batch index (the layout of
    the nearest-cell kernels: contiguous loads per plane)."""
    b = torch.zeros(coords.shape[0], dtype=torch.long, device=coords.device) if b is None else b
    return torch.cat([b.view(1, -1).double(), coords.t().double()], 0).contiguous()


def _check_cells(e: int) -> None:
    """The nearest-cell kernels address the 4 reference planes with 32-bit offsets (3 E + i < 2**31)."""
    if e >= 1 << 29:
        raise CloudFormatError(f"condition has {e} cells; at most {(1 << 29) - 1} are supported")


def bruteforce_nearest(q: torch.Tensor, r: torch.Tensor, qb: torch.Tensor | None = None,
                       rb: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Exact nearest reference cell of the same batch element by the Triton brute-force kernel
    (exact float64 arithmetic on the integer coordinates, ties to the smallest index); the drop-in
    for the float64 GEMM fallback of :mod:`.nearest`. With ``check``, raises when a query's batch
    element has no cell."""
    from . import triton_kernels as K

    m, e = q.shape[0], r.shape[0]
    out = torch.empty(m, dtype=torch.long, device=q.device)
    if m == 0:
        return out
    _check_cells(e)
    query, ref = _planes(q, qb), _planes(r, rb)
    bq, br = 64, 64
    K.nearest_cell_kernel[(-(-m // bq),)](query, ref, out, m, e, BQ=bq, BR=br, num_warps=4)
    if check and bool((out < 0).any()):
        missing = int(query[0, torch.nonzero(out < 0)[0, 0]])
        raise CloudFormatError(f"condition has no cells for batch element {missing}")
    return out.clamp_(min=0)


def nearest_rows(query: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, todo: torch.Tensor,
                 out: torch.Tensor, memo: dict | None = None) -> None:
    """The exact brute-force answer, written into ``out[row]``, for the listed (distinct) ``rows``
    of ``query`` (M, 4) whose ``todo`` flag is set, against ``ref`` (E, 4) (the static-mode
    fallback of :mod:`.nearest` in one kernel: no gathered query, no copies back). ``memo``: a
    dict kept for one pass, where the reference planes are built once."""
    from . import triton_kernels as K

    n, e = rows.shape[0], ref.shape[0]
    if n == 0:
        return
    _check_cells(e)
    key = ("planes", id(ref))
    hit = None if memo is None else memo.get(key)
    if hit is None or hit[0] is not ref:
        hit = (ref, _planes(ref[:, 1:], ref[:, 0]))
        if memo is not None:
            memo[key] = hit
    flags = todo.view(torch.int8) if todo.dtype == torch.bool else todo
    K.nearest_rows_kernel[(-(-n // 64),)](query, query.stride(0), query.stride(1), rows, n, flags, hit[1], out, e,
                                          BQ=64, BR=64, num_warps=4)


#: Points one program of :func:`.triton_kernels.fps_grid_kernel` keeps in registers at most.
FPS_MAX_CHUNK = 8192
#: Polls of one sampling step before the kernel gives up (about a second): it never hangs.
FPS_MAX_POLLS = 1 << 20


#: Candidates per program and exchange of :func:`.triton_kernels.fps_rounds_kernel` (0: the
#: one-sample-per-exchange :func:`.triton_kernels.fps_grid_kernel`).
FPS_CANDIDATES = (0, 1, 2, 4, 8)
ENV_FPS_CANDIDATES = "LIDAR_COMPLETION_FPS_CANDIDATES"


def fps_candidates_default() -> int:
    """``LIDAR_COMPLETION_FPS_CANDIDATES`` (one of :data:`FPS_CANDIDATES`), else 0."""
    raw = os.environ.get(ENV_FPS_CANDIDATES, "").strip()
    if not raw:
        return 0
    try:
        k = int(raw)
    except ValueError:
        k = -1
    if k not in FPS_CANDIDATES:
        raise ConfigError(f"{ENV_FPS_CANDIDATES}={raw!r}: expected one of {FPS_CANDIDATES}")
    return k


def _device_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 1


def farthest_point_sample_device(clouds: list, counts: list, programs: int | None = None,
                                 candidates: int | None = None) -> list:
    """Exact farthest-point sampling of several clouds on their device: for cloud i (an (n_i, 3)
    tensor) the indices of ``counts[i]`` samples, the textbook algorithm from point 0 in float32
    without fused multiply-adds, ties to the smallest index (a cloud of ``counts[i]`` points: every
    index, in order). The CPU path (:func:`lidar_completion.preprocess.farthest_point_sample`,
    fpsample's k-d tree variant) is the same algorithm from a start point of its own choosing, so
    the two pick different, equally valid samples.

    Each cloud is split over up to (SMs / clouds) programs of
    :func:`.triton_kernels.fps_grid_kernel`, whose points stay in registers and which exchange
    one key per step through global memory; clouds too large for that (over SMs x 8,192 points)
    take :func:`.triton_kernels.fps_kernel`, one program per cloud streaming its points each step.
    ``programs`` caps the programs per cloud (a benchmark knob; default: the SMs shared out).
    ``candidates`` = K (1, 2, 4 or 8; default ``LIDAR_COMPLETION_FPS_CANDIDATES``, else 0) takes
    :func:`.triton_kernels.fps_rounds_kernel` instead, which trades each program's K best
    points per exchange and takes every sample they settle - the same samples in far fewer
    exchanges; 0 keeps the one-sample-per-exchange kernel. (Clouds too large for registers take
    :func:`.triton_kernels.fps_kernel` whatever ``candidates`` says.)
    Under the interpreter every cloud is one program."""
    import triton

    from . import triton_kernels as K

    if len(clouds) != len(counts) or not clouds:
        raise ValueError("one sample count per cloud, at least one cloud")
    sizes = [int(c.shape[0]) for c in clouds]
    counts = [int(k) for k in counts]
    if any(k < 1 or k > n for k, n in zip(counts, sizes)):
        raise ValueError(f"sample counts {counts} must lie in 1..cloud size {sizes}")
    if max(sizes) >= (1 << 24) - 1:
        raise ValueError(f"device farthest-point sampling takes clouds of under 16,777,215 points, got {max(sizes)}")
    device = clouds[0].device
    pts = torch.cat([c[:, :3].float() for c in clouds]).contiguous()
    starts = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)
    out_starts = torch.tensor([0] + counts[:-1], device=device).cumsum(0)
    sizes_t = torch.tensor(sizes, dtype=torch.int32, device=device)
    counts_t = torch.tensor(counts, dtype=torch.int32, device=device)
    out = torch.empty(sum(counts), dtype=torch.long, device=device)
    interpreted = triton_interpreted()
    per_cloud = 1 if interpreted else max(1, _device_programs(device) // len(clouds))
    if programs is not None:
        per_cloud = max(1, min(per_cloud, int(programs)))
    largest = max(sizes)
    split = min(per_cloud, -(-largest // 256))           # programs per cloud: >= 256 points each
    block = triton.next_power_of_2(-(-largest // split))
    if candidates is None:
        candidates = fps_candidates_default()
    candidates = int(candidates)
    if candidates not in FPS_CANDIDATES:
        raise ValueError(f"candidates must be one of {FPS_CANDIDATES}, got {candidates}")
    if interpreted or block <= FPS_MAX_CHUNK:
        peers = max(16, triton.next_power_of_2(split))
        status = torch.zeros(1, dtype=torch.int32, device=device)
        warps = min(8, max(1, block // 1024))
        if candidates:
            slots = torch.zeros(len(clouds) * 2 * peers * (candidates + 1), dtype=torch.long, device=device)
            K.fps_rounds_kernel[(split, len(clouds))](
                pts, starts, sizes_t, counts_t, out_starts, slots, status, out, split, FPS_MAX_POLLS,
                BLOCK=block, PB=peers, K=candidates,
                num_warps=min(8, max(warps, (peers * candidates) // 512)), enable_fp_fusion=False)
        else:
            slots = torch.zeros(len(clouds) * 2 * peers, dtype=torch.long, device=device)
            K.fps_grid_kernel[(split, len(clouds))](
                pts, starts, sizes_t, counts_t, out_starts, slots, status, out, split, FPS_MAX_POLLS,
                BLOCK=block, PB=peers, num_warps=warps, enable_fp_fusion=False)
        code = int(status.item())
        if code == 1:
            raise RuntimeError(f"device farthest-point sampling: a step waited over {FPS_MAX_POLLS} polls "
                               f"for its {split} programs (not all resident at once?)")
        if code:
            raise RuntimeError("device farthest-point sampling: a round took no sample (kernel fault)")
    else:
        dist = torch.empty(pts.shape[0], dtype=torch.float32, device=device)
        K.fps_kernel[(len(clouds),)](pts, starts, sizes_t, counts_t, out_starts, dist, out, BLOCK=1024,
                                     num_warps=8, enable_fp_fusion=False)
    return [torch.arange(n, device=device) if k == n else idx - s
            for idx, s, n, k in zip(torch.split(out, counts), starts.tolist(), sizes, counts)]


def farthest_point_sample_sectors_device(points: torch.Tensor, count: int, parts: int) -> torch.Tensor:
    """Indices of ``count`` samples of one cloud (N, 3) on its device: exact
    (:func:`farthest_point_sample_device`) for ``parts`` = 1, else the approximate variant of
    :func:`lidar_completion.preprocess.sector_split` - the cloud's azimuth sectors as clouds of their
    own, sampled side by side in one launch (``count / parts`` sequential steps instead of
    ``count``), the indices sector after sector."""
    from ..preprocess import sector_members

    n = int(points.shape[0])
    count = min(int(count), n)
    if int(parts) <= 1 or count >= n:
        return farthest_point_sample_device([points], [count])[0]
    members, quotas = sector_members(points, count, int(parts))
    found = farthest_point_sample_device([points.index_select(0, m) for m in members], quotas)
    return torch.cat([m.index_select(0, i) for m, i in zip(members, found)])


class TritonBackend(TorchBackend):
    name = "triton"
    supports_groups = True

    @staticmethod
    def voxelize(points: torch.Tensor, batch: torch.Tensor, voxel_size: float):
        """Points (N, 3) float32 and batch index (N,) -> (Field, stride-1 tensor of mean xyz)."""
        TRITON_ENGINE._check_device(points.device)
        return voxelize_points(points, batch, voxel_size, TRITON_ENGINE, TritonSparseTensor)

    @staticmethod
    def coords(x) -> torch.Tensor:
        """As the torch backend's (kept per level), unpacked by one kernel."""
        level = x.level
        if level._coords is None:
            maps = TRITON_ENGINE.maps
            if maps is not None:
                level._coords = maps.unpack_keys(level.keys)
        return level.coords

    @staticmethod
    def nearest_cell(query: torch.Tensor, ref: torch.Tensor, check_batches: bool = True) -> torch.Tensor:
        maps = TRITON_ENGINE.maps
        if maps is None:
            return _nearest_cell(query, ref, check_batches, bruteforce=bruteforce_nearest)
        return _nearest_cell(query, ref, check_batches, bruteforce=bruteforce_nearest,
                             lattice=maps.lattice_nearest, fill=nearest_rows)

    @staticmethod
    def modulate(x, weights: list, rows: list):
        """As the torch backend's, one :func:`.triton_kernels.modulate_kernel` per condition writing
        its feature group (no gathered weight matrix, no stacking); under autograd the torch form."""
        f = x.feats
        if torch.is_grad_enabled() and (f.requires_grad or any(w.requires_grad for w in weights)):
            return TorchBackend.modulate(x, weights, rows)
        from . import triton_kernels as K

        m, c = f.shape[-2], f.shape[-1]
        groups = len(weights)
        dtype = f.dtype
        for w in weights:
            dtype = torch.promote_types(dtype, w.dtype)
        out = torch.empty((groups, m, c) if groups > 1 else (m, c), dtype=dtype, device=f.device)
        if m == 0:
            return x.replace(out)
        bm = 256 if triton_interpreted() else 32
        bc = igemm._pow2(c, 16, 128)
        grid = (-(-m // bm), -(-c // bc))
        for g, (w, r) in enumerate(zip(weights, rows)):
            fg = f if f.dim() == 2 else f[g if f.shape[0] > 1 else 0]
            if fg.stride(-1) != 1:
                fg = fg.contiguous()
            og = out if groups == 1 else out[g]
            K.modulate_kernel[grid](fg, w.contiguous(), r.contiguous(), og, m, c, fg.stride(0), og.stride(0),
                                    BM=bm, BC=bc, num_warps=8 if bc >= 128 else 4)
        return x.replace(out)


BACKEND = TritonBackend()

__all__ = ["BACKEND", "Field", "TritonBackend", "TritonSparseTensor", "bruteforce_nearest",
           "farthest_point_sample_device", "nearest_rows"]
