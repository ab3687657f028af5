"""scripts/research/compare_distillations.py: groups of students (one per distillation seed) evaluated
on the same frames, their training spread, and the comparison of each group with the first."""
import json

import numpy as np
import pytest

from lidar_completion.checkpoints import make_random_checkpoint
from scripts_support import load_script, small_drive


def _script():
    return load_script("scripts/research/compare_distillations.py")


def test_compare_statistics():
    cmp = _script()
    a, b = [0.30, 0.31, 0.32], [0.34, 0.36, 0.35]
    c = cmp.compare(a, b)
    assert c["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    assert c["spread"] == pytest.approx(max(np.std(a, ddof=1), np.std(b, ddof=1)))
    assert c["ratio"] == pytest.approx(abs(c["diff"]) / c["spread"])
    from scipy.stats import ttest_ind
    assert c["p_welch"] == pytest.approx(ttest_ind(b, a, equal_var=False).pvalue)
    assert c["p_welch"] < 0.05
    one = cmp.compare([0.3], [0.4])          # one student each: a difference, nothing to weigh it against
    assert one["diff"] == pytest.approx(0.1) and one["spread"] is None and one["p_welch"] is None
    assert one["seeds_needed"] is None
    assert c["seeds_needed"] == cmp.seeds_needed(c["diff"], np.std(a, ddof=1), np.std(b, ddof=1))


def test_seeds_needed_matches_the_t_test_sample_sizes():
    cmp = _script()
    # students per group of the two-sided two-sample t-test at 5 % and power 80 % for effect sizes
    # d = 0.5, 0.8, 1 and 2, as the standard power tables (Cohen 1988; G*Power) give them
    for d, n in ((0.5, 64), (0.8, 26), (1.0, 17), (2.0, 6)):
        assert cmp.seeds_needed(d * 0.011, 0.011, 0.011) == n
        assert cmp.seeds_needed(-d * 0.02, 0.02, 0.02) == n        # the sign and the unit do not matter
    assert cmp.seeds_needed(0.01, 0.005, 0.015) == cmp.seeds_needed(0.01, np.sqrt(0.000125), np.sqrt(0.000125))
    assert cmp.seeds_needed(0.0, 0.01, 0.01) is None and cmp.seeds_needed(0.01, 0.0, 0.0) is None
    assert cmp.seeds_needed(100.0, 0.01, 0.01) == 2
    assert cmp.seeds_needed(0.004, 0.011, 0.011) > cmp.seeds_needed(0.005, 0.011, 0.011)


def test_frame_by_frame_consistency(tmp_path):
    cmp = _script()
    rng = np.random.default_rng(0)
    students, frames = np.array([0.0, 0.02, 0.035, 0.05]), rng.uniform(0.2, 0.4, 10)
    M = 0.3 + students[:, None] + frames[None, :] + rng.normal(0, 0.004, (4, 10))
    keys = [(0, "08", f"{f:06d}") for f in range(10)]
    per = [dict(zip(keys, row)) for row in M]
    per[0][(0, "09", "000000")] = 9.0                   # a frame only one student has: left out
    c = cmp.consistency(per)
    assert c["frames"] == 10 and c["students"] == 4
    assert c["student_sd"] == pytest.approx(np.std(M.mean(1), ddof=1))
    # the residual of the additive model student + frame, fitted by least squares
    X = np.zeros((40, 14))
    for i in range(4):
        for j in range(10):
            X[i * 10 + j, i] = 1.0
            X[i * 10 + j, 4 + j] = 1.0
    fit, *_ = np.linalg.lstsq(X, M.ravel(), rcond=None)
    resid = M.ravel() - X @ fit
    assert c["residual_sd"] == pytest.approx(np.sqrt((resid ** 2).sum() / (3 * 9)))
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    agree = np.mean([(M[a, j] < M[b, j]) for a, b in pairs for j in range(10)])   # means increase with a
    assert c["order_agreement"] == pytest.approx(agree) and c["order_agreement"] > 0.9
    assert cmp.consistency(per[:1]) is None and cmp.consistency([{keys[0]: 1.0}, {keys[0]: 2.0}]) is None
    # per-frame CDs read from an evaluation folder, by row label
    run = tmp_path / "seed0" / "08" / "row_refine"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"run": {"label": "row", "seed": 0, "sequence": "08"}}))
    (run / "frames.jsonl").write_text("".join(json.dumps({"frame": f"{j:06d}", "cd": 0.1 * j}) + "\n"
                                              for j in range(3)))
    assert cmp.frame_cds(tmp_path)["row"] == {(0, "08", "000000"): 0.0, (0, "08", "000001"): 0.1,
                                              (0, "08", "000002"): pytest.approx(0.2)}
    assert "other row" not in cmp.frame_cds(tmp_path)


