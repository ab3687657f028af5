"""Training configuration: YAML files merged over built-in defaults, validated, with dotted access.

A config is a nested dict. ``load_config(path, kind)`` reads the YAML file, merges it over
``DEFAULTS[kind]`` (so a file only states what differs), applies ``--set key.sub=value`` overrides and
validates the result. Unknown keys are refused (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import copy
import importlib
import os
import re
from typing import Any, Callable

import yaml

from lidar_completion.errors import ConfigError

KINDS = ("teacher", "refiner", "distill", "teacher-dpo")
RANDOM = "random"   # distill.teacher / teacher_dpo.reference: start from randomly initialised networks

_COMMON: dict = {
    "kind": None,
    "seed": 0,
    # network widths: "full" (published), "tiny" (a quarter of the widths), or {"channels": [9 ints]}
    "model": "full",
    "backend": "auto",          # sparse backend: auto | torch | triton | minkowski
    "device": "auto",           # auto (cuda:LOCAL_RANK when available, else cpu) | cpu | cuda
    "threads": 0,               # torch intra-op threads per process; 0 leaves torch's default
    "init": None,               # checkpoint to start from (our inference format or a published one)
    "data": {
        "kind": "semantickitti",  # semantickitti | synthetic | npz
        "root": None,             # dataset root (the folder holding sequences/), or the .npz file
        "sequences": ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"],
        "gt_cache": None,         # per-frame target cache folder (default <root>/gt_cache, `lidar-completion build-gt`)
        "build_gt": None,         # build missing target caches first (None: yes for synthetic data only)
        "scan_points": 18000,     # farthest-point-sampled scan size
        "tile": 10,               # x_init = scan tiled this many times
        # where the scans are farthest-point sampled: cpu (in the loader: fpsample) | device (the
        # trainer's GPU, a batch per launch, exact; Triton) | auto (device on CUDA with Triton)
        "sample_on": "auto",
        "target_points": 180000,  # target shuffled and tiled/truncated to this size
        "augment": True,
        "num_workers": 2,
        # how loader workers start: forkserver (a clean process: no inherited CUDA context, thread
        # pools or locks of the trainer) | spawn | fork; loader_timeout_s: a worker that delivers
        # no batch in this long stops the run with an error instead of a silent hang (0 = wait forever)
        "loader_start": "forkserver",
        "loader_timeout_s": 600,
        # synthetic data (data.kind = synthetic): generated into <out>/synthetic unless root is given
        "synthetic": {"sequences": ["00"], "scans": 4, "seed": 0},
        # refiner only: scans aggregated around the centre scan for the dense target
        "scan_window": 40,
        "limit": None,            # use only the first N samples (overfitting, smoke runs)
    },
    "train": {
        "batch_size": 1,          # per process
        "epochs": 1,
        "max_steps": None,        # run this many optimiser steps instead of the epochs' (fewer or more)
        "batchnorm": "train",     # train | frozen (eval-mode statistics) | sync (SyncBatchNorm, GPU DDP)
        # fp32 | bf16 | fp16: the networks' forward passes under torch.autocast with fp32 master
        # weights and optimiser state; fp16 adds loss scaling (a GradScaler per optimiser)
        "precision": "fp32",
        "grad_clip": None,        # max gradient norm, None = off
        "optimizer": {"name": "adam", "lr": 1.0e-4, "betas": [0.9, 0.999], "weight_decay": 0.0,
                      "momentum": 0.0},
        # lr = lr0 * gamma ** (epoch // every_epochs); gamma 1 = constant. decay_steps N > 0 also
        # multiplies by a per-step decay from 1 at step 0 to decay_to at step N (and after):
        # decay linear or cosine (for runs shorter than an epoch, where gamma never acts)
        "lr_schedule": {"gamma": 1.0, "every_epochs": 1, "decay_steps": 0, "decay_to": 0.0, "decay": "linear"},
    },
    # every_steps: training-state checkpoint period (0: only at the end / on a signal);
    # export: write the inference checkpoint <out>/<kind>.pt when training finishes;
    # part_mib: split each training state into files of at most this many MiB (null: one file), for
    # machines that hand back only files up to a size (a run of a few minutes on a lent GPU)
    "checkpoint": {"every_steps": 500, "keep": 3, "export": True, "part_mib": None},
    "log": {"every_steps": 10, "render_every_steps": 500, "tensorboard": True, "progress": True},
    "diffusion": {"beta_start": 3.5e-5, "beta_end": 0.007, "steps": 1000, "reg_weight": 5.0},
    # completing held-out frames during training (training/validation.py); every_steps 0: off
    "validation": {
        "every_steps": 0,
        "at_start": True,          # also validate the starting weights (step 0 of a fresh run)
        "root": None,              # SemanticKITTI-layout root with its gt_cache (None: data.root)
        # data.kind synthetic without root: a held-out drive generated into <out>/validation
        "synthetic": {"sequence": "07", "scans": 60, "seed": 2},
        "sequence": "08",          # the held-out sequence (of root)
        "every": 10,               # frames 0, every, 2 every, ... (at most `frames`)
        "frames": 3,
        "steps": 8,                # sampler steps of the teacher / student
        "guidance": None,          # None: the exported checkpoint's (teacher 6, student 3.5)
        "seed": 0,                 # frame i is completed with seed + i
        "refine": True,            # refine with the refiner (distill.refiner, validation.refiner)
        "refiner": None,           # refiner checkpoint for the teacher's validation
        "select": "cd",            # cd | jsd_bev: the metric that picks the best checkpoint
    },
}

# the ranking of a preference pair (training/preference.py); distill and teacher_dpo read these keys
_PREFERENCE: dict = {
    # cd | iou | jsd_bev | cd_unseen | composite, or a dotted path to (pred, target) -> float
    "metric": "cd",
    "metric_lower_is_better": True,    # for a dotted path (the named metrics know their direction)
    "iou_voxel": 0.5,                  # metric iou: voxel size in metres
    "unseen_radius": 1.0,              # metric cd_unseen: farther than this from every scan point
    "composite": {"cd": 1.0, "cd_unseen": 1.0, "jsd_bev": 1.0},   # metric composite: name -> weight
    "pairs_per_scan": 1,               # K candidate pairs per scan; the widest margin is kept
}

DEFAULTS: dict = {
    "teacher": {
        "teacher": {"cond_dropout": 0.1},
    },
    "refiner": {
        "refiner": {
            "jitter_sigma": 0.2, "jitter_clip": 0.3,
            "input_points": 180000,     # jittered dense input points per sample
            "target_points": 360000,    # dense target points per sample (0.1 m subsampled aggregate)
            "target_voxel": 0.1,
            # chamfer_l2sq: mean squared NN distance both ways, summed (pytorch3d's default, published);
            # chamfer_l1: 0.5 * (mean NN distance both ways), the CD of docs/method.md, "Metrics"
            "loss": "chamfer_l2sq",
        },
    },
    "distill": {
        "distill": {
            "mode": "dpo",                 # dpo | vsd
            "teacher": None,               # checkpoint of the teacher (ours or published LiDiff / D-DPO); random: random init
            "refiner": None,               # optional refiner checkpoint copied into the exported model
            "noise_scale": 1.1,            # lambda: the second sample starts from x_init + lambda z
            # dpo pairs: "scaled" (z and lambda z, published) or "independent" (z and a second draw
            # z2, times lambda): two unrelated samples, a larger winner/loser margin
            "pair_noise": "scaled",
            **_PREFERENCE,
            # the pair's second sample: guided by the student with this weight (1: unguided) and
            # made in this many steps of the deterministic local sampler (gradient through the last)
            "pair_guidance": 1.0,
            "pair_steps": 1,
            # > 0: rank the pair region by region (squares of this many metres of the ground plane):
            # winner = the mosaic of each region's better sample, loser = the rest (training/preference.py)
            "pair_regions": 0.0,
            # every spread_every_steps steps (0: never) the metric of spread_samples independent
            # one-step samples per scan, against which the pair's margin is logged
            "spread_samples": 4,
            "spread_every_steps": 0,
            "generator": "local",          # local: G = x_T - sigma_T eps; vp: x_init + (z - sigma_T eps)/alpha_T
            # 1: the one-step sample from t = 999 (published); K > 1: the x_0 prediction after k ~ U{0..K-1}
            # steps of the K-step inference solver, guided with gen_guidance (training/distill.py)
            "gen_steps": 1,
            "gen_guidance": 1.0,
            "t_min": 0, "t_max": 999,      # distillation timesteps t ~ U{t_min..t_max}
            "teacher_guidance": 1.0,       # 1 = conditional teacher score (published); w > 1 uses CFG
            "aux_loss": "lidiff",          # lidiff (MSE + 5 * regulariser) | mse (published aux loss)
            "aux_updates_per_step": 1,
            "aux_warmup_steps": 0,         # first steps train only the auxiliary network(s)
            # dpo only: the two auxiliary networks' denoising steps draw one (t', eps') for both sides
            # (common random numbers), so that what separates them is their samples, not their draws
            "aux_shared_draws": False,
            "weighting": "linear",         # linear | logsigmoid (Diffusion-DPO style weight, dpo only)
            "dpo_beta": 1.0,
            # dpo only: add vsd_weight * mean of the two sides' score-distillation losses (0 = the
            # published objective; 2 = score distillation on the winners only)
            "vsd_weight": 0.0,
            "aux_optimizer": None,         # None = same as train.optimizer
            "aux_grad_clip": "same",       # "same" = train.grad_clip
        },
    },
    "teacher-dpo": {
        # Diffusion-DPO fine-tuning of the teacher against a frozen copy of itself (training/teacher_dpo.py)
        "teacher_dpo": {
            "reference": None,             # the teacher checkpoint fine-tuned and kept as the reference
            "beta": 1000.0,                # Diffusion-DPO's beta (per-point mean squared errors)
            **_PREFERENCE,
            "pair_noise": "independent",   # independent: two draws; scaled: z and noise_scale z
            "noise_scale": 1.0,
            "sample_steps": 1,             # the reference's deterministic local sampler, these steps
            "sample_guidance": 1.0,        # ... with this guidance weight
            "t_min": 0, "t_max": 999,
            "denoise_weight": 0.0,         # + this x the teacher's own loss on the ground truth
            # > 0: rank the pair region by region (squares of this many metres of the ground plane),
            # each region a pair of its own in the loss (training/teacher_dpo.py)
            "pair_regions": 0.0,
        },
    },
}

def deep_merge(base: dict, over: dict, path: str = "", strict: bool = True) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        where = f"{path}{k}"
        if strict and k not in out:
            raise ConfigError(f"unknown config key {where!r}; expected one of {sorted(out)}")
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("model", "composite"):
            out[k] = deep_merge(out[k], v, where + ".", strict=strict)
        else:
            out[k] = copy.deepcopy(v)
    return out


def defaults(kind: str) -> dict:
    if kind not in KINDS:
        raise ConfigError(f"unknown training kind {kind!r}; expected one of {', '.join(KINDS)}")
    base = copy.deepcopy(_COMMON)
    base.update(copy.deepcopy(DEFAULTS[kind]))
    base["kind"] = kind
    return base


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override must look like key.sub=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse the value of override {text!r}: {exc}") from exc
    return key.strip().split("."), value


def apply_overrides(cfg: dict, overrides) -> dict:
    cfg = copy.deepcopy(cfg)
    for text in overrides or ():
        keys, value = parse_override(text)
        node = cfg
        for k in keys[:-1]:
            if not isinstance(node, dict) or k not in node:
                raise ConfigError(f"override {text!r}: no config section {k!r}")
            node = node[k]
        if not isinstance(node, dict) or keys[-1] not in node:
            raise ConfigError(f"override {text!r}: unknown key {keys[-1]!r}")
        section = node[keys[-1]]
        if isinstance(value, dict) and isinstance(section, dict) and keys[-1] not in ("model", "composite"):
            # a mapping is merged over the section's current values, as a config file is merged over
            # the defaults: `train.optimizer={lr: 0.01}` changes the rate of the configured optimiser
            # and keeps its name and momentum (a replaced section would lose them, and keys such as
            # train.max_steps that the trainers read). Its keys are checked as dotted overrides
            # are (a typo such as momentun would otherwise mean "left as it was", silently)
            unknown = sorted(set(value) - set(section))
            if unknown:
                raise ConfigError(f"override {text!r}: unknown key{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(map(repr, unknown))} in {'.'.join(keys)}; expected "
                                  f"some of {sorted(section)}")
            try:
                value = deep_merge(section, value, ".".join(keys) + ".")
            except ConfigError as exc:
                raise ConfigError(f"override {text!r}: {exc}") from exc
        node[keys[-1]] = value
    return cfg


def load_config(path: str | os.PathLike | None, kind: str | None = None, overrides=None) -> dict:
    """Read a YAML config (or only the defaults when ``path`` is None) and validate it.

    ``kind`` must match the file's ``kind`` when both are given."""
    data: dict = {}
    if path is not None:
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping, found {type(data).__name__}")
    file_kind = data.get("kind")
    if kind and file_kind and kind != file_kind:
        raise ConfigError(f"config {path} is for {file_kind!r} training, but {kind!r} was requested")
    kind = kind or file_kind
    if not kind:
        raise ConfigError(f"config {path} does not say which training it is for (kind: {'|'.join(KINDS)})")
    cfg = deep_merge(defaults(kind), data)
    cfg["kind"] = kind
    cfg = apply_overrides(cfg, overrides)
    # the kind picks the defaults and the trainer: `--set kind=...` cannot change it afterwards
    # (the other kind's sections are missing, and the run would crash on one of them)
    _check(cfg["kind"] == kind, f"override kind={cfg['kind']!r}: this is a {kind!r} run (the subcommand "
                                f"and the config's kind); the training kind cannot be set with --set")
    validate(cfg)
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_teacher_source(cfg: dict, key: str, why: str) -> None:
    """``key`` (or ``init``) names the checkpoint a stage starts from; ``random`` asks for random
    networks (tests, benchmarks). Unset, the stage would train from random networks unannounced."""
    section, name = key.split(".")
    _check(cfg[section][name] is not None or cfg.get("init") is not None,
           f"{key} is not set: {why} (--set {key}=PATH; {key}={RANDOM} starts from randomly initialised "
           "networks, for tests and benchmarks)")


