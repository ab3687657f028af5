"""The Triton backend against the torch backend, on the CPU under the Triton interpreter.

Every layer type (3x3x3 at several strides, 1x1, stride-2, transposed; with the fused batch norm /
residual / ReLU epilogue and the two-segment skip input; grouped features), whole networks, the
kernel-map plans and each tile's listed offsets (the flat K loop), the exact nearest-cell kernel,
farthest-point sampling, backend selection and the tile tuner. fp32 throughout: the interpreter's
bf16 ``tl.dot`` is wrong (triton-lang/triton#11584), and fp32 lets the two backends agree to float
summation order (1e-5 relative; 1e-4 on CUDA, where fp32 products are tf32x3). The same file runs
on CUDA, and with ``LIDAR_COMPLETION_TRITON_LOOP=flat`` for the other K loop.
Clouds are small: every Triton program is a Python loop here.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lidar_completion import sparse
from lidar_completion.errors import CloudFormatError, ConfigError
from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig, Refiner
from scripts_support import load_script

pytestmark = pytest.mark.skipif(
    not (sparse.triton_available() and (sparse.triton_interpreted() or torch.cuda.is_available())),
    reason="Triton is not installed (make setup installs it), or it was imported without "
           "TRITON_INTERPRET=1 on a machine without CUDA")

DEVICE = "cuda" if torch.cuda.is_available() and not sparse.triton_interpreted() else "cpu"


# fp32 products: IEEE in the interpreter (the backends agree to summation order, 1e-5); on CUDA they
# are tf32x3 (three TF32 tensor-core products, about 1e-6 relative each, not IEEE): 1e-4 there, the
# tolerance tests/test_cuda.py gives the GPU comparisons
FP32_REL = 1e-5 if DEVICE == "cpu" else 1e-4


def _close(a, b, rel=None):
    rel = FP32_REL if rel is None else rel
    scale = max(float(b.abs().max()), 1e-6)
    err = float((a.float() - b.float()).abs().max())
    assert err <= rel * scale, (err, scale)


def _clouds(n=300, seed=3, far=False):
    """A scan-like cloud (batch 0), a single point (batch 2; batch 1 is empty) and, with ``far``,
    points at large negative and positive coordinates."""
    g = np.random.default_rng(seed)
    r = g.uniform(4, 25, n)
    a = g.uniform(0, 2 * np.pi, n)
    scan = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.6, 0.3, n)], 1)
    parts, ids = [scan, [[1.23, -4.56, 0.2]]], [0, 2]
    if far:
        parts.append(g.normal([-3000.0, 2500.0, -40.0], 0.3, (40, 3)))
        ids.append(3)
    pts = torch.from_numpy(np.concatenate(parts).astype(np.float32)).to(DEVICE)
    batch = torch.from_numpy(np.repeat(ids, [len(p) for p in parts])).to(DEVICE)
    return pts, batch


def _random_bn(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                                  (m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2)):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return net


def _pair(cls, cfg=None):
    torch.manual_seed(7)
    a = _random_bn(cls(cfg or ModelConfig.tiny(), "torch")).eval().to(DEVICE)
    b = cls(cfg or ModelConfig.tiny(), "triton").eval().to(DEVICE)
    b.load_state_dict(a.state_dict())
    return a, b


# -- layers ------------------------------------------------------------------------------------------
def _tensors(pts, batch):
    """The same stride-1 input on both backends."""
    ta = sparse.get_backend("torch").voxelize(pts, batch, 0.05)[1]
    tb = sparse.get_backend("triton").voxelize(pts, batch, 0.05)[1]
    return ta, tb


def _layer_cases():
    B = sparse.get_backend("torch")
    torch.manual_seed(1)
    return {
        "conv3": B.Convolution(3, 24, 3, 1),
        "conv1": B.Convolution(3, 40, 1, 1),
        "down": B.Convolution(3, 17, 2, 2),
    }


@pytest.mark.parametrize("case", ["conv3", "conv1", "down"])
@pytest.mark.parametrize("stride", [1, 4])
def test_convolutions_equal_the_torch_backend(case, stride):
    """Every convolution type at a fine and a coarse level, output widths that are not multiples of
    a tile, negative and large coordinates, an empty batch element and a one-point cloud."""
    pts, batch = _clouds(far=True)
    conv = _layer_cases()[case].to(DEVICE)
    ta, tb = _tensors(pts, batch)
    down = sparse.get_backend("torch").Convolution(3, 3, 2, 2).to(DEVICE)
    with torch.no_grad():
        while ta.stride < stride:
            ta, tb = down(ta), down(tb)
        ya, yb = conv(ta), conv(tb)
        assert yb.stride == ya.stride and yb.feats.shape == ya.feats.shape
        _close(yb.feats, ya.feats)


def test_transposed_convolution_equals_the_torch_backend():
    pts, batch = _clouds(far=True)
    B = sparse.get_backend("torch")
    torch.manual_seed(2)
    d1, d2 = B.Convolution(3, 20, 2, 2).to(DEVICE), B.Convolution(20, 20, 2, 2).to(DEVICE)
    up = B.ConvolutionTranspose(20, 19).to(DEVICE)
    ta, tb = _tensors(pts, batch)
    with torch.no_grad():
        ya, yb = up(d2(d1(ta))), up(d2(d1(tb)))
    assert ya.stride == yb.stride == 2
    _close(yb.feats, ya.feats)


@pytest.mark.parametrize("pair", [True, False], ids=["groups-paired", "group-per-program"])
def test_fused_residual_block_and_skip_concatenation(pair, monkeypatch):
    """conv3 -> BN -> ReLU -> conv3 -> BN (+ a 1x1 -> BN branch) -> ReLU over the concatenation of
    a grouped and an ungrouped tensor (the decoder's skip): one pending kernel per convolution with
    the element-wise work in its epilogue, equal to the torch backend; the two feature groups in
    one program or in one program each."""
    from lidar_completion.models.networks import ResidualBlock
    from lidar_completion.sparse import conv_implicit_gemm as ig
    from lidar_completion.sparse.triton_backend import TritonSparseTensor

    real = ig.candidates
    monkeypatch.setattr(ig, "candidates", lambda *a, **k: [
        ig.Config(c.bm, c.bn, c.bk, c.warps, c.stages, pair and c.pair) for c in real(*a, **k)])
    pts, batch = _clouds()
    torch.manual_seed(3)
    block = _random_bn(ResidualBlock(sparse.get_backend("torch"), 16 + 3, 21)).eval().to(DEVICE)
    lift = sparse.get_backend("torch").Convolution(3, 16, 3, 1).to(DEVICE)
    ta, tb = _tensors(pts, batch)
    with torch.no_grad():
        outs = []
        for t in (ta, tb):
            y = lift(t)
            y = y.replace(torch.stack([y.feats, -2 * y.feats]))          # two feature groups
            cat = sparse.get_backend("torch").cat(y, t)                   # grouped | ungrouped
            if isinstance(t, TritonSparseTensor):
                assert cat.pending is None and len(cat.segments()) == 2  # not materialised
                pending = block.net(cat)
                assert pending.pending is not None and pending.pending.epilogue.scale is not None
            outs.append(block(cat).feats)
    assert outs[1].shape == outs[0].shape == (2, outs[0].shape[1], 21)
    _close(outs[1], outs[0])


@pytest.mark.parametrize("cls,train", [(Refiner, True), (Denoiser, False)],
                         ids=["refiner-batch-stats", "denoiser-running-stats"])
def test_gradients_equal_the_torch_backend(cls, train):
    """Training through the Triton kernels (input gradient over the transposed maps, weight
    gradient per offset): outputs and the gradient of every parameter and of the input points'
    features within 1e-4 of the torch backend's, with batch norm on batch or running statistics."""
    pts, batch = _clouds()
    a, b = _pair(cls)
    a.train(train), b.train(train)
    outs = []
    for net in (a, b):
        if cls is Denoiser:
            with torch.no_grad():
                cond = ConditionEncoder(ModelConfig.tiny(), "torch").eval().to(DEVICE)(pts, batch)
            y = net(pts + 0.05, batch, torch.tensor([900, 10, 400], device=DEVICE), cond)
        else:
            y = net(pts, batch)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        outs.append((y.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}))
    (ya, ga), (yb, gb) = outs
    _close(yb, ya, rel=1e-4)
    assert ga.keys() == gb.keys()
    floor = 1e-4 * max(float(g.abs().max()) for g in ga.values())
    for k in ga:
        err = float((gb[k] - ga[k]).abs().max())
        assert err <= 1e-4 * float(ga[k].abs().max()) + floor, (k, err)


