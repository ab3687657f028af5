"""Static-shape passes of the torch backend (what CUDA graph capture needs) and the graph runner's
capacity logic, on the CPU: fixed capacities with padding rows give the ordinary pass's numbers,
a size past its capacity or an invalid input raises the pass's flag instead of a host read, and
:class:`GraphedDenoiser` (replays off) grows its capacities and falls back to the ordinary path.
The capture itself needs a GPU: tests/test_cuda.py."""
import numpy as np
import pytest
import torch

from lidar_completion.cuda_graphs import GraphedDenoiser, graphs_requested
from lidar_completion.diffusion import guided_noise
from lidar_completion.errors import CloudFormatError, ConfigError
from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig, Refiner
from lidar_completion.models.networks import Condition
from lidar_completion.sparse import PAD_BATCH, StaticShapes, grow_capacity, nearest_cell, use_static_shapes
from test_backends import _batch_clouds, _close


def _nets(seed=3):
    cfg = ModelConfig.tiny()
    torch.manual_seed(seed)
    nets = [ConditionEncoder(cfg, "torch").eval(), Denoiser(cfg, "torch").eval(), Refiner(cfg, "torch").eval()]
    g = torch.Generator().manual_seed(seed)
    for net in nets:
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return nets


def _static(fn, caps=None):
    plan = StaticShapes(caps)
    with use_static_shapes(plan):
        out = fn()
    keys, summary = plan.summary()
    values = summary.tolist()
    return out, bool(values[0]), dict(zip(keys, values[1:]))


@torch.inference_mode()
def test_static_pass_equals_ordinary_pass_for_the_three_networks():
    """A batch of three clouds (one a single point): upper-bound capacities, then capacities just
    above the sizes seen, give the ordinary outputs; the sizes are the true level sizes."""
    enc, den, ref = _nets()
    pts, batch = _batch_clouds()
    cond = enc(pts, batch)
    t = torch.tensor([900, 400, 10])
    xt = pts + 0.05

    def run_all():
        c = enc(pts, batch)
        return c.feats, c.coords, den(xt, batch, t, cond), ref(pts, batch)

    want = run_all()
    got, bad, sizes = _static(run_all)
    assert not bad
    # the condition comes out padded to the capacity: its real cells first, then padding cells
    e = cond.coords.shape[0]
    assert torch.equal(got[1][:e], cond.coords) and (got[1][e:, 0] == PAD_BATCH).all()
    assert _close(got[0][:e], want[0]) and _close(got[2], want[2]) and _close(got[3], want[3])
    assert sizes[("level", 0, 16)] == e            # the encoder's stride-16 cells
    _, x = den._voxelize(xt, batch)
    assert sizes[("level", 1, 1)] == len(x.manager.levels[1])
    tight = {k: v + 3 for k, v in sizes.items()}
    got2, bad2, sizes2 = _static(run_all, tight)
    assert not bad2 and sizes2 == sizes
    assert _close(got2[2], want[2]) and _close(got2[3], want[3])


@torch.inference_mode()
def test_static_grouped_convolution_with_a_pairs_capacity(monkeypatch):
    """The grouped form in static mode (each offset's neighbour rows padded to the plan's capacity of
    the longest list) gives the ordinary numbers; a capacity one short raises the flag."""
    from lidar_completion.sparse import torch_backend

    _, _, ref = _nets()
    pts, batch = _batch_clouds()
    want = ref(pts, batch)
    _, bad, sizes = _static(lambda: ref(pts, batch))
    assert not bad
    pairs = {k: v for k, v in sizes.items() if k[0] == "pairs"}
    assert set(k[2] for k in pairs) == {1, 2, 4, 8, 16} and all(v > 0 for v in pairs.values())
    monkeypatch.setenv(torch_backend.ENV_ALGO, "grouped")
    got, bad, _ = _static(lambda: ref(pts, batch), sizes)
    assert not bad and _close(got, want)
    short = dict(sizes)
    short[("pairs", 0, 1)] -= 1
    _, bad, _ = _static(lambda: ref(pts, batch), short)
    assert bad


