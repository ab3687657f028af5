"""Scans farthest-point sampled on the trainer's device (``data.sample_on``): the batch the step
gets, a short training run, the option's checks. Runs under the Triton interpreter on the CPU (and
on CUDA where a GPU is visible)."""
import numpy as np
import pytest
import torch

from lidar_completion import sparse
from lidar_completion.errors import ConfigError
from test_training_utils import tiny_config, write_npz

pytestmark = pytest.mark.skipif(
    not (sparse.triton_available() and (sparse.triton_interpreted() or torch.cuda.is_available())),
    reason="Triton is not installed (make setup installs it), or it was imported without "
           "TRITON_INTERPRET=1 on a machine without CUDA")

DEVICE = "cuda" if torch.cuda.is_available() and not sparse.triton_interpreted() else "cpu"


def _textbook(cloud: np.ndarray, k: int) -> np.ndarray:
    import fpsample
    return np.asarray(fpsample.fps_sampling(cloud, k, start_idx=0), dtype=np.int64)


def test_a_batch_is_sampled_in_one_launch_like_the_textbook():
    from training.data import collate, sample_scans_on_device

    g = np.random.default_rng(0)
    clouds = [g.normal(0, 8, (700, 3)).astype(np.float32), g.normal(0, 8, (60, 3)).astype(np.float32)]
    samples = [{"scan_full": c, "target": c[:10], "key": (0, i), "index": i} for i, c in enumerate(clouds)]
    batch = collate(samples)
    out = sample_scans_on_device(batch, 100, 3, DEVICE)
    assert "scan_full" not in out and torch.equal(out["target"], batch["target"])
    assert out["scan_counts"].tolist() == [100, 60] and out["x_init_counts"].tolist() == [300, 180]
    scan, xi = out["scan"].cpu().numpy(), out["x_init"].cpu().numpy()
    np.testing.assert_array_equal(scan[:100], clouds[0][_textbook(clouds[0], 100)])
    np.testing.assert_array_equal(scan[100:], clouds[1])                 # fewer than 100: the whole scan
    np.testing.assert_array_equal(xi[:300], np.tile(scan[:100], (3, 1)))  # each element's scan tiled
    np.testing.assert_array_equal(xi[300:], np.tile(scan[100:], (3, 1)))
    assert out["scan_batch"].tolist() == [0] * 100 + [1] * 60
    assert out["x_init_batch"].tolist() == [0] * 300 + [1] * 180
    plain = {"scan": torch.zeros(2, 3)}
    assert sample_scans_on_device(plain, 100, 3, DEVICE) is plain


def test_a_failed_device_sampling_says_how_to_sample_in_the_loader(monkeypatch):
    from lidar_completion.sparse import triton_backend
    from training.data import collate, sample_scans_on_device

    def fails(clouds, counts):
        raise RuntimeError("device farthest-point sampling: a step waited over 1048576 polls")

    monkeypatch.setattr(triton_backend, "farthest_point_sample_device", fails)
    cloud = np.zeros((50, 3), np.float32)
    batch = collate([{"scan_full": cloud, "target": cloud[:5], "key": (0, 0), "index": 0}])
    with pytest.raises(RuntimeError, match="polls; set data.sample_on=cpu"):
        sample_scans_on_device(batch, 10, 2, DEVICE)


def test_teacher_trains_on_scans_sampled_on_the_device(tmp_path):
    from training.teacher import TeacherTrainer

    npz = write_npz(tmp_path / "two.npz", n=2, n_target=1200, n_scan=300)
    over = ["data.kind=npz", f"data.root={npz}", "data.scan_points=120", "data.target_points=1200",
            "train.batch_size=2", "train.max_steps=2", f"device={DEVICE}"]
    tr = TeacherTrainer(tiny_config("teacher", *over, "data.sample_on=device"), tmp_path / "dev")
    assert tr.sample_on_device
    seen = []
    prepare = tr.prepare_batch
    tr.prepare_batch = lambda b: seen.append(prepare(b)) or seen[-1]
    tr.run()
    assert tr.step == 2 and len(seen) == 2
    with np.load(npz) as z:
        scans = [z["scan_0"], z["scan_1"]]
    for batch in seen:
        got = batch["scan"].cpu().numpy()
        for b, i in enumerate(batch["index"].tolist()):
            np.testing.assert_array_equal(got[batch["scan_batch"].cpu().numpy() == b],
                                          scans[i][_textbook(scans[i], 120)])
    cpu = TeacherTrainer(tiny_config("teacher", *over, "data.sample_on=cpu"), tmp_path / "cpu")
    assert not cpu.sample_on_device and "scan" in cpu.dataset[(0, 0, 0)]


def test_sample_on_is_checked(tmp_path, monkeypatch):
    from training import engine

    with pytest.raises(ConfigError, match="data.sample_on"):
        tiny_config("teacher", "data.sample_on=gpu")
    assert not engine._sampling_on_device("auto", torch.device("cpu"))     # auto: CUDA only
    monkeypatch.setattr(sparse, "triton_interpreted", lambda: False)
    with pytest.raises(ConfigError, match="needs Triton and a CUDA device"):
        engine._sampling_on_device("device", torch.device("cpu"))