def test_groups_are_parsed_and_checked(tmp_path):
    cmp = _script()
    assert cmp.parse_group("dpo=a.pt, b.pt") == ("dpo", ["a.pt", "b.pt"])
    for bad in ("dpo", "=a.pt", "dpo=", "x/y=a.pt"):
        with pytest.raises(Exception):
            cmp.parse_group(bad)
    ck = tmp_path / "s.pt"
    ck.write_bytes(b"x")
    with pytest.raises(SystemExit):      # one group: nothing to compare
        cmp.parse_args(["--group", f"a={ck}", "--data", "d", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):      # the same label twice
        cmp.parse_args(["--group", f"a={ck}", "--group", f"a={ck}", "--data", "d", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):      # a checkpoint that is not there
        cmp.parse_args(["--group", f"a={ck}", "--group", f"b={tmp_path / 'nope.pt'}", "--data", "d",
                        "--out", str(tmp_path)])
    with pytest.raises(SystemExit):      # --table-only before anything was evaluated
        cmp.main(["--group", f"a={ck}", "--group", f"b={ck}", "--out", str(tmp_path / "empty"), "--table-only"])


def test_two_groups_evaluated_compared_and_written_into_a_doc(tmp_path):
    cmp = _script()
    data = tmp_path / "data"
    small_drive(data, (8,), scans=2, seed=1)
    samp = {"steps": 1, "guidance": 1.0, "n_fps": 300, "tile": 4}
    ck = {}
    for name, seed in (("a0", 1), ("a1", 2), ("b0", 3), ("b1", 4)):
        ck[name] = tmp_path / f"{name}.pt"
        make_random_checkpoint(ck[name], seed=seed, sampling=samp)
    doc = tmp_path / "exp.md"
    doc.write_text(f"intro\n{cmp.DOC_BEGIN}\nold\n{cmp.DOC_END}\nafter\n")
    out = tmp_path / "cmp"
    argv = ["--data", str(data), "--sequence", "08", "--every", "1", "--limit", "1",
            "--group", f"a={ck['a0']},{ck['a1']}", "--group", f"b={ck['b0']},{ck['b1']}",
            "--rows", "student1w1local", "--out", str(out), "--threads", "1", "--no-progress", "--doc", str(doc)]
    assert cmp.main(argv) == 0
    res = json.loads((out / "compare.json").read_text())
    row = res["rows"]["student 1 steps, w=1, local solver + refine"]
    cds = {}
    for label in ("a", "b"):
        per = []
        for i in range(2):
            s = json.loads((out / label / str(i) / "seed0" / "08" / "student1w1local_refine" / "summary.json").read_text())
            assert s["frames"] == 1
            per.append(s["cd"]["mean"])
        cds[label] = per
        g = row["groups"][label]
        assert [x["cd"] for x in g["students"]] == pytest.approx(per)
        assert g["cd"]["mean"] == pytest.approx(np.mean(per))
        assert g["cd"]["std"] == pytest.approx(np.std(per, ddof=1))
    assert cds["a"][0] != cds["a"][1]                     # different weights, different completions
    c = res["comparisons"]["student 1 steps, w=1, local solver + refine"]["b"]
    assert c["diff"] == pytest.approx(np.mean(cds["b"]) - np.mean(cds["a"]))
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
    assert f"{np.mean(cds['b']) - np.mean(cds['a']):+.4f} m of CD" in text
    need = cmp.seeds_needed(c["diff"], np.std(cds["a"], ddof=1), np.std(cds["b"], ddof=1))
    assert c["seeds_needed"] == need and f"would need about {need} students per group" in text
    assert "--group" in text and "--table-only" not in text
    # rebuilt from the runs alone: the same result
    before = (out / "compare.md").read_text()
    assert cmp.main([a for a in argv if a != str(doc) and a != "--doc"] + ["--table-only"]) == 0
    assert (out / "compare.md").read_text() == before
    # the same folders under other students (a group's files reordered): refused, not misattributed
    swapped = [f"a={ck['a1']},{ck['a0']}" if a == f"a={ck['a0']},{ck['a1']}" else a for a in argv]
    with pytest.raises(SystemExit, match="holds the evaluation of"):
        cmp.main([a for a in swapped if a != str(doc) and a != "--doc"] + ["--table-only"])
    # a second block of the same page, by name; the first stays as it is
    begin2, end2 = cmp.doc_markers("second")
    doc.write_text(text + f"{begin2}\nold2\n{end2}\n")
    assert cmp.main(argv + ["--table-only", "--doc-block", "second"]) == 0
    again = doc.read_text()
    assert again.startswith(text) and "old2" not in again and again.count("m of CD") == 2 * text.count("m of CD")
    with pytest.raises(SystemExit, match="has no block"):
        cmp.main(argv + ["--table-only", "--doc-block", "third"])
