"""Pure-PyTorch sparse backend with MinkowskiEngine's semantics (the CPU path; runs on any device).

Kernel maps come from :mod:`.kmap` (sorted int64 keys, ``searchsorted``), built once per coordinate
set and shared by every tensor of one forward pass, so all layers and both guidance passes (feature
groups, ``(G, M, C)``, see ``Denoiser.forward_cfg``) reuse them.

Three convolution algorithms (``LIDAR_COMPLETION_CONV_ALGO``, see :func:`conv_algorithm`):
*scatter* (:mod:`.conv_scatter`, the CPU's), *gather* (:mod:`.conv_gather`, CUDA's for dense levels
and the one-to-one maps) and *grouped* (:mod:`.conv_grouped`, CUDA's for sparse levels).

Host-device synchronisation on CUDA (the unavoidable ones, per denoiser call): the noisy points move
at every solver step, so each step builds new coordinate sets, and ``torch.unique`` must learn how
many voxels each level has (voxelisation and 4 downsamplings: 5 reads); each 3x3x3 level reads the
longest per-offset neighbour list once (5 reads: the padded length and the algorithm choice); the
coordinate range check reads once; the nearest-condition lookup reads once per level (and once more
when some rows need the brute-force fallback). Everything else is queued without waiting for the
device. The scatter algorithm additionally reads per-offset row counts (26 per level).

Static mode (:func:`~.static.use_static_shapes`; what CUDA graph capture needs, see
``lidar_completion.cuda_graphs``): every level has a fixed capacity of rows from the plan (real rows
first, padding rows with the key PAD_KEY after them, which sort last and are nobody's neighbour),
``torch.unique`` becomes sort + cumsum + scatter into the capacity, the 3x3x3 convolutions take
the grouped form with the per-offset lists padded to a planned capacity (or the gather form), and
every check that would read the device (coordinate range, sizes past their capacity) becomes a
flag of the plan, read once by whoever ran the pass. No host read happens inside the pass.
"""
from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from ..errors import ConfigError
from . import sharing
from .conv_gather import gather_gemm, transposed_all_children
from .conv_grouped import grouped_offsets
from .conv_scatter import conv3_scatter, down_scatter, up_scatter
from .coords import AXIS_LIMIT, CENTRE, Field, check_coordinate_range, pack_keys, voxel_indices
from .kmap import CoordinateManager, Level, unique_static
from .layers import BatchNorm, Convolution, ConvolutionTranspose, ReLU
from .nearest import nearest_cell
from .static import PAD_BATCH, static_shapes

ENV_ALGO = "LIDAR_COMPLETION_CONV_ALGO"
ALGOS = ("auto", "gather", "grouped", "scatter")

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


def _static_algorithm(manager: CoordinateManager, stride: int) -> tuple[str, int]:
    """Static mode: ('grouped', L) or ('gather', 0) for the 3x3x3 convolutions of a level, from the
    plan's capacity L of the longest per-offset neighbour list (``("pairs", m, stride)``). The longest
    list is recorded either way (so the next plan knows it) and flagged when it exceeds the capacity
    the grouped form was built with. No capacity yet (a sizing pass): 'gather'."""
    key = ("torch-algo", stride)
    if key in manager.choices:
        return manager.choices[key]
    plan, m = manager.static
    n = len(manager.levels[stride])
    size_key = ("pairs", m, stride)
    table = manager.neighbour_table(stride)
    counts = (table < n).sum(0)
    longest = torch.cat([counts[:CENTRE], counts[CENTRE + 1:]]).max()
    cap = plan.caps.get(size_key)
    forced = os.environ.get(ENV_ALGO, "auto").strip().lower()
    choice = ("gather", 0)
    if cap is not None and forced != "gather":
        width = max(1, min(int(cap), n))
        if forced == "grouped" or 26 * width + n < GROUPED_MAX_WORK * 27 * n:
            choice = ("grouped", width)
    plan.size(size_key, longest, choice[1] if choice[0] == "grouped" else None)
    manager.choices[key] = choice
    return choice


class SparseTensorBase:
    """What the torch and Triton backends' tensors share: the coordinate set ``manager.levels[stride]``
    and arithmetic through the engine of their coordinate manager."""

    __slots__ = ("stride", "manager")

    @property
    def level(self) -> Level:
        return self.manager.levels[self.stride]

    @property
    def coords(self) -> torch.Tensor:
        return self.level.coords

    def replace(self, feats: torch.Tensor, stride: int | None = None):
        """A tensor of the same kind on this (or another) stride of the same input."""
        return type(self)(feats, self.stride if stride is None else stride, self.manager)

    def __add__(self, other):
        if other.manager is not self.manager or other.stride != self.stride:
            raise ValueError("adding sparse tensors on different coordinate sets")
        return self.manager.engine.add(self, other)


