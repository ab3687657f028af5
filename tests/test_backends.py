"""The pure-torch sparse backend against MinkowskiEngine (the reference) and against the measured
kernel-offset order of the published networks."""
import json
import os

import numpy as np
import pytest
import torch

from lidar_completion import sparse
from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig, Refiner
from lidiff_reference import FIXTURES

needs_minkowski = pytest.mark.skipif(not sparse.minkowski_available(),
                                     reason="MinkowskiEngine is not built here (or hidden): nothing to compare with")


def _batch_clouds():
    """Three clouds in one batch: a street-like scan, a small blob, and a single point."""
    g = np.random.default_rng(3)
    r = g.uniform(4, 25, 4000)
    a = g.uniform(0, 2 * np.pi, 4000)
    scan = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.6, 0.3, 4000)], 1)
    blob = g.normal([2.0, -3.0, 0.5], 0.4, (700, 3))
    single = np.array([[1.23, -4.56, 0.2]])
    pts = torch.from_numpy(np.concatenate([scan, blob, single]).astype(np.float32))
    batch = torch.from_numpy(np.repeat([0, 1, 2], [4000, 700, 1]))
    return pts, batch


def _pair(cls, cfg, train=False):
    torch.manual_seed(7)
    a = cls(cfg, "torch")
    b = cls(cfg, "minkowski")
    b.load_state_dict(a.state_dict(), strict=True)
    return (a.train(train), b.train(train))


def _levels(net, pts, batch):
    """(stride -> sorted coordinates) of every encoder level of a network's forward pass."""
    B = net._B
    _, x = net._voxelize(pts, batch)
    out = {}
    x = net.stem(x)
    for i in range(1, 5):
        c = B.coords(x).long()
        out[B.stride(x)] = c[torch.argsort(sparse.pack_keys(c))]
        x = getattr(net, f"stage{i}")(x)
    c = B.coords(x).long()
    out[B.stride(x)] = c[torch.argsort(sparse.pack_keys(c))]
    return out


def _close(a, b, rel=1e-4, floor=1e-6):
    scale = max(float(b.detach().abs().max()), floor)
    return float((a - b).detach().abs().max()) <= rel * scale


@needs_minkowski
def test_same_coordinates_at_every_level():
    pts, batch = _batch_clouds()
    a, b = _pair(ConditionEncoder, ModelConfig.tiny())
    la, lb = _levels(a, pts, batch), _levels(b, pts, batch)
    assert sorted(la) == sorted(lb) == [1, 2, 4, 8, 16]
    for s in la:
        assert torch.equal(la[s], lb[s]), s


@needs_minkowski
@pytest.mark.parametrize("cls", [ConditionEncoder, Denoiser, Refiner], ids=lambda c: c.__name__)
def test_outputs_and_gradients_agree(cls):
    """Same weights, same inputs (3 clouds incl. a single point): outputs within 1e-4 relative and
    the gradient of a scalar loss w.r.t. every parameter too.

    BatchNorm uses its running statistics here. In training mode (batch statistics) the outputs
    still agree to ~1e-4, but the two backends' float32 summation orders, amplified through batch
    statistics of 8-channel layers, move some gradients by ~1e-3 relative, which says nothing about
    the kernel maps this test is for."""
    cfg = ModelConfig.tiny()
    pts, batch = _batch_clouds()
    a, b = _pair(cls, cfg, train=False)
    outs = []
    for net in (a, b):
        if cls is ConditionEncoder:
            c = net(pts, batch)
            y = c.feats
        elif cls is Denoiser:
            enc = ConditionEncoder(cfg, "torch").eval()
            torch.manual_seed(11)
            with torch.no_grad():
                cond = enc(pts, batch)
            y = net(pts + 0.05, batch, torch.tensor([900, 400, 10]), cond)
        else:
            y = net(pts, batch)
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
        loss.backward()
        outs.append((y.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}))
    (ya, ga), (yb, gb) = outs
    assert ya.shape == yb.shape
    assert _close(ya, yb), float((ya - yb).abs().max())
    assert ga.keys() == gb.keys()
    # relative to the tensor's own scale, or to 1e-3 of the largest gradient for tensors whose
    # gradient is vanishingly small (deep BatchNorm biases: ~1e-7)
    floor = 1e-3 * max(float(g.abs().max()) for g in gb.values())
    for k in ga:
        assert _close(ga[k], gb[k], rel=1e-4, floor=floor), (k, float((ga[k] - gb[k]).abs().max()))


