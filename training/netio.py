"""Networks in and out of the trainers: construction, initialisation from a checkpoint (ours or a
published LiDiff / Distillation-DPO Lightning file, through ``lidar_completion.checkpoints``), and the
export of inference checkpoints at the end of training."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from lidar_completion.errors import CheckpointError


def build_networks(model_config, backend="auto", refiner: bool = False, encoder: bool = True,
                   denoiser: bool = True):
    from lidar_completion.models import ConditionEncoder, Denoiser, Refiner
    enc = ConditionEncoder(model_config, backend=backend) if encoder else None
    den = Denoiser(model_config, backend=backend) if denoiser else None
    ref = Refiner(model_config, backend=backend) if refiner else None
    return enc, den, ref


def load_pretrained(path, include=(), key: str | None = None):
    """Load a checkpoint on the CPU (any layout the core knows) -> ``Loaded``. ``key``: the config
    key that named the file, put in front of any error."""
    from lidar_completion.checkpoints import load_checkpoint

    from .checkpoint import MAGIC, PARTS_MAGIC
    try:
        try:
            with open(path, "rb") as fh:
                head = fh.read(max(len(MAGIC), len(PARTS_MAGIC)))
        except OSError:
            head = b""   # missing or unreadable: load_checkpoint says which
        if head.startswith(MAGIC) or head.startswith(PARTS_MAGIC):
            raise CheckpointError(
                f"{path} is a training state (what --resume reads), not a model checkpoint: continue its "
                f"run with --resume {path}, or start from the model that run exported (<run folder>/<kind>.pt)")
        return load_checkpoint(str(path), device="cpu", backend="torch", include=tuple(include))
    except CheckpointError as exc:
        if key is None:
            raise
        raise CheckpointError(f"{key}: {exc}") from exc


def _copy(dst: nn.Module, src: nn.Module | None, what: str, path) -> None:
    if src is None:
        raise CheckpointError(f"{path} has no {what} network, but this training needs one to start from")
    try:
        dst.load_state_dict(src.state_dict())
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the {what} does not fit the configured model size "
                              f"(set `model:` to the checkpoint's size): {exc}") from exc


def load_init(path, encoder: nn.Module | None = None, denoiser: nn.Module | None = None,
              refiner: nn.Module | None = None):
    """Copy the weights of checkpoint ``path`` into the given modules; returns the ``Loaded``."""
    loaded = load_pretrained(path, key="init")
    if encoder is not None:
        _copy(encoder, loaded.encoder, "condition encoder", path)
    if denoiser is not None:
        _copy(denoiser, loaded.denoiser, "denoiser", path)
    if refiner is not None:
        _copy(refiner, loaded.refiner, "refiner", path)
    return loaded


def export_inference(path, model_config, kind: str, encoder=None, denoiser=None, refiner=None,
                     sampling=None, meta=None) -> Path:
    """Write an inference checkpoint (the format ``Completer.from_checkpoint`` loads)."""
    from lidar_completion.checkpoints import save_checkpoint
    meta = dict(meta or {})
    if "config" in meta:  # keep the YAML text, not a nested dict of arbitrary objects
        from .config import dump
        meta["training_config"] = dump(meta.pop("config"))
    models = {k: m for k, m in (("encoder", encoder), ("denoiser", denoiser), ("refiner", refiner)) if m is not None}
    save_checkpoint(str(path), models, model_config, sampling=sampling, kind=kind, meta=meta)
    return Path(path)
