"""The pure-torch backend on a CUDA device against itself on the CPU (the CPU path is proven against
MinkowskiEngine in test_backends.py), CUDA graphs, and the Triton backend against the torch backend
on the GPU. Skipped where no GPU is visible (CI); run on a GPU machine with
``python -m pytest tests/test_cuda.py tests/test_triton.py``."""
import numpy as np
import pytest
import torch

from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig, Refiner
from lidar_completion.sparse import torch_backend
from test_backends import _batch_clouds, _close  # the same three clouds: scan, blob, single point

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_matmul():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # TF32 would move results by ~1e-3
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _randomise_bn(net, seed):
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def _run(cls, net, pts, batch, cond=None):
    if cls is ConditionEncoder:
        c = net(pts, batch)
        return c.feats, c.coords
    if cls is Denoiser:
        return net(pts + 0.05, batch, torch.tensor([900, 400, 10], device=pts.device), cond), None
    return net(pts, batch), None


@pytest.mark.parametrize("algo", ["auto", "gather", "grouped", "scatter"])
@pytest.mark.parametrize("cls", [ConditionEncoder, Denoiser, Refiner], ids=lambda c: c.__name__)
def test_cuda_matches_cpu(cls, algo, monkeypatch):
    """Same weights and inputs: outputs within 1e-4 relative, identical condition coordinates, and
    gradients of a scalar loss within 1e-3 relative, for every convolution algorithm."""
    monkeypatch.setenv(torch_backend.ENV_ALGO, algo)
    cfg = ModelConfig.tiny()
    torch.manual_seed(3)
    cpu_net = cls(cfg, "torch").eval()
    _randomise_bn(cpu_net, 4)
    gpu_net = cls(cfg, "torch").to(CUDA).eval()
    gpu_net.load_state_dict(cpu_net.state_dict())
    pts, batch = _batch_clouds()
    cond_cpu = cond_gpu = None
    if cls is Denoiser:
        enc = ConditionEncoder(cfg, "torch").eval()
        with torch.no_grad():
            cond_cpu = enc(pts, batch)
        cond_gpu = cond_cpu.to(CUDA)
    results = []
    for net, dev, cond in ((cpu_net, "cpu", cond_cpu), (gpu_net, CUDA, cond_gpu)):
        y, coords = _run(cls, net, pts.to(dev), batch.to(dev), cond)
        loss = (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum()
        loss.backward()
        grads = {k: p.grad.detach().cpu() for k, p in net.named_parameters()}
        results.append((y.detach().cpu(), None if coords is None else coords.cpu(), grads))
    (ya, ca, ga), (yb, cb, gb) = results
    assert ya.shape == yb.shape
    assert _close(yb, ya), float((ya - yb).abs().max())
    if ca is not None:
        assert torch.equal(ca, cb)
    # gradients: 1e-3 relative. A bias gradient is a float32 sum over every voxel row, accumulated
    # in a different order on the GPU (atomic adds); with the signed loss weights it cancels, and
    # on an H200 the head biases differed by 1.3e-4 of their largest entry while every other
    # parameter stayed within 1e-4.
    # Gradients that are tiny by cancellation (the first layer's, ~1e-4 against a largest gradient
    # of ~40) also carry that noise in absolute terms (6.5e-5 on an H200, 2e-6 of the largest): so
    # each parameter within 1e-3 of its own scale plus 1e-5 of the largest gradient, and all of them
    # together within 1e-4 (L2).
    top = max(float(g.abs().max()) for g in ga.values())
    for k in ga:
        diff = float((ga[k] - gb[k]).abs().max())
        assert diff <= 1e-3 * float(ga[k].abs().max()) + 1e-5 * top, (k, diff)
    va = torch.cat([g.flatten() for g in ga.values()])
    vb = torch.cat([gb[k].flatten() for k in ga])
    assert float((va - vb).norm()) <= 1e-4 * float(va.norm())


def test_guided_pass_on_cuda_equals_two_plain_passes():
    """forward_cfg (both guidance passes as feature groups sharing kernel maps) = two forward calls."""
    cfg = ModelConfig.tiny()
    torch.manual_seed(5)
    enc = ConditionEncoder(cfg, "torch").to(CUDA).eval()
    den = Denoiser(cfg, "torch").to(CUDA).eval()
    pts, _ = _batch_clouds()
    pts = pts[:4000].to(CUDA)
    batch = torch.zeros(len(pts), dtype=torch.long, device=CUDA)
    with torch.no_grad():
        cond = enc(pts, batch)
        uncond = enc(torch.zeros_like(pts), batch)
        t = torch.tensor([700], device=CUDA)
        xt = pts + 0.3 * torch.randn_like(pts)
        ec, eu = den.forward_cfg(xt, batch, t, cond, uncond)
        assert _close(ec, den(xt, batch, t, cond))
        assert _close(eu, den(xt, batch, t, uncond))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shipped_student_completes_on_cuda(precision):
    """The default student on the GPU: a plausible dense completion, with every stage timed."""
    from lidar_completion.completer import Completer
    from lidar_completion.metrics import chamfer_distance

    g = np.random.default_rng(0)
    r = g.uniform(4, 40, 30000)
    a = g.uniform(0, 2 * np.pi, 30000)
    scan = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.7, 0.05, 30000)], 1).astype(np.float32)
    c = Completer.from_checkpoint(None, device="cuda", seed=0, backend="torch", precision=precision)
    res = c.complete_detailed(scan)
    pts = res.points
    assert np.isfinite(pts).all()
    assert len(pts) > len(scan)                     # denser than the input (refiner: 6 per point)
    assert np.linalg.norm(pts, axis=1).max() < 60   # post-processing range limit plus refiner offsets
    assert res.timings["denoiser"] > 0 and res.timings["refinement"] > 0
    # a ground plane in, a ground plane out: the completion stays near the scan
    assert chamfer_distance(pts[::7], scan) < 1.0


