"""training/logs.py RunLogger: what the progress bar shows and what metrics.jsonl keeps."""
import json
import math

from training.logs import RunLogger


def test_progress_bar_hides_placeholders_but_the_log_keeps_them(tmp_path):
    log = RunLogger(tmp_path, enabled=True, tensorboard=False, progress=True, total_steps=3, desc="distill")
    try:
        # the distillation's auxiliary-only warm-up: no student update, its loss is a NaN placeholder
        warm = {"loss/aux_w": 0.9243, "loss/aux_l": 0.7285, "loss/student": float("nan")}
        log.scalars(1, warm)
        log.progress(1, warm)
        assert log.bar.postfix == "loss/aux_w=0.9243, loss/aux_l=0.7285"
        # once the student trains, its loss appears (negative values included)
        log.progress(1, {"loss/aux_w": 0.81, "loss/student": -0.2227, "loss": float("inf")})
        assert log.bar.postfix == "loss/aux_w=0.81, loss/student=-0.2227"
        assert log.bar.n == 2
    finally:
        log.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 1 and rec["loss/aux_w"] == 0.9243
    assert rec["loss/student"] == "nan" and math.isnan(float(rec["loss/student"]))
