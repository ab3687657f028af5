"""scripts/research/validation_curves.py: the val/* curves that training runs log, side by side, with
each run's start, best and last."""
import json
import math
from pathlib import Path

import pytest

from scripts_support import load_script
from training.logs import RunLogger


def _script():
    return load_script("scripts/research/validation_curves.py")


def _run(folder: Path, val: dict, train_steps=range(1, 31)) -> Path:
    """A run folder whose metrics.jsonl the trainers' own logger wrote: training scalars at every
    step, val/cd and val/jsd_bev at the steps of ``val``."""
    log = RunLogger(folder, enabled=True, tensorboard=False, progress=False)
    for s in sorted(set(train_steps) | set(val)):
        if s in train_steps:
            log.scalars(s, {"loss/aux": 1.0 / s, "lr": 2e-6})
        if s in val:
            log.scalars(s, {"val/cd": val[s], "val/jsd_bev": 0.4 + val[s] / 10})
    log.close()
    return folder


def test_curves_summaries_table_and_files(tmp_path):
    vc = _script()
    a = _run(tmp_path / "a", {0: 0.340, 10: 0.336, 20: 0.331, 30: 0.338})
    b = _run(tmp_path / "b", {0: 0.340, 10: 0.349, 30: 0.360})
    # a resumed run appends: step 30 logged again, the later value counts; then a half-written line
    with open(b / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "time": 1.0, "val/cd": 0.355}) + "\n")
        f.write('{"step": 31, "time": 2.0, "val/c')
    assert vc.read_curve(a, "val/cd") == {0: 0.340, 10: 0.336, 20: 0.331, 30: 0.338}
    assert vc.read_curve(b, "val/cd") == {0: 0.340, 10: 0.349, 30: 0.355}

    out = tmp_path / "out" / "curves.md"
    doc = tmp_path / "doc.md"
    doc.write_text(f"# page\n\n{vc.DOC_BEGIN}\nold\n{vc.DOC_END}\n\nafter\n")
    args = ["--run", f"early={a}", "--run", f"late={b}", "--out", str(out),
            "--plot", str(tmp_path / "curves.png"), "--doc", str(doc)]
    assert vc.main(args) == 0
    md = out.read_text()
    assert "| step | early | late |" in md
    assert "| 20 | 0.3310 | - |" in md                 # b did not validate at step 20
    assert "| early | 0.3400 (step 0) | 0.3310 (20) | 0.3380 (30) | -0.0090 | -0.0020 |" in md
    assert "| late | 0.3400 (step 0) | 0.3400 (0) | 0.3550 (30) | +0.0000 | +0.0150 |" in md
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["runs"]["early"]["summary"]["best_step"] == 20
    assert summary["runs"]["late"]["summary"]["last_minus_start"] == pytest.approx(0.015)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = doc.read_text()
    assert "old" not in text and md.strip() in text and text.endswith(f"{vc.DOC_END}\n\nafter\n")
    assert "python scripts/research/validation_curves.py --run early=" in text

    # another metric, and one where higher is better
    assert vc.read_curve(a, "val/jsd_bev")[20] == pytest.approx(0.4331)
    best = vc.summarise({0: 0.2, 10: 0.5, 20: 0.4}, lower_is_better=False)
    assert best["best_step"] == 10 and best["last_minus_start"] == pytest.approx(0.2)
    nan_first = vc.summarise({0: math.nan, 10: 0.3, 20: 0.2})
    assert nan_first["best_step"] == 20 and math.isnan(nan_first["best_minus_start"])


def test_bad_input_is_named(tmp_path, capsys):
    vc = _script()
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        vc.main(["--run", f"x={tmp_path / 'missing'}"])
    plain = _run(tmp_path / "plain", {})
    with pytest.raises(SystemExit, match="no val/cd logged"):
        vc.main(["--run", f"x={plain}"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 0, "val/cd": 0.3}\nnot json\n{"step": 10, "val/cd": 0.2}\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a JSON line"):
        vc.main(["--run", f"x={broken}"])
    for argv in ([], ["--run", "nolabel"], ["--run", f"x={plain}", "--run", f"x={plain}"]):
        with pytest.raises(SystemExit) as e:
            vc.main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "give at least one --run" in err and "expected LABEL=DIR" in err and "given twice" in err
