"""benchmarks/training_work.py counts the multiply-adds of a Triton training step from its plans:
the counts must agree with each other and with what the listed-pairs weight gradient saves."""
from __future__ import annotations

import re

import pytest

from scripts_support import load_script


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import io
    from contextlib import redirect_stdout
    mod = load_script("benchmarks/training_work.py")
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert mod.main(["--widths", "tiny", "--points", "12000", "--t", "10,900",
                         "--data", str(tmp_path_factory.mktemp("data"))]) == 0
    return buf.getvalue()


def test_counts_agree_and_the_listed_pairs_visit_fewer(run):
    rows = [line.split() for line in run.splitlines() if re.match(r"^\s*\d+\s+\d", line)]
    assert [int(r[0]) for r in rows] == [10, 900]
    for r in rows:
        fwd_u, fwd_v, in_u, in_v, w_u, w_d, ratio = map(float, r[1:])
        # every convolution's existing pairs, counted from its plan in the forward pass and in its
        # weight gradient; the input gradients skip only the first layer (no gradient to its input)
        assert fwd_u == pytest.approx(w_u, rel=1e-3)
        assert 0.9 * fwd_u <= in_u <= fwd_u
        # tiles visit at least the useful pairs; a loop over every row of every offset visits more
        assert fwd_v >= fwd_u and in_v >= in_u
        assert w_d > 1.5 * w_u and ratio == pytest.approx(w_d / w_u, rel=0.01)
    # noisier points fill space: more occupied voxels, more pairs
    assert float(rows[1][1]) > float(rows[0][1])
    assert "with the listed pairs" in run


def test_the_library_is_restored(run):
    from lidar_completion.sparse import conv_implicit_gemm as igemm
    from lidar_completion.sparse import triton_backend
    assert igemm.implicit_gemm.__module__ == igemm.__name__
    assert igemm.weight_gradient.__module__ == igemm.__name__
    assert triton_backend.TritonEngine.__dict__["maps"].__class__ is property
    assert triton_backend._ImplicitGemmConv.backward.__qualname__ == "_ImplicitGemmConv.backward"


@pytest.mark.slow
def test_wgrad_tiles_runs_under_the_interpreter(tmp_path, monkeypatch):
    """benchmarks/wgrad_tiles.py end to end on the CPU (Triton interpreter, tiny widths): every
    recorded weight-gradient call is timed with the default blocks and the dense loop, the tried
    configurations agree with the default's result, and the library's function is put back."""
    import io
    import json
    from contextlib import redirect_stdout

    from lidar_completion.sparse import conv_implicit_gemm as igemm
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = load_script("benchmarks/wgrad_tiles.py")
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert mod.main(["--device", "cpu", "--widths", "tiny", "--points", "600", "--batch", "1",
                         "--precision", "fp32", "--max-configs", "1", "--budget", "1", "--reps", "1",
                         "--json", str(tmp_path / "w.json")]) == 0
    out = buf.getvalue()
    calls = int(re.search(r"# (\d+) weight-gradient calls", out).group(1))
    assert calls > 20                                   # every trained convolution of the teacher
    result = json.loads((tmp_path / "w.json").read_text())
    assert result["default_ms"] > 0 and result["dense_ms"] > 0 and result["useful_macs"] > 0
    assert result["results"] and all(r["rel_err"] < 1e-4 for r in result["results"])
    assert igemm.weight_gradient.__module__ == igemm.__name__ and igemm.weight_gradient.__name__ == "weight_gradient"
