"""Checkpoints: the project's own format and strict loaders for the published Lightning files.

Our format is a ``torch.save`` dictionary holding only tensors and plain data (so it loads with
``weights_only=True``)::

    {"format": "lidar-completion", "version": 1, "kind": "student" | "teacher" | "refiner" | ...,
     "config": ModelConfig.to_dict(), "sampling": {"steps": 8, "guidance": 3.5, ...},
     "state_dicts": {"encoder": {...}, "denoiser": {...}, "refiner": {...}},  # any subset
     "meta": {...}, "content_hash": "<sha256 of config, sampling and every tensor>"}

Published layouts (prefixes of the Lightning ``state_dict``; see tests/fixtures/lidiff_state_dicts.json):

=====================  ==========================================  =================================
kind                   prefixes                                    roles
=====================  ==========================================  =================================
``lidiff``             ``partial_enc.`` + ``model.``               encoder, denoiser
``lidiff_refiner``     ``model_refine.``                           refiner
``student``            ``partial_enc.`` + ``generator.``           encoder, denoiser (= the student);
                       (+ ``teacher.``, ``auxDiff*.`` ignored       teacher / aux_* only on request
                       unless asked for)                            (ScoreLiDAR, Distillation-DPO)
``dpo_teacher``        ``DM_encoder.`` + ``DiffModel.``            encoder, denoiser
=====================  ==========================================  =================================

The published files keep the refiner in a file of its own (LiDiff's ``refine_net.ckpt``). A Lightning
file that carries ``model_refine.`` next to other networks gives that refiner only when it is also
named as the refiner file (``refiner_path``; CLI ``--refiner-checkpoint``).

Unlike the published inference code (non-strict loading that silently keeps random weights when a
prefix is wrong), every load here is strict: missing, unexpected or mis-shaped keys are named in a
:class:`~lidar_completion.errors.CheckpointError`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError
from .fileutil import atomic_write
from .settings import checkpoint_fallback
from .shipped import WEIGHTS_DIR, shipped_manifest  # noqa: F401 (re-exported)
from .models import ConditionEncoder, Denoiser, ModelConfig, Refiner

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")   # torch's messages bold some words for a terminal


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message without terminal colour codes (or its type's name)."""
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__

FORMAT = "lidar-completion"
VERSION = 1
ENV_TRUST = "LIDAR_COMPLETION_TRUST_CHECKPOINTS"

# role -> network class
NETWORKS = {"encoder": ConditionEncoder, "denoiser": Denoiser, "refiner": Refiner,
            "teacher": Denoiser, "aux": Denoiser, "aux_better": Denoiser, "aux_worse": Denoiser}

# published kind -> {prefix: role}; optional prefixes are only loaded when asked for
PUBLISHED_LAYOUTS = {
    "lidiff": {"partial_enc.": "encoder", "model.": "denoiser"},
    "lidiff_refiner": {"model_refine.": "refiner"},
    "student": {"partial_enc.": "encoder", "generator.": "denoiser"},
    "dpo_teacher": {"DM_encoder.": "encoder", "DiffModel.": "denoiser"},
}
OPTIONAL_PREFIXES = {"teacher.": "teacher", "auxDiff.": "aux", "auxDiffBetter.": "aux_better",
                     "auxDiffWorse.": "aux_worse", "model_refine.": "refiner"}
#: What a file that names no sampling defaults is sampled with (lidar_completion.settings).
DEFAULT_SAMPLING = {k: checkpoint_fallback(k) for k in ("steps", "guidance")}


@dataclass
class Loaded:
    """Networks built from a checkpoint (eval mode, on the requested device)."""
    encoder: ConditionEncoder | None
    denoiser: Denoiser | None
    refiner: Refiner | None
    config: ModelConfig
    sampling: dict
    meta: dict
    kind: str
    path: str
    content_hash: str | None = None
    extras: dict = field(default_factory=dict)  # teacher / aux networks when asked for


