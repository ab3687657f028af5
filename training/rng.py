"""Keyed randomness and RNG-state capture.

Every random draw of a training step (timesteps, noise, condition dropout, the student's initial noise)
comes from a generator seeded by a hash of (run seed, epoch, position of the sample in the epoch's
global order, purpose). A sample's draws therefore do not depend on which rank holds it, on the batch
it is in, or on whether the run was interrupted and resumed: DDP on N processes sees exactly the
numbers a single process sees on the union batch, and a resumed run continues bit for bit.

The global RNGs (torch, numpy, python, CUDA) are still captured and restored per rank in training
checkpoints, for code that uses them (DataLoader worker seeding, third-party code).
"""
from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import torch


def key_seed(*keys) -> int:
    """A 63-bit seed from integers / strings (stable across processes and Python versions)."""
    h = hashlib.blake2b(digest_size=8)
    for k in keys:
        if isinstance(k, str):
            h.update(b"s" + k.encode("utf-8") + b"\0")
        else:
            h.update(b"i" + struct.pack("<q", int(k)))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def generator(*keys) -> torch.Generator:
    """A CPU torch.Generator seeded from ``keys``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(key_seed(*keys))
    return g


def numpy_rng(*keys) -> np.random.Generator:
    return np.random.default_rng(key_seed(*keys))


def randn(shape, *keys, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws keyed by ``keys`` (drawn on the CPU, so identical on every device)."""
    out = torch.randn(tuple(shape), generator=generator(*keys), dtype=dtype)
    return out.to(device) if device is not None else out


def randint(low: int, high: int, *keys) -> int:
    """One integer in [low, high] (inclusive) keyed by ``keys``."""
    return int(torch.randint(low, high + 1, (1,), generator=generator(*keys)).item())


def uniform(*keys) -> float:
    return float(torch.rand((1,), generator=generator(*keys)).item())


def capture_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_state(state: dict) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
