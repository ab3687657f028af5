"""scripts/research/preference_stats.py: the statistics of each preference option's pairs, measured
with the distillation's own sampling code, on the winner and loser the distillation would use."""
import json

import numpy as np
import pytest

from lidar_completion.checkpoints import WEIGHTS_DIR
from scripts_support import load_script, small_drive


def test_whole_scan_and_region_options_on_a_small_drive(tmp_path, capsys):
    ps = load_script("scripts/research/preference_stats.py")
    data = tmp_path / "data"
    small_drive(data, (0,), scans=2, seed=0)
    out = tmp_path / "stats.json"
    argv = ["--data", str(data), "--sequence", "00", "--scans", "2", "--step", "1", "--spread-samples", "2",
            "--scan-points", "300", "--teacher", str(WEIGHTS_DIR / "teacher.pt"), "--out", str(out),
            "--work", str(tmp_path / "work"),
            "--option", "independent:pair_noise=independent noise_scale=1.0",
            "--option", "regions:pair_noise=independent noise_scale=1.0 pair_regions=2"]
    assert ps.main(argv) == 0
    res = json.loads(out.read_text())
    whole, regions = res["independent"], res["regions"]
    for r in (whole, regions):
        assert len(r["scans"]) == 2 and r["metric"] == "cd"
        assert r["margin_over_spread"] == pytest.approx(r["margin"] / r["spread"])
        assert r["agree_cd"] == 1.0                        # the ranking metric agrees with itself
    # whole scans: the winner is one of the pair, the share of scans the second won
    assert whole["second_won"] == pytest.approx(np.mean([not s["first"] for s in whole["scans"]]))
    assert all(s["winner"] == pytest.approx(min(s["m1"], s["m2"])) for s in whole["scans"])
    # regions: the mosaics are better / worse than either whole sample, and the second sample won
    # a share of the squares strictly between none and all
    for s in regions["scans"]:
        assert s["regions"] > 1 and 0 < s["second_won"] < 1
        assert s["winner"] < min(s["m1"], s["m2"]) and s["winner"] + s["margin"] > max(s["m1"], s["m2"])
    printed = capsys.readouterr().out
    assert "| independent | cd |" in printed and "| regions | cd |" in printed
    # a second call with the same --out prints the stored options without sampling again
    before = out.read_text()
    assert ps.main(argv) == 0 and out.read_text() == before