@needs_minkowski
def test_training_mode_outputs_agree():
    pts, batch = _batch_clouds()
    a, b = _pair(Refiner, ModelConfig.tiny(), train=True)
    ya, yb = a(pts, batch), b(pts, batch)
    assert _close(ya.detach(), yb.detach(), rel=1e-3)


def _single_offset_conv(backend, k):
    B = sparse.get_backend(backend)
    conv = B.Convolution(1, 1, kernel_size=3, stride=1)
    with torch.no_grad():
        conv.kernel.zero_()
        conv.kernel[k, 0, 0] = 1.0
    # a 3x3x3 block of voxels around the origin, feature 1 only at the origin
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), -1).view(-1, 3)
    pts = grid.float() * 0.05
    field, x = B.voxelize(pts, torch.zeros(len(pts), dtype=torch.long), 0.05)
    feats = (B.coords(x)[:, 1:].abs().sum(1) == 0).float().view(-1, 1)
    y = conv(B.with_feats(x, feats))
    nz = B.coords(y)[B.feats(y).view(-1) != 0][:, 1:]
    return [tuple(r) for r in nz.tolist()]


@pytest.mark.parametrize("k", [0, 1, 3, 9, 14, 22, 26])
def test_kernel_offset_order(k, backend):
    """kernel[k] reads the input at u + offset_k (x fastest, then y, then z - as MinkowskiEngine
    stores it), so a feature at the origin appears at -offset_k."""
    offsets = json.loads((FIXTURES / "lidiff_state_dicts.json").read_text())["kernel_offsets"]
    dx, dy, dz = offsets["kernel_size_3_stride_1"][k]
    assert _single_offset_conv(backend, k) == [(-dx, -dy, -dz)]


@needs_minkowski
def test_kernel_offset_order_matches_minkowski():
    for k in range(27):
        assert _single_offset_conv("torch", k) == _single_offset_conv("minkowski", k)


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("LIDAR_COMPLETION_BACKEND", "torch")
    assert sparse.resolve_backend(None) == "torch"
    monkeypatch.setenv("LIDAR_COMPLETION_HIDE_MINKOWSKI", "1")
    monkeypatch.delenv("LIDAR_COMPLETION_BACKEND")
    assert sparse.resolve_backend("auto") == "torch"
    from lidar_completion.errors import ConfigError
    with pytest.raises(ConfigError, match="hidden"):
        sparse.resolve_backend("minkowski")
    with pytest.raises(ConfigError, match="unknown sparse backend"):
        sparse.resolve_backend("cuda-magic")


@pytest.mark.parametrize("user_value", [None, "3"])
def test_minkowski_loads_its_blas_single_threaded_unless_the_user_chose(monkeypatch, user_value):
    """OpenBLAS (linked by MinkowskiEngine's CPU build) reads OPENBLAS_NUM_THREADS when it loads:
    1 at that moment unless the user set a value, and the environment as it was afterwards."""
    import sys
    import types

    seen = []

    def fake_import(name):
        seen.append((name, os.environ.get("OPENBLAS_NUM_THREADS")))
        raise ImportError("not built here")

    monkeypatch.delitem(sys.modules, "MinkowskiEngine", raising=False)
    monkeypatch.setattr(sparse.importlib, "import_module", fake_import)
    if user_value is None:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", user_value)
    with pytest.raises(ImportError):
        sparse.import_minkowski()
    assert seen == [("MinkowskiEngine", user_value or "1")]
    assert os.environ.get("OPENBLAS_NUM_THREADS") == user_value
    # loaded once already: returned as it is, nothing set
    loaded = types.ModuleType("MinkowskiEngine")
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", loaded)
    assert sparse.import_minkowski() is loaded and len(seen) == 1


