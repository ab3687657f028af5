"""sparse.shared_maps: networks on the same points share voxelisation and kernel maps, with results
(outputs and gradients) equal to separate calls, and nothing is shared where it would be wrong."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lidar_completion import sparse
from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig
from lidar_completion.sparse import sharing, torch_backend
from lidar_completion.sparse.static import StaticShapes, use_static_shapes


def _scene(n=600, seed=0):
    g = np.random.default_rng(seed)
    r, a = g.uniform(3, 20, n), g.uniform(0, 2 * np.pi, n)
    pts = np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.5, 0.3, n)], 1).astype(np.float32)
    batch = np.repeat([0, 1], [n // 2, n - n // 2])
    return torch.from_numpy(pts), torch.from_numpy(batch)


def _nets(backend="torch", device="cpu"):
    torch.manual_seed(0)
    enc = ConditionEncoder(ModelConfig.tiny(), backend).eval().to(device)
    a = Denoiser(ModelConfig.tiny(), backend).eval().to(device)
    torch.manual_seed(1)
    b = Denoiser(ModelConfig.tiny(), backend).train().to(device)   # another net, in train mode
    with torch.no_grad():   # random, non-zero modulation so that the condition matters
        for p in list(a.parameters()) + list(b.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return enc, a, b


@pytest.fixture(scope="module")
def setup():
    pts, batch = _scene()
    enc, a, b = _nets()
    with torch.no_grad():
        cond = enc(pts[::5], batch[::5])
    t = torch.tensor([300, 700])
    return pts, batch, cond, t, a, b


def _counting(monkeypatch):
    built = []

    class Counting(torch_backend.CoordinateManager):
        def __init__(self, *args, **kw):
            built.append(1)
            super().__init__(*args, **kw)

    monkeypatch.setattr(torch_backend, "CoordinateManager", Counting)
    return built


def test_two_networks_share_the_maps_with_equal_outputs_and_gradients(setup, monkeypatch):
    pts, batch, cond, t, a, b = setup
    noisy = pts + 0.3 * torch.randn_like(pts)
    with torch.no_grad():
        ref_a = a(noisy, batch, t, cond)
    ref_b = b(noisy, batch, t, cond)
    ref_g = torch.autograd.grad(ref_b.square().mean(), list(b.parameters()))

    built = _counting(monkeypatch)
    with sparse.shared_maps():
        with torch.no_grad():
            out_a = a(noisy, batch, t, cond)
        out_b = b(noisy, batch, t, cond)         # with gradient, train mode: still the same maps
        assert sharing.hits() == 1
    assert len(built) == 1
    g = torch.autograd.grad(out_b.square().mean(), list(b.parameters()))
    torch.testing.assert_close(out_a, ref_a, rtol=0, atol=0)
    torch.testing.assert_close(out_b, ref_b, rtol=1e-6, atol=1e-7)
    for x, y in zip(g, ref_g):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_gradient_reaches_the_points_through_a_shared_voxelisation(setup):
    """The per-voxel features are recomputed for each call: a pass that differentiates with respect
    to the points gets their gradient even when an earlier pass (without gradient) built the maps."""
    pts, batch, cond, t, a, _ = setup
    x = (pts + 0.2).requires_grad_(True)
    ref = torch.autograd.grad(a(x, batch, t, cond).sum(), x)[0]
    with sparse.shared_maps():
        with torch.no_grad():
            a(x, batch, t, cond)
        got = torch.autograd.grad(a(x, batch, t, cond).sum(), x)[0]
        assert sharing.hits() == 1
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_nothing_is_shared_where_it_would_be_wrong(setup, monkeypatch):
    pts, batch, cond, t, a, b = setup
    built = _counting(monkeypatch)
    with torch.no_grad():
        # outside a block: every call voxelises
        a(pts, batch, t, cond), a(pts, batch, t, cond)
        assert len(built) == 2 and sharing.hits() == 0
        with sparse.shared_maps():
            x = pts.clone()
            a(x, batch, t, cond)
            a(x.clone(), batch, t, cond)          # equal values, another tensor: not recognised
            a(x, batch.clone(), t, cond)          # another batch tensor
            assert sharing.hits() == 0
            x.add_(1.0)                           # changed in place since: a fresh voxelisation
            moved = a(x, batch, t, cond)
            assert sharing.hits() == 0
            again = a(x, batch, t, cond)          # now the same tensor, unchanged: shared
            assert sharing.hits() == 1
            torch.testing.assert_close(again, moved, rtol=0, atol=0)
            with sparse.shared_maps():            # a nested block sees the outer block's entries
                a(x, batch, t, cond)
                assert sharing.hits() == 2
            with torch.inference_mode():          # inference tensors are not mixed with others
                a(x, batch, t, cond)
            with use_static_shapes(StaticShapes()):   # static mode never shares
                assert not sharing.sharing_active()
            monkeypatch.setenv(sharing.ENV_SHARE, "0")  # switched off (for measuring what it saves)
            a(x, batch, t, cond)
            assert sharing.hits() == 2
            monkeypatch.delenv(sharing.ENV_SHARE)
        assert sharing.hits() == 0 and getattr(sharing._STATE, "entries", None) is None
    assert len(built) == 2 + 6


def test_triton_backend_shares_its_plans(monkeypatch):
    """On the Triton backend the shared manager carries the implicit-GEMM plans, built once."""
    if not (sparse.triton_available() and (sparse.triton_interpreted() or torch.cuda.is_available())):
        pytest.skip("Triton is not installed, or runs neither on CUDA nor in the interpreter")
    device = "cuda" if torch.cuda.is_available() and not sparse.triton_interpreted() else "cpu"
    pts, batch = _scene(n=200, seed=3)
    pts, batch = pts.to(device), batch.to(device)
    enc, a, _ = _nets("triton", device)
    torch.manual_seed(2)
    b = Denoiser(ModelConfig.tiny(), "triton").eval().to(device)
    t = torch.tensor([200, 600], device=device)
    with torch.no_grad():
        cond = enc(pts[::4], batch[::4])
        ref = a(pts, batch, t, cond), b(pts, batch, t, cond)
        plans = []
        orig = sparse.kmap.CoordinateManager.gather_plan

        def counted(self, kind, stride, block):
            if (kind, stride, block) not in self._plans:
                plans.append((kind, stride, block))
            return orig(self, kind, stride, block)

        monkeypatch.setattr(sparse.kmap.CoordinateManager, "gather_plan", counted)
        with sparse.shared_maps():
            out = a(pts, batch, t, cond), b(pts, batch, t, cond)
            assert sharing.hits() == 1
        n_first = len(plans)
        plans.clear()
        b(pts, batch, t, cond)                   # alone: builds every plan again
    assert n_first == len(plans) > 0
    for x, y in zip(out, ref):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
