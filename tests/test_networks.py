"""The three LiDiff networks: sizes, state-dict layout, forward parity with the published code."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lidar_completion import sparse
from lidar_completion.errors import CloudFormatError
from lidar_completion.models import (Condition, ConditionEncoder, Denoiser, ModelConfig, Refiner,
                                     count_parameters)
from lidiff_reference import FIXTURES, compare, load_synthetic

NETS = {"condition_encoder": ConditionEncoder, "denoiser": Denoiser, "refiner": Refiner}
COUNTS = {"condition_encoder": 8_497_952, "denoiser": 24_174_515, "refiner": 21_722_926}


def _case_files():
    files = sorted((FIXTURES / "lidiff_forward").glob("*.npz"))
    extra = os.environ.get("LIDAR_COMPLETION_EXTRA_FIXTURES")
    if extra:
        files += sorted(Path(extra).glob("*.npz"))
    return files


@pytest.mark.parametrize("name", list(NETS))
def test_parameter_counts(name):
    assert count_parameters(NETS[name](backend="torch")) == COUNTS[name]
    assert COUNTS["condition_encoder"] + COUNTS["denoiser"] == 32_672_467


@pytest.mark.parametrize("name", list(NETS))
def test_state_dict_equals_reference(name, backend):
    ref = json.loads((FIXTURES / "lidiff_state_dicts.json").read_text())["networks"][name]["state_dict"]
    sd = NETS[name](backend=backend).state_dict()
    assert [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()] == \
        [(k, s, d) for k, s, d in ref]


@pytest.fixture(scope="module")
def synthetic_nets():
    return {}


def _nets(backend, cache):
    if backend not in cache:
        cache[backend] = (load_synthetic(ConditionEncoder(backend=backend), "encoder"),
                          load_synthetic(Denoiser(backend=backend), "denoiser"),
                          load_synthetic(Refiner(backend=backend), "refiner"))
    return cache[backend]


@pytest.mark.parametrize("case", _case_files(), ids=lambda p: p.stem)
def test_lidiff_parity(case, backend, synthetic_nets):
    """Reproduce the outputs the published LiDiff networks computed for these inputs and weights
    (max |d| <= 2e-6 and RMS <= 1e-7; encoder cells exactly)."""
    z = np.load(case)
    enc, den, ref = _nets(backend, synthetic_nets)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        cond = enc(t(z["cond_points"]), t(z["cond_batch"]))
        assert np.array_equal(cond.coords.numpy(), z["enc_coords"])
        worst, rms = compare(cond.feats.numpy(), z["enc_feats"])
        assert worst <= 2e-6 and rms <= 1e-7, ("encoder", worst, rms)

        stored = Condition(t(z["enc_coords"]), t(z["enc_feats"]))
        out = den(t(z["xt_points"]), t(z["xt_batch"]), t(z["t"]), stored)
        worst, rms = compare(out.numpy(), z["denoiser_out"])
        assert worst <= 2e-6 and rms <= 1e-7, ("denoiser", worst, rms)

        out = ref(t(z["refine_points"]), t(z["refine_batch"]))
        worst, rms = compare(out.numpy(), z["refine_out"])
        assert worst <= 2e-6 and rms <= 1e-7, ("refiner", worst, rms)


def _scan(n, seed):
    g = np.random.default_rng(seed)
    r = g.uniform(4, 40, n)
    a = g.uniform(0, 2 * np.pi, n)
    z = g.normal(-1.5, 0.5, n)
    return torch.from_numpy(np.stack([r * np.cos(a), r * np.sin(a), z], 1).astype(np.float32))


def test_batched_forward_is_per_cloud(backend):
    """A batch of 2 clouds (18,000 and 25,000 points): per-point outputs of the right shape, finite,
    and each cloud's outputs equal those of the cloud alone."""
    torch.manual_seed(0)
    cfg = ModelConfig.tiny()  # the property is structural; the tiny widths keep the test fast
    enc, den, ref = (ConditionEncoder(cfg, backend).eval(), Denoiser(cfg, backend).eval(),
                     Refiner(cfg, backend).eval())
    a, b = _scan(18_000, 1), _scan(25_000, 2)
    pts = torch.cat([a, b])
    bat = torch.cat([torch.zeros(len(a), dtype=torch.long), torch.ones(len(b), dtype=torch.long)])
    t = torch.tensor([700, 30])
    with torch.no_grad():
        cond = enc(pts, bat)
        eps = den(pts + 0.1, bat, t, cond)
        off = ref(pts, bat)
        assert eps.shape == (43_000, 3) and off.shape == (43_000, 18)
        assert torch.isfinite(eps).all() and torch.isfinite(off).all()
        assert off.abs().max() < 1
        for i, cloud in enumerate((a, b)):
            rows = bat == i
            zero = torch.zeros(len(cloud), dtype=torch.long)
            c1 = enc(cloud, zero)
            ci = cond.select_batch(i)
            assert torch.equal(c1.coords, ci.coords)
            assert torch.allclose(c1.feats, ci.feats, atol=1e-5)
            e1 = den(cloud + 0.1, zero, t[i:i + 1], c1)
            assert torch.allclose(e1, eps[rows], atol=1e-5)
            assert torch.allclose(ref(cloud, zero), off[rows], atol=1e-5)