def test_nearest_cell_paths_agree():
    """The CPU k-d tree, the lattice search (GPU path) and brute force give the same cells."""
    from lidar_completion.sparse import pack_keys
    from lidar_completion.sparse.nearest import (_nearest_bruteforce, _nearest_device, _nearest_kdtree,
                                                 _nearest_lattice)
    g = torch.Generator().manual_seed(0)
    cells = torch.unique(torch.randint(-6, 6, (400, 3), generator=g) * 16, dim=0)
    zero = torch.zeros(len(cells), 1, dtype=torch.long)
    cells = cells[torch.argsort(pack_keys(torch.cat([zero, cells], 1)))]
    q = torch.randint(-200, 200, (5000, 3), generator=g)  # includes rows far outside (fallback path)
    brute = _nearest_bruteforce(q, cells)
    d2 = ((q[:, None, :] - cells[None, :, :]) ** 2).sum(-1)
    assert torch.equal(brute, torch.argmin(d2, dim=1))     # the float64 expansion is exact
    lattice, unresolved, off = _nearest_lattice(q, cells)
    assert not bool(off) and 0 < int(unresolved.sum()) < len(q)
    assert torch.equal(lattice[~unresolved], brute[~unresolved])
    assert torch.equal(torch.from_numpy(_nearest_kdtree(q.numpy(), cells.numpy())), brute)
    # midway between grid cells along 1, 2 or 3 axes: many-way ties (up to 13 here), which the k-d tree
    # widens its search for (the smallest index wins, as in the brute force)
    mid = torch.randint(-6, 6, (600, 3), generator=g) * 16 + 8 * torch.randint(0, 2, (600, 3), generator=g)
    ties = ((mid[:, None, :] - cells[None, :, :]) ** 2).sum(-1)
    assert (ties == ties.min(1, keepdim=True).values).sum(1).max() > 8   # past the second widening
    assert torch.equal(torch.from_numpy(_nearest_kdtree(mid.numpy(), cells.numpy())),
                       _nearest_bruteforce(mid, cells))
    qz = torch.cat([torch.zeros(len(q), 1, dtype=torch.long), q], 1)
    rz = torch.cat([zero, cells], 1)
    assert torch.equal(_nearest_device(qz, rz), brute)


def test_nearest_cell_device_path_with_several_batch_elements():
    """The device path (one search over every batch element, no per-element loop) equals the CPU
    path, stays inside each element, handles a one-cell condition and names a missing element."""
    from lidar_completion.errors import CloudFormatError
    from lidar_completion.sparse import pack_keys
    from lidar_completion.sparse.nearest import _nearest_device
    g = torch.Generator().manual_seed(1)
    cells = torch.cat([torch.randint(0, 3, (300, 1), generator=g),
                       torch.randint(-6, 6, (300, 3), generator=g) * 16], 1)
    cells = torch.unique(cells, dim=0)
    cells = cells[torch.argsort(pack_keys(cells))]
    q = torch.cat([torch.randint(0, 3, (4000, 1), generator=g),
                   torch.randint(-150, 150, (4000, 3), generator=g)], 1)
    got = _nearest_device(q, cells)
    assert torch.equal(got, sparse.nearest_cell(q, cells))          # CPU: k-d tree per element
    assert torch.equal(cells[got, 0], q[:, 0])
    one = torch.tensor([[0, 16, 0, 0]])
    assert _nearest_device(q[q[:, 0] == 0], one).eq(0).all()
    with pytest.raises(CloudFormatError, match="batch element 2"):
        _nearest_device(q, cells[cells[:, 0] != 2])
    with pytest.raises(CloudFormatError, match="batch element 1"):
        _nearest_device(q[q[:, 0] <= 1], one)
    # the sorted reference keys are kept per ref tensor: an in-place change is seen
    moved = cells.clone()
    assert torch.equal(_nearest_device(q, moved), got)
    moved[:, 1] += 16
    assert torch.equal(_nearest_device(q, moved), sparse.nearest_cell(q, moved))
    assert not torch.equal(_nearest_device(q, moved), got)