@torch.inference_mode()
def test_size_past_its_capacity_raises_the_flag():
    _, den, ref = _nets()
    pts, batch = _batch_clouds()
    _, bad, sizes = _static(lambda: ref(pts, batch))
    assert not bad
    for key in [k for k in sizes if k[0] == "level"]:       # any one level one row short
        caps = {k: v for k, v in sizes.items()}
        caps[key] = max(1, sizes[key] - 1)
        if caps[key] == sizes[key]:
            continue
        _, bad, seen = _static(lambda: ref(pts, batch), caps)
        assert bad and seen[key] == sizes[key], key


@torch.inference_mode()
def test_invalid_coordinates_raise_the_flag_not_an_error():
    _, _, ref = _nets()
    pts, batch = _batch_clouds()
    far = pts.clone()
    far[0, 0] = 1e6                                   # 2e7 voxels from the origin
    _, bad, _ = _static(lambda: ref(far, batch))
    assert bad
    _, bad, _ = _static(lambda: ref(pts, torch.full_like(batch, PAD_BATCH)))   # reserved batch index
    assert bad
    for value in (float("nan"), float("inf")):       # a non-finite point, which no coordinate test sees
        broken = pts.clone()
        broken[5, 1] = value
        _, bad, _ = _static(lambda: ref(broken, batch))
        assert bad, value


@torch.inference_mode()
def test_static_nearest_cell_matches_the_exact_lookup_with_padding_rows():
    """Padding reference cells (batch PAD_BATCH) never win; padding query rows take no place in the
    brute-force fallback; a fallback capacity below the unresolved rows raises the flag."""
    g = torch.Generator().manual_seed(0)
    ref = torch.unique(torch.cat([torch.randint(0, 2, (60, 1), generator=g),
                                  16 * torch.randint(-6, 6, (60, 3), generator=g)], 1), dim=0)
    query = torch.cat([torch.randint(0, 2, (500, 1), generator=g), torch.randint(-200, 200, (500, 3), generator=g)], 1)
    want = nearest_cell(query, ref)
    pad_ref = torch.cat([ref, torch.tensor([[PAD_BATCH, 0, 0, 0]]).repeat(5, 1)])
    pad_query = torch.cat([query, torch.tensor([[PAD_BATCH, 7, 7, 7]]).repeat(9, 1)])
    got, bad, sizes = _static(lambda: nearest_cell(pad_query, pad_ref))
    assert not bad and torch.equal(got[:500], want)
    unresolved = sizes[("unresolved", 0)]
    assert 0 < unresolved <= 500
    got, bad, _ = _static(lambda: nearest_cell(pad_query, pad_ref), {("unresolved", 0): unresolved})
    assert not bad and torch.equal(got[:500], want)
    _, bad, _ = _static(lambda: nearest_cell(pad_query, pad_ref), {("unresolved", 0): unresolved - 1})
    assert bad


def test_static_pass_refuses_training_batch_norm():
    _, _, ref = _nets()
    ref.train()
    pts, batch = _batch_clouds()
    with pytest.raises(RuntimeError, match="inference"):
        _static(lambda: ref(pts, batch))


def _scene(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g) * torch.tensor([8.0, 8.0, 1.0])


def _scene_and_condition():
    """(encoder, denoiser, a 3,000-point scene, the condition of its first 500 points)."""
    enc, den, _ = _nets()
    pts = _scene()
    return enc, den, pts, enc(pts[:500], torch.zeros(500, dtype=torch.long))


