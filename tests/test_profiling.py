"""The profiling helpers (named ranges installed only while asked for) and the training benchmark's
``--profile``: what they report comes from the work profiled, and the library is left as found."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lidar_completion import profiling
from lidar_completion.models import ModelConfig
from lidar_completion.models.networks import Refiner


def _statics():
    return [(o, a, inspect.getattr_static(o, a)) for o, a, _ in profiling.library_regions()]


def test_named_regions_wrap_only_inside_the_block():
    before = _statics()
    torch.manual_seed(0)
    net = Refiner(ModelConfig.tiny(), backend="torch").eval()
    pts = torch.randn(300, 3) * 2
    with profiling.named_regions() as names:
        assert {"conv", "batchnorm", "voxelize", "map.parent"} <= names
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
            out = net(pts)
    got = profiling.summary(prof, sorted(names), "cpu", top=5)
    regions = {r["name"]: r for r in got["regions"]}
    # every convolution of the refiner ran inside a "conv" range, and only the ranges that ran appear
    convs = sum(1 for m in net.modules() if type(m).__name__ == "Convolution")
    assert regions["conv"]["calls"] >= convs > 0
    assert "cond.modulate" not in regions            # the refiner has no conditioning
    assert got["top"] and got["total_ms"] > 0
    selfs = [r["self_ms"] for r in got["top"]]
    assert selfs == sorted(selfs, reverse=True)
    assert "## named regions" in got["text"] and "conv" in got["text"]
    # the originals are back, and the network computes the same without the ranges
    assert _statics() == before
    with torch.no_grad():
        assert torch.equal(net(pts), out)


def test_named_regions_restore_after_an_error():
    before = _statics()
    with pytest.raises(RuntimeError, match="inside"):
        with profiling.named_regions():
            assert _statics() != before
            raise RuntimeError("inside")
    assert _statics() == before


def test_training_bench_profiles_one_step_outside_the_timings(tmp_path, capsys):
    from training import bench
    rc = bench.main(["--sizes", "tiny", "--kinds", "teacher", "--steps", "1", "--points", "2000",
                     "--profile", "--top", "5", "--trace", str(tmp_path / "traces"),
                     "--data", str(tmp_path / "data"), "--scans", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    (row,) = summary["results"]
    assert row["steps"] == 1                      # the profiled step is not among the timed ones
    assert row["data_s_per_step"] > 0 and row["prepare_s_per_step"] >= 0
    assert row["loop_samples_per_s"] <= row["samples_per_s"]
    regions = {r["name"]: r for r in row["profile"]["regions"]}
    # one teacher step: one backward, one optimiser step, the denoiser's convolutions and its 8 sites
    assert regions["train.backward"]["calls"] == 1 and regions["train.optimizer"]["calls"] == 1
    assert regions["conv"]["calls"] > 10 and regions["cond.modulate"]["calls"] == 8
    assert "# profile of one step, prepare_batch and train_step (tiny teacher torch fp32)" in out
    assert (tmp_path / "traces" / "train_tiny_teacher_torch_fp32.json.gz").stat().st_size > 1000
    # the regions are gone again
    from training.engine import Trainer
    assert not hasattr(inspect.getattr_static(Trainer, "backward"), "__wrapped__")


def test_training_bench_refuses_a_trace_without_profile(capsys):
    from training import bench
    with pytest.raises(SystemExit):
        bench.main(["--trace", "x"])
    assert "--trace needs --profile" in capsys.readouterr().err


def test_an_inherited_method_is_wrapped_on_the_subclass_and_removed_after():
    class Base:
        @staticmethod
        def f(x):
            return x + 1

    class Sub(Base):
        pass

    with profiling.named_regions([(Sub, "f", "sub.f")]) as names:
        assert "sub.f" in names and "f" in Sub.__dict__
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            assert Sub.f(1) == 2 and Base.f(1) == 2
    assert "f" not in Sub.__dict__ and Sub.f is Base.f
    assert [e.count for e in prof.key_averages() if e.key == "sub.f"] == [1]


def test_a_failing_profiled_step_leaves_no_profiler_or_ranges(tmp_path, monkeypatch):
    """A step that raises while it is profiled: the error reaches the caller, and the profiler, the
    named ranges and the benchmark's wrappers are all gone."""
    from training import bench
    from training.engine import Trainer
    from training.teacher import TeacherTrainer
    before = _statics()
    calls = {"n": 0}
    real = TeacherTrainer.train_step

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:          # warm-up, one timed step, then the profiled one
            raise RuntimeError("boom in the profiled step")
        return real(self, batch)
    monkeypatch.setattr(TeacherTrainer, "train_step", flaky)
    from lidar_completion.data import generate_dataset
    generate_dataset(tmp_path / "data", sequences=["00"], scans=2, seed=0)
    with pytest.raises(RuntimeError, match="boom in the profiled step"):
        bench.measure("tiny", "teacher", tmp_path / "data", 1, "cpu", 2, None, points=2000, profile=True)
    assert calls["n"] == 3
    assert not torch.autograd.profiler._is_profiler_enabled
    assert not hasattr(inspect.getattr_static(Trainer, "backward"), "__wrapped__")
    assert _statics() == before