@needs_minkowski
def test_checkpoint_from_one_backend_completes_the_same_on_the_other(tmp_path):
    """Weights saved from MinkowskiEngine modules load into the torch backend (and back), and the
    same seed gives the same completion."""
    from lidar_completion.checkpoints import save_checkpoint
    from lidar_completion.completer import Completer

    cfg = ModelConfig.tiny()
    torch.manual_seed(3)
    nets = {"encoder": ConditionEncoder(cfg, "minkowski"), "denoiser": Denoiser(cfg, "minkowski"),
            "refiner": Refiner(cfg, "minkowski")}
    save_checkpoint(tmp_path / "m.pt", nets, cfg, sampling={"steps": 2, "guidance": 3.5, "n_fps": 400, "tile": 4})
    scan = _batch_clouds()[0][:4000].numpy()
    outs = [Completer.from_checkpoint(tmp_path / "m.pt", seed=0, backend=b).complete(scan)
            for b in ("minkowski", "torch")]
    assert outs[0].shape == outs[1].shape and len(outs[0]) > 0
    assert np.abs(outs[0] - outs[1]).max() < 1e-3


def test_convolution_algorithm_choice(monkeypatch):
    from lidar_completion.sparse.torch_backend import GROUPED_MAX_WORK, conv_algorithm
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    monkeypatch.delenv("LIDAR_COMPLETION_CONV_ALGO", raising=False)
    assert conv_algorithm(cpu) == conv_algorithm(cpu, (1000, 1000)) == "scatter"
    assert conv_algorithm(cuda) == "gather"                   # one-to-one maps
    assert conv_algorithm(cuda, (1000, 100)) == "grouped"     # sparse level: 26 * 100 + 1000 rows
    assert conv_algorithm(cuda, (1000, 900)) == "gather"      # dense level
    edge = int(GROUPED_MAX_WORK * 27 * 1000 - 1000) // 26
    assert conv_algorithm(cuda, (1000, edge - 1)) == "grouped" and conv_algorithm(cuda, (1000, edge + 1)) == "gather"
    for algo in ("gather", "grouped", "scatter"):
        monkeypatch.setenv("LIDAR_COMPLETION_CONV_ALGO", algo)
        assert conv_algorithm(cpu, (10, 1)) == conv_algorithm(cuda, (10, 9)) == algo
    monkeypatch.setenv("LIDAR_COMPLETION_CONV_ALGO", "fastest")
    with pytest.raises(ValueError, match="LIDAR_COMPLETION_CONV_ALGO"):
        conv_algorithm(cuda)