@torch.inference_mode()
def test_graph_runner_without_replays_follows_the_ordinary_path_and_grows():
    """Per timestep: the first call plans (sizing pass), later calls run static passes with the
    learnt capacities; a condition with more cells re-plans; a wider cloud at a known timestep
    overflows, is recomputed and grows that timestep's capacities. Always the ordinary numbers."""
    enc, den, pts, cond = _scene_and_condition()
    uncond = enc(torch.zeros(500, 3), torch.zeros(500, dtype=torch.long))
    r = GraphedDenoiser(den, 3.5, use_graphs=False)
    g = torch.Generator().manual_seed(1)
    for scan in range(2):
        for t in (900, 300):
            xt = pts + (t / 1000.0) * torch.randn(pts.shape, generator=g)
            assert _close(r(xt, t, cond, uncond), guided_noise(den, xt, t, cond, uncond, 3.5)), (scan, t)
    assert r.fallbacks == 0 and sorted(r._states) == [300, 900]
    assert r._states[900].caps[("level", 0, 16)] >= r._states[300].caps[("level", 0, 16)]
    first_caps = dict(r._states[300].caps)
    # a condition with more cells than the padded capacity: planned again, same numbers
    cond2 = enc(pts[:2500], torch.zeros(2500, dtype=torch.long))
    assert cond2.coords.shape[0] > r._states[300].cap
    assert _close(r(pts, 300, cond2, uncond), guided_noise(den, pts, 300, cond2, uncond, 3.5))
    assert r.fallbacks == 0
    # a cloud three times wider at a known timestep: levels do not fit -> recomputed, grown
    wide = 3 * pts
    assert _close(r(wide, 300, cond2, uncond), guided_noise(den, wide, 300, cond2, uncond, 3.5))
    assert r.fallbacks == 1
    assert r._states[300].caps[("level", 0, 16)] > first_caps[("level", 0, 16)]
    assert _close(r(wide, 300, cond2, uncond), guided_noise(den, wide, 300, cond2, uncond, 3.5))
    assert r.fallbacks == 1
    # w = 1: the conditional pass alone
    r1 = GraphedDenoiser(den, 1.0, use_graphs=False)
    assert _close(r1(pts, 100, cond, None), den(pts, None, torch.tensor([100]), cond))
    # bounded number of timesteps kept
    r2 = GraphedDenoiser(den, 1.0, use_graphs=False, max_states=2)
    for t in (10, 20, 30):
        r2(pts, t, cond, None)
    assert sorted(r2._states) == [20, 30]


@torch.inference_mode()
# the Triton variant takes ~45 s under the interpreter (its static path is covered in the fast suite
# by tests/test_triton.py's static denoiser pass, the runner by the torch variant)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_encoder_runner_gives_the_ordinary_condition(backend):
    """The encoder's graph runner (replays off: its static passes eagerly) returns the ordinary
    call's cells and features - scans of several sizes, the padding points' cell and the padding
    rows dropped - and plans again for a scan with more points than its capacity."""
    from lidar_completion import sparse
    from lidar_completion.cuda_graphs import GraphedEncoder

    if backend == "triton" and not (sparse.triton_available() and sparse.triton_interpreted()):
        pytest.skip("Triton is not installed with TRITON_INTERPRET=1 (make setup installs it)")
    enc, _, _ = _nets()
    if backend == "triton":
        tri = ConditionEncoder(ModelConfig.tiny(), "triton").eval()
        tri.load_state_dict(enc.state_dict())
        enc = tri
    r = GraphedEncoder(enc, use_graphs=False)
    pts = _scene()
    sizes = (900, 800, 900, 2600) if backend == "torch" else (300, 260)   # the interpreter is slow
    for n in sizes:
        got = r(pts[:n])
        want = enc(pts[:n], torch.zeros(n, dtype=torch.long))
        assert torch.equal(got.coords, want.coords), n
        assert got.feats.dtype == want.feats.dtype and _close(got.feats, want.feats), n
    assert len(r._states) == 1 and r._states[0].cap >= max(sizes) and r.fallbacks == 0
    with pytest.raises(CloudFormatError):
        r(torch.full((50, 3), 1e6))          # beyond the coordinate range: the ordinary error