@pytest.mark.parametrize("wgrad", ["compact", "dense"])
def test_convolution_gradients_for_every_map_kind(wgrad, monkeypatch):
    """Each convolution type alone (3x3x3, 1x1, stride 2, transposed; two input segments, one of
    them broadcast over two feature groups): input and weight gradients equal torch's, with the
    weight gradient over each offset's listed pairs (default) and over every row."""
    monkeypatch.setenv("LIDAR_COMPLETION_TRITON_WGRAD", wgrad)
    pts, batch = _clouds(far=True)
    B = sparse.get_backend("torch")
    torch.manual_seed(5)
    mods = [B.Convolution(3 + 5, 11, 3, 1), B.Convolution(11, 13, 2, 2), B.ConvolutionTranspose(13, 7),
            B.Convolution(7, 9, 1, 1)]
    mods = [m.to(DEVICE) for m in mods]
    results = []
    for backend in ("torch", "triton"):
        _, x = sparse.get_backend(backend).voxelize(pts, batch, 0.05)
        f = x.feats.detach().clone().requires_grad_(True)
        # the same values for both backends on any device (drawn on the CPU from a seeded generator)
        extra = torch.randn(2, f.shape[0], 5, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        extra.requires_grad_(True)
        y = sparse.get_backend(backend).cat(x.replace(f), x.replace(extra))   # (M, 3) broadcast | (2, M, 5)
        for m in mods:
            y = m(y)
        (y.feats * torch.linspace(-1, 1, y.feats.numel(), device=DEVICE).view_as(y.feats)).sum().backward()
        results.append([f.grad, extra.grad] + [m.kernel.grad.clone() for m in mods])
        for m in mods:
            m.kernel.grad = None
    for ga, gb in zip(*results):
        _close(gb, ga, rel=1e-4)


def test_offset_rows_list_the_plans_pairs_offset_by_offset():
    """``offset_rows``: for each offset, exactly the plan's (input row, output row) pairs, in the
    plan's row order, first in the row; a bad weight-gradient mode is a configuration error."""
    from lidar_completion.errors import ConfigError
    from lidar_completion.sparse import conv_implicit_gemm as igemm
    pts, batch = _clouds(far=True)
    _, x = sparse.get_backend("triton").voxelize(pts, batch, 0.05)
    m = x.manager
    for kind, stride in (("conv3", 1), ("down", 1), ("up", 2), ("conv3", 4)):
        m.level(stride * 2)
        order, table, _ = m.gather_plan(kind, stride, 64)
        src, dst, counts = m.offset_rows(kind, stride, 64)
        assert src.shape == dst.shape == table.shape and counts.shape == (table.shape[0],)
        assert int(counts.sum()) == int((table >= 0).sum()) > 0
        for k in range(table.shape[0]):
            keep = table[k] >= 0
            n = int(counts[k])
            assert torch.equal(src[k, :n], table[k][keep]), (kind, stride, k)
            assert torch.equal(dst[k, :n], order[keep]), (kind, stride, k)
        assert m.offset_rows(kind, stride, 64) is m.offset_rows(kind, stride, 64)   # kept for the pass
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIDAR_COMPLETION_TRITON_WGRAD", "sparse")
        with pytest.raises(ConfigError, match="LIDAR_COMPLETION_TRITON_WGRAD"):
            igemm.weight_gradient_mode()


# -- networks -----------------------------------------------------------------------------------------
def test_networks_equal_the_torch_backend():
    pts, batch = _clouds()
    with torch.no_grad():
        a, b = _pair(ConditionEncoder)
        ca, cb = a(pts, batch), b(pts, batch)
        assert torch.equal(ca.coords, cb.coords)
        _close(cb.feats, ca.feats)
        a, b = _pair(Refiner)
        _close(b(pts, batch), a(pts, batch))
        a, b = _pair(Denoiser)
        t = torch.tensor([900, 10, 400], device=DEVICE)
        _close(b(pts + 0.05, batch, t, ca), a(pts + 0.05, batch, t, ca))
        uncond = ConditionEncoder(ModelConfig.tiny(), "torch").eval().to(DEVICE).empty_condition(50, 3)
        for ya, yb in zip(a.forward_cfg(pts + 0.05, batch, t, ca, uncond),
                          b.forward_cfg(pts + 0.05, batch, t, ca, uncond)):
            _close(yb, ya)


def test_static_mode_equals_the_ordinary_pass():
    """The Triton backend in static mode (what CUDA graph capture runs: fixed capacities, padding
    rows, no host reads) gives the ordinary pass's output."""
    pts, batch = _clouds()
    _, den = _pair(Denoiser)
    enc = ConditionEncoder(ModelConfig.tiny(), "torch").eval().to(DEVICE)
    t = torch.tensor([500, 500, 500], device=DEVICE)
    with torch.inference_mode():
        cond = enc(pts, batch)
        ref = den(pts + 0.1, batch, t, cond)
        plan = sparse.StaticShapes()
        with sparse.use_static_shapes(plan):
            got = den(pts + 0.1, batch, t, cond)
        _, summary = plan.summary()
    assert not bool(summary[0])
    _close(got, ref)


# -- kernel maps and helpers --------------------------------------------------------------------------
@pytest.mark.parametrize("kind,stride", [("conv3", 1), ("conv3", 2), ("down", 1), ("up", 4)])
def test_gather_plan_sorts_rows_and_masks_tiles(kind, stride):
    pts, batch = _clouds()
    _, x = sparse.get_backend("torch").voxelize(pts, batch, 0.05)
    m = x.manager
    m.level(8)
    table, missing = m.table(kind, stride)
    for block in (16, 64):
        order, sorted_table, masks = m.gather_plan(kind, stride, block)
        assert torch.equal(torch.sort(order.long()).values, torch.arange(len(table), device=DEVICE))
        expect = torch.where(table == missing, -1, table)[order.long()]
        assert torch.equal(sorted_table.t().long(), expect)
        bits = (sorted_table.t() >= 0).long() * (2 ** torch.arange(table.shape[1], device=DEVICE))
        row_masks = bits.sum(1)
        assert torch.equal(row_masks, torch.sort(row_masks).values)          # sorted by bitmask
        rows = row_masks.cpu().numpy()
        assert masks.tolist() == [int(np.bitwise_or.reduce(rows[i:i + block])) for i in range(0, len(rows), block)]
        listed = m.tile_offsets(kind, stride, block).tolist()      # the flat loop's offsets per tile
        assert len(listed) == len(masks) and all(len(r) == table.shape[1] + 1 for r in listed)
        for mask, (count, *offsets) in zip(masks.tolist(), listed):
            assert offsets[:count] == [k for k in range(table.shape[1]) if mask >> k & 1]
        assert m.tile_offsets(kind, stride, block) is m.tile_offsets(kind, stride, block)   # kept


def _both_managers(static_caps=None):
    """The coordinate managers of one cloud (scan, single point, far points) on the torch engine
    and on the Triton engine (whose maps come from :mod:`sparse.triton_kmap`), in ordinary or, with
    ``static_caps``, in static mode with those capacities (padding rows included)."""
    pts, batch = _clouds(far=True)
    managers = []
    for name in ("torch", "triton"):
        if static_caps is None:
            _, x = sparse.get_backend(name).voxelize(pts, batch, 0.05)
        else:
            with sparse.use_static_shapes(sparse.StaticShapes(static_caps)):
                _, x = sparse.get_backend(name).voxelize(pts, batch, 0.05)
        x.manager.level(16)
        managers.append(x.manager)
    return managers


@pytest.mark.parametrize("static", [False, True], ids=["ordinary", "static"])
def test_map_kernels_build_the_torch_forms_maps(static):
    """Every coordinate set, parent map and gather plan (3x3x3, stride-2, transposed; two tile
    sizes) built by the Triton map kernels equals the torch operations' - in static mode with
    padding rows at every level and a level whose capacity is too small (its count says so)."""
    caps = None
    if static:
        caps = {("level", 0, 1): 900, ("level", 0, 2): 700, ("level", 0, 4): 500, ("level", 0, 8): 40,
                ("level", 0, 16): 300}
    a, b = _both_managers(caps)
    assert a.maps is None and b.maps is not None
    for s in (1, 2, 4, 8, 16):
        assert torch.equal(a.levels[s].keys, b.levels[s].keys), s
        assert torch.equal(b.maps.unpack_keys(b.levels[s].keys), a.levels[s].coords), s   # padding too
    for s in (1, 2, 4, 8):
        for x, y in zip(a.parent_map(s), b.parent_map(s)):
            assert torch.equal(x, y), s
        if static:
            assert torch.equal(a._down[("dump", s)], b._down[("dump", s)])
    if static:
        _, sa = a.static[0].summary()
        _, sb = b.static[0].summary()
        assert torch.equal(sa, sb) and bool(sa[0])     # the 40-row level overflowed in both
    for kind, strides in (("conv3", (1, 2, 8, 16)), ("down", (1, 4, 8)), ("up", (2, 16))):
        for s in strides:
            for block in (16, 64):
                for x, y in zip(a.gather_plan(kind, s, block), b.gather_plan(kind, s, block)):
                    assert x.dtype == y.dtype and torch.equal(x, y), (kind, s, block)


def test_lattice_kernel_settles_what_the_torch_search_does_and_more():
    """The one-kernel lattice search (4x4x4 block, then 6x6x6 where needed) answers exactly every
    row it settles, settles every row the torch search (4x4x4) settles and some it leaves, over
    several batch elements, negative and large coordinates and queries far from every cell; in
    static mode the fallback completes it to the exact answer."""
    from lidar_completion.sparse.nearest import _build_reference_index, _nearest_lattice
    from lidar_completion.sparse.triton_kmap import lattice_nearest

    g = torch.Generator().manual_seed(1)
    cells = torch.cat([torch.randint(0, 3, (300, 1), generator=g),
                       torch.randint(-8, 8, (300, 3), generator=g) * 16], 1)
    cells = torch.unique(cells, dim=0)
    cells = torch.cat([cells, torch.tensor([[1, -130000 // 16 * 16, 129984, 0]])])
    cells = cells[torch.argsort(sparse.pack_keys(cells))].to(DEVICE)
    q = torch.cat([torch.randint(0, 4, (900, 1), generator=g),
                   torch.randint(-160, 160, (900, 3), generator=g)], 1)
    q = torch.cat([q, torch.tensor([[1, -129990, 129990, 5], [0, 100000, 0, 0]])]).to(DEVICE)
    index = _build_reference_index(cells)
    want = _nearest_lattice(q[:, 1:], cells[:, 1:], q[:, 0], cells[:, 0], index)
    got = lattice_nearest(q[:, 1:], cells[:, 1:], q[:, 0], cells[:, 0], index)
    has_cells = q[:, 0] < 3
    exact = torch.full((len(q),), -1, dtype=torch.long)
    exact[has_cells.cpu()] = sparse.nearest_cell(q[has_cells].cpu(), cells.cpu())
    exact = exact.to(DEVICE)
    assert not bool((got[1] & ~want[1]).any())                          # settles all torch settles
    assert int((want[1] & ~got[1]).sum()) > 0 and int(got[1].sum()) > 0  # and more, not all
    assert bool(got[1][~has_cells].all())                               # no cell in the batch element
    assert torch.equal(got[0][~got[1]], exact[~got[1]])
    assert not bool(got[1][-2]) and cells[got[0][-2], 1:].tolist() == [-130000, 129984, 0]   # the far cell

    # static mode end to end (lattice, then the listed rows' brute force in place), against the
    # torch backend's static path and the exact answer; a capacity too small for the fallback
    # raises the flag in both
    from lidar_completion.sparse.triton_backend import TritonBackend
    q = q[q[:, 0] < 3]                                   # batch elements that have cells
    exact = sparse.nearest_cell(q.cpu(), cells.cpu()).to(DEVICE)
    counts = [int(search(q[:, 1:], cells[:, 1:], q[:, 0], cells[:, 0], index)[1].sum())
              for search in (lattice_nearest, _nearest_lattice)]
    assert min(counts) > 5
    for cap, overflow in ((None, False), (5, True)):
        results = []
        for nearest, unresolved in zip((TritonBackend.nearest_cell, sparse.get_backend("torch").nearest_cell), counts):
            plan = sparse.StaticShapes({("unresolved", 0): cap} if cap else None)
            with sparse.use_static_shapes(plan):
                results.append(nearest(q, cells))
            _, summary = plan.summary()
            assert bool(summary[0]) == overflow and int(summary[1]) == unresolved
        if not overflow:
            assert torch.equal(results[0], exact) and torch.equal(results[1], exact)


def test_loop_choice_and_tile_keys(monkeypatch):
    from lidar_completion.sparse import conv_implicit_gemm as ig

    monkeypatch.delenv(ig.ENV_LOOP, raising=False)
    masked = ig.candidates(100000, 64, 64, interpreted=False, groups=2)
    assert masked and not any(c.flat for c in masked)                        # the default
    monkeypatch.setenv(ig.ENV_LOOP, "flat")
    flat = ig.candidates(100000, 64, 64, interpreted=False, groups=2)
    assert [c.flat for c in flat] == [True] * len(masked) and {c.stages for c in flat} == {3}
    monkeypatch.setenv(ig.ENV_LOOP, "both")
    assert ig.candidates(100000, 64, 64, interpreted=False, groups=2) == masked + flat
    for c in masked + flat:                                                  # the tuning cache's keys
        assert ig.Config.parse(c.key()) == c
    monkeypatch.delenv(ig.ENV_LOOP, raising=False)
    # the defaults measured on an H200: 128 x 256 tiles for 256 output channels over many rows, a
    # third pipeline stage where an offset has several channel chunks, two where it has one
    assert ig.candidates(100000, 256, 256, interpreted=False)[0] == ig.Config(128, 256, 64, 8, 3)
    assert ig.candidates(2000, 256, 256, interpreted=False)[0] == ig.Config(64, 128, 64, 4, 3)
    assert ig.candidates(100000, 128, 128, interpreted=False)[0] == ig.Config(64, 128, 64, 4, 3)
    assert ig.candidates(100000, 32, 32, interpreted=False)[0] == ig.Config(64, 32, 32, 4, 2)
    monkeypatch.setenv(ig.ENV_LOOP, "fast")
    with pytest.raises(ConfigError, match="LIDAR_COMPLETION_TRITON_LOOP"):
        ig.candidates(1000, 16, 16, interpreted=True)


def test_tiles_fit_the_shared_memory_of_the_device():
    """fp32 operands take twice the shared memory of bf16: on an H200 (227 KiB per block) the
    128 x 256 x 64 three-stage tile fits in bf16 (144 KiB) and not in fp32 (288 KiB, which
    failed to launch there); a tile that fails at launch all the same gives way to the next
    candidate, remembered for its key, and no fitting tile is a clear error."""
    import triton

    from lidar_completion.sparse import conv_implicit_gemm as ig

    h200 = 232448
    big = ig.Config(128, 256, 64, 8, 3)
    assert ig.shared_bytes(big, 2) == 144 * 1024
    assert ig.candidates(100000, 256, 256, False, itemsize=2, shared_limit=h200)[0] == big
    fp32 = ig.candidates(100000, 256, 256, False, itemsize=4, shared_limit=h200)
    assert big not in fp32 and all(ig.shared_bytes(c, 4) * 9 // 8 <= h200 for c in fp32)
    tiny = ig.candidates(100000, 256, 256, False, itemsize=4, shared_limit=1024)
    assert len(tiny) == 1       # nothing fits: the smallest, to fail at launch with Triton's message

    tuner, options, ran = ig.Tuner(), ig.candidates(100000, 256, 256, False), []

    def run(cfg):
        ran.append(cfg)
        if cfg in options[:2]:
            raise triton.runtime.errors.OutOfResources(300000, h200, "shared memory")

    assert tuner.fallback(("k",), options, options[0], run) == options[2]
    assert ran == options[1:3] and tuner._best[("k",)] == options[2]
    with pytest.raises(RuntimeError, match="no Triton tile configuration"):
        tuner.fallback(("k2",), options[:2], options[0], run)


def test_nearest_cell_kernel_is_exact_with_ties_and_batches():
    from lidar_completion.sparse.nearest import _nearest_bruteforce
    from lidar_completion.sparse.triton_backend import bruteforce_nearest

    g = torch.Generator().manual_seed(0)
    cells = torch.cat([torch.randint(0, 3, (200, 1), generator=g),
                       torch.randint(-6, 6, (200, 3), generator=g) * 16], 1)
    cells = torch.unique(cells, dim=0)
    cells = cells[torch.argsort(sparse.pack_keys(cells))].to(DEVICE)
    q = torch.cat([torch.randint(0, 3, (700, 1), generator=g),
                   torch.randint(-150, 150, (700, 3), generator=g)], 1).to(DEVICE)
    got = bruteforce_nearest(q[:, 1:], cells[:, 1:], q[:, 0], cells[:, 0])
    assert torch.equal(got, _nearest_bruteforce(q[:, 1:], cells[:, 1:], q[:, 0], cells[:, 0]))
    assert torch.equal(got, sparse.nearest_cell(q, cells))     # ties: the smallest index
    with pytest.raises(CloudFormatError, match="batch element 2"):
        bruteforce_nearest(q[:, 1:], cells[cells[:, 0] != 2][:, 1:], q[:, 0], cells[cells[:, 0] != 2][:, 0])
    far = torch.tensor([[0, -131000, 131000, 0]], device=DEVICE)
    assert int(bruteforce_nearest(far[:, 1:], cells[:, 1:], far[:, 0], cells[:, 0])) == \
        int(_nearest_bruteforce(far[:, 1:], cells[:, 1:], far[:, 0], cells[:, 0]))


def test_nearest_cell_kernel_breaks_ties_across_tiles():
    """A full lattice block of cells (several reference tiles) and queries at the centres of its
    cubes, each equidistant from 8 cells that lie in different tiles: the smallest index wins."""
    from lidar_completion.sparse.nearest import _nearest_bruteforce
    from lidar_completion.sparse.triton_backend import bruteforce_nearest

    r = torch.arange(-4, 5) * 16
    cells = torch.cartesian_prod(torch.zeros(1, dtype=torch.long), r, r, r)           # 729 cells
    cells = cells[torch.argsort(sparse.pack_keys(cells))].to(DEVICE)
    centres = torch.cartesian_prod(torch.zeros(1, dtype=torch.long), r[:-1] + 8, r[:-1] + 8, r[:-1] + 8)
    q = torch.cat([centres, torch.tensor([[0, 5000, -70000, 3]])]).to(DEVICE)
    got = bruteforce_nearest(q[:, 1:], cells[:, 1:], q[:, 0], cells[:, 0])
    assert torch.equal(got, _nearest_bruteforce(q[:, 1:], cells[:, 1:], q[:, 0], cells[:, 0]))
    corner = centres[:, 1:].to(DEVICE) - 8                      # the smallest of the 8 equidistant cells
    assert torch.equal(cells[got[:-1], 1:], corner)


@pytest.mark.parametrize("candidates", [0, 2])
def test_device_farthest_point_sampling_is_exact(candidates):
    """The textbook algorithm from point 0 (fpsample's reference implementation), for several
    clouds in one launch: a scan-like one, a single point, one sampled whole - with one sample per
    exchange (0) and with each program offering two candidates (fps_rounds_kernel)."""
    import fpsample

    from lidar_completion.sparse.triton_backend import farthest_point_sample_device

    g = np.random.default_rng(5)
    clouds = [g.normal(0, 10, (n, 3)).astype(np.float32) for n in (2000, 1, 333)]
    want = [min(k, len(c)) for c, k in zip(clouds, (150, 5, 333))]
    got = farthest_point_sample_device([torch.from_numpy(c).to(DEVICE) for c in clouds], want,
                                       candidates=candidates)
    for c, k, idx in zip(clouds, want, got):
        assert idx.shape == (k,)
        expect = np.arange(k) if k == len(c) else np.asarray(fpsample.fps_sampling(c, k, start_idx=0))
        assert np.array_equal(idx.cpu().numpy(), expect)


@pytest.mark.parametrize("candidates", [1, 4, 8])
def test_candidate_rounds_break_ties_and_run_out_of_points_as_the_textbook_loop(candidates):
    """Ties everywhere (a lattice: many points at one distance) and more samples than distinct
    points (each point five times: once all are taken, the textbook loop takes point 0 again and
    again): the K-candidate kernel equals the float32 textbook loop, ties to the smallest index
    (fpsample ties to the largest), as the one-sample kernel does."""
    from lidar_completion.sparse.triton_backend import farthest_point_sample_device

    textbook = load_script("benchmarks/fps_rounds.py").textbook
    r = np.arange(-3, 4, dtype=np.float32)
    lattice = np.stack(np.meshgrid(r, r, r[:3], indexing="ij"), -1).reshape(-1, 3)     # 147 points
    g = np.random.default_rng(1)
    repeated = np.repeat(g.normal(0, 1, (7, 3)).astype(np.float32), 5, axis=0)          # 35 rows, 7 points
    clouds, want = [lattice, repeated], [60, 20]
    got = farthest_point_sample_device([torch.from_numpy(c).to(DEVICE) for c in clouds], want, candidates=candidates)
    for c, k, idx in zip(clouds, want, got):
        assert np.array_equal(idx.cpu().numpy(), textbook(c, k))
    assert np.array_equal(got[1].cpu().numpy()[7:], np.zeros(13))
    one = farthest_point_sample_device([torch.from_numpy(lattice).to(DEVICE)], [60], candidates=0)[0]
    assert torch.equal(one, got[0])


def test_fps_candidates_are_checked(monkeypatch):
    from lidar_completion.sparse import triton_backend

    cloud = [torch.zeros(10, 3, device=DEVICE)]
    with pytest.raises(ValueError, match="candidates must be one of"):
        triton_backend.farthest_point_sample_device(cloud, [3], candidates=3)
    monkeypatch.setenv("LIDAR_COMPLETION_FPS_CANDIDATES", "two")
    with pytest.raises(ValueError, match="LIDAR_COMPLETION_FPS_CANDIDATES='two'"):
        triton_backend.farthest_point_sample_device(cloud, [3])
    monkeypatch.setenv("LIDAR_COMPLETION_FPS_CANDIDATES", "4")
    assert triton_backend.fps_candidates_default() == 4


@pytest.mark.parametrize("grouped", [False, True])
def test_modulation_kernel_equals_the_gathered_product(grouped):
    """The denoiser's modulation: features times each voxel's condition-cell weight, one feature
    group per condition - the Triton kernel against the torch backend's gather and product, bf16
    features with bf16 and fp32 weights (the promoted dtype, one rounding), 200 channels (two
    column blocks, the second partial) and a row count that is no multiple of the tile."""
    from lidar_completion.sparse.torch_backend import TorchBackend
    from lidar_completion.sparse.triton_backend import TritonBackend

    pts, batch = _clouds(n=500)
    _, x = sparse.get_backend("triton", DEVICE).voxelize(pts, batch, 0.5)
    m = x.feats.shape[0]
    g = torch.Generator().manual_seed(1)
    f = torch.randn((2, m, 200) if grouped else (m, 200), generator=g).to(torch.bfloat16).to(DEVICE)
    weights = [torch.randn(7, 200, generator=g).to(torch.bfloat16).to(DEVICE),
               torch.randn(1, 200, generator=g).to(DEVICE)]                       # fp32: promotes
    rows = [torch.randint(0, 7, (m,), generator=g).to(DEVICE), torch.zeros(m, dtype=torch.long, device=DEVICE)]
    x = x.replace(f)
    for ws, rs in ((weights, rows), (weights[:1], rows[:1])):
        if grouped and len(ws) == 1:
            continue
        got = TritonBackend.modulate(x, ws, rs).feats
        want = TorchBackend.modulate(x, ws, rs).feats
        assert got.dtype == want.dtype and got.shape == want.shape
        if DEVICE == "cpu" and got.dtype == torch.bfloat16:
            # the interpreter truncates float32 -> bfloat16 where compiled code (and torch) rounds
            # to nearest: one bf16 step at most
            assert float(((got.float() - want.float()).abs() / want.float().abs().clamp(min=1e-30)).max()) <= 2 ** -7
        else:
            assert torch.equal(got, want)


def test_completer_samples_on_the_device_as_the_textbook_does(monkeypatch):
    """fps="device" (the Triton kernel; under the interpreter on the CPU) picks the points of the
    textbook algorithm from point 0, so the completion equals that of a CPU Completer whose
    sampling is fpsample's textbook loop (its k-d tree variant, the CPU default, is exact too but
    starts elsewhere)."""
    import fpsample

    from lidar_completion import preprocess
    from lidar_completion.completer import Completer

    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    nets = (ConditionEncoder(cfg, "torch").eval(), Denoiser(cfg, "torch").eval(), Refiner(cfg, "torch").eval())
    g = np.random.default_rng(2)
    r, a = g.uniform(4, 30, 1500), g.uniform(0, 2 * np.pi, 1500)
    scan = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.6, 0.3, 1500)], 1).astype(np.float32)
    kw = dict(steps=2, guidance=2.0, seed=4, n_fps=300, tile=3, device=DEVICE)
    dev, cpu = Completer(*nets, fps="device", **kw), Completer(*nets, fps="cpu", **kw)
    assert dev.fps_on_device and not cpu.fps_on_device
    a_res = dev.complete_detailed(scan)
    monkeypatch.setattr(preprocess, "farthest_point_sample",
                        lambda p, k, parts=1: np.asarray(fpsample.fps_sampling(p, k, start_idx=0), dtype=np.int64))
    b_res = cpu.complete_detailed(scan)
    assert a_res.num_fps == b_res.num_fps == 300
    np.testing.assert_array_equal(a_res.points, b_res.points)
    # fps_parts: the same sectors and shares on both, each sector sampled from its first point
    monkeypatch.undo()   # the shipped CPU path again, but for the start point within a sector
    monkeypatch.setattr(preprocess, "_fps_exact",
                        lambda p, k: np.asarray(fpsample.fps_sampling(p, k, start_idx=0), dtype=np.int64))
    dev.fps_parts = cpu.fps_parts = 5
    a_res, b_res = dev.complete_detailed(scan), cpu.complete_detailed(scan)
    assert a_res.num_fps == b_res.num_fps == 300
    np.testing.assert_array_equal(a_res.points, b_res.points)


def test_completer_falls_back_to_cpu_sampling_when_the_kernel_fails(monkeypatch, caplog):
    """fps="auto" on a device where the kernel fails (here: made to raise) warns once and samples
    on the CPU from then on; fps="device" reports the failure."""
    from lidar_completion.completer import Completer
    from lidar_completion.sparse import triton_backend

    calls = []

    def broken(clouds, counts):
        calls.append(len(clouds))
        raise RuntimeError("a step waited too long")

    monkeypatch.setattr(triton_backend, "farthest_point_sample_device", broken)
    cfg = ModelConfig.tiny()
    nets = (ConditionEncoder(cfg, "torch").eval(), Denoiser(cfg, "torch").eval(), None)
    g = np.random.default_rng(4)
    r, a = g.uniform(4, 30, 800), g.uniform(0, 2 * np.pi, 800)
    scan = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.6, 0.3, 800)], 1).astype(np.float32)
    c = Completer(*nets, steps=1, guidance=1.0, seed=0, n_fps=100, tile=2, device=DEVICE, fps="device")
    with pytest.raises(RuntimeError, match="waited too long"):
        c.complete(scan)
    c.fps = "auto"
    # "auto" takes the device only on CUDA: force its device path to exercise the fallback
    monkeypatch.setattr(type(c), "fps_on_device", property(lambda self: not self._fps_failed))
    with caplog.at_level("WARNING"):
        res = c.complete_detailed(scan)
        res2 = c.complete_detailed(scan)
    assert res.num_fps == res2.num_fps == 100 and len(calls) == 2
    assert sum("sampling on the CPU from now on" in m for m in caplog.messages) == 1
    # a setting to correct is an error, not a kernel fault to fall back from
    monkeypatch.undo()
    monkeypatch.setattr(type(c), "fps_on_device", property(lambda self: True))
    monkeypatch.setenv("LIDAR_COMPLETION_FPS_CANDIDATES", "3")
    with pytest.raises(ConfigError, match="LIDAR_COMPLETION_FPS_CANDIDATES='3'"):
        c.complete(scan)


# -- selection and tuning -----------------------------------------------------------------------------
def test_backend_selection(monkeypatch):
    monkeypatch.delenv(sparse.ENV_BACKEND, raising=False)   # make test-torch sets what "auto" means
    assert sparse.resolve_backend("triton", DEVICE) == "triton"
    assert "triton" in sparse.BACKENDS
    assert isinstance(sparse.get_backend("triton"), sparse.SparseBackend)
    assert isinstance(sparse.get_backend("torch"), sparse.SparseBackend)
    assert sparse.resolve_backend("auto", torch.device("cuda")) == "triton"   # a device object needs no GPU
    with pytest.raises(ConfigError, match="CUDA devices"):
        sparse.resolve_backend("triton", "mps")
    monkeypatch.setenv(sparse.ENV_BACKEND, "torch")                  # the variable decides "auto"
    assert sparse.resolve_backend("auto", torch.device("cuda")) == "torch"


def test_cpu_without_the_interpreter_is_refused_with_the_reason():
    code = ("import sys\nfrom lidar_completion.completer import Completer\n"
            "try:\n    Completer.from_checkpoint(backend='triton', device='cpu')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ConfigError" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_tuner_times_once_and_remembers_on_disk(tmp_path, monkeypatch):
    from lidar_completion.sparse import conv_implicit_gemm as ig

    monkeypatch.setenv(ig.ENV_TUNE_CACHE, str(tmp_path / "tune.json"))
    monkeypatch.delenv(ig.ENV_TUNE, raising=False)        # benchmarks/gpu_session.sh sets it to 0
    monkeypatch.delenv(ig.ENV_LOOP, raising=False)        # the default (masked) candidates
    timed = []
    monkeypatch.setattr(ig, "_time", lambda run, cfg, reps=5: timed.append(cfg) or (1.0 if cfg.bm == 128 else 2.0))
    monkeypatch.setattr(ig.Tuner, "_device_tag", lambda self, device: "fake-gpu|triton x")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    options = ig.candidates(100000, 64, 64, interpreted=False)
    assert len(options) > 2 and len(set(options)) == len(options)
    cuda = torch.device("cuda")
    tuner = ig.Tuner()
    best = tuner.choose(("conv3", 1), options, None, cuda)
    assert best.bm == 128 and len(timed) == len(options)
    assert tuner.choose(("conv3", 1), options, None, cuda) == best and len(timed) == len(options)
    fresh = ig.Tuner()                                   # a new process reads the file
    assert fresh.choose(("conv3", 1), options, None, cuda) == best and len(timed) == len(options)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    n = len(timed)
    key = ("conv3", 27, 1 << 17, 32, 0, 32, 2, "torch.bfloat16", False)
    assert fresh.choose(key, options, None, cuda) == options[0]               # never time in a capture
    fresh._best[key[:2] + (1 << 14,) + key[3:]] = options[2]                  # a sizing pass's choice
    fresh._best[key[:2] + (1 << 10,) + key[3:]] = options[1]
    assert fresh.choose(key, options, None, cuda) == options[2]               # the nearest row count
    assert len(timed) == n
    flat = [ig.Config(c.bm, c.bn, c.bk, c.warps, 3, c.pair, True) for c in options]
    assert fresh.choose(key, flat, None, cuda) == flat[0]     # a choice among other loops does not count


def test_completer_with_the_triton_backend_completes_like_torch(tmp_path):
    """The API end to end (encoder, guided solver steps, refiner) on the Triton backend equals the
    torch backend's completion for the same seed."""
    from lidar_completion.checkpoints import make_random_checkpoint
    from lidar_completion.completer import Completer

    path = make_random_checkpoint(tmp_path / "r.pt", seed=2,
                                  sampling={"steps": 2, "guidance": 2.0, "n_fps": 150, "tile": 3, "process": "local"})
    scan = _clouds(n=500)[0][:500].cpu().numpy()
    outs = []
    for backend in ("torch", "triton"):
        c = Completer.from_checkpoint(path, seed=0, backend=backend, device=DEVICE)
        assert c.denoiser.backend == backend
        outs.append(c.complete(scan))
    assert outs[0].shape == outs[1].shape and len(outs[0]) > 0
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


def test_wide_layers_span_several_tiles():
    """Channel counts past one tile (several K blocks, several output-column programs, not
    multiples of the tile): forward, input and weight gradients of a 3x3x3 and a 1x1 convolution."""
    pts, batch = _clouds(n=150)
    B = sparse.get_backend("torch")
    torch.manual_seed(9)
    lift = B.Convolution(3, 150, 1, 1).to(DEVICE)
    convs = [B.Convolution(150, 290, 3, 1).to(DEVICE), B.Convolution(290, 70, 1, 1).to(DEVICE)]
    results = []
    for backend in ("torch", "triton"):
        _, x = sparse.get_backend(backend).voxelize(pts, batch, 0.05)
        with torch.no_grad():
            f = lift(x).feats
        f = f.detach().clone().requires_grad_(True)
        y = x.replace(f)
        for c in convs:
            y = c(y)
        (y.feats * torch.linspace(-1, 1, y.feats.numel(), device=DEVICE).view_as(y.feats)).sum().backward()
        results.append([y.feats.detach(), f.grad] + [c.kernel.grad.clone() for c in convs])
        for c in convs:
            c.kernel.grad = None
    for a, b in zip(*results):
        _close(b, a, rel=1e-4)


def test_map_kernels_issue_fewer_launches_per_pass(capsys, monkeypatch):
    """benchmarks/launch_count.py: a guided static pass with the Triton map kernels launches far
    fewer operators and kernels than with the maps built by torch operations. (The convolutions
    return zeros here: the same in both variants, and the slow part under the interpreter.)"""
    import importlib.util
    import pathlib

    from lidar_completion.sparse import conv_implicit_gemm as igemm

    def zeros(segments, weight, plan_for, rows, epilogue, out_dtype, kind, interpreted):
        plan_for(16)                                   # the plan is built, as a real launch would
        groups = max([t.shape[0] for t in segments if t.dim() == 3] or [0])
        shape = (groups, rows, weight.shape[2]) if groups else (rows, weight.shape[2])
        return torch.zeros(shape, dtype=out_dtype, device=weight.device)
    monkeypatch.setattr(igemm, "implicit_gemm", zeros)

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "launch_count.py"
    spec = importlib.util.spec_from_file_location("launch_count", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--points", "400", "--top", "3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(f.split("=") for f in last.split()[1:])
    assert int(fields["maps_triton"]) < 0.7 * int(fields["maps_torch"]), last
