"""Checkpoints: our format round trip, published Lightning layouts, and every error path."""
import json

import pytest
import torch

from lidar_completion.checkpoints import (detect_layout, load_checkpoint, make_random_checkpoint,
                                          read_state_dicts, save_checkpoint, split_prefixed)
from lidar_completion.errors import CheckpointError
from lidar_completion.models import ConditionEncoder, Denoiser, ModelConfig, Refiner
from lidiff_reference import FIXTURES, synth_param

REF = json.loads((FIXTURES / "lidiff_state_dicts.json").read_text())["networks"]
LISTS = {"encoder": REF["condition_encoder"]["state_dict"], "denoiser": REF["denoiser"]["state_dict"],
         "refiner": REF["refiner"]["state_dict"]}


def lightning_file(path, parts: dict, extra=None):
    """A Lightning-style file whose state_dict has the reference names/shapes under the given
    prefixes ({prefix: "encoder"|"denoiser"|"refiner"}), filled with the deterministic weight rule."""
    sd = {}
    for prefix, role in parts.items():
        for name, shape, _ in LISTS[role]:
            sd[prefix + name] = torch.from_numpy(synth_param(prefix + name, shape))
    obj = {"state_dict": sd, "epoch": 3, "global_step": 1234, "hyper_parameters": {"lr": 1e-4}}
    if extra:
        obj.update(extra)
    torch.save(obj, path)
    return sd


def _points(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g) * torch.tensor([10.0, 10.0, 1.0])


def test_round_trip_our_format(tmp_path):
    cfg = ModelConfig.tiny()
    torch.manual_seed(1)
    enc, den, ref = ConditionEncoder(cfg, "torch"), Denoiser(cfg, "torch"), Refiner(cfg, "torch")
    digest = save_checkpoint(tmp_path / "m.pt", {"encoder": enc, "denoiser": den, "refiner": ref}, cfg,
                             sampling={"steps": 4, "guidance": 2.0}, kind="teacher", meta={"note": "x"})
    loaded = load_checkpoint(tmp_path / "m.pt", backend="torch")
    assert loaded.content_hash == digest and loaded.kind == "teacher"
    assert loaded.config == cfg and loaded.sampling == {"steps": 4, "guidance": 2.0}
    assert loaded.meta["note"] == "x"
    for a, b in ((enc, loaded.encoder), (den, loaded.denoiser), (ref, loaded.refiner)):
        for (k1, v1), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2)
    x = _points()
    with torch.no_grad():
        enc.eval(), den.eval()
        c1, c2 = enc(x), loaded.encoder(x)
        assert torch.equal(c1.feats, c2.feats)
        assert torch.equal(den(x, None, torch.tensor([3]), c1), loaded.denoiser(x, None, torch.tensor([3]), c2))


def test_half_precision_storage(tmp_path):
    make_random_checkpoint(tmp_path / "a.pt")
    a = load_checkpoint(tmp_path / "a.pt")
    save_checkpoint(tmp_path / "h.pt", {"encoder": a.encoder, "denoiser": a.denoiser}, a.config, half=True)
    h = load_checkpoint(tmp_path / "h.pt")
    assert h.refiner is None
    w1, w2 = a.denoiser.stem[0].kernel, h.denoiser.stem[0].kernel
    assert w2.dtype == torch.float32 and torch.allclose(w1, w2, rtol=1e-3, atol=1e-4)
    assert (tmp_path / "h.pt").stat().st_size < 0.6 * (tmp_path / "a.pt").stat().st_size