# ----------------------------------------------------------------------------- hashing / saving
def content_hash(state_dicts: dict, config: dict, sampling: dict) -> str:
    """sha256 over the config, the sampling defaults and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": config, "sampling": sampling}, sort_keys=True).encode())
    for role in sorted(state_dicts):
        for name in sorted(state_dicts[role]):
            t = state_dicts[role][name]
            h.update(f"{role}/{name}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    return h.hexdigest()


def _non_finite(state_dict: dict) -> str:
    """'' when every floating tensor is finite, else which tensors are not (for an error message)."""
    bad = []
    for name, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()})")
    if not bad:
        return ""
    more = f" (+{len(bad) - 4} more tensors)" if len(bad) > 4 else ""
    return "non-finite values (NaN/inf) in " + ", ".join(bad[:4]) + more


def save_checkpoint(path, models: dict, config: ModelConfig, sampling: dict | None = None,
                    kind: str = "student", meta: dict | None = None, half: bool = False) -> str:
    """Save networks (``{"encoder": m, "denoiser": m, "refiner": m}``, any subset; modules or state
    dicts) with their config and sampling defaults. ``half=True`` stores floating tensors as float16
    (loaded back as float32). Returns the content hash."""
    state_dicts = {}
    for role, m in models.items():
        if m is None:
            continue
        if role not in NETWORKS:
            raise CheckpointError(f"unknown network role {role!r}; expected one of {sorted(NETWORKS)}")
        sd = m.state_dict() if hasattr(m, "state_dict") else m
        out = {}
        for k, v in sd.items():
            v = v.detach().cpu()
            if half and v.is_floating_point():
                v = v.half()
            out[k] = v.clone()
        # a network that diverged, or a float16 export of values past 65504, would be refused by
        # every load: refuse to write it (the file on disk, if any, stays as it was)
        bad = _non_finite(out)
        if bad:
            overflow = half and not _non_finite(sd)
            raise CheckpointError(f"not saving {path}: the {role} network has {bad}"
                                  + (" after the float16 conversion (values beyond ±65504)" if overflow else ""))
        state_dicts[role] = out
    if not state_dicts:
        raise CheckpointError("nothing to save: no network given")
    cfg = config.to_dict()
    sampling = dict(DEFAULT_SAMPLING if sampling is None else sampling)
    digest = content_hash(state_dicts, cfg, sampling)
    obj = {"format": FORMAT, "version": VERSION, "kind": kind, "config": cfg, "sampling": sampling,
           "state_dicts": state_dicts, "meta": dict(meta or {}), "content_hash": digest}
    atomic_write(path, lambda f: torch.save(obj, f))
    return digest


def make_random_checkpoint(path, config: ModelConfig | None = None, seed: int = 0, refine: bool = True,
                           sampling: dict | None = None) -> Path:
    """A valid checkpoint with randomly initialised networks (for plumbing tests and demos of the
    machinery - its completions are meaningless)."""
    config = config or ModelConfig.tiny()
    with torch.random.fork_rng(devices=[]):     # seeded here, the caller's random stream untouched
        torch.manual_seed(seed)
        models = {"encoder": ConditionEncoder(config, "torch").float(),
                  "denoiser": Denoiser(config, "torch").float()}
        if refine:
            models["refiner"] = Refiner(config, "torch").float()
    save_checkpoint(path, models, config, sampling=sampling, kind="random",
                    meta={"note": "random weights", "seed": seed})
    return Path(path)


# ----------------------------------------------------------------------------- reading
# how the trainers' training-state files begin (training/checkpoint.py: a magic line per layout)
TRAIN_STATE_PREFIX = b"LIDAR-COMPLETION-TRAIN-STATE"


def _torch_load(path: Path, allow_pickle: bool | None):
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, expected a file: {path}")
    # torch.save writes a zip archive (a pickle stream, 0x80 first, before torch 1.6): anything else
    # is not a checkpoint at all, and the advice to trust its pickled objects would be wrong (a
    # truncated archive still starts like one: torch.load then says it is damaged)
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(TRAIN_STATE_PREFIX))
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if head == TRAIN_STATE_PREFIX:
        raise CheckpointError(f"{path} is a training state of lidar-completion-train (what its --resume "
                              "reads), not a model: use the model that run exported, <run folder>/<kind>.pt "
                              "(or <run folder>/best/<kind>.pt)")
    head = head[:4]
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither the zip archive torch.save "
                              f"writes nor a legacy pickle): a wrong file, or a damaged one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if allow_pickle is None:
            allow_pickle = os.environ.get(ENV_TRUST, "").lower() in ("1", "true", "yes")
        if not allow_pickle:
            raise CheckpointError(
                f"{path} contains pickled Python objects beyond plain tensors, so it cannot be loaded "
                f"safely (weights_only=True failed: {_first_line(exc)}). If you trust the file, "
                f"pass allow_pickle=True (CLI: --trust-checkpoint) or set {ENV_TRUST}=1.") from None
        log.warning("loading %s with weights_only=False: it runs pickled code from the file", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - any failure of a foreign file is a CheckpointError
            raise CheckpointError(f"{path} is not a readable checkpoint: {_first_line(exc2)}") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on damaged files
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{_first_line(exc)}") from None


def split_prefixed(state_dict: dict, prefix: str) -> dict:
    """The entries of ``state_dict`` under ``prefix``, with the prefix removed (the one key mapping
    between the published checkpoints and our modules: names are otherwise identical)."""
    n = len(prefix)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(prefix)}


def detect_layout(state_dict: dict) -> str:
    """Name the published layout of a Lightning ``state_dict`` from its key prefixes."""
    prefixes = {k.split(".", 1)[0] + "." for k in state_dict}
    if "generator." in prefixes and "partial_enc." in prefixes:
        return "student"
    if "DiffModel." in prefixes and "DM_encoder." in prefixes:
        return "dpo_teacher"
    if "model." in prefixes and "partial_enc." in prefixes:
        return "lidiff"
    if prefixes == {"model_refine."}:
        return "lidiff_refiner"
    raise CheckpointError(
        "unrecognised checkpoint layout: top-level key prefixes " + ", ".join(sorted(prefixes)[:12]) +
        "; expected one of: partial_enc.+model. (LiDiff), model_refine. (LiDiff refiner), "
        "partial_enc.+generator. (ScoreLiDAR / Distillation-DPO student), DM_encoder.+DiffModel. "
        "(Distillation-DPO teacher)")


def infer_config(state_dict: dict) -> ModelConfig:
    """Channel widths from the shapes of a denoiser / refiner / encoder state dict (prefix removed)."""
    def kernel(key: str):
        shape = tuple(state_dict[key].shape)
        if len(shape) != 3 or min(shape) < 1:
            raise CheckpointError(f"cannot infer the network widths: {key} has shape {shape}, expected "
                                  "3 positive dimensions (kernel offsets, in, out channels)")
        return shape

    try:
        cs = [kernel("stem.0.kernel")[2]]
        for i in range(1, 5):
            cs.append(kernel(f"stage{i}.1.net.0.kernel")[2])
        for i in range(1, 5):
            key = f"up{i}.0.net.0.kernel"
            if key not in state_dict:
                break
            cs.append(kernel(key)[2])
        in_ch = kernel("stem.0.kernel")[1]
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the network widths: key {exc} missing") from None
    if len(cs) == 5:  # encoder only: decoder widths are not stored; assume the published ratios
        full = ModelConfig.full().channels
        cs += [max(1, round(cs[0] * c / full[0])) for c in full[5:]]
    refine_up = 6
    if "last.2.weight" in state_dict and state_dict["last.2.weight"].shape[0] != 3:
        refine_up = state_dict["last.2.weight"].shape[0] // 3
    hidden = state_dict["last.0.weight"].shape[0] if "last.0.weight" in state_dict else 20
    name = "full" if tuple(cs) == ModelConfig.full().channels else "custom"
    try:
        return ModelConfig(channels=tuple(int(c) for c in cs), in_channels=int(in_ch), head_hidden=int(hidden),
                           refine_up=refine_up, name=name)
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"the network widths read from its shapes are not usable: {exc}") from None


#: the key whose last dimension gives each of the first five widths (and the input channels)
_WIDTH_KEYS = ("stem.0.kernel",) + tuple(f"stage{i}.1.net.0.kernel" for i in range(1, 5))


def _check_shared_widths(path, kind: str, roles: dict) -> None:
    """The condition encoder and the denoiser share their encoder's widths: when the shapes of the
    two disagree, name the keys (else the network built from one is blamed on the other)."""
    enc, den = roles.get("encoder"), roles.get("denoiser")
    if not enc or not den:
        return
    prefixes = {r: p for p, r in {**OPTIONAL_PREFIXES, **PUBLISHED_LAYOUTS[kind]}.items()}
    for key in _WIDTH_KEYS:
        if key in enc and key in den:
            a, b = tuple(enc[key].shape), tuple(den[key].shape)
            if a != b:
                raise CheckpointError(
                    f"{path}: {prefixes.get('encoder', '')}{key} has shape {a} but "
                    f"{prefixes.get('denoiser', '')}{key} has {b}; the two encoders have the same widths "
                    "in every published network: one of the files' weights was altered")


def _infer_published_config(path, kind: str, role: str, sd: dict) -> ModelConfig:
    """:func:`infer_config` of the ``role`` network of a published file; a failure names the file,
    its layout and some of the keys found under the network's prefix (misnamed modules)."""
    try:
        return infer_config(sd)
    except CheckpointError as exc:
        prefixes = {**OPTIONAL_PREFIXES, **PUBLISHED_LAYOUTS[kind]}
        prefix = next((p for p, r in prefixes.items() if r == role), "")
        keys = list(sd)
        more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
        modules = ", ".join(dict.fromkeys(k.split(".", 1)[0] for k in keys))
        raise CheckpointError(f"{path}: {kind} layout: {exc} under '{prefix}'; found "
                              + ", ".join(prefix + k for k in keys[:4]) + more
                              + f" (modules: {modules})") from None


