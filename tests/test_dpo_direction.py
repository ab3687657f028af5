"""scripts/research/dpo_direction.py: with exact auxiliary networks (a Gaussian toy with closed-form
scores and the trainer's own losses), score distillation brings the student to its teacher, and
Distillation-DPO's preference term pushes it from its winners towards its losers at every step."""
import pytest
from scripts_support import load_script


@pytest.fixture(scope="module")
def toy():
    return load_script("scripts/research/dpo_direction.py")


def test_score_distillation_reaches_the_teacher(toy):
    for teacher in (2.0, 0.0):
        r = toy.run("vsd", seed=0, steps=150, teacher=teacher)
        assert r["to_teacher"] < 0.05, r


@pytest.mark.parametrize("pairs", ["scaled", "independent"])
def test_the_preference_term_points_from_the_winner_to_the_loser(toy, pairs):
    r = toy.run("dpo", seed=0, steps=60, dim=3, pairs=pairs)
    assert r["min_cos_loser"] > 0.999, r
    # alone it moves the student away from the data (mean 1) whatever the teacher
    assert r["to_data"] > 1.0 * 3 ** 0.5, r


def test_the_preference_share_moves_the_student_away_from_the_data(toy):
    """Added to score distillation (vsd_weight 1), the student ends further from the data than
    score distillation alone takes it, on independent pairs in 3-D (the table of the docs)."""
    for teacher in (2.0, 0.0):
        vsd = toy.run("vsd", seed=1, steps=200, dim=3, teacher=teacher, pairs="independent")
        both = toy.run("dpo+vsd", seed=1, steps=200, dim=3, teacher=teacher, pairs="independent")
        assert both["to_data"] > vsd["to_data"], (teacher, vsd, both)