@pytest.mark.parametrize("layout,parts,roles", [
    ("lidiff", {"partial_enc.": "encoder", "model.": "denoiser"}, {"encoder", "denoiser"}),
    ("lidiff_refiner", {"model_refine.": "refiner"}, {"refiner"}),
    ("student", {"partial_enc.": "encoder", "generator.": "denoiser", "teacher.": "denoiser",
                 "auxDiffBetter.": "denoiser", "auxDiffWorse.": "denoiser"}, {"encoder", "denoiser"}),
    ("dpo_teacher", {"DM_encoder.": "encoder", "DiffModel.": "denoiser"}, {"encoder", "denoiser"}),
])
def test_published_layouts(tmp_path, layout, parts, roles):
    sd = lightning_file(tmp_path / "x.ckpt", parts)
    assert detect_layout(sd) == layout
    kind, got, cfg, sampling, meta, _ = read_state_dicts(tmp_path / "x.ckpt")
    assert kind == layout and set(got) == roles and cfg == ModelConfig.full()
    assert meta["global_step"] == 1234
    if layout == "lidiff_refiner":
        return  # building the full refiner is covered by the refiner-pair test below
    loaded = load_checkpoint(tmp_path / "x.ckpt", backend="torch")
    enc_prefix = [p for p, r in parts.items() if r == "encoder"][0]
    den_prefix = [p for p, r in parts.items() if r == "denoiser"][0]
    for prefix, net in ((enc_prefix, loaded.encoder), (den_prefix, loaded.denoiser)):
        for k, v in net.state_dict().items():
            assert torch.equal(v, sd[prefix + k]), k
    if layout == "student":
        assert loaded.extras == {}
        with_teacher = load_checkpoint(tmp_path / "x.ckpt", backend="torch", include=("teacher",))
        assert torch.equal(with_teacher.extras["teacher"].last[2].weight, sd["teacher.last.2.weight"])


def test_lidiff_pair_with_refiner_file(tmp_path):
    lightning_file(tmp_path / "diff_net.ckpt", {"partial_enc.": "encoder", "model.": "denoiser"})
    sd = lightning_file(tmp_path / "refine_net.ckpt", {"model_refine.": "refiner"})
    loaded = load_checkpoint(tmp_path / "diff_net.ckpt", refiner_path=tmp_path / "refine_net.ckpt")
    assert loaded.refiner is not None and loaded.sampling["guidance"] == 6.0
    assert torch.equal(loaded.refiner.last[2].bias, sd["model_refine.last.2.bias"])


def test_key_mapping_is_prefix_split():
    sd = {"model.a.b": 1, "partial_enc.c": 2, "model_refine.d": 3}
    assert split_prefixed(sd, "model.") == {"a.b": 1}
    assert split_prefixed(sd, "model_refine.") == {"d": 3}