def _build(role: str, config: ModelConfig, sd: dict, backend, device, source: str):
    # the initial weights are overwritten below: drawn from a forked RNG, so that loading a model
    # leaves the caller's torch random stream as it was, and float32 whatever the caller's default
    # dtype (under torch.set_default_dtype(torch.float64) every call failed on mixed dtypes)
    with torch.random.fork_rng(devices=[]):
        net = NETWORKS[role](config, backend).float()
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k}: file {tuple(sd[k].shape)} vs network {tuple(expected[k].shape)}"
                 for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{len(items)} {label}: " + ", ".join(items[:8]) + more)
        raise CheckpointError(f"{source}: the {role} weights do not match the network - " + "; ".join(parts))
    def unfit(k, v) -> bool:
        """Integer / bool / complex values where the network holds floats (cast without a word
        otherwise), or bool / complex where it holds integers (a BatchNorm's counter)."""
        return v.is_complex() or v.dtype == torch.bool or \
            (expected[k].is_floating_point() and not v.is_floating_point())
    keys = [k for k, v in sd.items() if unfit(k, v)]
    if keys:
        odd = sorted({str(sd[k].dtype).replace("torch.", "") for k in keys})
        want = sorted({str(expected[k].dtype).replace("torch.", "") for k in keys})
        raise CheckpointError(f"{source}: the {role} weights hold {', '.join(odd)} tensors where the "
                              f"network has {', '.join(want)} ones ({', '.join(keys[:4])}"
                              f"{f' +{len(keys) - 4} more' if len(keys) > 4 else ''})")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    bad = _non_finite(sd)
    if bad:   # such a network makes every completion non-finite: refuse it at load, not per scan
        raise CheckpointError(f"{source}: the {role} weights hold {bad}: the run that wrote them "
                              "diverged, or the file was edited")
    net.load_state_dict(sd, strict=True)
    return net.to(device).eval()