def _student_pieces(seed=0):
    """The shipped student on the GPU, a synthetic ring scan, its condition and the unconditional one."""
    from lidar_completion.completer import Completer

    g = np.random.default_rng(seed)
    r = g.uniform(4, 40, 30000)
    a = g.uniform(0, 2 * np.pi, 30000)
    scan = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.7, 0.05, 30000)], 1).astype(np.float32)
    c = Completer.from_checkpoint(None, device="cuda", seed=0, backend="torch")
    _, scan_fps, x_init, _ = c.prepare(scan)
    with torch.inference_mode():
        cond = c.encoder(torch.from_numpy(scan_fps).to(CUDA),
                         torch.zeros(len(scan_fps), dtype=torch.long, device=CUDA))
        uncond = c.unconditional(len(scan_fps))
    return c, scan, torch.from_numpy(x_init).to(CUDA), cond, uncond


def test_cuda_graph_replay_equals_ordinary_calls():
    """Two "scans" over five timesteps: the first plans and captures one graph per timestep, the
    second replays them; every result = the ordinary call (float summation order only)."""
    from lidar_completion.cuda_graphs import GraphedDenoiser
    from lidar_completion.diffusion import guided_noise

    c, _, x, cond, uncond = _student_pieces()
    r = GraphedDenoiser(c.denoiser, c.guidance)
    gen = torch.Generator(device=CUDA).manual_seed(0)
    steps = (950, 700, 400, 150, 20)
    with torch.inference_mode():
        for scan in range(2):
            for t in steps:
                xt = x + (t / 1000.0) * torch.randn(x.shape, generator=gen, device=CUDA)
                got = r(xt, t, cond, uncond)
                want = guided_noise(c.denoiser, xt, t, cond, uncond, c.guidance).float()
                assert _close(got, want), (scan, t)
    assert r.captures == len(steps) + r.fallbacks and r.replays == len(steps)
    assert r.fallbacks <= 1      # new noise, same level: capacities with a 1.5x margin fit