def test_error_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_error_truncated_file(tmp_path):
    make_random_checkpoint(tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "t.pt")
    (tmp_path / "g.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "g.pt")


def test_error_modified_content(tmp_path):
    make_random_checkpoint(tmp_path / "a.pt")
    obj = torch.load(tmp_path / "a.pt", weights_only=True)
    obj["state_dicts"]["denoiser"]["last.2.bias"] += 1.0
    torch.save(obj, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(tmp_path / "b.pt")
    del obj["content_hash"]                   # no hash at all: said so, not "mismatch (file None)"
    torch.save(obj, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="field 'content_hash' missing"):
        load_checkpoint(tmp_path / "c.pt")


def test_non_finite_weights_are_refused_at_save_and_at_load(tmp_path):
    """A network with NaN / inf weights makes every completion non-finite (the node then refused
    every scan one by one): save_checkpoint refuses to write it, and a file that holds such weights
    (a published Lightning file, or ours re-hashed by hand) is refused at load naming the tensor."""
    cfg = ModelConfig.tiny()
    den = Denoiser(cfg, "torch")
    with torch.no_grad():
        den.last[2].bias[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"not saving .*bad\.pt: the denoiser network has non-finite "
                                              r"values \(NaN/inf\) in last\.2\.bias \(1 of \d+\)"):
        save_checkpoint(tmp_path / "bad.pt", {"denoiser": den}, cfg)
    assert not (tmp_path / "bad.pt").exists()
    with torch.no_grad():                          # finite in float32, inf in float16
        den.last[2].bias[0] = 1e6
    with pytest.raises(CheckpointError, match="after the float16 conversion"):
        save_checkpoint(tmp_path / "half.pt", {"denoiser": den}, cfg, half=True)
    save_checkpoint(tmp_path / "full.pt", {"denoiser": den}, cfg)   # float32 holds it

    sd = lightning_file(tmp_path / "nan.ckpt", {"model.": "denoiser", "partial_enc.": "encoder"})
    name = next(k for k in sd if k.startswith("model.") and sd[k].is_floating_point() and sd[k].numel() > 1)
    sd[name].view(-1)[1] = float("inf")
    torch.save({"state_dict": sd}, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=rf"nan\.ckpt: the denoiser weights hold non-finite values "
                                              rf"\(NaN/inf\) in {name[len('model.'):]} \(1 of"):
        load_checkpoint(tmp_path / "nan.ckpt")


def test_error_wrong_prefix_names_the_prefixes(tmp_path):
    lightning_file(tmp_path / "x.ckpt", {"net.": "denoiser"})
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout.*net\\."):
        load_checkpoint(tmp_path / "x.ckpt")


def test_error_missing_and_misshaped_keys(tmp_path):
    sd = lightning_file(tmp_path / "x.ckpt", {"partial_enc.": "encoder", "model.": "denoiser"})
    del sd["model.up4.1.1.net.3.kernel"]
    sd["model.last.0.weight"] = torch.zeros(20, 95)
    sd["model.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.ckpt")
    msg = str(info.value)
    assert "1 missing: up4.1.1.net.3.kernel" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "last.0.weight: file (20, 95) vs network (20, 96)" in msg


class Opaque:
    """An arbitrary Python object: not loadable with weights_only=True."""


def _pickled_lightning(tmp_path):
    """A LiDiff-layout file whose hyper-parameters are an arbitrary pickled object."""
    make_random_checkpoint(tmp_path / "a.pt")
    obj = torch.load(tmp_path / "a.pt", weights_only=True)
    sd = {"partial_enc." + k: v for k, v in obj["state_dicts"]["encoder"].items()}
    sd.update({"model." + k: v for k, v in obj["state_dicts"]["denoiser"].items()})
    torch.save({"state_dict": sd, "hyper_parameters": Opaque()}, tmp_path / "p.ckpt")
    return tmp_path / "p.ckpt"


def test_error_unsafe_pickle_refused_then_allowed(tmp_path):
    _pickled_lightning(tmp_path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(tmp_path / "p.ckpt")
    loaded = load_checkpoint(tmp_path / "p.ckpt", allow_pickle=True)
    assert loaded.config == ModelConfig.tiny() and loaded.kind == "lidiff"


def test_error_asking_for_absent_network(tmp_path):
    lightning_file(tmp_path / "x.ckpt", {"partial_enc.": "encoder", "model.": "denoiser"})
    with pytest.raises(CheckpointError, match="no 'teacher.' keys"):
        read_state_dicts(tmp_path / "x.ckpt", include=("teacher",))


def test_complete_cli_with_published_pair(tmp_path):
    """A LiDiff-layout pair (diff_net.ckpt + refine_net.ckpt) runs through `lidar-completion complete`
    with --refiner-checkpoint: 6 refined points per post-processed point."""
    import numpy as np

    from lidar_completion.cli import main

    make_random_checkpoint(tmp_path / "ours.pt", sampling={"steps": 1, "guidance": 3.5, "n_fps": 200, "tile": 2})
    obj = torch.load(tmp_path / "ours.pt", weights_only=True)["state_dicts"]
    diff = {"partial_enc." + k: v for k, v in obj["encoder"].items()}
    diff.update({"model." + k: v for k, v in obj["denoiser"].items()})
    torch.save({"state_dict": diff}, tmp_path / "diff_net.ckpt")
    torch.save({"state_dict": {"model_refine." + k: v for k, v in obj["refiner"].items()}},
               tmp_path / "refine_net.ckpt")
    g = np.random.default_rng(0)
    scan = np.concatenate([g.uniform(-20, 20, (3000, 2)), g.normal(-1.5, 0.2, (3000, 1)),
                           np.zeros((3000, 1))], 1).astype(np.float32)
    scan.tofile(tmp_path / "scan.bin")
    rc = main(["complete", str(tmp_path / "scan.bin"), "-o", str(tmp_path / "out.npy"),
               "--checkpoint", str(tmp_path / "diff_net.ckpt"),
               "--refiner-checkpoint", str(tmp_path / "refine_net.ckpt"),
               "--steps", "1", "--n-fps", "200", "--tile", "2", "--seed", "0", "--backend", "torch"])
    assert rc == 0
    out = np.load(tmp_path / "out.npy")
    assert out.shape[1] == 3 and len(out) % 6 == 0 and len(out) > 0
    rc = main(["complete", str(tmp_path / "scan.bin"), "-o", str(tmp_path / "x.npy"),
               "--checkpoint", str(tmp_path / "refine_net.ckpt")])
    assert rc == 1  # a refiner-only file cannot complete: a clear error, not a crash


def test_a_file_that_is_no_checkpoint_at_all_is_not_called_pickled(tmp_path):
    """Random bytes or text used to get the advice to trust the file's pickled objects (random
    bytes) or a bare "101" (text): neither is a checkpoint, and the message says so."""
    import os

    (tmp_path / "random.pt").write_bytes(os.urandom(4096).replace(b"\x80", b"\x00"))
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    for name in ("random.pt", "text.pt"):
        with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as e:
            load_checkpoint(tmp_path / name)
        assert "trust" not in str(e.value)
    legacy = tmp_path / "legacy.pt"      # torch.save's pre-1.6 format still gets through to torch.load
    torch.save({"state_dict": {}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(legacy)
    assert "not a PyTorch checkpoint" not in str(e.value)


def _tiny_parts(tmp_path):
    """The encoder / denoiser / refiner state dicts of a tiny random checkpoint (fast to build)."""
    make_random_checkpoint(tmp_path / "ours.pt")
    return torch.load(tmp_path / "ours.pt", weights_only=True)["state_dicts"]


def _save_lightning(path, parts: dict):
    """A Lightning-style file from {prefix: state dict}."""
    torch.save({"state_dict": {p + k: v for p, sd in parts.items() for k, v in sd.items()}}, path)
    return path


def test_a_mismatched_refiner_file_is_named_not_the_main_checkpoint(tmp_path):
    obj = _tiny_parts(tmp_path)
    diff = _save_lightning(tmp_path / "diff_net.ckpt",
                           {"partial_enc.": obj["encoder"], "model.": obj["denoiser"]})
    refine = {k: v for k, v in obj["refiner"].items() if k != "last.2.bias"}
    refine_file = _save_lightning(tmp_path / "refine_missing.ckpt", {"model_refine.": refine})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(diff, backend="torch", refiner_path=refine_file)
    msg = str(info.value)
    assert msg.startswith(f"{refine_file}: the refiner weights do not match")
    assert "1 missing: last.2.bias" in msg
    assert str(diff) not in msg
    # a mismatch in the main file is still blamed on the main file
    bad = dict(obj["denoiser"])
    del bad["last.2.bias"]
    _save_lightning(diff, {"partial_enc.": obj["encoder"], "model.": bad})
    good_refiner = _save_lightning(tmp_path / "refine_net.ckpt", {"model_refine.": obj["refiner"]})
    with pytest.raises(CheckpointError, match=f"^{diff}: the denoiser weights do not match"):
        load_checkpoint(diff, backend="torch", refiner_path=good_refiner)


def test_misnamed_published_keys_name_the_file_the_layout_and_the_keys_found(tmp_path):
    obj = _tiny_parts(tmp_path)
    renamed = {k.replace("stem.", "conv0.", 1) if k.startswith("stem.") else k: v
               for k, v in obj["denoiser"].items()}
    path = _save_lightning(tmp_path / "renamed.ckpt", {"partial_enc.": obj["encoder"], "model.": renamed})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, backend="torch")
    msg = str(info.value)
    assert msg.startswith(f"{path}: lidiff layout: ")
    assert "key 'stem.0.kernel' missing under 'model.'" in msg
    assert "model.conv0.0.kernel" in msg and "modules: conv0, " in msg


def test_a_lightning_file_with_model_refine_keys_gives_its_refiner_only_when_named(tmp_path):
    obj = _tiny_parts(tmp_path)
    path = _save_lightning(tmp_path / "student_with_refine.ckpt",
                           {"partial_enc.": obj["encoder"], "generator.": obj["denoiser"],
                            "model_refine.": obj["refiner"]})
    kind, roles, _, _, meta, _ = read_state_dicts(path)
    assert kind == "student" and set(roles) == {"encoder", "denoiser"}
    assert meta["not_loaded"] == ["model_refine."]
    assert load_checkpoint(path, backend="torch").refiner is None
    loaded = load_checkpoint(path, backend="torch", refiner_path=path)
    assert torch.equal(loaded.refiner.last[2].bias, obj["refiner"]["last.2.bias"])
    plain = _save_lightning(tmp_path / "student.ckpt",
                            {"partial_enc.": obj["encoder"], "generator.": obj["denoiser"]})
    assert read_state_dicts(plain)[4]["not_loaded"] == []
    with pytest.raises(CheckpointError, match="holds no refiner network"):
        load_checkpoint(path, backend="torch", refiner_path=plain)


@pytest.mark.parametrize("layout,parts", [
    ("lidiff", {"partial_enc.": "encoder", "model.": "denoiser"}),
    ("dpo_teacher", {"DM_encoder.": "encoder", "DiffModel.": "denoiser"}),
    ("student", {"partial_enc.": "encoder", "generator.": "denoiser"}),
])
def test_guidance_help_states_what_a_published_file_is_sampled_with(tmp_path, layout, parts):
    from lidar_completion.settings import BY_NAME, checkpoint_fallback

    lightning_file(tmp_path / "x.ckpt", parts)
    guidance = read_state_dicts(tmp_path / "x.ckpt")[3]["guidance"]
    help_text = BY_NAME["guidance"].help
    rule = "a file that names none gets 6 when it is a published LiDiff or Distillation-DPO teacher file"
    assert rule in help_text and help_text.endswith(", else the fallback)")
    assert guidance == (6.0 if layout != "student" else checkpoint_fallback("guidance"))


def test_a_training_state_is_named_as_one(tmp_path):
    """A trainer's step_N.ckpt given as a model was "not a PyTorch checkpoint ... a wrong file, or a
    damaged one", although the trainer itself recognises it (whole or in parts)."""
    from training.checkpoint import MAGIC, PARTS_MAGIC, save_state
    save_state(tmp_path / "step_000000005.ckpt", {"kind": "teacher", "step": 5})
    assert (tmp_path / "step_000000005.ckpt").read_bytes().startswith(MAGIC)
    with pytest.raises(CheckpointError, match=r"is a training state of lidar-completion-train .*"
                                              r"<run folder>/<kind>\.pt"):
        load_checkpoint(tmp_path / "step_000000005.ckpt")
    (tmp_path / "parts.ckpt").write_bytes(PARTS_MAGIC + b"x\n")
    with pytest.raises(CheckpointError, match="is a training state"):
        load_checkpoint(tmp_path / "parts.ckpt")


def test_a_kernel_of_the_wrong_rank_is_an_error_naming_the_file_and_key(tmp_path):
    obj = _tiny_parts(tmp_path)
    for key, value, expect in (("stem.0.kernel", torch.zeros(27, 8), r"stem\.0\.kernel has shape \(27, 8\)"),
                               ("stage1.1.net.0.kernel", torch.zeros(()), r"stage1\.1\.net\.0\.kernel has shape \(\)"),
                               ("up1.0.net.0.kernel", torch.zeros(8, 32, 0), r"up1\.0\.net\.0\.kernel has shape \(8, 32, 0\)")):
        den = dict(obj["denoiser"], **{key: value})
        enc = dict(obj["encoder"], **({key: value} if key in obj["encoder"] else {}))   # both alike
        path = _save_lightning(tmp_path / "bad.ckpt", {"partial_enc.": enc, "model.": den})
        with pytest.raises(CheckpointError, match=f"^{path}: lidiff layout: .*{expect}, expected 3 positive"):
            load_checkpoint(path, backend="torch")
    # from the command line: one line, no traceback
    from lidar_completion.cli import main
    scan = tmp_path / "scan.npy"
    import numpy as np
    np.save(scan, np.random.default_rng(0).normal(size=(500, 3)) * [10, 10, 1])
    assert main(["complete", str(scan), "-o", str(tmp_path / "o.npy"), "--checkpoint", str(path)]) == 1


def test_encoder_and_denoiser_widths_that_disagree_name_both_keys(tmp_path):
    obj = _tiny_parts(tmp_path)
    key = "stage3.1.net.0.kernel"
    k, cin, cout = obj["denoiser"][key].shape
    den = dict(obj["denoiser"], **{key: torch.zeros(k, cin, cout - 4)})
    path = _save_lightning(tmp_path / "bad.ckpt", {"partial_enc.": obj["encoder"], "model.": den})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, backend="torch")
    msg = str(info.value)
    assert msg.startswith(f"{path}: partial_enc.{key} has shape ({k}, {cin}, {cout}) but model.{key} has "
                          f"({k}, {cin}, {cout - 4})")
    assert "encoder weights do not match" not in msg       # the intact encoder is not blamed


def test_a_layout_error_names_the_file(tmp_path):
    obj = _tiny_parts(tmp_path)
    main_file = _save_lightning(tmp_path / "diff_net.ckpt", {"partial_enc.": obj["encoder"], "model.": obj["denoiser"]})
    ddp = _save_lightning(tmp_path / "ddp.ckpt", {"module.model_refine.": obj["refiner"]})
    with pytest.raises(CheckpointError, match=f"^{ddp}: unrecognised checkpoint layout: .*module\\."):
        load_checkpoint(main_file, backend="torch", refiner_path=ddp)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_weights_of_a_non_float_dtype_are_refused(tmp_path, dtype):
    obj = _tiny_parts(tmp_path)
    den = dict(obj["denoiser"])
    den["last.2.weight"] = den["last.2.weight"].to(dtype)
    path = _save_lightning(tmp_path / "bad.ckpt", {"partial_enc.": obj["encoder"], "model.": den})
    name = str(dtype).replace("torch.", "")
    with pytest.raises(CheckpointError, match=f"^{path}: the denoiser weights hold {name} tensors where the "
                                              r"network has float32 ones \(last\.2\.weight\)"):
        load_checkpoint(path, backend="torch")


def test_an_integer_buffer_of_another_integer_type_loads(tmp_path):
    obj = _tiny_parts(tmp_path)
    den = {k: (v.to(torch.int32) if k.endswith("num_batches_tracked") else v) for k, v in obj["denoiser"].items()}
    assert any(k.endswith("num_batches_tracked") for k in den)
    path = _save_lightning(tmp_path / "int32.ckpt", {"partial_enc.": obj["encoder"], "model.": den})
    assert load_checkpoint(path, backend="torch").denoiser is not None


def test_the_unsafe_pickle_message_has_no_terminal_codes(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_pickled_lightning(tmp_path))
    assert "\x1b[" not in str(info.value) and "pickled Python objects" in str(info.value)