# values that may be of another type than their default's (checked by `validate` or where used)
_ANY_TYPE = {"model", "distill.metric", "teacher_dpo.metric", "distill.aux_grad_clip"}
# integer defaults that also take a fraction
_REAL = {"data.loader_timeout_s"}
# sequence names ("00".."21"): YAML reads 07 as the integer 7 and 00 as 0
_SEQUENCE_LISTS = {"data.sequences", "data.synthetic.sequences"}
_SEQUENCES = {"validation.sequence", "validation.synthetic.sequence"}


def _sequence_name(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{where}: expected a sequence name like \"08\", got {value!r}")
    return f"{value:02d}" if isinstance(value, int) else value


def _as_number(value):
    """``value`` as an int or float, or None when it is not a number. Strings are parsed: YAML 1.1
    (PyYAML) reads 1e-5 as the string '1e-5', and configs write learning rates that way."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return None


def _check_types(cfg: dict, base: dict, path: str = "") -> None:
    """Every value of ``cfg`` of the type of its default in ``base`` (in place: integral floats
    become ints, ints floats where the default is a float, sequence numbers names), or a
    ConfigError naming the key; a ``None`` default takes anything (``validate`` checks those)."""
    for k, default in base.items():
        if k not in cfg:
            continue
        where, v = path + k, cfg[k]
        if where in _SEQUENCE_LISTS:
            items = v if isinstance(v, list) else [v]
            cfg[k] = [_sequence_name(x, where) for x in items]
        elif where in _SEQUENCES:
            cfg[k] = _sequence_name(v, where)
        elif default is None or where in _ANY_TYPE:
            continue
        elif isinstance(default, dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{where} must be a mapping (e.g. {where}.key=value), got {v!r}")
            if k != "composite":
                _check_types(v, default, where + ".")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"{where} must be true or false, got {v!r}")
        elif isinstance(default, (int, float)):
            real = isinstance(default, float) or where in _REAL
            v = _as_number(v)
            if v is None:
                raise ConfigError(f"{where} must be a number, got {cfg[k]!r}")
            if not real and isinstance(v, float) and not v.is_integer():
                raise ConfigError(f"{where} must be a whole number, got {v!r}")
            cfg[k] = float(v) if isinstance(default, float) else (v if real else int(v))
        elif isinstance(default, str) and not isinstance(v, str):
            raise ConfigError(f"{where} must be a string, got {v!r}")
        elif isinstance(default, list) and not isinstance(v, list):
            raise ConfigError(f"{where} must be a list like {default!r}, got {v!r}")


def _number_or_none(node: dict, key: str, where: str, minimum: float, integer: bool = False,
                    above: bool = False) -> None:
    """``node[key]`` None, or a number >= ``minimum`` (> with ``above``; whole with ``integer``),
    stored as a number."""
    value = node[key]
    if value is None:
        return
    n = _as_number(value)
    ok = n is not None and (n > minimum if above else n >= minimum) and (not integer or float(n).is_integer())
    kind = "a whole number" if integer else "a number"
    _check(ok, f"{where} must be null or {kind} {'>' if above else '>='} {minimum:g}, got {value!r}")
    node[key] = int(n) if integer else n


def _check_optimizer(spec, where: str) -> None:
    _check(isinstance(spec, dict) and spec.get("name", "adam") in ("adam", "adamw", "sgd"),
           f"{where} must be a mapping with name adam|adamw|sgd, got {spec!r}")
    lr = _as_number(spec.get("lr"))
    _check(lr is not None and lr > 0, f"{where}.lr must be a positive number, got {spec.get('lr')!r}")
    spec["lr"] = float(lr)
    betas = spec.get("betas", [0.9, 0.999])
    numbers = [_as_number(b) for b in betas] if isinstance(betas, list) else []
    _check(len(numbers) == 2 and all(b is not None and 0 <= b < 1 for b in numbers),
           f"{where}.betas must be two numbers in [0, 1), got {betas!r}")
    if "betas" in spec:
        spec["betas"] = [float(b) for b in numbers]
    for key in ("weight_decay", "momentum"):
        if key in spec:
            _number_or_none(spec, key, f"{where}.{key}", 0)
    # only SGD has a momentum; Adam and AdamW would ignore it without a word (betas are theirs)
    _check(spec.get("name", "adam") == "sgd" or not spec.get("momentum"),
           f"{where}.momentum is {spec.get('momentum')!r}, but {where}.name {spec.get('name', 'adam')!r} has "
           f"no momentum (it takes {where}.betas): use name sgd, or leave momentum at 0")


def validate(cfg: dict) -> None:
    _check_types(cfg, defaults(cfg["kind"]))
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg["device"]) is not None,
           f"device must be auto, cpu, cuda or cuda:N, got {cfg['device']!r}")
    tr = cfg["train"]
    _number_or_none(tr, "max_steps", "train.max_steps", 0, integer=True)
    _number_or_none(tr, "grad_clip", "train.grad_clip", 0, above=True)
    _number_or_none(cfg["data"], "limit", "data.limit", 1, integer=True)
    _number_or_none(cfg["checkpoint"], "part_mib", "checkpoint.part_mib", 1)
    _number_or_none(cfg["validation"], "guidance", "validation.guidance", 0, above=True)
    _check_optimizer(tr["optimizer"], "train.optimizer")
    _check(int(cfg["threads"]) >= 0, f"threads must be >= 0 (0: torch's default), got {cfg['threads']}")
    # gamma <= 0 makes the learning rate 0 or negative (gradient ascent) after the first period
    _check(float(tr["lr_schedule"].get("gamma", 1.0)) > 0,
           f"train.lr_schedule.gamma must be positive, got {tr['lr_schedule'].get('gamma')}")
    _check(int(cfg["log"]["every_steps"]) >= 0,
           f"log.every_steps must be >= 0, got {cfg['log']['every_steps']}")
    # step % -N is 0 for every step: a negative period rendered every step instead of never
    _check(int(cfg["log"]["render_every_steps"]) >= 0,
           f"log.render_every_steps must be >= 0 (0: off), got {cfg['log']['render_every_steps']}")
    # a negative weight rewards the regulariser's deviation instead of penalising it
    _check(float(cfg["diffusion"]["reg_weight"]) >= 0,
           f"diffusion.reg_weight must be >= 0, got {cfg['diffusion']['reg_weight']}")
    _check(int(tr["lr_schedule"].get("every_epochs", 1)) >= 1,
           f"train.lr_schedule.every_epochs must be >= 1, got {tr['lr_schedule'].get('every_epochs')}")
    _check(int(tr["batch_size"]) >= 1, f"train.batch_size must be >= 1, got {tr['batch_size']}")
    _check(int(tr["epochs"]) >= 1, f"train.epochs must be >= 1, got {tr['epochs']}")
    _check(tr.get("precision", "fp32") in ("fp32", "bf16", "fp16"),
           f"train.precision must be fp32|bf16|fp16, got {tr.get('precision')!r}")
    _check(tr["batchnorm"] in ("train", "frozen", "sync"),
           f"train.batchnorm must be train|frozen|sync, got {tr['batchnorm']!r}")
    ls = tr["lr_schedule"]
    _check(int(ls.get("decay_steps", 0) or 0) >= 0,
           f"train.lr_schedule.decay_steps must be >= 0, got {ls.get('decay_steps')}")
    _check(0.0 <= float(ls.get("decay_to", 0.0)) <= 1.0,
           f"train.lr_schedule.decay_to must be in [0, 1], got {ls.get('decay_to')}")
    _check(ls.get("decay", "linear") in ("linear", "cosine"),
           f"train.lr_schedule.decay must be linear|cosine, got {ls.get('decay')!r}")
    _check(cfg["data"].get("loader_start", "forkserver") in ("forkserver", "spawn", "fork"),
           f"data.loader_start must be forkserver|spawn|fork, got {cfg['data'].get('loader_start')!r}")
    _check(float(cfg["data"].get("loader_timeout_s", 0) or 0) >= 0, "data.loader_timeout_s must be >= 0")
    _check(cfg["data"].get("sample_on", "auto") in ("auto", "cpu", "device"),
           f"data.sample_on must be auto|cpu|device, got {cfg['data'].get('sample_on')!r}")
    for key in ("scan_points", "target_points", "tile"):
        _check(int(cfg["data"][key]) >= 1, f"data.{key} must be >= 1, got {cfg['data'][key]}")
    _check(int(cfg["data"]["num_workers"]) >= 0, f"data.num_workers must be >= 0, got {cfg['data']['num_workers']}")
    _check(cfg["data"]["kind"] in ("semantickitti", "synthetic", "npz"),
           f"data.kind must be semantickitti|synthetic|npz, got {cfg['data']['kind']!r}")
    _check(int(cfg["checkpoint"]["every_steps"]) >= 0, "checkpoint.every_steps must be >= 0")
    _check(int(cfg["checkpoint"]["keep"]) >= 1, "checkpoint.keep must be >= 1")
    model = cfg["model"]
    _check(model in ("full", "tiny") or (isinstance(model, dict) and "channels" in model),
           f"model must be 'full', 'tiny' or a mapping with 'channels', got {model!r}")
    if cfg["kind"] == "teacher":
        p = float(cfg["teacher"]["cond_dropout"])
        _check(0.0 <= p < 1.0, f"teacher.cond_dropout must be in [0, 1), got {p}")
    if cfg["kind"] == "refiner":
        r = cfg["refiner"]
        _check(r["loss"] in ("chamfer_l2sq", "chamfer_l1"),
               f"refiner.loss must be chamfer_l2sq|chamfer_l1, got {r['loss']!r}")
        for key in ("jitter_sigma", "jitter_clip"):   # a standard deviation and a bound
            _check(float(r[key]) >= 0, f"refiner.{key} must be >= 0, got {r[key]}")
        for key in ("input_points", "target_points"):
            _check(int(r[key]) >= 1, f"refiner.{key} must be >= 1, got {r[key]}")
        _check(float(r["target_voxel"]) > 0,
               f"refiner.target_voxel must be positive, got {r['target_voxel']}")
    if cfg["kind"] == "distill":
        d = cfg["distill"]
        _check_teacher_source(cfg, "distill.teacher", "a distillation needs its teacher's checkpoint")
        _check(d["mode"] in ("dpo", "vsd"), f"distill.mode must be dpo|vsd, got {d['mode']!r}")
        _check(d["generator"] in ("local", "vp"), f"distill.generator must be local|vp, got {d['generator']!r}")
        _check(d["aux_loss"] in ("lidiff", "mse"), f"distill.aux_loss must be lidiff|mse, got {d['aux_loss']!r}")
        _check(d["weighting"] in ("linear", "logsigmoid"),
               f"distill.weighting must be linear|logsigmoid, got {d['weighting']!r}")
        steps = int(cfg["diffusion"]["steps"])
        _check(0 <= int(d["t_min"]) <= int(d["t_max"]) < steps,
               f"distill.t_min/t_max must satisfy 0 <= t_min <= t_max < {steps}, got {d['t_min']}, {d['t_max']}")
        _check(float(d["noise_scale"]) > 0, f"distill.noise_scale must be positive, got {d['noise_scale']}")
        _check(d.get("pair_noise", "scaled") in ("scaled", "independent"),
               f"distill.pair_noise must be scaled|independent, got {d.get('pair_noise')!r}")
        _check(int(d["aux_updates_per_step"]) >= 1, "distill.aux_updates_per_step must be >= 1")
        _check(isinstance(d["aux_shared_draws"], bool),
               f"distill.aux_shared_draws must be true|false, got {d['aux_shared_draws']!r}")
        _check(int(d["aux_warmup_steps"]) >= 0, f"distill.aux_warmup_steps must be >= 0, got {d['aux_warmup_steps']}")
        if d["aux_optimizer"] is not None:
            _check_optimizer(d["aux_optimizer"], "distill.aux_optimizer")
        if d["aux_grad_clip"] != "same":
            _number_or_none(d, "aux_grad_clip", "distill.aux_grad_clip (or 'same')", 0, above=True)
        _check(float(d["pair_guidance"]) > 0, f"distill.pair_guidance must be positive, got {d['pair_guidance']}")
        _check(int(d["pair_steps"]) >= 1, f"distill.pair_steps must be >= 1, got {d['pair_steps']}")
        _check(1 <= int(d["gen_steps"]) <= steps, f"distill.gen_steps must be in 1..{steps}, got {d['gen_steps']}")
        _check(float(d["gen_guidance"]) > 0, f"distill.gen_guidance must be positive, got {d['gen_guidance']}")
        # guidance weights as pair_guidance / gen_guidance: 1 conditional, w > 1 classifier-free
        # guidance, 0 < w < 1 towards the unconditional score; w <= 0 turns the condition around
        _check(float(d["teacher_guidance"]) > 0,
               f"distill.teacher_guidance must be positive, got {d['teacher_guidance']}")
        # the logsigmoid weight 2 sigmoid(beta (D_w - D_l)): beta <= 0 favours the pairs the student
        # already gets right (or weights all alike)
        _check(float(d["dpo_beta"]) > 0, f"distill.dpo_beta must be positive, got {d['dpo_beta']}")
        # 0 is the published objective; a negative weight pushes the student away from the teacher
        _check(float(d["vsd_weight"]) >= 0, f"distill.vsd_weight must be >= 0, got {d['vsd_weight']}")
        if int(d["gen_steps"]) > 1:
            _check(d["generator"] == "local", "distill.gen_steps > 1 needs distill.generator: local")
            _check(int(d["pair_steps"]) == 1 and float(d["pair_guidance"]) == 1.0,
                   "distill.gen_steps > 1 makes both samples of a pair on the solver's trajectory: "
                   "leave distill.pair_steps and distill.pair_guidance at 1")
        _check(int(d["spread_every_steps"]) >= 0 and (int(d["spread_every_steps"]) == 0 or int(d["spread_samples"]) >= 2),
               "distill.spread_every_steps must be >= 0, with distill.spread_samples >= 2 when it is on")
        if d["mode"] == "dpo":
            from .preference import check_spec
            check_spec(d, "distill")   # fail early on a bad metric or dotted path
    if cfg["kind"] == "teacher-dpo":
        d = cfg["teacher_dpo"]
        _check_teacher_source(cfg, "teacher_dpo.reference", "the teacher's DPO stage fine-tunes a trained teacher")
        from .preference import check_spec
        check_spec(d, "teacher_dpo")
        _check(float(d["beta"]) > 0, f"teacher_dpo.beta must be positive, got {d['beta']}")
        _check(d["pair_noise"] in ("scaled", "independent"),
               f"teacher_dpo.pair_noise must be scaled|independent, got {d['pair_noise']!r}")
        _check(float(d["noise_scale"]) > 0, f"teacher_dpo.noise_scale must be positive, got {d['noise_scale']}")
        _check(int(d["sample_steps"]) >= 1, f"teacher_dpo.sample_steps must be >= 1, got {d['sample_steps']}")
        _check(float(d["sample_guidance"]) > 0,
               f"teacher_dpo.sample_guidance must be positive, got {d['sample_guidance']}")
        steps = int(cfg["diffusion"]["steps"])
        _check(0 <= int(d["t_min"]) <= int(d["t_max"]) < steps,
               f"teacher_dpo.t_min/t_max must satisfy 0 <= t_min <= t_max < {steps}, got {d['t_min']}, {d['t_max']}")
        _check(float(d["denoise_weight"]) >= 0, "teacher_dpo.denoise_weight must be >= 0")
        # the frozen reference runs on its running statistics: a model on batch statistics differs
        # from it before any update (a first-step loss of 77.7 instead of log 2 on a tiny teacher)
        _check(cfg["train"]["batchnorm"] == "frozen",
               "teacher-dpo needs train.batchnorm: frozen (the frozen reference uses the running batch-norm "
               f"statistics; with {cfg['train']['batchnorm']!r} the model and the reference differ before "
               "any update, and the preference margin measures that instead of the fine-tuning)")
        _check(float(d["pair_regions"]) == 0 or int(d["pairs_per_scan"]) == 1,
               "teacher_dpo.pair_regions ranks one pair square by square: leave teacher_dpo.pairs_per_scan at 1")
    v = cfg["validation"]
    _check(int(v["every_steps"]) >= 0, f"validation.every_steps must be >= 0, got {v['every_steps']}")
    _check(v["select"] in ("cd", "jsd_bev"), f"validation.select must be cd|jsd_bev, got {v['select']!r}")
    _check(int(v["steps"]) >= 1 and int(v["frames"]) >= 1 and int(v["every"]) >= 1,
           "validation.steps, validation.frames and validation.every must be >= 1")


def resolve_callable(dotted: str | Callable) -> Callable:
    """``"package.module.function"`` -> the function (a callable passes through)."""
    if callable(dotted):
        return dotted
    if not isinstance(dotted, str) or "." not in dotted:
        raise ConfigError(f"expected a dotted path like 'package.module.function', got {dotted!r}")
    mod_name, _, attr = dotted.rpartition(".")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {mod_name!r} for {dotted!r}: {exc}") from exc
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"{mod_name!r} has no callable {attr!r} (from {dotted!r})")
    return fn


def model_config(cfg: dict):
    from lidar_completion.models import ModelConfig
    m = cfg["model"]
    if m == "full":
        return ModelConfig.full()
    if m == "tiny":
        return ModelConfig.tiny()
    return ModelConfig.from_dict(m)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