def test_cuda_graph_grows_when_a_level_does_not_fit():
    """A much wider cloud at a captured timestep: the replay's flag says it did not fit, the call
    is recomputed (same result), the capacities grow, the next call replays a new capture."""
    from lidar_completion.cuda_graphs import GraphedDenoiser
    from lidar_completion.diffusion import guided_noise

    c, _, x, cond, uncond = _student_pieces()
    r = GraphedDenoiser(c.denoiser, c.guidance)
    with torch.inference_mode():
        r(x, 500, cond, uncond)                                  # plan + capture
        wide = x + 3.0 * torch.randn_like(x)
        got = r(wide, 500, cond, uncond)                         # replay: does not fit
        assert r.fallbacks == 1 and r.captures == 2
        assert _close(got, guided_noise(c.denoiser, wide, 500, cond, uncond, c.guidance).float())
        got = r(wide, 500, cond, uncond)                         # replay of the new capture
        assert r.fallbacks == 1 and r.captures == 2 and r.replays == 2
        assert _close(got, guided_noise(c.denoiser, wide, 500, cond, uncond, c.guidance).float())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_completion_with_and_without_cuda_graphs(precision):
    """Whole completions, same seed, graphs on and off: the same cloud (float summation order only;
    bf16 rounds differently along the way, so it gets a loose bound)."""
    from lidar_completion.completer import Completer
    from lidar_completion.metrics import chamfer_distance

    _, scan, _, _, _ = _student_pieces()
    on = Completer.from_checkpoint(None, device="cuda", seed=0, backend="torch", precision=precision,
                                   cuda_graphs=True)
    off = Completer.from_checkpoint(None, device="cuda", seed=0, backend="torch", precision=precision,
                                    cuda_graphs=False)
    assert on.graphs_active and not off.graphs_active
    a = on.complete(scan)
    a2 = on.complete(scan)           # second scan: pure replays
    b = off.complete(scan)
    assert on._graphed.captures >= 1 and on._graphed.replays >= on.steps
    # the SDE solver amplifies float-order differences (atomic adds, the gather vs grouped forms)
    # over its steps, bf16 much more; so: fp32 close, bf16 the same quality against the scan
    if precision == "fp32":
        assert chamfer_distance(a, a2) < 5e-3 and chamfer_distance(a, b) < 5e-3
    else:
        ref = chamfer_distance(b[::7], scan)
        assert abs(chamfer_distance(a[::7], scan) - ref) < 0.1 * ref
        assert abs(chamfer_distance(a2[::7], scan) - ref) < 0.1 * ref


def test_auto_cuda_graphs_measure_and_keep_the_faster_path():
    """cuda_graphs=None (auto): the first scan times a replay against an ordinary call and keeps
    the faster; either way the completion is the same cloud as without graphs."""
    from lidar_completion.completer import Completer
    from lidar_completion.metrics import chamfer_distance

    _, scan, _, _, _ = _student_pieces()
    auto = Completer.from_checkpoint(None, device="cuda", seed=0, backend="torch")
    off = Completer.from_checkpoint(None, device="cuda", seed=0, backend="torch", cuda_graphs=False)
    a = auto.complete(scan)
    g = auto._graphed
    assert g is not None and g.tuning is not None and all(x > 0 for x in g.tuning)
    assert g.replaying == (g.tuning[0] <= g.tuning[1])
    assert chamfer_distance(a, off.complete(scan)) < 5e-3


def test_refiner_graph_equals_the_ordinary_refiner():
    from lidar_completion.cuda_graphs import GraphedRefiner

    c, _, x, _, _ = _student_pieces()
    r = GraphedRefiner(c.refiner)
    with torch.inference_mode():
        for n in (30000, 28000, 30000):
            pts = x[:n] + 0.05 * torch.randn_like(x[:n])
            want = c.refiner(pts, torch.zeros(n, dtype=torch.long, device=CUDA))
            assert _close(r(pts), want), n
    assert r.captures >= 1 and r.replays >= 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_encoder_graph_equals_the_ordinary_encoder(backend):
    from lidar_completion import sparse
    from lidar_completion.cuda_graphs import GraphedEncoder

    if backend == "triton" and sparse.triton_refusal(torch.device(CUDA)) is not None:
        pytest.skip(sparse.triton_refusal(torch.device(CUDA)))
    c, _, x, _, _ = _student_pieces()
    enc = c.encoder
    if backend != enc.backend:
        other = ConditionEncoder(enc.config, backend).to(CUDA).eval()
        other.load_state_dict(enc.state_dict())
        enc = other
    r = GraphedEncoder(enc)
    with torch.inference_mode():
        for n in (4000, 3500, 4000):
            pts = x[:n] + 0.05 * torch.randn_like(x[:n])
            got = r(pts)
            want = enc(pts, torch.zeros(n, dtype=torch.long, device=CUDA))
            assert torch.equal(got.coords, want.coords), n
            assert _close(got.feats, want.feats), n
    assert r.captures >= 1 and r.replays >= 1


