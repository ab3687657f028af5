"""scripts/research/seed_choice.py: the validation drive's choice among seeds and what it is worth,
on hand-made compare_distillations folders whose answers are known."""
import json

import pytest
from scripts_support import load_script

ROW = "student 8 steps, w=2, local solver + refine"


def _folder(root, cds_by_student, per_frame=None):
    """A compare_distillations output: compare.json (row ROW, group 'a') and, with ``per_frame``,
    each student's frames.jsonl {frame: cd} under root/a/<i>/seed0/07/<row>/."""
    students = [{"index": i, "checkpoint": ck, "cd": cd} for i, (ck, cd) in enumerate(cds_by_student)]
    root.mkdir(parents=True)
    (root / "compare.json").write_text(json.dumps({"rows": {ROW: {"groups": {"a": {"students": students}}}}}))
    for i, frames in enumerate(per_frame or []):
        where = root / "a" / str(i) / "seed0" / "07" / "student8w2_refine"
        where.mkdir(parents=True)
        (where / "summary.json").write_text(json.dumps({"run": {"label": ROW, "seed": 0, "sequence": "07"}}))
        (where / "frames.jsonl").write_text("".join(json.dumps({"frame": f"{f:06d}", "cd": cd}) + "\n"
                                                    for f, cd in frames.items()))


def test_choice_and_best_of_k_follow_the_validation_frames(tmp_path, capsys):
    sc = load_script("scripts/research/seed_choice.py")
    held = [("s0.pt", 0.10), ("s1.pt", 0.20), ("s2.pt", 0.30)]
    # frames 0 and 10 rank the students as held out; frame 5 the other way round, and by more
    val = [{0: 0.31, 5: 0.90, 10: 0.33}, {0: 0.32, 5: 0.60, 10: 0.34}, {0: 0.33, 5: 0.30, 10: 0.35}]
    _folder(tmp_path / "held", held)
    _folder(tmp_path / "val", [(ck, 0.0) for ck, _ in held], val)
    res = sc.analyse(tmp_path / "val", [tmp_path / "held"], [[0, 10], None, [5]], [1, 2, 3])
    agree, every, reverse = res
    assert agree["spearman"] == pytest.approx(1.0) and agree["chosen"] == "s0.pt"
    g = agree["groups"][0]
    assert g["chosen_held"] == 0.10 and g["best_held"] == 0.10
    # best of 1: the mean; of 2: pairs (0,1) (0,2) (1,2) choose 0.1, 0.1, 0.2; of 3: the best
    assert g["best_of_k"] == pytest.approx({1: 0.2, 2: (0.1 + 0.1 + 0.2) / 3, 3: 0.1})
    # all frames: frame 5 dominates the means, the choice is the worst student held out
    assert every["frames"] == [0, 5, 10] and every["spearman"] == pytest.approx(-1.0)
    assert every["chosen_held"] == 0.30 and every["groups"][0]["best_of_k"][2] == pytest.approx((0.2 + 0.3 + 0.3) / 3)
    assert reverse["chosen"] == "s2.pt"
    # the command line prints the same
    assert sc.main(["--val", str(tmp_path / "val"), "--held", str(tmp_path / "held"), "--frames", "0,10",
                    "--k", "1,3"]) == 0
    out = capsys.readouterr().out
    assert "Spearman 1.00" in out and "k=1 0.2000, k=3 0.1000" in out


def test_bad_inputs_are_named(tmp_path):
    sc = load_script("scripts/research/seed_choice.py")
    _folder(tmp_path / "held", [("s0.pt", 0.1), ("s1.pt", 0.2)])
    _folder(tmp_path / "val", [("s0.pt", 0.0), ("s1.pt", 0.0)], [{0: 0.3}, {0: 0.4}])
    with pytest.raises(SystemExit, match="frames \\[20\\] are not in every student"):
        sc.analyse(tmp_path / "val", [tmp_path / "held"], [[0, 20]], [1])
    with pytest.raises(SystemExit, match="has no row 'other'"):
        sc.analyse(tmp_path / "val", [tmp_path / "held"], [None], [1], row="other")
    with pytest.raises(SystemExit, match="not a compare_distillations result"):
        sc.analyse(tmp_path / "nowhere", [tmp_path / "held"], [None], [1])
    with pytest.raises(SystemExit, match="fewer than two students"):
        _folder(tmp_path / "other", [("x.pt", 0.1)])
        sc.analyse(tmp_path / "val", [tmp_path / "other"], [None], [1])
    with pytest.raises(SystemExit):
        sc.main(["--val", str(tmp_path / "val"), "--held", str(tmp_path / "held"), "--k", "0"])
    _folder(tmp_path / "val_bare", [("s0.pt", 0.0), ("s1.pt", 0.0)])         # compare.json without its runs
    with pytest.raises(SystemExit, match="no validation frame is shared.*s0.pt, s1.pt"):
        sc.analyse(tmp_path / "val_bare", [tmp_path / "held"], [None], [1])