def test_condition_lookup_stays_in_batch_element():
    """Each voxel takes the feature of its nearest stride-16 cell of the SAME batch element, even when
    a cell of the other element is closer."""
    ref = torch.tensor([[0, 0, 0, 0], [0, 160, 0, 0], [1, 16, 0, 0]])
    query = torch.tensor([[0, 17, 0, 0],    # element 1's cell (16,0,0) is at distance 1; own nearest is (0,0,0)
                          [0, 100, 0, 0],   # own cells at 100 and 60 -> (160,0,0)
                          [1, 200, 0, 0]])  # element 1 has only one cell
    assert sparse.nearest_cell(query, ref).tolist() == [0, 1, 2]
    # ties go to the smallest (b, x, y, z)
    ref = torch.tensor([[0, -16, 0, 0], [0, 16, 0, 0]])
    assert sparse.nearest_cell(torch.tensor([[0, 0, 0, 0]]), ref).tolist() == [0]
    # exact on a larger random case against brute force, on the CPU (k-d tree) path
    g = torch.Generator().manual_seed(0)
    cells = torch.unique(torch.randint(-5, 5, (300, 3), generator=g) * 16, dim=0)
    ref = torch.cat([torch.zeros(len(cells), 1, dtype=torch.long), cells], 1)
    q = torch.cat([torch.zeros(2000, 1, dtype=torch.long), torch.randint(-90, 90, (2000, 3), generator=g)], 1)
    d2 = ((q[:, None, 1:] - ref[None, :, 1:]) ** 2).sum(-1)
    assert torch.equal(sparse.nearest_cell(q, ref), torch.argmin(d2, dim=1))


def test_voxelisation_mean_and_inverse(backend):
    B = sparse.get_backend(backend)
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.02, 0.01, -0.02], [1.0, 1.0, 1.0], [0.024, 0, 0]])
    batch = torch.tensor([0, 0, 0, 1])
    field, st = B.voxelize(pts, batch, 0.05)
    coords, feats = B.coords(st).long(), B.feats(st)
    assert len(coords) == 3
    sliced = B.slice(st, field)
    # every point maps back to its own voxel: the sliced coordinate equals round(p / 0.05)
    vox = torch.cat([batch[:, None], torch.round(pts / 0.05).long()], 1)
    keyed = {tuple(c.tolist()): f for c, f in zip(coords, feats)}
    for i in range(len(pts)):
        assert torch.equal(sliced[i], keyed[tuple(vox[i].tolist())])
    assert torch.allclose(keyed[(0, 0, 0, 0)], pts[:2].mean(0), atol=1e-7)
    assert torch.allclose(keyed[(1, 0, 0, 0)], pts[3])


def test_voxelisation_empty_and_single_point():
    B = sparse.get_backend("torch")
    field, st = B.voxelize(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 0.05)
    assert B.feats(st).shape == (0, 3) and field.inverse.numel() == 0
    cfg = ModelConfig.tiny()
    enc, den, ref = ConditionEncoder(cfg, "torch").eval(), Denoiser(cfg, "torch").eval(), Refiner(cfg, "torch").eval()
    one = torch.tensor([[3.0, -2.0, 0.5]])
    with torch.no_grad():
        c = enc(one)
        assert c.coords.shape == (1, 4)
        assert den(one, None, torch.tensor([10]), c).shape == (1, 3)
        assert ref(one).shape == (1, 18)
        with pytest.raises(CloudFormatError):
            enc(torch.zeros(0, 3))
        with pytest.raises(CloudFormatError):
            enc(torch.tensor([[1e6, 0.0, 0.0]]))  # 20 km away: beyond the coordinate range