class TorchSparseTensor(SparseTensorBase):
    """Features (..., M, C) on the coordinate set ``manager.levels[stride]``."""

    __slots__ = ("feats",)

    def __init__(self, feats: torch.Tensor, stride: int, manager: CoordinateManager):
        self.feats = feats
        self.stride = stride
        self.manager = manager


def broadcast_groups(fa: torch.Tensor, fb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature tensors with the same leading (group) dimensions: the one without groups is
    expanded (a view) to the other's."""
    if fa.dim() < fb.dim():
        fa = fa.expand(fb.shape[:-1] + fa.shape[-1:])
    elif fb.dim() < fa.dim():
        fb = fb.expand(fa.shape[:-1] + fb.shape[-1:])
    return fa, fb


class TorchEngine:
    """What the layers compute on the torch backend (see :mod:`.layers`)."""

    name = "torch"

    @staticmethod
    def convolution(conv: Convolution, x) -> TorchSparseTensor:
        f = x.feats
        w = conv.kernel
        if conv.kernel_size == 1:
            return x.replace(f @ w)
        manager = x.manager
        static = manager.static is not None   # fixed shapes: gather or padded grouped, no host reads
        scatter = not static and conv_algorithm(f.device) == "scatter"
        if conv.kernel_size == 2:   # stride 2: every fine row feeds its parent cell through one offset
            if scatter:
                inverse, rows = manager.downsample_map(x.stride)
                out = down_scatter(f, w, inverse, rows, len(manager.levels[2 * x.stride]))
            else:
                out = gather_gemm(f, manager.child_table(x.stride), w.reshape(-1, conv.out_channels))
            return x.replace(out, 2 * x.stride)
        if scatter:
            return x.replace(conv3_scatter(f, w, manager.neighbour_map(x.stride)))
        if static:
            algo, width = _static_algorithm(manager, x.stride)
        else:
            algo, width = conv_algorithm(f.device, manager.neighbour_stats(x.stride)), None
        if algo == "grouped":
            out_rows, in_rows = manager.offset_pairs(x.stride, width)
            return x.replace(grouped_offsets(f, out_rows, in_rows, w, conv.side_kernel()))
        return x.replace(gather_gemm(f, manager.neighbour_table(x.stride), w.reshape(-1, conv.out_channels)))

    @staticmethod
    def transposed(conv: ConvolutionTranspose, x) -> TorchSparseTensor:
        fine = x.stride // 2
        f = x.feats
        manager = x.manager
        if manager.static is not None or conv_algorithm(f.device) != "scatter":
            inverse, k = manager.parent_map(fine)
            return x.replace(transposed_all_children(f, conv.kernel, inverse, k), fine)
        inverse, rows = manager.downsample_map(fine)
        return x.replace(up_scatter(f, conv.kernel, inverse, rows, len(manager.levels[fine])), fine)

    @staticmethod
    def batch_norm(bn: BatchNorm, x) -> TorchSparseTensor:
        f = x.feats
        if bn.uses_running_stats:
            # inference: the same affine map as F.batch_norm with running statistics, one kernel on
            # any feature shape (F.batch_norm costs a host read per call on CUDA here)
            shift, scale = bn.affine(f.dtype)
            return x.replace(torch.addcmul(shift, f, scale))
        if x.manager.static is not None:
            raise RuntimeError("static-shape passes are for inference: batch statistics would count "
                               "the padding rows")
        if f.dim() == 2:
            return x.replace(bn.bn(f))
        shape = f.shape
        return x.replace(bn.bn(f.reshape(-1, shape[-1])).reshape(shape))

    @staticmethod
    def relu(x) -> TorchSparseTensor:
        return x.replace(F.relu(x.feats))

    @staticmethod
    def add(a, b) -> TorchSparseTensor:
        return a.replace(a.feats + b.feats)

    @staticmethod
    def cat(a, b) -> TorchSparseTensor:
        return a.replace(torch.cat(broadcast_groups(a.feats, b.feats), dim=-1))


TORCH_ENGINE = TorchEngine()


def voxelize_points(points: torch.Tensor, batch: torch.Tensor, voxel_size: float, engine, tensor_cls):
    """Points (N, 3) and batch index (N,) -> (Field, stride-1 tensor of the mean xyz per voxel)
    whose coordinate manager uses ``engine``; shared by the torch and Triton backends. Inside a
    :func:`~.sharing.shared_maps` block a second call with the same tensors reuses the first call's
    coordinate manager (its kernel maps) and point-to-voxel assignment."""
    shared = sharing.lookup(points, batch, voxel_size, engine)
    given = (points, batch)
    if not points.is_floating_point():
        points = points.float()
    if shared is not None:
        inverse, rows, manager = shared
        return Field(inverse, points.shape[0]), tensor_cls(_mean_per_voxel(points, inverse, rows), 1, manager)
    idx = voxel_indices(points, voxel_size)  # always from float32 values, as LiDiff
    coords = torch.cat([batch.long().view(-1, 1).to(idx.device), idx], dim=1)
    plan = static_shapes()
    n = coords.shape[0]
    if plan is not None:
        # the stride-1 level has the plan's capacity of rows; an out-of-range coordinate or a batch
        # index outside 0..PAD_BATCH-1 or a non-finite point raises the plan's flag
        b = coords[:, 0]
        plan.flag((b.min() < 0) | (b.max() >= PAD_BATCH) | (coords[:, 1:].abs().max() >= AXIS_LIMIT)
                  | ~torch.isfinite(points).all())
        m = plan.ordinal("voxelize")
        size_key = ("level", m, 1)
        cap = plan.capacity(size_key, n)
        maps = getattr(engine, "maps", None)     # the engine's kernels where it has them
        keys, inverse, _, count = (unique_static if maps is None else maps.unique_static)(pack_keys(coords), cap)
        plan.size(size_key, count, cap)
        rows = cap
        manager = CoordinateManager(Level(1, keys), static=(plan, m), engine=engine)
    else:
        check_coordinate_range(coords, points)
        keys, inverse = torch.unique(pack_keys(coords), sorted=True, return_inverse=True)
        rows = keys.shape[0]
        manager = CoordinateManager(Level(1, keys), engine=engine)
    sharing.remember(*given, voxel_size, engine, (inverse, rows, manager))
    return Field(inverse, n), tensor_cls(_mean_per_voxel(points, inverse, rows), 1, manager)


def _mean_per_voxel(points: torch.Tensor, inverse: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, C) mean of the points of every voxel (0 for a padding row of static mode)."""
    # per-voxel point counts by a scatter-add (torch.bincount reads the maximum back to the host)
    counts = points.new_zeros(rows).index_add_(0, inverse, points.new_ones(points.shape[0]))
    inv_count = 1.0 / counts.clamp(min=1.0)
    return points.new_zeros((rows, points.shape[1])).index_add(0, inverse, points * inv_count[inverse, None])


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
        return voxelize_points(points, batch, voxel_size, TORCH_ENGINE, TorchSparseTensor)

    @staticmethod
    def slice(x, field: Field) -> torch.Tensor:
        if x.stride != 1:
            raise ValueError("slicing needs a stride-1 tensor")
        f = x.feats
        return f.index_select(f.dim() - 2, field.inverse)

    @staticmethod
    def feats(x) -> torch.Tensor:
        return x.feats

    @staticmethod
    def modulate(x, weights: list, rows: list):
        """``x`` with its features times a weight row per voxel: ``weights[g][rows[g]]`` for
        condition g ((E_g, C) tables, (M,) indices); with several conditions one feature group per
        condition, (G, M, C) (ungrouped features broadcast)."""
        f = x.feats
        ws = [w.index_select(0, r) for w, r in zip(weights, rows)]
        return x.replace(f * ws[0] if len(ws) == 1 else f * torch.stack(ws))

    @staticmethod
    def with_feats(x, feats: torch.Tensor):
        return x.replace(feats)

    @staticmethod
    def coords(x) -> torch.Tensor:
        return x.coords

    @staticmethod
    def stride(x) -> int:
        return x.stride

    @staticmethod
    def cat(a, b):
        if a.manager is not b.manager or a.stride != b.stride:
            raise ValueError("concatenating sparse tensors on different coordinate sets")
        return a.manager.engine.cat(a, b)

    @staticmethod
    def cache(x) -> dict:
        return x.manager.cache

    nearest_cell = staticmethod(nearest_cell)


BACKEND = TorchBackend()
