"""SDE-DPM-Solver++ (order 2): timesteps, parity with diffusers, statelessness."""
import pytest
import torch

from lidar_completion.diffusion import DPMSolverSDE, NoiseSchedule, linspace_timesteps, sample
from lidar_completion.errors import ConfigError

SCHEDULE = NoiseSchedule()
ABAR = SCHEDULE.alphas_cumprod


def _model(x_init, target):
    """A smooth eps-model: near the ideal denoiser towards `target` offsets, plus a nonlinearity."""
    def eps(x, t):
        a = float(ABAR[t].sqrt())
        s = float((1 - ABAR[t]).sqrt())
        return 0.9 * (x - x_init - a * target) / s + 0.1 * torch.tanh(x)
    return eps


def test_timesteps_match_the_published_schedule():
    assert DPMSolverSDE(SCHEDULE, 8).timesteps.tolist() == [999, 874, 749, 624, 500, 375, 250, 125]
    assert DPMSolverSDE(SCHEDULE, 1).timesteps.tolist() == [999]
    assert linspace_timesteps(4).tolist() == [999, 749, 500, 250]
    for bad in (0, -3, 1001, 2.5):
        with pytest.raises(ConfigError):
            DPMSolverSDE(SCHEDULE, bad)
    with pytest.raises(ConfigError):
        DPMSolverSDE(SCHEDULE, 8, order=3)


def test_first_and_last_steps_are_first_order():
    s = DPMSolverSDE(SCHEDULE, 8)
    assert [s.step_order(i) for i in range(8)] == [1, 2, 2, 2, 2, 2, 2, 1]
    assert [s.needs_noise(i) for i in range(8)] == [True] * 7 + [False]
    s1 = DPMSolverSDE(SCHEDULE, 8, order=1)
    assert all(s1.step_order(i) == 1 for i in range(8))


def test_second_order_step_requires_history_and_noise():
    s = DPMSolverSDE(SCHEDULE, 4)
    y = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="prev_x0"):
        s.step(torch.zeros(5, 3), 1, y, noise=torch.zeros(5, 3))
    with pytest.raises(ValueError, match="noise"):
        s.step(torch.zeros(5, 3), 0, y)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(4, 3), 0, y, noise=torch.zeros(5, 3))