def test_cfg_pass_equals_two_passes(backend):
    """forward_cfg (conditional + unconditional sharing one coordinate set) equals two plain calls."""
    torch.manual_seed(0)
    cfg = ModelConfig.tiny()
    enc, den = ConditionEncoder(cfg, backend).eval(), Denoiser(cfg, backend).eval()
    pts = _scan(3000, 5)
    with torch.no_grad():
        cond = enc(pts)
        uncond = enc.empty_condition(len(pts))
        x = pts + 0.2 * torch.randn_like(pts)
        t = torch.tensor([400])
        ec, eu = den.forward_cfg(x, None, t, cond, uncond)
        assert torch.allclose(ec, den(x, None, t, cond), atol=1e-5)
        assert torch.allclose(eu, den(x, None, t, uncond), atol=1e-5)


def test_points_gradient_after_a_first_call_in_inference_mode():
    """Constants kept per device (the voxel size divisor, the time-embedding frequencies) are made
    outside inference mode: a process whose first completion ran under torch.inference_mode can
    still differentiate a later call with respect to the points."""
    from lidar_completion.models import networks
    from lidar_completion.sparse import coords

    coords._VOXEL_SIZE.clear()
    networks._FREQS.clear()
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    enc, den = ConditionEncoder(cfg, "torch").eval(), Denoiser(cfg, "torch").eval()
    pts = torch.randn(300, 3) * 5
    with torch.inference_mode():
        cond = enc(pts, None)
        den(pts, None, torch.tensor([10]), cond)
    x = pts.clone().requires_grad_(True)
    g = torch.autograd.grad(den(x, None, torch.tensor([10]), Condition(cond.coords.clone(), cond.feats.clone())).sum(), x)[0]
    assert g.shape == x.shape and bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0


def test_condition_latents_are_kept_across_calls_and_redone_when_inputs_change():
    """At inference the latent MLPs of a condition run once for repeated calls with the same
    condition tensors; an in-place change of the condition or of a latent weight recomputes them
    (the outputs equal a denoiser without any cache)."""
    cfg = ModelConfig.tiny()
    torch.manual_seed(1)
    enc, den = ConditionEncoder(cfg, "torch").eval(), Denoiser(cfg, "torch").eval()
    fresh = Denoiser(cfg, "torch").eval()
    pts = torch.randn(300, 3) * 5
    t = torch.tensor([20])
    with torch.no_grad():
        cond = enc(pts, None)
        den(pts, None, t, cond)
        kept = den._latent_cache[3]
        den(pts, None, t, cond)
        assert den._latent_cache[3] is kept                     # reused
        cond.feats.mul_(1.5)                                     # the condition changed in place
        fresh.load_state_dict(den.state_dict())
        assert torch.allclose(den(pts, None, t, cond), fresh(pts, None, t, cond), atol=1e-6)
        assert den._latent_cache[3] is not kept
        den.latent_stage2[0].weight.add_(0.1)                    # a latent weight changed in place
        fresh.load_state_dict(den.state_dict())
        assert torch.allclose(den(pts, None, t, cond), fresh(pts, None, t, cond), atol=1e-6)


def test_denoiser_gradients_are_bit_equal_between_runs_on_two_threads():
    """Training is bit-reproducible with torch's default threads on a CPU: a backward pass of the
    denoiser gives the same gradients every time. Many condition cells share each batch element's
    time-MLP row; the gather of those rows must not accumulate its gradient with atomic adds in
    thread order (advanced indexing's backward did, and two identical training runs ended apart)."""
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    den = Denoiser(cfg, "torch").train()
    side = torch.arange(-12, 13) * 16                  # 25^3 = 15,625 cells for element 0, 5,000 for 1:
    grid = torch.stack(torch.meshgrid(side, side, side, indexing="ij"), -1).reshape(-1, 3)
    # the threads' halves of the rows then split element 0's cells, whose row both threads add to
    coords = torch.cat([torch.cat([torch.full((len(g), 1), b), g], 1) for b, g in ((0, grid), (1, grid[:5000]))])
    cond = Condition(coords, torch.randn(len(coords), cfg.cond_dim))
    pts = torch.randn(600, 3) * 3
    batch = torch.repeat_interleave(torch.tensor([0, 1]), 300)
    t = torch.tensor([10, 700])
    grads = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)          # two threads whatever the machine or the suite's workers give
    try:
        for _ in range(4):
            den.zero_grad(set_to_none=True)
            den(pts, batch, t, cond).pow(2).sum().backward()
            grads.append({n: p.grad.clone() for n, p in den.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(before)
    assert any(n.endswith("_temp.0.weight") for n in grads[0])
    for other in grads[1:]:
        for n, g in grads[0].items():
            assert torch.equal(g, other[n]), f"{n}: gradients differ between identical backward passes"
