"""The training loop shared by the teacher, refiner and distillation trainers.

Responsibilities: process group and device, DDP wrapping of the trainable modules, batch-norm mode,
optimisers and the epoch-wise learning-rate schedule, the resumable data order, atomic training
checkpoints (every N steps, at the end, and on SIGTERM/SIGINT), the NaN/inf guard, rank-0 logging,
and the export of an inference checkpoint when training finishes.

Subclasses implement ``build()`` (modules, optimisers) ``train_step(batch) -> dict`` and
``export(path)``.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lidar_completion.diffusion import NoiseSchedule
from lidar_completion.errors import (CheckpointError, ConfigError, DatasetError, LidarCompletionError,
                                     ModelOutputError)
from lidar_completion.fileutil import hold_folder, release_folder

from . import distributed as D
from . import rng as R
from .checkpoint import LATEST, CheckpointManager, load_state
from .config import dump, model_config
from .data import KeyedDataset, ShardSampler, make_loader, sample_scans_on_device
from .logs import RunLogger

log = logging.getLogger(__name__)


def _first_bad(value: torch.Tensor) -> float:
    """The first non-finite element of ``value`` (its first element if none is)."""
    flat = value.detach().flatten()
    bad = torch.nonzero(~torch.isfinite(flat))
    return float(flat[bad[0, 0]] if len(bad) else flat[0])


class TrainingDivergedError(LidarCompletionError, FloatingPointError):
    """A loss became NaN or infinite; the run stopped without overwriting the last good checkpoint.

    Every rank of a multi-rank run raises it with the same message (which names the ranks that saw
    the value), so ``same_on_every_rank`` tells the launcher that one rank reporting it is enough."""

    same_on_every_rank = True


class TrainingInterrupted(LidarCompletionError):
    """SIGTERM/SIGINT: a checkpoint was written and the run stopped."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


def _earlier_config(config_yaml) -> dict | None:
    """The config a checkpoint's run recorded (its ``config_yaml``), or None when it has none."""
    if not config_yaml:
        return None
    try:
        return yaml.safe_load(config_yaml) or {}
    except yaml.YAMLError:
        return None


class TrainingAborted(KeyboardInterrupt):
    """A second Ctrl-C while the run finished its step to save: it stopped at once, unsaved (a
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it)."""


def set_bn_mode(module: nn.Module, mode: str) -> None:
    """After ``module.train()``: with mode "frozen" every batch norm keeps using (and not updating)
    its running statistics."""
    if mode == "frozen":
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def make_optimizer(params, spec: dict) -> torch.optim.Optimizer:
    name = spec.get("name", "adam").lower()
    lr = float(spec["lr"])
    wd = float(spec.get("weight_decay", 0.0) or 0.0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(spec.get("betas", (0.9, 0.999))), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(spec.get("betas", (0.9, 0.999))), weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(spec.get("momentum", 0.0) or 0.0), weight_decay=wd)
    raise ConfigError(f"unknown optimizer {name!r}; expected adam, adamw or sgd")


