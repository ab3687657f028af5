"""Data plumbing of the trainers: resumable per-rank sharding, keyed samples, collation.

A *source* is anything with ``__len__`` and ``sample(index, rng) -> dict`` (or ``__getitem__``)
returning float32 numpy arrays:

* ``scan``   (n, 3): the farthest-point-sampled input scan (the condition), or instead
  ``scan_full`` (N, 3): the whole scan, sampled on the trainer's device
  (:func:`sample_scans_on_device`, ``data.sample_on``),
* ``x_init`` (n * tile, 3): the scan tiled (optional; built from ``scan`` when absent),
* ``target`` (m, 3): the dense ground truth (teacher / distillation), or for the refiner
  ``input`` (k, 3) jittered dense points and ``target`` (m, 3) the dense aggregate.

:class:`ShardSampler` is torch's DistributedSampler sharding (rank r takes global positions r, r + R,
r + 2R, ... of each epoch's permutation) made resumable at any step, and it yields
``(index, epoch, position)`` so that :class:`KeyedDataset` can seed each sample's randomness by its
position in the global order (see :mod:`training.rng`).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from lidar_completion.data.dataset import tile_to
from lidar_completion.errors import DatasetError

from . import rng as R


class ShardSampler(DistributedSampler):
    """Batch sampler: one list of ``(index, epoch, position)`` per step for this rank.

    ``steps_per_epoch = max(1, N // (world * batch))``; global positions of step s are
    ``s * world * batch + r + j * world`` for rank r and local slot j (DistributedSampler's
    interleaving); index = permutation[position % N]. The union over ranks of one step is therefore
    the same set of samples for any split of a global batch across ranks.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        if num_samples <= 0:
            raise DatasetError("the training set is empty: expected at least one sample, found 0")
        super().__init__(range(num_samples), num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=True)
        self.n = int(num_samples)
        self.batch = int(batch_size)
        self.world = int(world_size)
        self.rank_ = int(rank)
        self.start_step = 0
        self.end_step = None

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n // (self.world * self.batch))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:  # noqa: D401
        """Iterate over the rest of ``epoch`` from its step ``start_step``."""
        super().set_epoch(epoch)
        self.start_step = int(start_step)
        self.end_step = None

    def set_range(self, first_step: int, end_step: int) -> None:
        """Iterate over global steps ``first_step`` .. ``end_step - 1``, across epochs (one
        DataLoader, and its workers, for the whole run)."""
        spe = self.steps_per_epoch
        super().set_epoch(first_step // spe)
        self.start_step = first_step % spe
        self.end_step = int(end_step)

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        g = R.generator(self.seed, epoch, "permutation")
        return torch.randperm(self.n, generator=g).numpy()

    def _batch(self, perm, epoch: int, s: int) -> list:
        gb = self.world * self.batch
        out = []
        for j in range(self.batch):
            pos = s * gb + self.rank_ + j * self.world
            out.append((int(perm[pos % self.n]), int(epoch), int(pos)))
        return out

    def __iter__(self) -> Iterator[list]:
        spe = self.steps_per_epoch
        if self.end_step is None:
            perm = self.permutation(self.epoch)
            for s in range(self.start_step, spe):
                yield self._batch(perm, self.epoch, s)
            return
        step = self.epoch * spe + self.start_step
        perm_epoch, perm = None, None
        while step < self.end_step:
            epoch, s = divmod(step, spe)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, self.permutation(epoch)
            yield self._batch(perm, epoch, s)
            step += 1

    def __len__(self) -> int:
        if self.end_step is None:
            return self.steps_per_epoch - self.start_step
        return max(0, self.end_step - (self.epoch * self.steps_per_epoch + self.start_step))


class KeyedDataset(Dataset):
    """Wraps a source; item ``(index, epoch, position)`` -> the sample, with its augmentation seeded
    by (seed, epoch, position) and the key stored as ``key``."""

    def __init__(self, source, seed: int, tile: int = 10):
        self.source = source
        self.seed = int(seed)
        self.tile = int(tile)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        index, epoch, pos = item
        rng = R.numpy_rng(self.seed, epoch, pos, "data")
        if hasattr(self.source, "sample"):
            s = self.source.sample(index, rng)
        else:
            s = self.source[index]
        s = dict(s)
        if "scan" in s and "x_init" not in s:
            s["x_init"] = np.tile(np.asarray(s["scan"], dtype=np.float32), (self.tile, 1))
        s["key"] = (int(epoch), int(pos))
        s["index"] = int(index)
        return s


def collate(samples: list) -> dict:
    """Pack a list of samples into flat point tensors with batch indices (rows grouped by element)."""
    out: dict = {"batch_size": len(samples)}
    names = [k for k in samples[0] if isinstance(samples[0][k], np.ndarray)]
    for name in names:
        arrs = [np.asarray(s[name], dtype=np.float32)[:, :3] for s in samples]
        out[name] = torch.from_numpy(np.concatenate(arrs, axis=0))
        out[name + "_batch"] = torch.cat([torch.full((len(a),), b, dtype=torch.long)
                                          for b, a in enumerate(arrs)])
        out[name + "_counts"] = torch.tensor([len(a) for a in arrs], dtype=torch.long)
    out["key"] = torch.tensor([s["key"] for s in samples], dtype=torch.long)
    out["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    return out


def sample_scans_on_device(batch: dict, n_fps: int, tile: int, device) -> dict:
    """Farthest-point sample a collated batch's unsampled scans (``scan_full``) on ``device``, in
    one launch for the whole batch (:func:`lidar_completion.sparse.triton_backend.
    farthest_point_sample_device`: exact, from each cloud's first point - the sources shuffle the
    cloud when they augment, so the start is random): ``scan`` (n, 3) per element, ``n_fps``
    points or the whole scan when it has fewer, ``x_init`` each element's scan tiled ``tile``
    times, with their ``_batch`` and ``_counts``, as device tensors. A batch without
    ``scan_full`` comes back as it is."""
    if "scan_full" not in batch:
        return batch
    from lidar_completion.sparse.triton_backend import farthest_point_sample_device

    device = torch.device(device)
    counts = [int(c) for c in batch["scan_full_counts"]]
    if min(counts) < 1:
        raise DatasetError(f"cannot farthest-point-sample an empty scan (points per scan: {counts})")
    full = batch["scan_full"].to(device)
    clouds = list(torch.split(full, counts))
    want = [min(int(n_fps), c) for c in counts]
    try:
        idx = farthest_point_sample_device(clouds, want)
    except RuntimeError as exc:   # e.g. its programs not all resident on a GPU shared with other work
        raise RuntimeError(f"{exc}; set data.sample_on=cpu to sample the scans in the loader instead") from exc
    scans = [c.index_select(0, i) for c, i in zip(clouds, idx)]
    out = {k: v for k, v in batch.items() if not k.startswith("scan_full")}
    for name, parts in (("scan", scans), ("x_init", [sc.repeat(int(tile), 1) for sc in scans])):
        sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
        out[name] = torch.cat(parts)
        out[name + "_batch"] = torch.repeat_interleave(torch.arange(len(parts)), sizes).to(device)
        out[name + "_counts"] = sizes
    return out


def make_loader(dataset: KeyedDataset, sampler: ShardSampler, num_workers: int = 0, start: str = "forkserver",
                timeout_s: float = 0.0) -> DataLoader:
    """Batches of ``dataset`` in ``sampler``'s order; with ``num_workers`` > 0 the samples are made
    in worker processes started by ``start``. ``forkserver`` (the default) starts each worker from a
    clean server process: a forked worker inherits the trainer's CUDA context, thread pools and any
    lock another thread held at the fork (TensorBoard's writer, logging), which can leave it hung
    before its first sample. ``timeout_s`` turns a worker that delivers nothing into an error."""
    workers = int(num_workers)
    kw = {}
    if workers > 0:
        kw = {"multiprocessing_context": start, "timeout": float(timeout_s or 0.0), "prefetch_factor": 2}
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=False, pin_memory=False, **kw)


class ArraySource:
    """In-memory source from lists of arrays (tests, overfitting, single scans).

    ``scans[i]`` is used as is (already sampled); ``targets[i]`` is the dense ground truth. With
    ``target_points`` the target is shuffled and tiled/truncated to that size with the sample's rng."""

    def __init__(self, scans, targets, target_points: int | None = None, inputs=None):
        if len(scans) != len(targets):
            raise DatasetError(f"expected as many scans as targets, found {len(scans)} and {len(targets)}")
        self.scans = [np.asarray(s, dtype=np.float32)[:, :3] for s in scans]
        self.targets = [np.asarray(t, dtype=np.float32)[:, :3] for t in targets]
        self.inputs = None if inputs is None else [np.asarray(a, dtype=np.float32)[:, :3] for a in inputs]
        self.target_points = target_points

    def __len__(self) -> int:
        return len(self.scans)

    def sample(self, index: int, rng: np.random.Generator) -> dict:
        tgt = self.targets[index]
        if self.target_points:
            tgt = tile_to(tgt, int(self.target_points), rng)
        out = {"scan": self.scans[index], "target": tgt}
        if self.inputs is not None:
            out["input"] = self.inputs[index]
        return out
