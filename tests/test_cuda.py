"""The pure-torch backend on a CUDA device against itself on the CPU (the CPU path is proven against
MinkowskiEngine in test_backends.py). Skipped where no GPU is visible (CI); run on a GPU machine with
``python -m pytest tests/test_cuda.py``."""
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
    floor = 1e-3 * max(float(g.abs().max()) for g in ga.values())
    for k in ga:
        assert _close(gb[k], ga[k], rel=1e-3, floor=floor), (k, float((ga[k] - gb[k]).abs().max()))


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