# -- the Triton backend on the GPU (its CPU checks under the interpreter: tests/test_triton.py) --------
def _triton_pair(cls, cfg):
    torch.manual_seed(3)
    ref = cls(cfg, "torch").eval()
    _randomise_bn(ref, 4)
    tri = cls(cfg, "triton").to(CUDA).eval()
    tri.load_state_dict(ref.state_dict())
    return ref.to(CUDA), tri


@pytest.mark.parametrize("cls", [ConditionEncoder, Denoiser, Refiner], ids=lambda c: c.__name__)
def test_triton_matches_torch_on_cuda(cls):
    """fp32 (TF32 off): the Triton kernels give the torch backend's outputs within 1e-4 relative,
    with the guided pass too; bf16 (operands rounded to 8 significant bits, fp32 accumulation in
    both backends): the Triton result is no further from the fp32 result than the torch backend's
    own bf16 result is, with a 1.5x allowance for the different summation order."""
    cfg = ModelConfig.tiny()
    ref, tri = _triton_pair(cls, cfg)
    pts, batch = (t.to(CUDA) for t in _batch_clouds())
    cond = None
    if cls is Denoiser:
        with torch.no_grad():
            cond = ConditionEncoder(cfg, "torch").to(CUDA).eval()(pts, batch)
    with torch.no_grad():
        want = _run(cls, ref, pts, batch, cond)[0].float()
        got = _run(cls, tri, pts, batch, cond)[0].float()
        assert _close(got, want), float((got - want).abs().max())
        if cls is Denoiser:
            uncond = ConditionEncoder(cfg, "torch").to(CUDA).eval().empty_condition(100, 3)
            t = torch.tensor([900, 400, 10], device=CUDA)
            for a, b in zip(ref.forward_cfg(pts + 0.05, batch, t, cond, uncond),
                            tri.forward_cfg(pts + 0.05, batch, t, cond, uncond)):
                assert _close(b, a)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch_bf16 = _run(cls, ref, pts, batch, cond)[0].float()
            triton_bf16 = _run(cls, tri, pts, batch, cond)[0].float()
    err_torch = float((torch_bf16 - want).abs().max())
    err_triton = float((triton_bf16 - want).abs().max())
    assert err_triton <= 1.5 * err_torch + 1e-3 * float(want.abs().max()), (err_triton, err_torch)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_triton_completion_with_graphs_equals_torch(precision):
    """The shipped student on the Triton backend with CUDA graphs (replays on the second scan):
    the torch backend's completion in fp32, the same quality against the scan in bf16."""
    from lidar_completion.completer import Completer
    from lidar_completion.metrics import chamfer_distance

    _, scan, _, _, _ = _student_pieces()
    tri = Completer.from_checkpoint(None, device="cuda", seed=0, backend="triton", precision=precision,
                                    cuda_graphs=True)
    ref = Completer.from_checkpoint(None, device="cuda", seed=0, backend="torch", precision=precision,
                                    cuda_graphs=False)
    assert tri.graphs_active and tri.denoiser.backend == "triton"
    a, a2, b = tri.complete(scan), tri.complete(scan), ref.complete(scan)
    assert tri._graphed.replays >= tri.steps
    if precision == "fp32":
        assert chamfer_distance(a, b) < 5e-3 and chamfer_distance(a2, b) < 5e-3
    else:
        want = chamfer_distance(b[::7], scan)
        assert abs(chamfer_distance(a[::7], scan) - want) < 0.1 * want
        assert abs(chamfer_distance(a2[::7], scan) - want) < 0.1 * want


def test_auto_backend_on_cuda_is_triton(monkeypatch):
    from lidar_completion.completer import Completer

    monkeypatch.delenv("LIDAR_COMPLETION_BACKEND", raising=False)
    c = Completer.from_checkpoint(None, device="cuda", seed=0)
    assert c.denoiser.backend == c.encoder.backend == c.refiner.backend == "triton"


def _check_farthest_point_sampling(cloud: np.ndarray, idx: np.ndarray):
    """Each sample is (up to float32 rounding) the point farthest from the samples before it."""
    pts = cloud.astype(np.float64)
    assert len(np.unique(idx)) == len(idx) and idx[0] == 0
    d = np.full(len(pts), np.inf)
    for s in range(1, len(idx)):
        d = np.minimum(d, ((pts - pts[idx[s - 1]]) ** 2).sum(1))
        assert d[idx[s]] >= d.max() * (1 - 1e-5), (s, d[idx[s]], d.max())


