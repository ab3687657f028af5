"""scripts/research/denoiser_floor.py: the Bayes-optimal noise prediction and the per-t denoiser diagnostics."""
import json

import numpy as np
import pytest

from lidar_completion.checkpoints import make_random_checkpoint
from scripts_support import load_script, small_drive


@pytest.fixture(scope="module")
def floor():
    return load_script("scripts/research/denoiser_floor.py")


def _plane(spacing=0.05, half=6.0):
    g = np.arange(-half, half, spacing)
    xx, yy = np.meshgrid(g, g)
    return np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)], axis=1)


def test_posterior_on_a_plane_predicts_the_normal_noise_only(floor):
    # noise much larger than the point spacing: only the component across the plane can be told
    # apart, so the Bayes-optimal MSE is 2/3 and the prediction's std sqrt(1/3)
    rng = np.random.default_rng(0)
    target = _plane()
    x0 = target[rng.choice(len(target), 3000, replace=False)]
    x0 = x0[np.abs(x0[:, :2]).max(axis=1) < 3.0]  # keep the posterior away from the plane's edges
    sigma = 0.5
    eps = rng.standard_normal(x0.shape)
    e = floor.posterior_eps(target, x0 + sigma * eps, sigma, k=512)
    np.testing.assert_allclose(e[:, 2], eps[:, 2], atol=1e-6)
    assert np.abs(e[:, :2]).mean() < 0.1 * np.abs(eps[:, :2]).mean()
    s = floor.stats(e, eps, sigma)
    assert s["mse"] == pytest.approx(2 / 3, abs=0.05)
    assert s["std"] == pytest.approx(np.sqrt(1 / 3), abs=0.05)
    assert s["best_scale"] == pytest.approx(1.0, abs=0.05)   # the posterior mean is calibrated


def test_posterior_with_noise_below_the_spacing_recovers_the_noise(floor):
    rng = np.random.default_rng(1)
    target = _plane(spacing=0.1, half=2.0)
    x0 = target[rng.choice(len(target), 500, replace=False)]
    sigma = 0.01
    eps = rng.standard_normal(x0.shape)
    e = floor.posterior_eps(target, x0 + sigma * eps, sigma, k=16)
    assert floor.stats(e, eps, sigma)["mse"] < 0.01


def test_stats_of_inflated_and_perfect_predictions(floor):
    rng = np.random.default_rng(2)
    eps = rng.standard_normal((4000, 3))
    part = eps * np.array([0.0, 0.0, 1.0])          # only the z noise is known
    inflated = floor.stats(2 * part, eps, 0.3)
    assert inflated["best_scale"] == pytest.approx(0.5, abs=0.01)
    assert inflated["mse"] == pytest.approx(1.0, abs=0.1)   # 2/3 + the overshoot in z
    perfect = floor.stats(eps, eps, 0.3)
    assert perfect["mse"] == 0 and perfect["noise_removed"] == 1.0
    assert floor.stats(np.zeros_like(eps), eps, 0.3)["noise_removed"] == 0.0


def test_main_prints_bayes_and_model_rows(floor, tmp_path, capsys):
    data = tmp_path / "data"
    small_drive(data, (8,), scans=2, seed=1)
    ckpt = tmp_path / "t.pt"
    make_random_checkpoint(ckpt, seed=3, refine=False)
    out = tmp_path / "floor.json"
    assert floor.main(["--data", str(data), "--frames", "1", "--checkpoint", str(ckpt), "--t", "50,999",
                       "--scan-points", "300", "--tile", "4", "--eval-points", "500", "--backend", "torch",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bayes" in text and "t.pt" in text
    got = json.loads(out.read_text())
    for name in ("bayes", "t.pt"):
        for t in ("50", "999"):
            assert set(got[name][t]) == {"mse", "std", "best_scale", "noise_removed", "sigma"}
    assert got["bayes"]["999"]["sigma"] == pytest.approx(0.985, abs=1e-3)
    # a random network is no denoiser: the posterior mean beats it at every t
    assert all(got["bayes"][t]["mse"] < got["t.pt"][t]["mse"] for t in ("50", "999"))


def test_main_refuses_a_checkpoint_without_a_denoiser_and_a_missing_dataset(floor, tmp_path, capsys):
    from lidar_completion.checkpoints import save_checkpoint
    from lidar_completion.models import ModelConfig, Refiner

    bad = tmp_path / "refiner_only.pt"
    save_checkpoint(bad, {"refiner": Refiner(ModelConfig.tiny(), "torch")}, ModelConfig.tiny(), kind="refiner")
    assert floor.main(["--data", str(tmp_path), "--checkpoint", str(bad), "--backend", "torch"]) == 2
    assert "holds no denoiser" in capsys.readouterr().err
    assert floor.main(["--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
