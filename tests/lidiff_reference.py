"""Helpers for the LiDiff reference fixtures (tests/fixtures/, see tests/fixtures/PROVENANCE.md)."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures"
PREFIXES = {"encoder": "partial_enc.", "denoiser": "model.", "refiner": "model_refine."}


def synth_param(name: str, shape) -> np.ndarray:
    """Deterministic weight of a full checkpoint key (the rule in tests/fixtures/PROVENANCE.md)."""
    shape = tuple(shape)
    if name.endswith("num_batches_tracked"):
        return np.zeros(shape, dtype=np.int64)
    a = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(shape)
    if name.endswith(".kernel"):
        fan_in = shape[0] * shape[1] if len(shape) == 3 else shape[0]
        v = a * np.sqrt(2.0 / fan_in)
    elif name.endswith(".bn.weight"):
        v = 1.0 + 0.1 * a
    elif name.endswith(".bn.bias"):
        v = 0.05 * a
    elif name.endswith(".bn.running_mean"):
        v = 0.05 * a
    elif name.endswith(".bn.running_var"):
        v = 1.0 + 0.2 * np.abs(a)
    elif name.endswith(".weight"):
        v = a * np.sqrt(1.0 / shape[1])
    elif name.endswith(".bias"):
        v = 0.05 * a
    else:
        raise ValueError(name)
    return v.astype(np.float32)


def synth_state_dict(module: torch.nn.Module, prefix: str) -> dict:
    return {k: torch.from_numpy(synth_param(prefix + k, v.shape)) for k, v in module.state_dict().items()}


def load_synthetic(module: torch.nn.Module, kind: str) -> torch.nn.Module:
    module.load_state_dict(synth_state_dict(module, PREFIXES[kind]), strict=True)
    return module.eval()


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    d = np.asarray(ours, dtype=np.float64) - np.asarray(ref, dtype=np.float64)
    return float(np.abs(d).max()), float(np.sqrt(np.mean(d ** 2)))
