"""Pure-PyTorch sparse backend with MinkowskiEngine's semantics.

Coordinates follow MinkowskiEngine: a row at tensor stride ``s`` has integer coordinates that are
multiples of ``s`` (in voxel units), the minimum corner of its cell (floor towards -inf). Kernel maps
are built from sorted int64 keys with ``searchsorted`` once per coordinate set and cached in the
:class:`CoordinateManager` that every tensor of one forward pass shares, so all layers (and the
conditional / unconditional guidance passes, see ``Denoiser.forward_cfg``) reuse them.

Convolution = for each kernel offset: gather input rows -> matmul with that offset's weight ->
scatter-add into output rows. Kernel offsets are enumerated x fastest, then y, then z, exactly as
MinkowskiEngine stores ``kernel[k]`` (``k = dx + 3 dy + 9 dz`` shifted to 0..26 for size 3;
``k = dx + 2 dy + 4 dz`` for size 2).

Features may carry leading "group" dimensions, ``(G, M, C)``: G feature sets that share one coordinate
set (and so one set of kernel maps). The denoiser uses this for classifier-free guidance.

Three convolution algorithms (``LIDAR_COMPLETION_CONV_ALGO``, see :func:`conv_algorithm`):
*scatter* (gather -> matmul -> scatter-add per offset over the rows that have that neighbour; the
CPU's), *gather* (one (M, 27) neighbour table, one GEMM per chunk of rows; CUDA's for dense levels
and the stride-2 maps) and *grouped* (the rows with a neighbour at each offset padded to one length,
one batched GEMM over the 26 offsets; CUDA's for sparse levels such as the noisy stride-1 points).

Host-device synchronisation on CUDA (the unavoidable ones, per denoiser call): the noisy points move
at every solver step, so each step builds new coordinate sets, and ``torch.unique`` must learn how
many voxels each level has (voxelisation and 4 downsamplings: 5 reads); each 3x3x3 level reads the
longest per-offset neighbour list once (5 reads: the padded length and the algorithm choice); the
coordinate range check reads once; the nearest-condition lookup reads once per level (and once more
when some rows need the brute-force fallback). Everything else - neighbour and child tables,
convolutions, batch norm (an affine map at inference), slicing - is queued without waiting for the
device. The scatter algorithm additionally reads per-offset row counts (26 per level).

Static mode (``common.use_static_shapes``; what CUDA graph capture needs, see
``lidar_completion.cuda_graphs``): every level has a fixed capacity of rows from the plan (real rows
first, padding rows with the key PAD_KEY after them, which sort last and are nobody's neighbour),
``torch.unique`` becomes sort + cumsum + scatter into the capacity, the 3x3x3 convolutions take
the grouped form with the per-offset lists padded to a planned capacity (or the gather form), and
every check that would read the device (coordinate range, sizes past their capacity) becomes a
flag of the plan, read once by whoever ran the pass. No host read happens inside the pass.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from .common import (AXIS_BITS, AXIS_LIMIT, AXIS_OFFSET, PAD_BATCH, PAD_KEY, Field, StaticShapes,
                     check_coordinate_range, offset_key, pack_keys, static_shapes, tensor_version,
                     voxel_indices)

KERNEL3_OFFSETS = [(dx, dy, dz) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
KERNEL2_OFFSETS = [(dx, dy, dz) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


def unpack_keys(keys: torch.Tensor) -> torch.Tensor:
    mask = (1 << AXIS_BITS) - 1
    z = (keys & mask) - AXIS_OFFSET
    y = ((keys >> AXIS_BITS) & mask) - AXIS_OFFSET
    x = ((keys >> (2 * AXIS_BITS)) & mask) - AXIS_OFFSET
    b = keys >> (3 * AXIS_BITS)
    return torch.stack([b, x, y, z], dim=1)


_DELTAS: dict = {}


def _kernel3_deltas(stride: int, device: torch.device) -> torch.Tensor:
    """Key differences of the 27 offsets of a 3x3x3 kernel at ``stride``, kept on the device (a
    fresh host-to-device copy per level would wait for the device)."""
    key = (stride, str(device))
    if key not in _DELTAS:
        _DELTAS[key] = torch.tensor([offset_key(dx * stride, dy * stride, dz * stride)
                                     for dx, dy, dz in KERNEL3_OFFSETS], dtype=torch.long, device=device)
    return _DELTAS[key]


class Level:
    """One coordinate set: rows sorted by (b, x, y, z)."""

    __slots__ = ("stride", "keys", "_coords")

    def __init__(self, stride: int, keys: torch.Tensor, coords: torch.Tensor | None = None):
        self.stride = stride
        self.keys = keys
        self._coords = coords

    @property
    def coords(self) -> torch.Tensor:
        if self._coords is None:
            self._coords = unpack_keys(self.keys)
        return self._coords

    def __len__(self) -> int:
        return int(self.keys.shape[0])


def _unique_static(keys: torch.Tensor, cap: int):
    """``torch.unique(keys, sorted=True, return_inverse=True)`` with a fixed output size and no host
    read. Returns ``(unique keys (cap,) padded with PAD_KEY, inverse clamped to cap - 1,
    inverse with cap (a dump row) for PAD_KEY rows and for rows past the capacity, number of
    distinct real keys (0-d))``; PAD_KEY entries of ``keys`` are padding and never counted."""
    skeys, order = torch.sort(keys)
    new = torch.ones_like(skeys, dtype=torch.bool)
    new[1:] = skeys[1:] != skeys[:-1]
    ids = torch.cumsum(new, 0) - 1
    real = skeys != PAD_KEY
    count = (new & real).sum()
    slot = torch.where(real & (ids < cap), ids, cap)
    # every row of one group writes the same key; the dump slot (cap) is dropped
    ukeys = torch.full((cap + 1,), PAD_KEY, dtype=keys.dtype, device=keys.device).index_put_((slot,), skeys)
    dump = torch.empty_like(slot).scatter_(0, order, slot)
    return ukeys[:cap], dump.clamp(max=cap - 1), dump, count


class CoordinateManager:
    """Coordinate sets of every tensor stride of one input, and their kernel maps (built lazily).

    ``static``: ``(plan, m)`` in static mode (see :class:`~lidar_completion.sparse.common.StaticShapes`;
    ``m`` numbers the voxelisations of the pass): every level then has a fixed capacity of rows,
    the real ones first, padding rows (key PAD_KEY) after them."""

    def __init__(self, base: Level, static: tuple[StaticShapes, int] | None = None):
        self.levels = {base.stride: base}
        self._down = {}
        self._nbr = {}
        self.cache = {}  # free-form cache for users (e.g. nearest condition cells per level)
        self.static = static

    def level(self, stride: int) -> Level:
        if stride not in self.levels:
            if stride // 2 not in self.levels and stride > 1:
                self.level(stride // 2)
            self.parent_map(stride // 2)
        return self.levels[stride]

    def parent_map(self, stride: int):
        """Parent cell (row of the level at ``2 * stride``) and kernel offset index of every row of
        the level at ``stride``. Every fine row belongs to exactly one coarse cell and one offset.

        Works on the packed keys: each axis field holds ``coordinate + 2**17`` and the offset is a
        multiple of ``2 * stride``, so flooring a coordinate to the coarse grid clears the field's
        low bits, and the offset inside the parent cell is the bit at ``log2(stride)``."""
        key = ("parent", stride)
        if key in self._down:
            return self._down[key]
        if stride & (stride - 1) or not 1 <= stride < AXIS_OFFSET // 2:
            raise ValueError(f"tensor strides are powers of two, got {stride}")
        keys = self.levels[stride].keys
        sh = stride.bit_length() - 1
        low = (1 << (sh + 1)) - 1
        coarse = keys & ~(low | (low << AXIS_BITS) | (low << (2 * AXIS_BITS)))
        s2 = 2 * stride
        if self.static is not None:
            plan, m = self.static
            size_key = ("level", m, s2)
            cap = plan.capacity(size_key, keys.shape[0])
            pkeys, inverse, dump, count = _unique_static(torch.where(keys == PAD_KEY, keys, coarse), cap)
            plan.size(size_key, count, cap)
            self._down[("dump", stride)] = dump
        else:
            pkeys, inverse = torch.unique(coarse, sorted=True, return_inverse=True)
        if s2 not in self.levels:
            self.levels[s2] = Level(s2, pkeys)
        k = (((keys >> (2 * AXIS_BITS + sh)) & 1) + 2 * ((keys >> (AXIS_BITS + sh)) & 1)
             + 4 * ((keys >> sh) & 1))
        self._down[key] = (inverse, k)
        return self._down[key]

    def downsample_map(self, stride: int):
        """(parent index per fine row, list over the 8 offsets of the fine rows at that offset)."""
        key = ("rows", stride)
        if key not in self._down:
            inverse, k = self.parent_map(stride)
            order = torch.argsort(k, stable=True)
            counts = torch.bincount(k, minlength=8).tolist()
            self._down[key] = (inverse, list(torch.split(order, counts)))
        return self._down[key]

    def child_table(self, stride: int) -> torch.Tensor:
        """(M_coarse, 8) fine-row index of each child of the cells at ``2 * stride`` (x fastest), or
        M_fine where that child does not exist (the index of a zero padding row)."""
        key = ("children", stride)
        if key not in self._down:
            inverse, k = self.parent_map(stride)
            inverse = self._down.get(("dump", stride), inverse)   # static: padding rows -> dump row
            n_fine = len(self.levels[stride])
            n_coarse = len(self.levels[2 * stride])
            table = torch.full((n_coarse + 1, 8), n_fine, dtype=torch.long, device=k.device)
            table[inverse, k] = torch.arange(n_fine, device=k.device)
            self._down[key] = table[:n_coarse]
        return self._down[key]

    def neighbour_table(self, stride: int) -> torch.Tensor:
        """(M, 27) row index of the neighbour at each 3x3x3 offset, or M where there is none."""
        key = ("table", stride)
        if key in self._nbr:
            return self._nbr[key]
        keys = self.levels[stride].keys
        n = keys.shape[0]
        q = keys[:, None] + _kernel3_deltas(stride, keys.device)[None, :]
        idx = torch.searchsorted(keys, q.reshape(-1)).view(n, 27).clamp_(max=max(n - 1, 0))
        table = torch.where(keys[idx] == q, idx, torch.full_like(idx, n))
        self._nbr[key] = table
        return table

    def neighbour_stats(self, stride: int) -> tuple[int, int]:
        """``(M, L)``: rows of the level and the largest number of rows that have a neighbour at any
        one of the 26 non-centre offsets (one host read per level, shared by every layer)."""
        key = ("stats", stride)
        if key not in self._nbr:
            table = self.neighbour_table(stride)
            n = table.shape[0]
            counts = (table < n).sum(0)
            self._nbr[key] = (n, int(torch.cat([counts[:13], counts[14:]]).max()) if n else 0)
        return self._nbr[key]

    def offset_pairs(self, stride: int):
        """For the 26 non-centre offsets of a 3x3x3 kernel: ``(out_rows, in_rows)``, each (26, L)
        with L from :meth:`neighbour_stats`. Row ``j`` of offset ``k`` pairs an output row with its
        neighbour at that offset; offsets with fewer than L pairs are padded with ``in_rows = M``
        (the index of a zero feature row) and distinct output rows, so the padding adds exact zeros
        without two padded entries hitting one row. Built without host reads."""
        key = ("pairs", stride)
        if key in self._nbr:
            return self._nbr[key]
        if self.static is not None:
            n, width = len(self.levels[stride]), self._nbr[("width", stride)]
        else:
            n, width = self.neighbour_stats(stride)
        table = self.neighbour_table(stride)
        side = torch.cat([table[:, :13], table[:, 14:]], dim=1)            # (M, 26)
        missing = (side >= n).to(torch.uint8)
        order = torch.argsort(missing, dim=0, stable=True)[:width]         # (L, 26): existing first
        in_rows = torch.gather(side, 0, order)                             # M where padded
        pairs = (order.t().contiguous(), in_rows.t().contiguous())
        self._nbr[key] = pairs
        return pairs

    def static_algorithm(self, stride: int) -> str:
        """Static mode: 'grouped' or 'gather' for the 3x3x3 convolutions of a level, from the plan's
        capacity of the longest per-offset neighbour list (``("pairs", m, stride)``). The longest
        list is recorded either way (so the next plan knows it) and flagged when it exceeds the
        capacity the grouped form was built with. No capacity yet (a sizing pass): 'gather'."""
        key = ("algo", stride)
        if key in self._nbr:
            return self._nbr[key]
        plan, m = self.static
        n = len(self.levels[stride])
        size_key = ("pairs", m, stride)
        table = self.neighbour_table(stride)
        counts = (table < n).sum(0)
        longest = torch.cat([counts[:13], counts[14:]]).max()
        cap = plan.caps.get(size_key)
        forced = os.environ.get(ENV_ALGO, "auto").strip().lower()
        algo = "gather"
        if cap is not None and forced != "gather":
            width = max(1, min(int(cap), n))
            if forced == "grouped" or 26 * width + n < GROUPED_MAX_WORK * 27 * n:
                algo = "grouped"
                self._nbr[("width", stride)] = width
        plan.size(size_key, longest, self._nbr[("width", stride)] if algo == "grouped" else None)
        self._nbr[key] = algo
        return algo

    def neighbour_map(self, stride: int):
        """For the 27 offsets of a 3x3x3 kernel at ``stride``: (out_rows, in_rows) pairs, or None for
        the centre (identity)."""
        if stride in self._nbr:
            return self._nbr[stride]
        lv = self.levels[stride]
        keys = lv.keys
        n = keys.shape[0]
        maps = []
        for dx, dy, dz in KERNEL3_OFFSETS:
            if dx == 0 and dy == 0 and dz == 0:
                maps.append(None)
                continue
            q = keys + offset_key(dx * stride, dy * stride, dz * stride)
            idx = torch.searchsorted(keys, q)
            idx.clamp_(max=n - 1)
            hit = keys[idx] == q
            out_rows = torch.nonzero(hit, as_tuple=True)[0]
            maps.append((out_rows, idx[out_rows]))
        self._nbr[stride] = maps
        return maps


class TorchSparseTensor:
    """Features (..., M, C) on the coordinate set ``manager.levels[stride]``."""

    __slots__ = ("feats", "stride", "manager")

    def __init__(self, feats: torch.Tensor, stride: int, manager: CoordinateManager):
        self.feats = feats
        self.stride = stride
        self.manager = manager

    @property
    def level(self) -> Level:
        return self.manager.levels[self.stride]

    @property
    def coords(self) -> torch.Tensor:
        return self.level.coords

    def replace(self, feats: torch.Tensor) -> "TorchSparseTensor":
        return TorchSparseTensor(feats, self.stride, self.manager)

    def __add__(self, other: "TorchSparseTensor") -> "TorchSparseTensor":
        if other.manager is not self.manager or other.stride != self.stride:
            raise ValueError("adding sparse tensors on different coordinate sets")
        return self.replace(self.feats + other.feats)


ENV_ALGO = "LIDAR_COMPLETION_CONV_ALGO"
ALGOS = ("auto", "gather", "grouped", "scatter")
# bytes of gathered features per chunk of the gather-GEMM and grouped paths
_GATHER_BUDGET = {"cuda": 1 << 30, "cpu": 64 << 20}

# On CUDA, a 3x3x3 convolution uses the grouped path when its padded work (26 L + M rows) is below
# this share of the gather path's (27 M rows; it multiplies every missing neighbour's zero row).
GROUPED_MAX_WORK = 0.8


def conv_algorithm(device: torch.device, stats: tuple[int, int] | None = None) -> str:
    """Convolution algorithm for a layer: LIDAR_COMPLETION_CONV_ALGO when set to one of
    'gather' | 'grouped' | 'scatter', else ('auto') 'scatter' on the CPU and, on other devices,
    'grouped' where the level is sparse (``stats`` = :meth:`CoordinateManager.neighbour_stats`) and
    'gather' where it is dense or the map is one-to-one (``stats`` None).

    * gather: one (M, 27) neighbour table and one GEMM per chunk of rows - 3 kernels a layer;
    * grouped: the rows with a neighbour at each offset, padded to the same length L, one batched
      GEMM over the 26 offsets and one scatter-add - 6 kernels a layer, 26 L + M rows of work;
    * scatter: gather -> matmul -> scatter-add per offset over exactly the rows that have that
      neighbour - least work, ~80 kernels and (on CUDA) 26 host reads per level. The CPU's choice.
    """
    algo = os.environ.get(ENV_ALGO, "auto").strip().lower()
    if algo in ("gather", "grouped", "scatter"):
        return algo
    if algo not in ("", "auto"):
        raise ConfigError(f"{ENV_ALGO}={algo!r}: expected one of {', '.join(ALGOS)}")
    if device.type == "cpu":
        return "scatter"
    if stats is None:
        return "gather"
    m, width = stats
    return "grouped" if 26 * width + m < GROUPED_MAX_WORK * 27 * m else "gather"


def _use_gather(device: torch.device) -> bool:
    """Whether one-to-one maps (stride-2 convolutions, transposed ones) take the table/GEMM form."""
    return conv_algorithm(device) != "scatter"


def _gather_gemm(f: torch.Tensor, table: torch.Tensor, w2d: torch.Tensor) -> torch.Tensor:
    """out[..., i, :] = concat_k f_pad[..., table[i, k], :] @ w2d, with f_pad = f plus a zero row."""
    k = table.shape[1]
    c = f.shape[-1]
    pad = f.new_zeros(f.shape[:-2] + (1, c))
    fp = torch.cat([f, pad], dim=-2)
    lead = f.shape[:-2]
    n = table.shape[0]
    groups = 1
    for d in lead:
        groups *= d
    budget = _GATHER_BUDGET.get(f.device.type, _GATHER_BUDGET["cuda"])
    chunk = max(1024, budget // max(1, k * c * f.element_size() * groups))
    dim = f.dim() - 2
    outs = []
    for s in range(0, n, chunk):
        t = table[s:s + chunk]
        g = fp.index_select(dim, t.reshape(-1)).reshape(lead + (t.shape[0], k * c))
        outs.append(g @ w2d)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _grouped_offsets(f: torch.Tensor, out_rows: torch.Tensor, in_rows: torch.Tensor,
                     w: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Centre offset as one GEMM, the 26 others as batched GEMMs over their padded row lists
    (``side``: the kernel without its centre, (26, C, Cout))."""
    dim = f.dim() - 2
    lead = f.shape[:-2]
    c, cout = f.shape[-1], w.shape[-1]
    out = f @ w[13]
    width = in_rows.shape[1]
    if width == 0:
        return out
    fp = torch.cat([f, f.new_zeros(lead + (1, c))], dim=-2)
    groups = 1
    for d in lead:
        groups *= d
    budget = _GATHER_BUDGET.get(f.device.type, _GATHER_BUDGET["cuda"])
    per = max(1, budget // max(1, width * c * f.element_size() * groups))   # offsets per chunk
    for k0 in range(0, 26, per):
        k1 = min(26, k0 + per)
        idx = in_rows[k0:k1].reshape(-1)
        g = fp.index_select(dim, idx).reshape(lead + (k1 - k0, width, c))
        y = torch.matmul(g, side[k0:k1])                                    # (..., k, L, Cout)
        rows = out_rows[k0:k1].reshape(-1)
        y = y.reshape(lead + ((k1 - k0) * width, cout))
        if dim == 0:
            out.index_add_(0, rows, y)
        else:   # per feature group: rows of contiguous (M, Cout) slices add faster than a strided dim
            for o, yy in zip(out.view(-1, *out.shape[-2:]), y.view(-1, *y.shape[-2:])):
                o.index_add_(0, rows, yy)
    return out


def _reset_kernel(kernel: torch.Tensor, in_channels: int, kernel_volume: int) -> None:
    # the same initialisation as MinkowskiEngine's convolutions
    stdv = 1.0 / math.sqrt(in_channels * kernel_volume)
    with torch.no_grad():
        kernel.uniform_(-stdv, stdv)


class Convolution(nn.Module):
    """Sparse convolution, kernel size 1 or 3 at stride 1, or kernel size 2 at stride 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        if (kernel_size, stride) not in ((1, 1), (3, 1), (2, 2)):
            raise ValueError(f"unsupported convolution kernel_size={kernel_size} stride={stride}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        volume = kernel_size ** 3
        shape = (in_channels, out_channels) if kernel_size == 1 else (volume, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        _reset_kernel(self.kernel, in_channels, volume)
        self._side_cache = None

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"

    def _side_kernel(self) -> torch.Tensor:
        """The 26 non-centre offsets' weights, (26, in, out); kept between calls at inference."""
        w = self.kernel
        if torch.is_grad_enabled() and w.requires_grad:
            return torch.cat([w[:13], w[14:]], dim=0)
        stamp = (w.data_ptr(), tensor_version(w), torch.is_inference_mode_enabled())
        if self._side_cache is None or self._side_cache[0] != stamp:
            with torch.no_grad():
                self._side_cache = (stamp, torch.cat([w[:13], w[14:]], dim=0))
        return self._side_cache[1]

    def forward(self, x: TorchSparseTensor) -> TorchSparseTensor:
        f = x.feats
        w = self.kernel
        if self.kernel_size == 1:
            return x.replace(f @ w)
        dim = f.dim() - 2
        static = x.manager.static is not None   # fixed shapes: gather or padded grouped, no host reads
        gather = static or _use_gather(f.device)
        if self.kernel_size == 3 and gather:
            if static:
                algo = x.manager.static_algorithm(x.stride)
            else:
                algo = conv_algorithm(f.device, x.manager.neighbour_stats(x.stride))
            if algo == "grouped":
                out_rows, in_rows = x.manager.offset_pairs(x.stride)
                return x.replace(_grouped_offsets(f, out_rows, in_rows, w, self._side_kernel()))
            if algo == "gather":
                table = x.manager.neighbour_table(x.stride)
                return x.replace(_gather_gemm(f, table, w.reshape(-1, self.out_channels)))
        if self.kernel_size == 2 and gather:
            table = x.manager.child_table(x.stride)
            out = _gather_gemm(f, table, w.reshape(-1, self.out_channels))
            return TorchSparseTensor(out, 2 * x.stride, x.manager)
        if self.kernel_size == 3:
            maps = x.manager.neighbour_map(x.stride)
            out = f @ w[13]
            for k, m in enumerate(maps):
                if m is None or m[0].numel() == 0:
                    continue
                out_rows, in_rows = m
                out.index_add_(dim, out_rows, f.index_select(dim, in_rows) @ w[k])
            return x.replace(out)
        # kernel 2, stride 2: every fine row contributes to its parent cell through one offset
        inverse, rows = x.manager.downsample_map(x.stride)
        coarse = x.manager.levels[2 * x.stride]
        shape = list(f.shape)
        shape[-2] = len(coarse)
        shape[-1] = self.out_channels
        out = f.new_zeros(shape)
        for k, r in enumerate(rows):
            if r.numel() == 0:
                continue
            out.index_add_(dim, inverse[r], f.index_select(dim, r) @ w[k])
        return TorchSparseTensor(out, 2 * x.stride, x.manager)


class ConvolutionTranspose(nn.Module):
    """Transposed sparse convolution, kernel size 2 and stride 2, onto the existing finer coordinates."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2):
        super().__init__()
        if (kernel_size, stride) != (2, 2):
            raise ValueError("only kernel_size=2, stride=2 transposed convolutions are supported")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.kernel = nn.Parameter(torch.empty(8, in_channels, out_channels))
        _reset_kernel(self.kernel, in_channels, 8)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=2, stride=2"

    def forward(self, x: TorchSparseTensor) -> TorchSparseTensor:
        fine_stride = x.stride // 2
        if fine_stride < 1 or fine_stride not in x.manager.levels:
            raise ValueError(f"no finer coordinate set at stride {fine_stride} to write onto")
        f = x.feats
        dim = f.dim() - 2
        w = self.kernel
        if x.manager.static is not None or _use_gather(f.device):
            # all 8 child outputs of every coarse cell in one GEMM, then pick each fine row's own
            inverse, k = x.manager.parent_map(fine_stride)
            y = f @ w.permute(1, 0, 2).reshape(self.in_channels, 8 * self.out_channels)
            y = y.reshape(f.shape[:-2] + (f.shape[-2] * 8, self.out_channels))
            return TorchSparseTensor(y.index_select(dim, inverse * 8 + k), fine_stride, x.manager)
        inverse, rows = x.manager.downsample_map(fine_stride)
        shape = list(f.shape)
        shape[-2] = len(x.manager.levels[fine_stride])
        shape[-1] = self.out_channels
        out = f.new_zeros(shape)
        for k, r in enumerate(rows):
            if r.numel() == 0:
                continue
            out.index_copy_(dim, r, f.index_select(dim, inverse[r]) @ w[k])
        return TorchSparseTensor(out, fine_stride, x.manager)


class BatchNorm(nn.Module):
    """BatchNorm over voxel features; the torch module sits in ``.bn`` as in MinkowskiEngine."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum)
        self._affine_cache = None

    def _affine(self, dtype: torch.dtype):
        """(shift, scale) of the inference map, recomputed only when a statistic or parameter
        changed (tensor version counters: load_state_dict, optimiser steps, .to() all move them)."""
        bn = self.bn
        parts = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in parts):
            return self._affine_terms(dtype)   # differentiable, not cached
        # inference tensors (made under torch.inference_mode) must not reach autograd outside it
        stamp = (dtype, bn.eps, torch.is_inference_mode_enabled()) + tuple(
            None if t is None else (t.data_ptr(), tensor_version(t)) for t in parts)
        cache = self._affine_cache
        if cache is None or cache[0] != stamp:
            with torch.no_grad():
                cache = self._affine_cache = (stamp,) + self._affine_terms(dtype)
        return cache[1], cache[2]

    def _affine_terms(self, dtype: torch.dtype):
        bn = self.bn
        scale = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        shift = -bn.running_mean.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        return shift.to(dtype), scale.to(dtype)

    def forward(self, x: TorchSparseTensor) -> TorchSparseTensor:
        f = x.feats
        bn = self.bn
        if not bn.training and bn.track_running_stats and bn.running_var is not None:
            # inference: the same affine map as F.batch_norm with running statistics, one kernel on
            # any feature shape (F.batch_norm costs a host read per call on CUDA here)
            shift, scale = self._affine(f.dtype)
            return x.replace(torch.addcmul(shift, f, scale))
        if x.manager.static is not None:
            raise RuntimeError("static-shape passes are for inference: batch statistics would count "
                               "the padding rows")
        if f.dim() == 2:
            return x.replace(self.bn(f))
        shape = f.shape
        return x.replace(self.bn(f.reshape(-1, shape[-1])).reshape(shape))


