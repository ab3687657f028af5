"""Kernel maps: the coordinate sets of one input at every tensor stride and the maps between them.

Coordinates follow MinkowskiEngine: a row at tensor stride ``s`` has integer coordinates that are
multiples of ``s`` (in voxel units), the minimum corner of its cell (floor towards -inf). Rows are
kept sorted by their packed key, i.e. by ``(b, x, y, z)``, and every map is built on the device from
those sorted keys (``searchsorted``, ``unique``, sorts): no hash table, no host loop. A
:class:`CoordinateManager` is shared by every tensor of one forward pass, so each map is built once
and reused by every layer and by both guidance halves (feature groups).

Maps, by the convolution that reads them:

* 3x3x3 at stride s: :meth:`CoordinateManager.neighbour_table` (M, 27), the row of the neighbour at
  each offset or M where there is none; per-offset pair lists (:meth:`~CoordinateManager.offset_pairs`,
  :meth:`~CoordinateManager.neighbour_map`) for the algorithms that want them;
* 2x2x2 stride-2 (down): :meth:`~CoordinateManager.parent_map` (parent row and offset of every fine
  row) and :meth:`~CoordinateManager.child_table` (M_coarse, 8);
* transposed (up): the parent map read the other way, :meth:`~CoordinateManager.parent_table`;
* :meth:`~CoordinateManager.gather_plan`: any of these tables with its output rows sorted by their
  neighbour bitmask and one OR-ed mask per tile of rows, for the masked implicit GEMM.

An engine with map kernels (``engine.maps``: the Triton engine's :mod:`.triton_kmap`) builds the
parent keys, the fixed-capacity unique keys and the gather plans with them instead of the torch
operations here; the results are the same.
"""
from __future__ import annotations

import torch

from .coords import AXIS_BITS, AXIS_OFFSET, CENTRE, kernel3_deltas, offset_key, unpack_keys, KERNEL3_OFFSETS
from .static import PAD_KEY, StaticShapes


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


