"""Static shapes: what a forward pass needs to be captured in a CUDA graph.

A pass in "static" mode gives every tensor a shape fixed in advance and never reads the device from
the host. Each coordinate set gets a capacity (rows past the real ones carry the key PAD_KEY, sort
last and are never anyone's neighbour), and the nearest-cell fallback a capacity of rows. What
would have been a host read becomes a device flag ("did not fit" / "invalid input"), read once after
the pass by whoever ran it, together with the sizes seen, so that capacities can grow.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch

from .coords import MAX_BATCH

PAD_KEY = torch.iinfo(torch.long).max   # key of a padding row: batch field 511, sorts after any real key
PAD_BATCH = MAX_BATCH - 1               # batch index reserved for padding rows in static mode

_STATE = threading.local()


class StaticShapes:
    """Capacities and findings of one static-mode pass.

    ``caps`` maps a size key to its capacity: ``("level", m, stride)`` for the coordinate set at
    ``stride`` of the m-th voxelisation in the pass, ``("unresolved", n)`` for the rows of the n-th
    nearest-cell lookup that need the brute-force fallback. A key without a capacity gets its upper
    bound (every row). ``flags`` collects 0-d bool device tensors (true: an input was invalid or a
    size exceeded its capacity, so the pass's output must not be used); ``sizes`` the 0-d device
    tensors of the sizes seen. :meth:`summary` stacks both for one host read."""

    def __init__(self, caps: dict | None = None):
        self.caps = dict(caps or {})
        self.flags: list = []
        self.sizes: dict = {}
        self._ordinals: dict = {}
        self.memo: dict = {}    # what one pass computes once and reuses (e.g. a reference index)

    def ordinal(self, kind: str) -> int:
        n = self._ordinals.get(kind, 0)
        self._ordinals[kind] = n + 1
        return n

    def capacity(self, key, upper: int) -> int:
        cap = self.caps.get(key)
        return int(upper) if cap is None else max(1, min(int(cap), int(upper)))

    def flag(self, bad: torch.Tensor) -> None:
        self.flags.append(bad.reshape(()))

    def size(self, key, value: torch.Tensor, cap: int | None) -> None:
        """Record a size and flag it when it exceeds ``cap`` (None: record only)."""
        value = value.reshape(())
        self.sizes[key] = value
        if cap is not None:
            self.flags.append(value > cap)

    def summary(self) -> tuple[list, torch.Tensor]:
        """(size keys, int64 device tensor [any flag, size_0, size_1, ...]) for one host read."""
        keys = list(self.sizes)
        device = (self.flags or list(self.sizes.values()) or [torch.zeros(())])[0].device
        bad = torch.stack(self.flags).any() if self.flags else torch.zeros((), dtype=torch.bool, device=device)
        vals = [bad.long()] + [self.sizes[k].long() for k in keys]
        return keys, torch.stack(vals)


def static_shapes() -> StaticShapes | None:
    """The static-mode plan of the running pass on this thread, or None."""
    return getattr(_STATE, "static", None)


@contextlib.contextmanager
def use_static_shapes(plan: StaticShapes):
    """Run the torch backend in static mode inside this block (inference only)."""
    old = getattr(_STATE, "static", None)
    _STATE.static = plan
    try:
        yield plan
    finally:
        _STATE.static = old


def caching_allowed() -> bool:
    """False while a CUDA graph is captured or a static pass runs: caches keyed on tensor identity
    would be baked into the graph while the buffers behind them change between replays."""
    if static_shapes() is not None:
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def grow_capacity(size: int, margin: float = 1.5, align: int = 128) -> int:
    """Capacity for a size seen: ``size * margin`` plus one block, rounded up to ``align``."""
    return int(math.ceil((size * margin + align) / align) * align)




def tensor_version(t: torch.Tensor) -> int:
    """The in-place modification counter of ``t`` for caches keyed on it; -1 for inference tensors
    (made under ``torch.inference_mode``), which track none: a cache keyed on one assumes it is not
    modified in place."""
    return -1 if t.is_inference() else t._version