def test_device_fps_splits_a_scan_over_every_sm():
    """A 120,000-point cloud spread over all SMs (programs trading their candidates each step) and
    four clouds sharing the SMs in one launch: valid farthest-point samples, and the one-cloud
    result equal to the four-cloud one for the same cloud."""
    from lidar_completion.sparse.triton_backend import farthest_point_sample_device

    g = np.random.default_rng(7)
    r, a = g.uniform(4, 50, 120_000), g.uniform(0, 2 * np.pi, 120_000)
    scan = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.6, 0.4, 120_000)], 1).astype(np.float32)
    one = farthest_point_sample_device([torch.from_numpy(scan).to(CUDA)], [3000])[0].cpu().numpy()
    _check_farthest_point_sampling(scan, one)
    clouds = [scan, scan[:5000], scan[:1], scan[7:70_007]]
    many = farthest_point_sample_device([torch.from_numpy(c).to(CUDA) for c in clouds], [3000, 700, 1, 900])
    assert np.array_equal(many[0].cpu().numpy(), one)
    for c, idx in zip(clouds[1:], many[1:]):
        _check_farthest_point_sampling(c, idx.cpu().numpy())


@pytest.mark.parametrize("candidates", [1, 2, 4, 8])
def test_device_fps_with_candidate_rounds_equals_one_sample_per_exchange(candidates):
    """fps_rounds_kernel over every SM takes the same samples as fps_grid_kernel (both are the
    textbook loop): a 120,000-point scan at the published budget, in the sensor's azimuth order and
    shuffled, and five clouds sharing the SMs in one launch (one of 20 points: most of its
    programs hold none)."""
    from lidar_completion.sparse.triton_backend import farthest_point_sample_device

    g = np.random.default_rng(8)
    r, a = g.uniform(4, 50, 120_000), np.sort(g.uniform(0, 2 * np.pi, 120_000))
    scan = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.6, 0.4, 120_000)], 1).astype(np.float32)
    for cloud in (scan, scan[g.permutation(len(scan))]):
        x = torch.from_numpy(cloud).to(CUDA)
        want = farthest_point_sample_device([x], [18_000], candidates=0)[0]
        assert torch.equal(farthest_point_sample_device([x], [18_000], candidates=candidates)[0], want)
    clouds = [torch.from_numpy(c).to(CUDA) for c in (scan, scan[:5000], scan[:1], scan[7:70_007], scan[:20])]
    counts = [3000, 700, 1, 900, 15]
    for got, want in zip(farthest_point_sample_device(clouds, counts, candidates=candidates),
                         farthest_point_sample_device(clouds, counts, candidates=0)):
        assert torch.equal(got, want)


def test_completer_samples_on_the_gpu_by_default():
    from lidar_completion.completer import Completer

    c = Completer.from_checkpoint(None, device="cuda", seed=0, backend="torch")
    assert c.fps == "auto" and c.fps_on_device
    g = np.random.default_rng(3)
    r, a = g.uniform(4, 40, 30000), g.uniform(0, 2 * np.pi, 30000)
    scan = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.7, 0.05, 30000)], 1).astype(np.float32)
    res = c.complete_detailed(scan)
    assert res.num_fps == c.n_fps and np.isfinite(res.points).all()
    cpu = Completer.from_checkpoint(None, device="cuda", seed=0, backend="torch", fps="cpu")
    assert not cpu.fps_on_device
    # both exact, from different start points: other samples, completions of the same quality
    from lidar_completion.metrics import chamfer_distance
    want = chamfer_distance(cpu.complete(scan)[::7], scan)
    assert abs(chamfer_distance(res.points[::7], scan) - want) < 0.1 * want


def test_sync_counter_counts_sites_and_restores_the_debug_mode():
    """``profiling.sync_counter``: a ``.item()`` counts as a synchronisation (at a file:line); the debug
    mode comes back as it was and other warnings of the block are issued again."""
    import warnings

    from lidar_completion.profiling import sync_counter
    x = torch.ones(4, device="cuda")
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as outer:
            warnings.simplefilter("always")
            with sync_counter() as r:
                float(x.sum().item())
                warnings.warn("something else", UserWarning)
        assert torch.cuda.get_sync_debug_mode() == 1          # "warn", as before the block
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert r["count"] >= 1 and all(site.rsplit(":", 1)[1].isdigit() for site in r["sites"])
    assert [str(w.message) for w in outer] == ["something else"]
