"""scripts/research/weight_average.py: soups of students and steps along their mean displacement,
on small checkpoints whose answers are known; broken inputs are named."""
import json

import pytest
import torch
from scripts_support import load_script

from lidar_completion.checkpoints import load_checkpoint, make_random_checkpoint, save_checkpoint
from lidar_completion.models import ModelConfig


def _students(tmp_path, n=2, half_teacher=False):
    """A teacher (random weights) and n students: the teacher's checkpoint with the denoiser's floating
    tensors moved by k * d (k = 1..n) for one fixed displacement d, and one more moved by -d."""
    teacher = make_random_checkpoint(tmp_path / "teacher.pt", seed=3)
    obj = torch.load(teacher, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    d = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in obj["state_dicts"]["denoiser"].items()
         if v.is_floating_point()}
    cfg = ModelConfig.from_dict(obj["config"])
    paths = []
    for k in list(range(1, n + 1)) + [-1]:
        sds = {r: dict(sd) for r, sd in obj["state_dicts"].items()}
        sds["denoiser"] = {name: (v + k * d[name] if name in d else v) for name, v in sds["denoiser"].items()}
        p = tmp_path / f"student_{k}.pt"
        save_checkpoint(p, sds, cfg, sampling=obj["sampling"], kind="student")
        paths.append(p)
    if half_teacher:
        save_checkpoint(teacher, obj["state_dicts"], cfg, sampling=obj["sampling"], kind="teacher", half=True)
    return teacher, paths, d, obj


def test_soup_and_scales_are_the_mean_and_the_line_through_it(tmp_path, capsys):
    wa = load_script("scripts/research/weight_average.py")
    teacher, (s1, s2, sm), d, obj = _students(tmp_path)
    out = tmp_path / "out"
    assert wa.main(["--teacher", str(teacher), "--student", str(s1), "--student", str(s2),
                    "--scale", "0,1,2", "--out", str(out)]) == 0
    t = obj["state_dicts"]["denoiser"]
    for a, k in ((0, 0.0), (1, 1.5), (2, 3.0)):  # the soup of 1d and 2d is 1.5d
        got = torch.load(out / f"scale_{a}.pt", weights_only=True)["state_dicts"]["denoiser"]
        for name, v in t.items():
            want = v + k * d[name] if name in d else v
            assert torch.allclose(got[name], want, atol=1e-6), (a, name)
    # the written files load as students and keep the other networks
    loaded = load_checkpoint(out / "scale_1.pt")
    assert loaded.refiner is not None and loaded.encoder is not None
    rep = json.loads((out / "weight_average.json").read_text())
    n1 = float(torch.cat([x.reshape(-1).double() for x in d.values()]).norm())
    assert rep["displacement_norms"] == pytest.approx([n1, 2 * n1], rel=1e-5)
    assert rep["soup_displacement_norm"] == pytest.approx(1.5 * n1, rel=1e-5)
    assert rep["cosines"][0][1] == pytest.approx(1.0)
    assert rep["distances_from_soup"] == pytest.approx([0.5 * n1, 0.5 * n1], rel=1e-5)
    assert "0.000" not in capsys.readouterr().out.split("cosines")[0]


def test_opposite_students_cancel_and_their_cosine_is_minus_one(tmp_path):
    wa = load_script("scripts/research/weight_average.py")
    teacher, (s1, sm), _, obj = _students(tmp_path, n=1, half_teacher=True)
    # n=1: the students moved by +d and -d; the teacher file is float16
    out = tmp_path / "out"
    wa.main(["--teacher", str(teacher), "--student", str(s1), "--student", str(sm), "--out", str(out)])
    rep = json.loads((out / "weight_average.json").read_text())
    # measured from the float16 teacher, whose rounding (about 1e-3 of the weights) both share
    assert rep["cosines"][0][1] == pytest.approx(-1.0, abs=1e-3)
    got = torch.load(out / "scale_1.pt", weights_only=True)["state_dicts"]["denoiser"]
    for name, v in obj["state_dicts"]["denoiser"].items():
        assert got[name].dtype == v.dtype
        assert torch.allclose(got[name], v, atol=1e-6), name


def test_broken_inputs_are_named(tmp_path):
    wa = load_script("scripts/research/weight_average.py")
    teacher, (s1, s2, _), _, obj = _students(tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="checkpoint not found"):
        wa.main(["--teacher", str(teacher), "--student", str(tmp_path / "nope.pt"), "--out", out])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a PyTorch checkpoint"):
        wa.main(["--teacher", str(junk), "--student", str(s1), "--out", out])
    # a student whose refiner differs is not from the same distillation; edited without a new
    # content hash, the file is refused as modified
    other = torch.load(s2, weights_only=True)
    other["state_dicts"]["refiner"] = {k: v + 1 if v.is_floating_point() else v
                                      for k, v in other["state_dicts"]["refiner"].items()}
    torch.save(other, tmp_path / "edited.pt")
    with pytest.raises(SystemExit, match="content hash mismatch"):
        wa.main(["--teacher", str(teacher), "--student", str(s1), "--student", str(tmp_path / "edited.pt"), "--out", out])
    save_checkpoint(tmp_path / "odd.pt", other["state_dicts"], ModelConfig.from_dict(other["config"]),
                    sampling=other["sampling"], kind="student")
    with pytest.raises(SystemExit, match="its refiner differs"):
        wa.main(["--teacher", str(teacher), "--student", str(s1), "--student", str(tmp_path / "odd.pt"), "--out", out])
    # a teacher of other widths
    small = make_random_checkpoint(tmp_path / "other.pt", config=ModelConfig.scaled(16), seed=1)
    with pytest.raises(SystemExit, match="config differs"):
        wa.main(["--teacher", str(small), "--student", str(s1), "--out", out])
    with pytest.raises(SystemExit):
        wa.main(["--teacher", str(teacher), "--student", str(s1), "--scale", "1,x", "--out", out])
