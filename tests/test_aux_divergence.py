"""scripts/research/aux_divergence.py: whether Distillation-DPO's two auxiliary networks differ, read
from a distillation's training checkpoints on held-out frames."""
import json

import pytest

from scripts_support import load_script, small_drive
from test_training_utils import tiny_config
from training.config import dump
from training.distill import DistillTrainer


def _run(folder, data, mode="dpo"):
    cfg = tiny_config("distill", f"data.root={data}", "data.sequences=['00']", "data.kind=synthetic",
                      "data.scan_points=300", "data.target_points=3000", "distill.pair_noise=independent",
                      "distill.noise_scale=1.0", "distill.pair_regions=2", "train.optimizer={name: adam, lr: 1.0e-3}",
                      "distill.aux_optimizer={name: adam, lr: 1.0e-2}", mode=mode)
    tr = DistillTrainer(cfg, folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(dump(cfg))
    return tr


def test_step_zero_nets_coincide_and_an_update_separates_them(tmp_path, capsys):
    ad = load_script("scripts/research/aux_divergence.py")
    data = small_drive(tmp_path / "data", (0,), scans=2, seed=0)
    run = tmp_path / "run"
    tr = _run(run, data)
    first = tr.save()                             # step 0: both auxiliary nets are the teacher's copy
    from training.data import collate
    tr.train_step(collate([tr.dataset[(0, 0, 0)]]))   # an auxiliary update on the winner / loser mosaics
    tr.step = 1
    tr.save()
    vsd = tmp_path / "vsd"
    _run(vsd, data, mode="vsd").save()
    out = tmp_path / "res.json"
    argv = ["--run", f"{run}:{first}", "--run", str(run), "--run", str(vsd), "--data", str(data),
            "--sequence", "00", "--frames", "2", "--every", "1", "--timesteps", "200,800", "--out", str(out)]
    assert ad.main(argv) == 0
    res = json.loads(out.read_text())
    start, after, one = res[f"{run}:{first}"]["timesteps"], res[str(run)]["timesteps"], res[str(vsd)]["timesteps"]
    for t in ("200", "800"):
        # the copies: no gap, the teacher's own score (guidance 1), the same estimates
        assert start[t]["aux_gap"] == 0 and start[t]["score_diff"] == pytest.approx(0, abs=1e-6)
        assert start[t]["cd_x0_w"] == pytest.approx(start[t]["cd_x0_l"])
        # one update of each net on its own side's samples: they differ
        assert after[t]["aux_gap"] > 0 and after[t]["score_diff"] > 0
        assert after[t]["gap_ratio"] == pytest.approx(after[t]["aux_gap"] / after[t]["score_diff"])
        assert "aux_gap" not in one[t] and one[t]["score_diff"] == pytest.approx(0, abs=1e-6)
    assert res[str(vsd)]["mode"] == "vsd"
    printed = capsys.readouterr().out
    assert f"| {run} | 200 |" in printed


def test_bad_arguments_are_refused(tmp_path):
    ad = load_script("scripts/research/aux_divergence.py")
    with pytest.raises(SystemExit, match="no config.yaml"):
        ad.main(["--run", str(tmp_path), "--data", str(tmp_path)])
    (tmp_path / "config.yaml").write_text("kind: distill\n")
    with pytest.raises(SystemExit, match="no checkpoint"):
        ad.main(["--run", str(tmp_path), "--data", str(tmp_path)])
    with pytest.raises(SystemExit):
        ad.main(["--run", str(tmp_path), "--data", str(tmp_path), "--timesteps", "5000"])