class ReLU(nn.Module):
    def forward(self, x: TorchSparseTensor) -> TorchSparseTensor:
        return x.replace(F.relu(x.feats))


class TorchBackend:
    name = "torch"
    supports_groups = True

    Convolution = Convolution
    ConvolutionTranspose = ConvolutionTranspose
    BatchNorm = BatchNorm
    ReLU = ReLU

    @staticmethod
    def voxelize(points: torch.Tensor, batch: torch.Tensor, voxel_size: float):
        """Points (N, 3) float32 and batch index (N,) -> (Field, stride-1 tensor of mean xyz)."""
        if not points.is_floating_point():
            points = points.float()
        idx = voxel_indices(points, voxel_size)  # always from float32 values, as LiDiff
        coords = torch.cat([batch.long().view(-1, 1).to(idx.device), idx], dim=1)
        plan = static_shapes()
        if plan is not None:
            return TorchBackend._voxelize_static(points, coords, plan)
        check_coordinate_range(coords)
        keys, inverse = torch.unique(pack_keys(coords), sorted=True, return_inverse=True)
        m = keys.shape[0]
        # per-voxel point counts by a scatter-add (torch.bincount reads the maximum back to the host)
        counts = points.new_zeros(m).index_add_(0, inverse, points.new_ones(points.shape[0]))
        inv_count = 1.0 / counts
        feats = points.new_zeros((m, points.shape[1])).index_add(0, inverse, points * inv_count[inverse, None])
        manager = CoordinateManager(Level(1, keys))
        return Field(inverse, points.shape[0]), TorchSparseTensor(feats, 1, manager)

    @staticmethod
    def _voxelize_static(points: torch.Tensor, coords: torch.Tensor, plan: StaticShapes):
        """:meth:`voxelize` in static mode: the stride-1 level has the plan's capacity of rows; an
        out-of-range coordinate or a batch index outside 0..PAD_BATCH-1 raises the plan's flag."""
        n = coords.shape[0]
        b = coords[:, 0]
        plan.flag((b.min() < 0) | (b.max() >= PAD_BATCH) | (coords[:, 1:].abs().max() >= AXIS_LIMIT))
        m = plan.ordinal("voxelize")
        size_key = ("level", m, 1)
        cap = plan.capacity(size_key, n)
        keys, inverse, _, count = _unique_static(pack_keys(coords), cap)
        plan.size(size_key, count, cap)
        counts = points.new_zeros(cap).index_add_(0, inverse, points.new_ones(n))
        inv_count = 1.0 / counts.clamp(min=1.0)   # padding rows have no point
        feats = points.new_zeros((cap, points.shape[1])).index_add(0, inverse, points * inv_count[inverse, None])
        manager = CoordinateManager(Level(1, keys), static=(plan, m))
        return Field(inverse, n), TorchSparseTensor(feats, 1, manager)

    @staticmethod
    def slice(x: TorchSparseTensor, field: Field) -> torch.Tensor:
        if x.stride != 1:
            raise ValueError("slicing needs a stride-1 tensor")
        return x.feats.index_select(x.feats.dim() - 2, field.inverse)

    @staticmethod
    def feats(x: TorchSparseTensor) -> torch.Tensor:
        return x.feats

    @staticmethod
    def with_feats(x: TorchSparseTensor, feats: torch.Tensor) -> TorchSparseTensor:
        return x.replace(feats)

    @staticmethod
    def coords(x: TorchSparseTensor) -> torch.Tensor:
        return x.coords

    @staticmethod
    def stride(x: TorchSparseTensor) -> int:
        return x.stride

    @staticmethod
    def cat(a: TorchSparseTensor, b: TorchSparseTensor) -> TorchSparseTensor:
        if a.manager is not b.manager or a.stride != b.stride:
            raise ValueError("concatenating sparse tensors on different coordinate sets")
        fa, fb = a.feats, b.feats
        if fa.dim() != fb.dim():  # one side grouped, the other not: broadcast the shared one
            if fa.dim() < fb.dim():
                fa = fa.expand(fb.shape[:-1] + fa.shape[-1:])
            else:
                fb = fb.expand(fa.shape[:-1] + fb.shape[-1:])
        return a.replace(torch.cat([fa, fb], dim=-1))

    @staticmethod
    def cache(x: TorchSparseTensor) -> dict:
        return x.manager.cache


BACKEND = TorchBackend()