def unique_static(keys: torch.Tensor, cap: int):
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

    ``engine``: the object whose ``convolution`` / ``transposed`` / ``batch_norm`` / ``relu`` /
    ``cat`` the layer modules call for tensors of this input (the torch or the Triton engine).

    ``static``: ``(plan, m)`` in static mode (see :class:`~lidar_completion.sparse.common.StaticShapes`;
    ``m`` numbers the voxelisations of the pass): every level then has a fixed capacity of rows,
    the real ones first, padding rows (key PAD_KEY) after them."""

    def __init__(self, base: Level, static: tuple[StaticShapes, int] | None = None, engine=None):
        self.levels = {base.stride: base}
        self._down = {}
        self._nbr = {}
        self._plans = {}
        self.cache = {}    # free-form cache for users (e.g. nearest condition cells per level)
        self.choices = {}  # the engine's per-level decisions (algorithm, tile sizes) for this pass
        self.static = static
        self.engine = engine   # the engine that convolves tensors of this input (see layers)

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
        maps = self.maps
        if maps is not None:   # the same keys and offsets in one kernel (padding keys kept)
            coarse, k = maps.parent_keys(keys, stride)
        else:
            sh = stride.bit_length() - 1
            low = (1 << (sh + 1)) - 1
            coarse = keys & ~(low | (low << AXIS_BITS) | (low << (2 * AXIS_BITS)))
            k = (((keys >> (2 * AXIS_BITS + sh)) & 1) + 2 * ((keys >> (AXIS_BITS + sh)) & 1)
                 + 4 * ((keys >> sh) & 1))
        s2 = 2 * stride
        if self.static is not None:
            plan, m = self.static
            size_key = ("level", m, s2)
            cap = plan.capacity(size_key, keys.shape[0])
            if maps is not None:
                pkeys, inverse, dump, count = maps.unique_static(coarse, cap)
            else:
                pkeys, inverse, dump, count = unique_static(torch.where(keys == PAD_KEY, keys, coarse), cap)
            plan.size(size_key, count, cap)
            self._down[("dump", stride)] = dump
        else:
            pkeys, inverse = torch.unique(coarse, sorted=True, return_inverse=True)
        if s2 not in self.levels:
            self.levels[s2] = Level(s2, pkeys)
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
        q = keys[:, None] + kernel3_deltas(stride, keys.device)[None, :]
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

    def offset_pairs(self, stride: int, width: int | None = None):
        """For the 26 non-centre offsets of a 3x3x3 kernel: ``(out_rows, in_rows)``, each (26, L)
        with L = ``width``, by default the longest list from :meth:`neighbour_stats` (static mode
        passes its planned capacity: lists longer than that are cut, which the caller flags). Row ``j`` of offset ``k`` pairs an output row with its
        neighbour at that offset; offsets with fewer than L pairs are padded with ``in_rows = M``
        (the index of a zero feature row) and distinct output rows, so the padding adds exact zeros
        without two padded entries hitting one row. Built without host reads."""
        key = ("pairs", stride)
        if key in self._nbr:
            return self._nbr[key]
        if width is None:
            n, width = self.neighbour_stats(stride)
        else:
            n = len(self.levels[stride])
        table = self.neighbour_table(stride)
        side = torch.cat([table[:, :13], table[:, 14:]], dim=1)            # (M, 26)
        missing = (side >= n).to(torch.uint8)
        order = torch.argsort(missing, dim=0, stable=True)[:width]         # (L, 26): existing first
        in_rows = torch.gather(side, 0, order)                             # M where padded
        pairs = (order.t().contiguous(), in_rows.t().contiguous())
        self._nbr[key] = pairs
        return pairs

    def neighbour_map(self, stride: int):
        """For the 27 offsets of a 3x3x3 kernel at ``stride``: (out_rows, in_rows) pairs, or None for
        the centre (identity). Both lists of a pair are ascending.

        Only the first 13 offsets are searched: offset 26 - k is offset k reversed (row i finds row
        j through +d exactly when j finds i through -d), so its pair is k's with the two lists
        swapped - the same tensors a search would give, since the keys are sorted and unique."""
        if stride in self._nbr:
            return self._nbr[stride]
        lv = self.levels[stride]
        keys = lv.keys
        n = keys.shape[0]
        maps = [None] * len(KERNEL3_OFFSETS)
        for k, (dx, dy, dz) in enumerate(KERNEL3_OFFSETS[:CENTRE]):
            q = keys + offset_key(dx * stride, dy * stride, dz * stride)
            idx = torch.searchsorted(keys, q)
            idx.clamp_(max=n - 1)
            hit = keys[idx] == q
            out_rows = torch.nonzero(hit, as_tuple=True)[0]
            maps[k] = (out_rows, idx[out_rows])
            maps[len(KERNEL3_OFFSETS) - 1 - k] = (maps[k][1], maps[k][0])
        self._nbr[stride] = maps
        return maps

    def parent_table(self, fine_stride: int) -> torch.Tensor:
        """(M_fine, 8) table of the transposed convolution from ``2 * fine_stride`` onto
        ``fine_stride``: row i holds its parent's row at column ``k_i`` (its offset inside the parent
        cell) and M_coarse elsewhere. Every fine row reads exactly one (parent, offset) pair."""
        key = ("parents", fine_stride)
        if key not in self._down:
            inverse, k = self.parent_map(fine_stride)
            n_coarse = len(self.levels[2 * fine_stride])
            table = torch.full((inverse.shape[0], 8), n_coarse, dtype=torch.long, device=k.device)
            table.scatter_(1, k.view(-1, 1), inverse.view(-1, 1))
            self._down[key] = table
        return self._down[key]

    def table(self, kind: str, stride: int) -> tuple[torch.Tensor, int]:
        """``(table, missing)``: the gather table of a convolution at ``stride`` and the value that
        marks "no input row". ``kind``: 'conv3' (3x3x3 at ``stride``), 'down' (2x2x2 stride 2 from
        ``stride``), 'up' (transposed onto ``stride // 2``)."""
        if kind == "conv3":
            return self.neighbour_table(stride), len(self.levels[stride])
        if kind == "down":
            return self.child_table(stride), len(self.levels[stride])
        if kind == "up":
            return self.parent_table(stride // 2), len(self.levels[stride])
        raise ValueError(f"unknown kernel map kind {kind!r}")

    @property
    def maps(self):
        """The engine's map-building kernels (:mod:`.triton_kmap` on the Triton engine), or None
        where the maps are built with torch operations."""
        return getattr(self.engine, "maps", None)

    def _table_bits(self, kind: str, stride: int):
        """The table of :meth:`table` as int32 with -1 for "no input", and each row's bitmask, from
        the engine's kernels."""
        maps = self.maps
        if kind == "conv3":
            keys = self.levels[stride].keys
            return maps.neighbour_bits(keys, kernel3_deltas(stride, keys.device))
        if kind == "down":
            inverse, k = self.parent_map(stride)
            inverse = self._down.get(("dump", stride), inverse)   # static: padding rows -> dump row
            return maps.child_bits(inverse, k, len(self.levels[2 * stride]))
        if kind == "up":
            inverse, k = self.parent_map(stride // 2)
            return maps.parent_bits(inverse, k)
        raise ValueError(f"unknown kernel map kind {kind!r}")

    def gather_plan(self, kind: str, stride: int, block: int):
        """The map of :meth:`table` arranged for the masked implicit GEMM with tiles of ``block``
        output rows: ``(order, table, tile_masks)``.

        * ``order`` (M,) int32: output rows sorted by their neighbour bitmask (bit k set when the
          row has an input at offset k), so that the rows of one tile mostly share their offsets;
        * ``table`` (K, M) int32: the gather table in that order and transposed (the rows of one
          tile read one offset's entries contiguously), -1 where there is no input;
        * ``tile_masks`` (ceil(M / block),) int32: the OR of the bitmasks of each tile's rows; a tile
          skips every offset whose bit is clear (no padded rows, no wasted multiply-adds).

        Built on the device with no host read; kept per (kind, stride, block) for the pass."""
        key = (kind, stride, block)
        if key in self._plans:
            return self._plans[key]
        maps = self.maps
        if maps is not None:   # the engine's kernels: the same plan in a sort and three launches
            arranged = self._plans.get(("arranged", kind, stride))
            if arranged is None:
                arranged = self._plans[("arranged", kind, stride)] = maps.arrange(*self._table_bits(kind, stride))
            order, table_sorted, sorted_bits = arranged
            plan = self._plans[key] = (order, table_sorted, maps.tile_masks(sorted_bits, block))
            return plan
        table, missing = self.table(kind, stride)
        m, k = table.shape
        # 32-bit throughout (K <= 27 bits): half the bytes of int64 and a 32-bit key sort (on the
        # CPU the plan builds twice as fast as with int64 bitmasks; the outputs are the same)
        present = table != missing                                           # (M, K) bool
        shifts = torch.arange(k, device=table.device, dtype=torch.int32)
        bits = (present.to(torch.int32) << shifts).sum(1, dtype=torch.int32)  # (M,) bitmask
        order = torch.argsort(bits, stable=True)
        table_sorted = torch.where(present, table.to(torch.int32), -1)[order].t()
        tiles = -(-m // block)
        pad = tiles * block - m
        bits_sorted = bits[order]
        if pad:
            bits_sorted = torch.cat([bits_sorted, bits_sorted.new_zeros(pad)])
        tile_bits = ((bits_sorted.view(tiles, block, 1) >> shifts) & 1).amax(1)   # (tiles, K): any row
        tile_masks = (tile_bits << shifts).sum(1, dtype=torch.int32)
        plan = (order.to(torch.int32), table_sorted.contiguous(), tile_masks)
        self._plans[key] = plan
        return plan

    def offset_rows(self, kind: str, stride: int, block: int):
        """The pairs of :meth:`gather_plan`'s map listed offset by offset: ``(src, dst, counts)``,
        ``src`` and ``dst`` (K, M) int32, ``counts`` (K,) int32. For offset k the first ``counts[k]``
        entries of row k are its (input row, output row) pairs, in the plan's row order; the rest of
        the row is never read. What the weight gradient loops over: at the finest levels of a noisy
        cloud 4-13 % of the (row, offset) entries hold an input, so a loop over every row of every
        offset would multiply mostly zeros. Built with a cumulative sum and two scatters (no sort, no
        host read); kept per (kind, stride) like the plan."""
        key = ("rows", kind, stride)
        if key in self._plans:
            return self._plans[key]
        order, table, _ = self.gather_plan(kind, stride, block)
        k, m = table.shape
        valid = table >= 0
        counts = valid.sum(1, dtype=torch.int32)
        # position of each pair in its offset's list; the entries without an input go to a spare
        # column m (several land there: its content is dropped)
        pos = torch.where(valid, valid.cumsum(1) - 1, m)
        src = table.new_full((k, m + 1), -1).scatter_(1, pos, table)[:, :m].contiguous()
        dst = table.new_full((k, m + 1), 0).scatter_(1, pos, order.to(table.dtype).expand(k, m))[:, :m].contiguous()
        rows = self._plans[key] = (src, dst, counts)
        return rows

    def tile_offsets(self, kind: str, stride: int, block: int) -> torch.Tensor:
        """The offsets each tile of :meth:`gather_plan` visits, listed: (tiles, K + 1) int32, row i
        = [count, k_0, k_1, ...] with the ``count`` set bits of tile i's mask in increasing order
        first (the rest of the row is the clear bits, never read). What a kernel needs to run one
        flat loop over (offset, channel chunk) pairs without a branch per offset. Kept per
        (kind, stride, block) like the plan."""
        key = ("offsets", kind, stride, block)
        if key in self._plans:
            return self._plans[key]
        _, table, masks = self.gather_plan(kind, stride, block)
        k = table.shape[0]
        bits = ((masks[:, None] >> torch.arange(k, device=masks.device, dtype=torch.int32)) & 1).bool()
        listed = torch.argsort((~bits).to(torch.int8), dim=1, stable=True)   # set bits first, in order
        offsets = torch.cat([bits.sum(1, keepdim=True), listed], 1).to(torch.int32).contiguous()
        self._plans[key] = offsets
        return offsets