def read_state_dicts(path, include=(), allow_pickle: bool | None = None):
    """Read a checkpoint of any supported kind without building networks.

    Returns ``(kind, {role: state_dict}, config, sampling, meta, content_hash)``. ``include`` names
    optional roles (teacher, aux, aux_better, aux_worse, refiner) to read from Lightning files too."""
    path = Path(path)
    obj = _torch_load(path, allow_pickle)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dictionary checkpoint, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {obj.get('version')} is not supported "
                                  f"(this release reads version {VERSION})")
        try:
            sds, cfg, sampling = obj["state_dicts"], obj["config"], obj["sampling"]
        except KeyError as exc:
            raise CheckpointError(f"{path}: incomplete checkpoint, field {exc} missing") from None
        digest = content_hash(sds, cfg, sampling)
        if obj.get("content_hash") is None:
            raise CheckpointError(f"{path}: incomplete checkpoint, field 'content_hash' missing (written by "
                                  "hand, not by save_checkpoint / the trainers' export?)")
        if obj.get("content_hash") != digest:
            raise CheckpointError(f"{path}: content hash mismatch (file {str(obj.get('content_hash'))[:12]}…, "
                                  f"computed {digest[:12]}…): the file was modified or is corrupt")
        return obj.get("kind", "unknown"), sds, ModelConfig.from_dict(cfg), dict(sampling), \
            dict(obj.get("meta", {})), digest
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: neither a lidar-completion checkpoint nor a Lightning checkpoint "
                              "with a 'state_dict' of tensors")
    try:
        kind = detect_layout(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    roles = {}
    for prefix, role in PUBLISHED_LAYOUTS[kind].items():
        roles[role] = split_prefixed(sd, prefix)
    for prefix, role in OPTIONAL_PREFIXES.items():
        if role in include and role not in roles:
            part = split_prefixed(sd, prefix)
            if not part:
                raise CheckpointError(f"{path}: asked for the {role} network but the file has no "
                                      f"'{prefix}' keys")
            roles[role] = part
    known = set(PUBLISHED_LAYOUTS[kind]) | set(OPTIONAL_PREFIXES)
    stray = sorted({k.split(".", 1)[0] + "." for k in sd} - known)
    if stray:
        raise CheckpointError(f"{path}: unexpected key prefixes {stray} for a {kind} checkpoint")
    first = next(r for r in ("denoiser", "refiner", "encoder") if roles.get(r))
    _check_shared_widths(path, kind, roles)
    config = _infer_published_config(path, kind, first, roles[first])
    sampling = dict(DEFAULT_SAMPLING)
    if kind == "lidiff" or kind == "dpo_teacher":
        sampling["guidance"] = 6.0
    present = {k.split(".", 1)[0] + "." for k in sd}
    meta = {"source": "published", "layout": kind,
            "epoch": obj.get("epoch"), "global_step": obj.get("global_step"),
            # optional networks the file holds but that were not asked for
            "not_loaded": sorted(p for p, r in OPTIONAL_PREFIXES.items()
                                 if p in present and r not in roles)}
    return kind, roles, config, sampling, meta, None


def load_checkpoint(path, device="cpu", backend: str | None = None, refiner_path=None,
                    include=(), allow_pickle: bool | None = None) -> Loaded:
    """Build the networks stored in ``path`` (our format or a published Lightning file).

    ``refiner_path`` adds a refiner from a second file (e.g. LiDiff's ``refine_net.ckpt``), or from
    the ``model_refine.`` keys of a Lightning file that holds other networks too (``path`` itself).
    A network that does not match is blamed on the file it came from.
    ``backend`` (None / "auto": chosen for ``device``, see :func:`lidar_completion.sparse.resolve_backend`)."""
    from . import sparse
    backend = sparse.resolve_backend(backend, device)
    kind, roles, config, sampling, meta, digest = read_state_dicts(path, include, allow_pickle)
    if refiner_path is not None:
        # a Lightning file that carries model_refine.* next to other networks gives its refiner too
        r_kind, r_roles, r_config, _, r_meta, _ = read_state_dicts(refiner_path, (), allow_pickle)
        if "refiner" not in r_roles and "model_refine." in r_meta.get("not_loaded", ()):
            r_roles = read_state_dicts(refiner_path, ("refiner",), allow_pickle)[1]
            r_config = _infer_published_config(refiner_path, r_kind, "refiner", r_roles["refiner"])
        if "refiner" not in r_roles:
            raise CheckpointError(f"{refiner_path}: holds no refiner network")
        roles["refiner"] = r_roles["refiner"]
        refiner_config = r_config
    else:
        refiner_config = config
    nets = {}
    for role, sd in roles.items():
        from_refiner_file = role == "refiner" and refiner_path is not None
        cfg = refiner_config if role == "refiner" else config
        source = str(refiner_path if from_refiner_file else path)   # the file a mismatch is blamed on
        nets[role] = _build(role, cfg, sd, backend, device, source)
    extras = {r: nets.pop(r) for r in list(nets) if r not in ("encoder", "denoiser", "refiner")}
    return Loaded(nets.get("encoder"), nets.get("denoiser"), nets.get("refiner"), config, sampling, meta,
                  kind, str(path), digest, extras)


# ----------------------------------------------------------------------------- shipped weights
def default_checkpoint_path() -> Path:
    """The shipped distilled student (with refiner): the default of the CLI and the node."""
    manifest = shipped_manifest(WEIGHTS_DIR)
    name = manifest.get("default")
    if not name or not (WEIGHTS_DIR / name).exists():
        raise CheckpointError("no default checkpoint is shipped with this installation; pass a checkpoint "
                              "path (e.g. --checkpoint model.pt)")
    return WEIGHTS_DIR / name