@pytest.mark.parametrize("algo", ["gather", "grouped"])
def test_convolution_algorithms_agree(algo, monkeypatch):
    """Each GPU-oriented algorithm, run on the CPU, equals the per-offset scatter algorithm, for the
    guided (grouped features) and the plain denoiser pass, and so does CUDA's automatic per-level
    choice (both grouped and gather levels occur)."""
    from lidar_completion.sparse import torch_backend as tb

    cfg = ModelConfig.tiny()
    pts, batch = _batch_clouds()
    torch.manual_seed(0)
    den, enc = Denoiser(cfg, "torch").eval(), ConditionEncoder(cfg, "torch").eval()
    t = torch.tensor([500, 20, 3])
    outs = []
    for a in ("scatter", algo, "auto-as-cuda"):
        if a == "auto-as-cuda":
            monkeypatch.delenv("LIDAR_COMPLETION_CONV_ALGO", raising=False)
            real = tb.conv_algorithm
            chosen = []

            def like_cuda(device, stats=None):
                chosen.append(real(torch.device("cuda"), stats))
                return chosen[-1]
            monkeypatch.setattr(tb, "conv_algorithm", like_cuda)
        else:
            monkeypatch.setenv("LIDAR_COMPLETION_CONV_ALGO", a)
        with torch.no_grad():
            cond = enc(pts, batch)
            uncond = enc.empty_condition(len(pts) // 3 + 1, 3)
            outs.append(den.forward_cfg(pts + 0.1, batch, t, cond, uncond) + (den(pts + 0.1, batch, t, cond),))
    assert {"grouped", "gather"} <= set(chosen)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert _close(b, a, rel=1e-5)


@pytest.mark.parametrize("algo", ["gather", "grouped", "scatter"])
def test_convolution_algorithms_differentiate_feature_groups(algo, monkeypatch):
    """Gradients through a 3x3x3 and a stride-2 convolution of two feature groups (the guided pass
    as training records it) are the same with each algorithm as with the groups run one by one."""
    monkeypatch.setenv("LIDAR_COMPLETION_CONV_ALGO", algo)
    B = sparse.get_backend("torch")
    pts, batch = _batch_clouds()
    torch.manual_seed(3)
    convs = [B.Convolution(3, 6, 3, 1), B.Convolution(6, 5, 2, 2)]
    _, x = B.voxelize(pts, batch, 0.05)
    feats = torch.randn(2, x.feats.shape[0], 3, requires_grad=True)

    def run(f):
        y = x.replace(f)
        for c in convs:
            y = c(y)
        return y.feats

    grouped = run(feats)
    grouped.square().sum().backward()
    g_grouped, w_grouped = feats.grad.clone(), [c.kernel.grad.clone() for c in convs]
    feats.grad = None
    for c in convs:
        c.kernel.grad = None
    singles = torch.stack([run(feats[i]) for i in range(2)])
    singles.square().sum().backward()
    assert _close(grouped, singles, rel=1e-5)
    assert _close(g_grouped, feats.grad, rel=1e-5)
    for a, b in zip(w_grouped, (c.kernel.grad for c in convs)):
        assert _close(a, b, rel=1e-5)


def test_offset_pairs_cover_every_neighbour_once():
    """The padded per-offset row lists hold exactly the table's neighbour pairs; padding reads the
    zero row and writes distinct rows."""
    from lidar_completion.sparse import torch_backend as tb
    pts, batch = _batch_clouds()
    _, x = tb.BACKEND.voxelize(pts, batch, 0.05)
    x = tb.TorchSparseTensor(x.feats, 1, x.manager)
    m = x.manager
    for stride in (1, 2, 4):
        if stride > 1:
            m.level(stride)
        n, width = m.neighbour_stats(stride)
        out_rows, in_rows = m.offset_pairs(stride)
        table = m.neighbour_table(stride)
        assert out_rows.shape == in_rows.shape == (26, width)
        side = [k for k in range(27) if k != 13]
        for j, k in enumerate(side):
            real = in_rows[j] < n
            expect = torch.nonzero(table[:, k] < n, as_tuple=True)[0]
            assert torch.equal(torch.sort(out_rows[j][real]).values, expect)
            assert torch.equal(in_rows[j][real], table[out_rows[j][real], k])
            assert len(torch.unique(out_rows[j])) == width


def test_batchnorm_inference_is_the_running_statistics_affine_map():
    from lidar_completion.sparse import torch_backend as tb
    bn = tb.BatchNorm(5).eval()
    with torch.no_grad():
        bn.bn.running_mean.uniform_(-1, 1)
        bn.bn.running_var.uniform_(0.2, 2)
        bn.bn.weight.uniform_(-2, 2)
        bn.bn.bias.uniform_(-1, 1)
    f = torch.randn(2, 40, 5)
    _, x = tb.BACKEND.voxelize(torch.randn(40, 3) * 10, torch.zeros(40, dtype=torch.long), 0.05)
    y = bn(x.replace(f)).feats
    ref = torch.nn.functional.batch_norm(f.reshape(-1, 5), bn.bn.running_mean, bn.bn.running_var,
                                         bn.bn.weight, bn.bn.bias, False, 0.0, bn.bn.eps).view_as(f)
    assert torch.allclose(y, ref, atol=1e-6)
    # the inference map is cached: a change of the statistics (load_state_dict, optimiser) is seen
    with torch.no_grad():
        bn.bn.running_mean.add_(1.0)
    ref2 = torch.nn.functional.batch_norm(f.reshape(-1, 5), bn.bn.running_mean, bn.bn.running_var,
                                          bn.bn.weight, bn.bn.bias, False, 0.0, bn.bn.eps).view_as(f)
    assert torch.allclose(bn(x.replace(f)).feats, ref2, atol=1e-6)
    # gradients reach the affine parameters in eval mode, and a map cached under inference_mode
    # does not leak inference tensors into autograd afterwards (a frozen teacher in distillation)
    loss = bn(x.replace(f)).feats.sum()
    loss.backward()
    assert bn.bn.weight.grad is not None and bn.bn.bias.grad.abs().sum() > 0
    bn.bn.requires_grad_(False)
    with torch.inference_mode():
        bn(x.replace(f))
    fg = f.clone().requires_grad_(True)
    bn(x.replace(fg)).feats.square().sum().backward()
    assert fg.grad is not None and torch.isfinite(fg.grad).all()
    bn.train()
    assert torch.allclose(bn(x.replace(f)).feats.reshape(-1, 5).mean(0), bn.bn.bias, atol=1e-5)


def test_inference_caches_follow_weight_and_condition_changes(monkeypatch):
    """The condition-only MLP outputs and the grouped kernels kept between solver steps are
    recomputed when the weights or the condition change, and never used with autograd on."""
    monkeypatch.setenv("LIDAR_COMPLETION_CONV_ALGO", "grouped")
    cfg = ModelConfig.tiny()
    pts, batch = _batch_clouds()
    torch.manual_seed(0)
    den, enc = Denoiser(cfg, "torch").eval(), ConditionEncoder(cfg, "torch").eval()
    t = torch.tensor([500, 20, 3])
    with torch.no_grad():
        cond = enc(pts, batch)
        first = den(pts + 0.1, batch, t, cond)
        assert torch.equal(den(pts + 0.1, batch, t, cond), first)          # cached path, same result
        other = Denoiser(cfg, "torch").eval()                                # new weights, same cond
        den.load_state_dict(other.state_dict())
        assert torch.allclose(den(pts + 0.1, batch, t, cond), other(pts + 0.1, batch, t, cond), atol=1e-6)
        cond2 = enc(pts * 1.5, batch)                                        # another condition
        assert torch.allclose(den(pts + 0.1, batch, t, cond2), other(pts + 0.1, batch, t, cond2), atol=1e-6)
        den.stem[0].kernel.mul_(2.0)                                         # in-place weight change
        other.stem[0].kernel.mul_(2.0)
        assert torch.allclose(den(pts + 0.1, batch, t, cond2), other(pts + 0.1, batch, t, cond2), atol=1e-6)
    y = den(pts + 0.1, batch, t, cond2)                                      # autograd on: no cache
    y.square().sum().backward()
    assert den.latent_stage1[0].weight.grad is not None and den.stem[0].kernel.grad.abs().sum() > 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_points_are_refused_by_name(backend, value):
    """A NaN or infinite point becomes an arbitrary voxel index (on the CPU INT64_MIN, whose absolute
    value overflows to a negative number and passes the range test): the voxelisation of every
    backend names it instead of computing on it."""
    from lidar_completion.errors import CloudFormatError
    pts, batch = _batch_clouds()
    pts[17, 2] = value
    pts[4100, 0] = value
    net = ConditionEncoder(ModelConfig.tiny(), backend).eval()
    with pytest.raises(CloudFormatError, match="2 of 4701 points are not finite"):
        with torch.no_grad():
            net(pts, batch)


def test_neighbour_map_equals_a_search_of_every_offset():
    """The scatter form's maps (offsets past the centre are the mirrored ones' pairs swapped) equal
    a direct search of each of the 27 offsets against the level's coordinates: ascending rows, every
    neighbour once, at strides 1, 2 and 4, with negative and large coordinates."""
    from lidar_completion.sparse import torch_backend as tb
    from lidar_completion.sparse.coords import KERNEL3_OFFSETS
    pts, batch = _batch_clouds()
    pts = pts.clone()
    pts[: len(pts) // 3] -= 40.0           # negative coordinates
    pts[-5:] += 3000.0                      # a few far away (isolated rows)
    _, x = tb.BACKEND.voxelize(pts, batch, 0.05)
    m = x.manager
    for stride in (1, 2, 4):
        coords = m.level(stride).coords.long()
        index = {tuple(c): i for i, c in enumerate(coords.tolist())}
        maps = m.neighbour_map(stride)
        assert maps[13] is None and len(maps) == 27
        for k, (dx, dy, dz) in enumerate(KERNEL3_OFFSETS):
            if k == 13:
                continue
            pairs = [(i, index[(b, cx + dx * stride, cy + dy * stride, cz + dz * stride)])
                     for i, (b, cx, cy, cz) in enumerate(coords.tolist())
                     if (b, cx + dx * stride, cy + dy * stride, cz + dz * stride) in index]
            out_rows, in_rows = maps[k]
            assert list(zip(out_rows.tolist(), in_rows.tolist())) == pairs, (stride, k)


@pytest.mark.parametrize("groups", [None, 2])
def test_scatter_convolutions_written_out_backward_equals_autograd(groups):
    """The scatter form's own backward (one input-gradient buffer, nothing gathered kept) gives the
    gradients autograd gives through the same per-offset operations: 3x3x3, stride-2 and
    transposed maps, plain rows and feature groups, weights frozen or input without gradient."""
    from lidar_completion.sparse import conv_scatter as cs
    from lidar_completion.sparse import torch_backend as tb
    pts, batch = _batch_clouds()
    _, x = tb.BACKEND.voxelize(pts, batch, 0.1)
    m = x.manager
    m.level(2)
    n1, n2 = len(m.levels[1]), len(m.levels[2])
    inverse, rows = m.downsample_map(1)
    g = torch.Generator().manual_seed(5)
    lead = () if groups is None else (groups,)
    cases = {   # name: (input rows, kernel offsets, pairs, output rows, centre, copy)
        "conv3": (n1, 27, [(k, p[0], p[1]) for k, p in enumerate(m.neighbour_map(1)) if p is not None], n1, True, False),
        "down": (n1, 8, [(k, inverse[r], r) for k, r in enumerate(rows)], n2, False, False),
        "up": (n2, 8, [(k, r, inverse[r]) for k, r in enumerate(rows)], n1, False, True),
    }
    for name, (n_in, kernel, pairs, n_out, centre, copy) in cases.items():
        assert sum(len(p[1]) for p in pairs) > 0, name
        f0 = torch.randn(*lead, n_in, 6, generator=g)
        w0 = torch.randn(kernel, 6, 5, generator=g)
        r = torch.randn(*lead, n_out, 5, generator=g)
        for f_grad, w_grad in ((True, True), (True, False), (False, True)):
            got, want = [], []
            for fn, sink in ((cs._ScatterConv.apply, got), (cs._apply, want)):
                f = f0.clone().requires_grad_(f_grad)
                w = w0.clone().requires_grad_(w_grad)
                rows_f = f if groups is None else f.transpose(0, 1).contiguous()
                out = fn(rows_f, w, pairs, n_out, centre, copy)
                out = out if groups is None else out.transpose(0, 1)
                (out * r).sum().backward()
                sink += [out.detach(), f.grad, w.grad]
            assert torch.equal(got[0], want[0]), name
            for a, b in zip(got[1:], want[1:]):
                assert (a is None) == (b is None), (name, f_grad, w_grad)
                if a is not None:
                    assert _close(a, b, rel=1e-5), (name, f_grad, w_grad)
    # the public functions route through it whenever a gradient is wanted, and not otherwise
    f = torch.randn(n1, 6, generator=g, requires_grad=True)
    w = torch.randn(27, 6, 5, generator=g)
    assert type(cs.conv3_scatter(f, w, m.neighbour_map(1)).grad_fn).__name__ == "_ScatterConvBackward"
    with torch.no_grad():
        assert cs.conv3_scatter(f, w, m.neighbour_map(1)).grad_fn is None