def test_single_step_returns_the_data_prediction():
    s = DPMSolverSDE(SCHEDULE, 1)
    g = torch.Generator().manual_seed(0)
    y, eps = torch.randn(100, 3, generator=g), torch.randn(100, 3, generator=g)
    out = s.step(eps, 0, y).prev_sample
    a, sg = float(ABAR[999].sqrt()), float((1 - ABAR[999]).sqrt())
    assert torch.allclose(out, (y - sg * eps) / a, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps", [1, 4, 8, 20, 50])
def test_parity_with_diffusers(steps):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only reference")
    ref = diffusers.DPMSolverMultistepScheduler(
        beta_start=3.5e-5, beta_end=0.007, beta_schedule="linear", num_train_timesteps=1000,
        algorithm_type="sde-dpmsolver++", solver_order=2, lower_order_final=True,
        timestep_spacing="linspace", prediction_type="epsilon")
    ref.set_timesteps(steps)
    ours = DPMSolverSDE(SCHEDULE, steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()

    g = torch.Generator().manual_seed(steps)
    x_init = torch.randn(3000, 3, generator=g) * 5
    target = torch.randn(3000, 3, generator=g) * 0.3
    model = _model(x_init, target)
    y_ref = torch.randn(3000, 3, generator=g)
    y, prev = y_ref.clone(), None
    for i, t in enumerate(ours.timesteps.tolist()):
        z = torch.randn(3000, 3, generator=g)
        y_ref = ref.step(model(x_init + y_ref, t), ref.timesteps[i], y_ref, variance_noise=z).prev_sample
        y, prev = ours.step(model(x_init + y, t), i, y, noise=z, prev_x0=prev)
        assert torch.allclose(y, y_ref, atol=1e-5, rtol=0), (i, float((y - y_ref).abs().max()))
    if steps >= 4:   # the offsets end near the targets the model denoises towards
        assert float((y - target).abs().mean()) < 0.2


def test_sample_loop_is_reproducible_and_stateless():
    solver = DPMSolverSDE(SCHEDULE, 8)
    x_a = torch.randn(400, 3, generator=torch.Generator().manual_seed(1)) * 10
    x_b = torch.randn(600, 3, generator=torch.Generator().manual_seed(2)) * 10
    t_a, t_b = torch.zeros_like(x_a), torch.ones_like(x_b) * 0.2

    def run(x, t, seed):
        return sample(_model(x, t), x, solver, torch.Generator().manual_seed(seed))

    b_alone = run(x_b, t_b, 7)
    run(x_a, t_a, 7)                        # scan A in between, same solver object
    assert torch.equal(run(x_b, t_b, 7), b_alone)
    assert not torch.equal(run(x_b, t_b, 8), b_alone)


def test_sample_calls_the_model_on_absolute_points_at_the_scheduled_timesteps():
    solver = DPMSolverSDE(SCHEDULE, 4)
    x_init = torch.full((10, 3), 100.0)
    seen = []

    def model(x, t):
        seen.append((t, float(x.mean())))
        return torch.zeros_like(x)

    noise = torch.zeros(10, 3)
    out = sample(model, x_init, solver, torch.Generator().manual_seed(0), initial_noise=noise)
    assert [t for t, _ in seen] == [999, 749, 500, 250]
    assert seen[0][1] == pytest.approx(100.0)       # x_T = x_init + 0
    # eps = 0 everywhere: x0 = y / alpha; the chain stays finite and returns absolute points
    assert out.shape == (10, 3) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- the "local" process
def _local_oracle(x0):
    """The exact noise of the local process x_t = x_0 + sigma_t eps (a point set with one answer)."""
    def eps(x, t):
        return (x - x0) / float((1 - ABAR[t]).sqrt())
    return eps


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_local_solver_returns_the_clean_points_of_an_exact_local_model(steps):
    g = torch.Generator().manual_seed(0)
    x_init = torch.randn(500, 3, generator=g)
    x0 = x_init + 0.3 * torch.randn(500, 3, generator=g)
    solver = DPMSolverSDE(SCHEDULE, steps, process="local")
    ts = solver.timesteps.tolist()[1:]
    seen = []

    def check(i, t, x):   # every intermediate state has the local process's noise level
        if i < len(ts):
            seen.append(float((x - x0).std()) / float((1 - ABAR[ts[i]]).sqrt()))

    # start exactly on the process's marginal at t = 999: x_T = x_0 + sigma_999 z
    start = x0 - x_init + float((1 - ABAR[999]).sqrt()) * torch.randn(500, 3, generator=g)
    out = sample(_local_oracle(x0), x_init, solver, torch.Generator().manual_seed(1), initial_noise=start,
                 callback=check)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert len(seen) == steps - 1 and all(0.93 < r < 1.07 for r in seen), seen


def test_published_vp_solver_magnifies_a_local_models_offsets():
    # the published sampler treats the offsets from x_init as a VP process: one step from t = 999
    # returns x_init + (x_0 - x_init) / alpha_999, about 5.8 times the true offsets
    g = torch.Generator().manual_seed(0)
    x_init = torch.randn(500, 3, generator=g)
    x0 = x_init + 0.3 * torch.randn(500, 3, generator=g)
    out = sample(_local_oracle(x0), x_init, DPMSolverSDE(SCHEDULE, 1), torch.Generator().manual_seed(1))
    alpha = float(ABAR[999].sqrt())
    torch.testing.assert_close(out - x_init, (x0 - x_init) / alpha, atol=1e-4, rtol=1e-4)
    assert 5.5 < 1 / alpha < 6.0


def test_local_first_order_step_is_the_gaussian_posterior_of_the_local_process():
    s = DPMSolverSDE(SCHEDULE, 8, order=1, process="local")
    t, t_next = 999, 874
    var, var_next = float(1 - ABAR[t]), float(1 - ABAR[t_next])
    y = torch.randn(200, 3)
    x0 = torch.randn(200, 3)
    z = torch.randn(200, 3)
    eps = (y - x0) / var ** 0.5
    out = s.step(eps, 0, y, noise=z).prev_sample
    # q(x_s | x_t, x_0) for x_t = x_0 + sigma_t eps: mean (v_s / v_t) x_t + (1 - v_s / v_t) x_0,
    # variance v_s (1 - v_s / v_t)
    r = var_next / var
    want = r * y + (1 - r) * x0 + (var_next * (1 - r)) ** 0.5 * z
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        DPMSolverSDE(SCHEDULE, 8, process="ve")
    assert "local" in repr(s)
