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


def test_the_bar_shows_the_values_of_the_step_it_counts(tmp_path):
    """update() drew the bar before set_postfix(refresh=False) changed it: every drawn line showed
    the previous step's loss."""
    import io
    log = RunLogger(tmp_path, enabled=True, tensorboard=False, progress=True, total_steps=3, desc="t")
    try:
        log.bar.close()
        from tqdm import tqdm
        stream = io.StringIO()
        log.bar = tqdm(total=3, file=stream, mininterval=0, miniters=1, ascii=True)
        log.progress(1, {"loss": 1.25})
        log.progress(1, {"loss": 0.75})
        drawn = stream.getvalue().split("\r")[-1]
        assert "2/3" in drawn and "loss=0.75" in drawn, stream.getvalue()
    finally:
        log.close()


def test_a_resumed_runs_time_goes_on_from_its_last_record(tmp_path):
    """metrics.jsonl's time restarted at 0 on resume: a run's curve against time folded back."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 40.0}\n{"step": 2, "time": 80.5}\n'
                                            '{"step": 3, "time": 120.0}\n')
    log = RunLogger(tmp_path, enabled=True, tensorboard=False, progress=False, initial_step=2)
    log.scalars(3, {"loss": 1.0})
    log.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert 80.5 <= recs[-1]["time"] < 100


def test_a_fresh_run_moves_an_earlier_runs_best_weights_aside_with_its_logs(tmp_path):
    """The logs of an earlier run without checkpoints were moved to earlier/, its best/ stayed
    beside the new run's export (and a release script takes best/<kind>.pt first)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 1.0}\n')
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "teacher.pt").write_bytes(b"other run")
    (tmp_path / "best" / "validation.json").write_text('{"step": 1, "select": "cd", "value": 1.0}')
    RunLogger(tmp_path, enabled=True, tensorboard=False, progress=False).close()
    assert not (tmp_path / "best").exists()
    moved = list((tmp_path / "earlier").glob("*/best/teacher.pt"))
    assert len(moved) == 1 and moved[0].read_bytes() == b"other run"
    assert moved[0].parent.parent == next((tmp_path / "earlier").glob("*/metrics.jsonl")).parent