@torch.inference_mode()
def test_graph_runner_passes_invalid_input_to_the_ordinary_path():
    """An input the static pass flags as invalid gets the ordinary path's error."""
    from lidar_completion.errors import CloudFormatError

    _, den, pts, cond = _scene_and_condition()
    r = GraphedDenoiser(den, 1.0, use_graphs=False)
    bad = pts.clone()
    bad[0] = 1e6
    with pytest.raises(CloudFormatError):
        r(bad, 10, cond, None)


def test_graph_settings():
    assert graphs_requested(None) is None and graphs_requested("auto") is None
    assert graphs_requested(True) is True and graphs_requested("off") is False
    with pytest.raises(ConfigError):
        graphs_requested("sometimes")
    assert grow_capacity(1000) >= 1500 and grow_capacity(1000) % 128 == 0


def test_graph_settings_from_the_environment(monkeypatch):
    from lidar_completion.completer import Completer

    monkeypatch.setenv("LIDAR_COMPLETION_CUDA_GRAPHS", "0")
    assert graphs_requested(None) is False
    monkeypatch.setenv("LIDAR_COMPLETION_CUDA_GRAPHS", "maybe")
    with pytest.raises(ConfigError):
        graphs_requested(None)
    monkeypatch.delenv("LIDAR_COMPLETION_CUDA_GRAPHS")
    enc, den, ref = _nets()
    c = Completer(enc, den, ref, device="cpu")
    assert not c.graphs_active and c.graph_runner() is None     # CPU: never graphs
    with pytest.raises(ConfigError):
        Completer(enc, den, ref, device="cpu", cuda_graphs="sometimes")


def test_graph_runner_needs_a_backend_with_a_static_mode():
    class Fake(torch.nn.Module):
        backend = "minkowski"
    with pytest.raises(ConfigError, match="torch or Triton sparse backend"):
        GraphedDenoiser(Fake(), 3.5)


def test_condition_padding_changes_nothing():
    """Padding cells appended to a condition (batch PAD_BATCH, zero features) do not move a static
    pass's output (the graph runner pads every condition to a capacity)."""
    enc, den, _ = _nets()
    pts = _scene()
    with torch.inference_mode():
        cond = enc(pts[:500], torch.zeros(500, dtype=torch.long))
        e, c = cond.feats.shape
        padded = Condition(torch.cat([cond.coords, torch.tensor([[PAD_BATCH, 0, 0, 0]]).repeat(50, 1)]),
                           torch.cat([cond.feats, torch.zeros(50, c)]))
        t = torch.tensor([300])
        want = den(pts, None, t, cond)
        got, bad, _ = _static(lambda: den(pts, None, t, padded))
    assert not bad and _close(got, want)
    assert np.isfinite(got.numpy()).all()


@torch.inference_mode()
def test_refiner_runner_pads_with_a_separate_batch_element():
    """GraphedRefiner pads the points with batch element 1 at the origin: the real rows equal the
    ordinary refiner's, for clouds of different sizes sharing one capacity and for a larger one."""
    from lidar_completion.cuda_graphs import GraphedRefiner

    _, _, ref = _nets()
    pts = _scene(4000)
    r = GraphedRefiner(ref, use_graphs=False)
    for n in (3000, 2500, 3000, 3900):
        got = r(pts[:n])
        assert got.shape == (n, 3 * ref.config.refine_up)
        assert _close(got, ref(pts[:n], torch.zeros(n, dtype=torch.long))), n
    assert r.fallbacks == 0 and len(r._states) == 1


@torch.inference_mode()
def test_an_fp32_graph_runner_keeps_a_callers_autocast_out():
    """The graph runners (the CUDA path's denoiser, encoder and refiner) ran an fp32 model inside a
    caller's autocast region in that region's dtype, and a graph captured there would have kept it
    for later replays: fp32 turns autocast off for the runner's passes as the Completer does."""
    enc, den, pts, cond = _scene_and_condition()
    r = GraphedDenoiser(den, 1.0, use_graphs=False)
    r(pts, 300, cond, None)                  # the sizing pass; then the static passes compared
    plain = r(pts, 300, cond, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = r(pts, 300, cond, None)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