def params_digest(modules: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(modules):
        for k, v in sorted(modules[name].state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _sampling_on_device(mode: str, device: torch.device) -> bool:
    """``data.sample_on`` resolved for the trainer's device (see training/config.py)."""
    from lidar_completion import sparse
    usable = ((device.type == "cuda" and sparse.triton_available() and not sparse.triton_interpreted())
              or (device.type == "cpu" and sparse.triton_interpreted()))
    if mode == "device" and not usable:
        raise ConfigError("data.sample_on: device needs Triton and a CUDA device (or TRITON_INTERPRET=1 "
                          f"on the CPU); the trainer runs on {device}")
    return mode == "device" or (mode == "auto" and device.type == "cuda" and usable)


def _batches(loader, workers: int, timeout_s):
    """The loader's batches; a worker timeout becomes an error that says what to change."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as exc:
            if workers and "timed out" in str(exc):
                raise DatasetError(
                    f"no batch from {workers} data loader workers within {timeout_s} s ({exc}); run with "
                    "data.num_workers=0 (samples made in the trainer) or another data.loader_start, or "
                    "raise data.loader_timeout_s for very slow samples") from exc
            raise
        yield batch


class Trainer(abc.ABC):
    kind = "base"

    def __init__(self, cfg: dict, out_dir: str | os.PathLike, resume=None, max_steps: int | None = None,
                 source=None, dist_info: D.DistInfo | None = None, hold: bool = True):
        """``hold``: keep other runs out of ``out_dir`` from here to the end of :meth:`run`; False
        for a trainer built to be driven step by step or inspected, never run as a whole (the
        research scripts build several on one work folder)."""
        self.cfg = cfg
        self.out = Path(out_dir)
        earlier = CheckpointManager(self.out / "checkpoints")
        if not resume and earlier.holds_checkpoints():
            # a fresh run would mix its checkpoints, logs and export with the earlier run's
            raise ConfigError(f"{self.out} already holds the checkpoints of a run (latest: "
                              f"{earlier.latest_path()}); continue "
                              f"it with --resume, or give this run another --out (or delete that folder)")
        # a --resume that cannot work fails here, before any data is made or folder written
        self._resume_state = None
        if resume:
            path = earlier.resolve(resume)
            if path is None and resume is not True:
                raise CheckpointError(f"--resume {resume}: no checkpoint found there")
            if path is not None:
                if not path.is_file():
                    raise CheckpointError(self._missing_resume_file(resume, path))
                st = load_state(path, map_location="cpu")   # CheckpointError for a corrupt file
                if st.get("kind") != self.kind:
                    raise CheckpointError(f"{path} is a {st.get('kind')!r} training state, expected {self.kind!r}")
                own = (self.out / "checkpoints").resolve()
                if earlier.holds_checkpoints() and path.resolve().parent != own:
                    # the rotation would delete this folder's own checkpoints, the export replace its model
                    raise ConfigError(f"--resume {resume} continues the run of {path.parent.parent}, but "
                                      f"{self.out} already holds the checkpoints of another run (latest: "
                                      f"{earlier.latest_path()}); give an --out that holds none, or resume "
                                      f"that folder's own run (--resume with --out {self.out})")
                self._check_resume_settings(path, st.get("config_yaml"))
                self._resume_state = (path, st)
        self.dist = dist_info or D.init(cfg.get("device", "auto"))
        self.device = self.dist.device
        # one run writes into a folder at a time: a second one started on it (a fresh run before
        # the first checkpoint, a --resume of a run still going) passed the checks above, then
        # moved the first one's logs aside and mixed checkpoints, config and export of two runs.
        # Held from here (before data is made, synthetic data into the folder included) to the end
        # of run(); every rank learns of a refusal, so none waits in a collective for rank 0.
        self._held, refused = None, None
        if hold and self.dist.is_main:
            try:
                self._held = hold_folder(self.out, "training run")
            except ConfigError as exc:
                refused = exc
        if hold and D.any_flag(refused is not None, self.device):
            raise refused or ConfigError(f"{self.out} is being written by another training run (the "
                                         "main rank was refused it)")
        if int(cfg.get("threads") or 0) > 0:
            torch.set_num_threads(int(cfg["threads"]))
        self.seed = int(cfg["seed"])
        self.bn_mode = cfg["train"]["batchnorm"]
        if self.bn_mode == "sync" and self.dist.distributed and self.device.type != "cuda":
            raise ConfigError("train.batchnorm: sync needs CUDA (torch's SyncBatchNorm has no CPU kernel); "
                              "on CPU use batchnorm: frozen (or train, unsynchronised)")
        dcfg = cfg["diffusion"]
        self.schedule = NoiseSchedule(float(dcfg["beta_start"]), float(dcfg["beta_end"]), int(dcfg["steps"]))
        self.sigmas = torch.sqrt(1.0 - self.schedule.alphas_cumprod).float()   # (T,), CPU
        self.model_config = model_config(cfg)
        self.backend = cfg.get("backend", "auto")
        self.precision = cfg["train"].get("precision", "fp32")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.scalers: dict = {}   # fp16: one GradScaler per optimiser (made in make_optimizers' wake)
        # {config key: SHA-256} of the files whose weights a run starts from (build() fills it),
        # saved with every checkpoint: a resume keeps the digests of the run it continues
        self.sources: dict[str, str] = {}

        self.modules: dict[str, nn.Module] = {}     # everything that is saved
        self.trainable: dict[str, nn.Module] = {}   # subset that is optimised (DDP-wrapped)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.base_lrs: dict[str, list] = {}
        # networks are initialised from torch's global RNG: seed it so that every rank (and every
        # run with this seed) starts from the same weights, frozen modules included
        torch.manual_seed(R.key_seed(self.seed, "init"))
        self.build()
        for name, m in self.modules.items():
            m.to(self.device)
        self.wrapped: dict[str, nn.Module] = {}
        for name, m in self.trainable.items():
            if self.bn_mode == "sync" and self.dist.distributed:
                m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
                self.trainable[name] = m
                self.modules[name] = m
            if self.dist.distributed:
                kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
                self.wrapped[name] = DDP(m, **kw)
            else:
                self.wrapped[name] = m
        self.make_optimizers()
        for name, opt in self.optimizers.items():
            self.base_lrs[name] = [g["lr"] for g in opt.param_groups]
            if self.precision == "fp16":
                self.scalers[name] = torch.amp.GradScaler(self.device.type)

        self.sample_on_device = _sampling_on_device(cfg["data"].get("sample_on", "auto"), self.device)
        self.source = source if source is not None else self.build_source()
        tile = int(cfg["data"]["tile"])
        self.dataset = KeyedDataset(self.source, self.seed, tile=tile)
        bs = int(cfg["train"]["batch_size"])
        self.sampler = ShardSampler(len(self.dataset), bs, self.dist.world_size, self.dist.rank,
                                    seed=self.seed, shuffle=True)
        self.loader_workers = int(cfg["data"].get("num_workers", 0) or 0)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = int(cfg["train"]["epochs"]) * self.steps_per_epoch
        ms = max_steps if max_steps is not None else cfg["train"]["max_steps"]
        if ms is not None:  # an explicit step budget replaces the epoch count
            self.total_steps = int(ms)
        self.step = 0
        part = cfg["checkpoint"].get("part_mib")
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=int(cfg["checkpoint"]["keep"]),
                                      part_bytes=None if part is None else int(float(part) * 2 ** 20))
        self._stop_signal = None
        self.resumed_from = None
        if resume:
            path = self.ckpt.resolve(resume)
            if path is None:
                if resume is True:   # nothing to resume: fresh start (documented behaviour of --resume)
                    if self.dist.is_main:
                        log.info("--resume: no checkpoint in %s, starting a fresh run", self.ckpt.folder)
                else:
                    raise CheckpointError(f"--resume {resume}: no checkpoint found there")
            else:
                if resume is True and not (self.ckpt.folder / "latest.json").is_file() and self.dist.is_main:
                    log.warning("--resume: %s has no latest.json; resuming from its checkpoint of the "
                                "highest step, %s", self.ckpt.folder, path.name)
                self.load(path)
                self.resumed_from = str(path)

    def resumed_without(self, src, key: str, what: str) -> bool:
        """Whether a --resume stands in for the missing pretrained file ``src`` (config key ``key``):
        the training state holds every network the file would give (the frozen teacher of a
        distillation, the reference of teacher-dpo), so only their sizes (and the source digest
        the export names) are taken from the state, with a warning. False for a fresh run or a file
        that exists (it is loaded as usual)."""
        resumed = getattr(self, "_resume_state", None)   # (path, state) of --resume, read by __init__
        if not src or resumed is None or Path(src).exists():
            return False
        path, st = resumed
        if st.get("model_config"):
            from lidar_completion.models import ModelConfig
            self.model_config = ModelConfig.from_dict(st["model_config"])
        if key in (st.get("sources") or {}):
            self.sources[key] = st["sources"][key]
        log.warning("--resume: %s %s does not exist; %s taken from the training state %s", key, src, what,
                    path)
        return True

    @staticmethod
    def _missing_resume_file(resume, path: Path) -> str:
        """The error of a --resume whose checkpoint file is missing: a latest.json pointing at a
        deleted file names the pointer and the checkpoints that are there."""
        flag = "--resume" if resume is True else f"--resume {resume}"
        pointer = path.parent / LATEST
        if (resume is True or Path(resume).is_dir()) and pointer.is_file():
            there = [p.name for p in CheckpointManager(path.parent).step_files()]
            listing = (f"the checkpoints there are {', '.join(there)}: give one with --resume "
                       f"{path.parent / there[-1]}" if there else "no checkpoint file is left there")
            return f"{flag}: {pointer} names {path.name}, which does not exist; {listing}"
        return f"{flag}: {path} does not exist"

    # -- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def build(self) -> None:
        """Create the networks (self.modules / self.trainable) of this kind of run."""

    def make_optimizers(self) -> None:
        opt = self.cfg["train"]["optimizer"]
        params = [p for m in self.trainable.values() for p in m.parameters() if p.requires_grad]
        self.optimizers["main"] = make_optimizer(params, opt)

    @abc.abstractmethod
    def train_step(self, batch: dict) -> dict:
        """One optimiser step on ``batch``; returns the scalars to log."""

    def export(self, path: Path) -> Path | None:
        return None

    def render(self, batch: dict) -> dict | None:
        """Clouds for the bird's-eye image ({name: (N, 3) array}) of the first sample, or None."""
        return None

    def validation_predictor(self, guidance: float):
        """``predict(scan, seed) -> (M, 3) points`` completing a held-out scan with the current
        weights (training/validation.py), or None when this kind has nothing to validate."""
        return None

    # -- helpers for subclasses ------------------------------------------------------------------
    def build_source(self):
        from .sources import build_source
        return build_source(self.cfg, self.out, self.kind, fps=not self.sample_on_device)

    def prepare_batch(self, batch: dict) -> dict:
        """A loader batch as ``train_step`` takes it: scans left unsampled by the source
        (``data.sample_on: device``) farthest-point sampled on the trainer's device."""
        d = self.cfg["data"]
        return sample_scans_on_device(batch, int(d["scan_points"]), int(d["tile"]), self.device)

    def sample_keys(self, batch: dict) -> list:
        return [(int(e), int(p)) for e, p in batch["key"].tolist()]

    def draw_t(self, keys, purpose: str, low: int = 0, high: int | None = None) -> torch.Tensor:
        high = self.schedule.num_train_timesteps - 1 if high is None else high
        return torch.tensor([R.randint(low, high, self.seed, e, p, purpose) for e, p in keys],
                            dtype=torch.long, device=self.device)

    def draw_noise(self, keys, counts, purpose: str) -> torch.Tensor:
        return torch.cat([R.randn((int(n), 3), self.seed, e, p, purpose)
                          for (e, p), n in zip(keys, counts)]).to(self.device)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(t.device)[t]

    def set_train(self, module: nn.Module, train: bool = True) -> None:
        module.train(train)
        if train:
            set_bn_mode(module, self.bn_mode)

    def _stopped_without_saving(self) -> str:
        last = self.ckpt.latest_path()
        # "last written", not "good": a value can grow for steps before it stops being finite
        if last and last.exists():
            return (f"The run stopped without saving; the last checkpoint written is {last}: resume from it "
                    "with --resume, e.g. with a lower learning rate or gradient clipping.")
        return ("The run stopped without saving, and no checkpoint was written yet: start it again, e.g. "
                "with a lower learning rate or gradient clipping.")

    def guard(self, name: str, value: torch.Tensor, what: str = "loss") -> None:
        """Stop (on every rank) when ``value`` is NaN/inf, before any optimiser step uses it.
        ``what`` names the value in the message (a loss, or e.g. the samples a network generated).
        Called inside a training step: ``self.step`` steps are done, this is step ``self.step + 1``."""
        bad = not bool(torch.isfinite(value.detach()).all())
        if D.any_flag(bad, self.device):
            # every rank stops here; each learns which ranks saw the value, so that all of them raise
            # the same message (one collective more, on this path only)
            seen = D.gather_objects(_first_bad(value) if bad else None)
            ranks = [r for r, v in enumerate(seen) if v is not None]
            became = seen[ranks[0]]
            on = "" if len(seen) == 1 else \
                f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {len(seen)}"
            raise TrainingDivergedError(
                f"{self.kind} training: {what} {name!r} became {became} in step {self.step + 1} "
                f"(epoch {self.step // self.steps_per_epoch}){on}, after {self.step} completed step"
                f"{'' if self.step == 1 else 's'}; expected a finite value. {self._stopped_without_saving()}")

    def guard_weights(self) -> None:
        """Stop when an optimiser step that had a finite loss left a trainable weight NaN/inf (a far
        too high learning rate): checked before the weights are rendered, saved or exported, so that
        neither a plot of NaN points nor a checkpoint of them ends the run (the next step's loss
        would only show it one step later)."""
        finite = {name: torch.stack([torch.isfinite(p.detach()).all() for p in m.parameters()]).all()
                  for name, m in self.trainable.items()}   # one device read per network
        bad = [name for name, ok in finite.items() if not bool(ok)]
        if D.any_flag(bool(bad), self.device):
            which = ", ".join(bad) if bad else "the networks (on another rank)"
            raise TrainingDivergedError(
                f"{self.kind} training: the weights of {which} became non-finite in step {self.step} "
                f"(epoch {(self.step - 1) // self.steps_per_epoch}), whose loss was finite: the learning "
                f"rate is likely far too high. {self._stopped_without_saving()}")

    def autocast(self):
        """The context for forward passes and losses: torch.autocast in the run's precision (bf16 or
        fp16 operands, fp32 master weights), nothing in fp32. Losses should leave it in fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor, name: str = "main") -> None:
        """``loss.backward()``, scaled for the optimiser ``name`` in fp16."""
        scaler = self.scalers.get(name)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def clip_and_step(self, name: str, clip) -> float:
        opt = self.optimizers[name]
        scaler = self.scalers.get(name)
        if scaler is not None:
            scaler.unscale_(opt)   # clip and log the true gradient norm
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = float("nan")
        if params:  # with clip None the norm is only measured (for the logs)
            norm = float(torch.nn.utils.clip_grad_norm_(params, float(clip) if clip is not None else float("inf")))
        if scaler is not None:
            scaler.step(opt)       # skipped (and the scale lowered) when the gradient overflowed
            scaler.update()
        else:
            opt.step()
        return norm

    # -- learning rate ---------------------------------------------------------------------------
    def lr_factor(self, epoch: int, step: int = 0) -> float:
        """``gamma ** (epoch // every_epochs)``, times the per-step decay when ``decay_steps`` > 0."""
        s = self.cfg["train"]["lr_schedule"]
        gamma, every = float(s.get("gamma", 1.0)), max(1, int(s.get("every_epochs", 1)))
        f = gamma ** (epoch // every)
        n = int(s.get("decay_steps", 0) or 0)
        if n > 0:
            p, low = min(step, n) / n, float(s.get("decay_to", 0.0))
            if s.get("decay", "linear") == "cosine":
                f *= low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * p))
            else:
                f *= 1.0 - (1.0 - low) * p
        return f

    def apply_lr(self, epoch: int, step: int = 0) -> None:
        f = self.lr_factor(epoch, step)
        for name, opt in self.optimizers.items():
            for g, lr0 in zip(opt.param_groups, self.base_lrs[name]):
                g["lr"] = lr0 * f

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict:
        rngs = D.gather_objects(R.capture_state())
        return {
            "kind": self.kind,
            "version": 1,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "data": {"steps_per_epoch": self.steps_per_epoch,
                     "global_batch": self.dist.world_size * int(self.cfg["train"]["batch_size"]),
                     "num_samples": len(self.dataset)},
            "world_size": self.dist.world_size,
            "models": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "optimizer_types": {k: type(o).__name__ for k, o in self.optimizers.items()},
            "scalers": {k: sc.state_dict() for k, sc in self.scalers.items()},
            "rng": rngs,
            "model_config": self.model_config.to_dict(),
            "config_yaml": dump(self.cfg),
            "sources": dict(self.sources),
        }

    def save(self) -> Path | None:
        st = self.state()  # collective (RNG gather): every rank calls it
        path = None
        if self.dist.is_main:
            path = self.ckpt.save(st)
        D.barrier()
        self._saved = (self.step, path)
        return path

    def save_unless_saved(self) -> Path | None:
        """save(), unless this step's checkpoint was just written (the last step a multiple of
        checkpoint.every_steps): writing it again cost a full write, and rewrote a split checkpoint's
        parts in place under the index that named them."""
        saved = getattr(self, "_saved", None)
        if saved is not None and saved[0] == self.step:
            return saved[1]
        return self.save()

    def load(self, path) -> None:
        early = getattr(self, "_resume_state", None)   # read once, by __init__'s early check
        st = early[1] if early is not None and early[0] == path else load_state(path, map_location="cpu")
        self._resume_state = None
        if st.get("kind") != self.kind:
            raise CheckpointError(f"{path} is a {st.get('kind')!r} training state, expected {self.kind!r}")
        gb = self.dist.world_size * int(self.cfg["train"]["batch_size"])
        if st["data"]["global_batch"] != gb or st["data"]["num_samples"] != len(self.dataset):
            raise CheckpointError(
                f"{path}: the data order cannot be resumed: it was written with global batch "
                f"{st['data']['global_batch']} over {st['data']['num_samples']} samples, this run has global "
                f"batch {gb} over {len(self.dataset)} samples")
        missing = set(self.modules) - set(st["models"])
        if missing:
            raise CheckpointError(f"{path} lacks the modules {sorted(missing)} (has {sorted(st['models'])})")
        for k, m in self.modules.items():
            try:
                m.load_state_dict(st["models"][k])
            except RuntimeError as exc:
                # torch lists every mismatched tensor (hundreds for another model size): the first few
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                more = f" (+{len(lines) - 4} more)" if len(lines) > 4 else ""
                raise CheckpointError(f"{path}: module {k!r} does not match this configuration (another "
                                      f"model size?): {' '.join(lines[:4])}{more}") from exc
        saved_types = st.get("optimizer_types", {})   # states before this key: not checked
        for k, o in self.optimizers.items():
            if saved_types.get(k, type(o).__name__) != type(o).__name__:
                # another optimiser's state loads without complaint and fails at its first step
                raise CheckpointError(
                    f"{path}: the {k!r} optimiser was {saved_types[k]}, this run's is {type(o).__name__}; "
                    f"resume with the optimiser it was trained with, or start a new run from the "
                    f"weights it exported (init=<run folder>/{self.kind}.pt)")
            fresh = [{h: v for h, v in g.items() if h != "params"} for g in o.param_groups]
            o.load_state_dict(st["optimizers"][k])
            self._keep_configured_hyperparameters(k, o, fresh)
        self._log_changed_settings(path, st.get("config_yaml"))
        for key, digest in (st.get("sources") or {}).items():
            if self.sources.get(key) != digest:
                # the weights just loaded came from the file of the checkpoint's run: the export
                # must name that one, not whatever the key names now
                log.warning("--resume: %s now names a file with SHA-256 %s, but %s was trained from "
                            "one with SHA-256 %s; the run goes on with the weights it was trained "
                            "from, and its export names that file", key, self.sources.get(key), path,
                            digest)
                self.sources[key] = digest
        for k, sc in self.scalers.items():
            if k in st.get("scalers", {}):
                sc.load_state_dict(st["scalers"][k])
        self.step = int(st["step"])
        self._saved = (self.step, Path(path))   # nothing to write again before the next step
        rngs = st.get("rng") or []
        if self.dist.rank < len(rngs):
            R.restore_state(rngs[self.dist.rank])

    @staticmethod
    def _keep_configured_hyperparameters(name: str, opt, fresh: list) -> None:
        """After ``opt.load_state_dict``: the hyper-parameters of this run's configuration (betas,
        weight decay, momentum, eps, ...) over the checkpoint's, as the learning rate already is
        (apply_lr). load_state_dict restores every param-group entry, so a resume with changed
        betas silently kept the old ones while config.yaml recorded the new ones."""
        def same(a, b):
            return (list(a) == list(b)) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) \
                else a == b
        changed = set()
        for group, want in zip(opt.param_groups, fresh):
            for key, value in want.items():
                if key in ("lr", "initial_lr"):
                    continue
                if key in group and not same(group[key], value):
                    changed.add(f"{key} {group[key]} -> {value}")
                group[key] = value
        if changed:
            log.warning("--resume: the %r optimiser takes this run's settings: %s", name,
                        ", ".join(sorted(changed)))

    # what a sample is made of (its scans, sizes, targets) and the networks' widths: a resume must
    # keep them, or it goes on with other data (or fails) after the data is made
    RESUME_FIXED = ("model", "data.kind", "data.root", "data.sequences", "data.gt_cache", "data.scan_points",
                    "data.tile", "data.target_points", "data.augment", "data.synthetic", "data.scan_window",
                    "data.limit")

    def _check_resume_settings(self, path, config_yaml) -> None:
        """Refuse, before any data is made, a resume whose sample or network settings differ from
        those of the run that wrote ``path`` (e.g. the run's --set flags left out)."""
        before = _earlier_config(config_yaml)
        if before is None:
            return
        unset = object()

        def get(cfg, key):
            for part in key.split("."):
                if not isinstance(cfg, dict) or part not in cfg:
                    return unset
                cfg = cfg[part]
            return cfg
        now = yaml.safe_load(dump(self.cfg))
        diffs = []
        for k in self.RESUME_FIXED:
            old, new = get(before, k), get(now, k)
            if old == new or old is unset:    # a key the run's version did not have: not compared
                continue
            if k in ("data.root", "data.gt_cache") and old is not None and new is not None:
                # the same data moved to another folder is a resume, not another run
                log.warning("--resume: %s is %s now, %s in the run that wrote %s: taken for the same "
                            "data in another place", k, new, old, path)
                continue
            diffs.append(f"{k}: {old!r} there, {new!r} now")
        if diffs:
            saved = Path(path).parent.parent / "config.yaml"
            # the run folder too: without --out the run would go to runs/config/, a fresh run
            same = self.out.resolve() == saved.parent.resolve()
            again = f"--config {saved} --out {self.out} --resume" + ("" if same else f" {path}")
            hint = (f"; its settings are in {saved}: `{again}` resumes with all of them"
                    if saved.is_file() else "")
            raise ConfigError(f"--resume: {path} was written by a run with other data or networks ("
                              + "; ".join(diffs) + "): a run continues on the data and networks it "
                              "began with, so give the settings it was started with again" + hint)

    def _log_changed_settings(self, path, config_yaml) -> None:
        """Name every setting that differs from the checkpoint's run (a resume takes this run's)."""
        before = _earlier_config(config_yaml)
        if before is None:
            return

        def flat(d, prefix=""):
            out = {}
            for k, v in (d or {}).items():
                if isinstance(v, dict):
                    out.update(flat(v, f"{prefix}{k}."))
                else:
                    out[f"{prefix}{k}"] = v
            return out
        old, new = flat(before), flat(yaml.safe_load(dump(self.cfg)))
        diffs = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
                 for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diffs:
            log.info("--resume: settings changed since %s (this run's apply): %s", path, "; ".join(diffs))

    # -- validation (training/validation.py) -----------------------------------------------------
    def make_validator(self):
        """The run's :class:`~training.validation.Validator`, or None when validation is off."""
        if int(self.cfg["validation"]["every_steps"]) <= 0:
            return None
        from .validation import Validator
        validator = Validator(self.cfg, self.kind, self.out)
        if self.step == 0:
            validator.best = None   # a fresh run: a best of an earlier run in this folder does not count
        # a wrong validation.root / sequence stops the run now, not at step N. Under DDP rank 0
        # loads the frames (it alone validates) and tells the other ranks whether it could, so that
        # every rank stops at once rather than waiting for rank 0 at the first validation
        error = None
        if self.dist.is_main:
            try:
                validator.frames()
            except LidarCompletionError as exc:
                error = exc
        message = D.broadcast_object(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise LidarCompletionError(f"rank 0 could not load the validation frames: {message}")
        return validator

    def validate(self, validator, logger) -> None:
        """Rank 0 completes the held-out frames, logs ``val/*`` and exports the weights to
        ``<out>/best/`` when the selected metric improved; the other ranks wait."""
        if self.dist.is_main:
            predict = self.validation_predictor(validator.guidance)
            if predict is not None:
                try:
                    metrics = validator.evaluate(predict)
                except ModelOutputError as exc:
                    # a held-out sample that explodes is not a diverged run (the guards stop that):
                    # recorded as an infinite error, never a best, and training goes on
                    log.warning("validation at step %d failed: %s; recorded as inf (not a best), "
                                "training goes on", self.step, exc)
                    metrics = {"cd": math.inf, "jsd_bev": math.inf, "seconds": 0.0, "frames": 0}
                if validator.improved(metrics):
                    self.export(validator.best_dir / f"{self.kind}.pt")
                    validator.record_best(self.step, metrics)
                logger.scalars(self.step, validator.logs(metrics))
        D.barrier()

    # -- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        finishing = getattr(self, "_finishing", False)
        if self._stop_signal is not None and signum == signal.SIGINT:
            latest = self.ckpt.latest_path() if self.dist.is_main else None
            where = "while the finished run was being saved" if finishing else f"in step {self.step + 1}"
            raise TrainingAborted(
                f"stopped at once by a second Ctrl-C {where}, without a checkpoint; "
                + (f"--resume continues from the last one, {latest}" if latest else
                   "none was written before, so the run starts again from the beginning"))
        first = self._stop_signal is None
        self._stop_signal = signum
        if first and self.dist.is_main:
            # a step can take minutes on a CPU: say at once that the signal was taken
            name = signal.Signals(signum).name
            again = " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else ""
            if finishing:
                # all steps are done: the final checkpoint (and export) are being written
                exporting = self.cfg["checkpoint"].get("export", True)
                what = "checkpoint and export are" if exporting else "checkpoint is"
                print(f"\n{name} received: the run has done its {self.step} steps and stops once its final "
                      f"{what} written{again}", file=sys.stderr, flush=True)
            else:
                print(f"\n{name} received: the run stops after step {self.step + 1} and writes its "
                      f"checkpoint there{again}", file=sys.stderr, flush=True)

    def _install_signals(self):
        old = {}
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                old[s] = signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread: signals cannot be caught here
            return {}
        return old

    @staticmethod
    def _restore_signals(old):
        for s, h in old.items():
            signal.signal(s, h)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        # the folder, held since __init__, is free again once the run ends, however it ends
        try:
            return self._run()
        finally:
            release_folder(self._held)
            self._held = None

    def _run(self) -> dict:
        cfg = self.cfg
        logc = cfg["log"]
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump(cfg), encoding="utf-8")
        logger = RunLogger(self.out, self.dist.is_main, tensorboard=bool(logc["tensorboard"]),
                           progress=bool(logc["progress"]), total_steps=self.total_steps,
                           initial_step=self.step, desc=f"{self.kind}")
        if self.dist.is_main and self.step > 0:
            # a best of the abandoned continuation (after the checkpoint) is not this run's history
            from .validation import discard_later_best
            discard_later_best(self.out, self.step)
        self._finishing = False
        every_ckpt = int(cfg["checkpoint"]["every_steps"])
        every_log = max(1, int(logc["every_steps"]))
        every_render = int(logc["render_every_steps"] or 0)
        old = self._install_signals()
        t_start = time.time()
        steps_done = 0
        status, error = "finished", None
        step_times = []
        try:
            # inside: a wrong validation root fails the run like any error (summary, signals restored)
            validator = self.make_validator()
            if validator is not None and self.step == 0 and cfg["validation"]["at_start"]:
                self.validate(validator, logger)
            if self.step < self.total_steps:
                self.sampler.set_range(self.step, self.total_steps)
                dcfg = cfg["data"]
                loader = make_loader(self.dataset, self.sampler, self.loader_workers,
                                     dcfg.get("loader_start", "forkserver"), dcfg.get("loader_timeout_s", 0))
                for batch in _batches(loader, self.loader_workers, dcfg.get("loader_timeout_s", 0)):
                    epoch = self.step // self.steps_per_epoch
                    self.apply_lr(epoch, self.step)
                    t0 = time.time()
                    batch = self.prepare_batch(batch)
                    logs = self.train_step(batch)
                    self.step += 1
                    steps_done += 1
                    step_times.append(time.time() - t0)
                    logs["lr"] = next(iter(self.optimizers.values())).param_groups[0]["lr"]
                    logs["epoch"] = epoch
                    logs["time/step_s"] = step_times[-1]
                    if self.step % every_log == 0 or self.step == 1 or self.step == self.total_steps:
                        logger.scalars(self.step, logs)
                    render_now = every_render and (self.step % every_render == 0 or self.step == 1)
                    validate_now = validator is not None and validator.due(self.step, self.total_steps)
                    if render_now or validate_now or (every_ckpt and self.step % every_ckpt == 0) \
                            or self.step == self.total_steps:
                        self.guard_weights()   # before the weights are drawn, validated or saved
                    if render_now:
                        clouds = self.render(batch)
                        if clouds:
                            logger.bev(self.step, f"{self.kind}/bev", clouds)
                    logger.progress(1, {k: v for k, v in logs.items() if k.startswith("loss")})
                    if validate_now:
                        self.validate(validator, logger)
                    stop = D.any_flag(self._stop_signal is not None, self.device)
                    if every_ckpt and self.step % every_ckpt == 0 and not stop:
                        self.save()
                    if stop:
                        self.guard_weights()
                        path = self.save()
                        sig = self._stop_signal or signal.SIGTERM
                        raise TrainingInterrupted(
                            f"{self.kind} training interrupted by signal {int(sig)} at step {self.step}; "
                            f"checkpoint {path or self.ckpt.latest_path()} written; continue with --resume",
                            int(sig))
            self._finishing = True    # a signal now: say that the run is being saved, not "after step N+1"
            final_ckpt = self.save_unless_saved()
            export_path = None
            if self.dist.is_main and cfg["checkpoint"].get("export", True):
                export_path = self.export(self.out / f"{self.kind}.pt")
            D.barrier()
        except TrainingInterrupted:
            status = "interrupted"
            raise
        except TrainingDivergedError as exc:
            status, error = "diverged", str(exc)
            raise
        except TrainingAborted as exc:
            status, error = "aborted", str(exc)
            raise
        except BaseException as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._restore_signals(old)
            digests = D.gather_objects(params_digest(self.trainable))
            summary = {
                "kind": self.kind, "status": status, "step": self.step, "total_steps": self.total_steps,
                "steps_this_run": steps_done, "seconds": round(time.time() - t_start, 3),
                "mean_step_s": (sum(step_times[1:]) / max(1, len(step_times) - 1)) if len(step_times) > 1
                else (step_times[0] if step_times else None),
                "world_size": self.dist.world_size, "device": str(self.device),
                "rank_weight_digests": digests, "resumed_from": self.resumed_from,
            }
            if error is not None:
                summary["error"] = error
            if self.dist.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
            logger.close()
        summary["checkpoint"] = str(final_ckpt) if final_ckpt else None
        summary["export"] = str(export_path) if export_path else None
        return summary
