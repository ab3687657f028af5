"""The K-candidate farthest-point sampling of the device kernel (fps_rounds_kernel), modelled in
NumPy by benchmarks/fps_rounds.py: with many programs sharing a cloud - which the interpreter
cannot run, since its programs run one after another - the rounds take the textbook loop's
samples, in fewer exchanges."""
import numpy as np
import pytest

from scripts_support import load_script

fr = load_script("benchmarks/fps_rounds.py")


def _scan(n, seed=0):
    g = np.random.default_rng(seed)
    r, a = g.uniform(4, 40, n), g.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(a), r * np.sin(a), g.normal(-1.6, 0.4, n)], 1).astype(np.float32)


@pytest.mark.parametrize("programs,candidates", [(1, 2), (5, 1), (33, 2), (33, 8), (400, 8)])
def test_rounds_take_the_textbook_samples(programs, candidates):
    """Any split (one program; 91 points per program; 400 programs of 7 or 8 points, fewer than
    the K + 1 = 9 keys each offers) and any K."""
    cloud = _scan(3000)
    idx, per_round = fr.rounds_model(cloud, 400, programs, candidates)
    assert np.array_equal(idx, fr.textbook(cloud, 400))
    assert sum(per_round) == 399 and min(per_round) >= 1


@pytest.mark.parametrize("programs", [3, 16])
def test_rounds_break_ties_and_repeat_points_as_the_textbook_loop(programs):
    r = np.arange(-3, 4, dtype=np.float32)
    lattice = np.stack(np.meshgrid(r, r, r[:3], indexing="ij"), -1).reshape(-1, 3)
    assert np.array_equal(fr.rounds_model(lattice, 100, programs, 2)[0], fr.textbook(lattice, 100))
    repeated = np.repeat(np.random.default_rng(2).normal(0, 1, (7, 3)).astype(np.float32), 5, axis=0)
    idx = fr.rounds_model(repeated, 20, programs, 4)[0]
    assert np.array_equal(idx, fr.textbook(repeated, 20)) and (idx[7:] == 0).all()


def test_more_candidates_take_more_samples_per_exchange():
    cloud = _scan(20_000, seed=3)
    rounds = {k: len(fr.rounds_model(cloud, 2000, 64, k)[1]) for k in (1, 2, 8)}
    assert rounds[8] < rounds[2] < rounds[1] < 1999 / 3, rounds


def test_the_script_counts_exchanges_and_checks_them(tmp_path, capsys):
    scan = np.concatenate([_scan(5000, seed=4), np.ones((5000, 1), np.float32)], 1)
    scan.tofile(tmp_path / "000000.bin")
    assert fr.main(["--scan", str(tmp_path / "000000.bin"), "--samples", "300", "--programs", "16",
                    "--candidates", "1", "4", "--order", "azimuth", "--check"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("same_as_textbook=True" in line for line in lines)
    assert "candidates=4 order=azimuth: exchanges=" in lines[1] and "(one sample each: 299)" in lines[1]
    with pytest.raises(SystemExit):
        fr.main(["--candidates", "3"])
