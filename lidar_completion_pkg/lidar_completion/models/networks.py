"""The three LiDiff networks: condition encoder, conditioned denoiser U-Net, refinement U-Net.

Structure, names and shapes follow the published networks exactly (docs/method.md, "Networks"), so
that published checkpoints load with ``strict=True`` and the state dicts equal the reference listing. The networks
are written against the backend interface of :mod:`lidar_completion.sparse` only.

Two deliberate differences from the published code, neither of which changes a number it computes
correctly: (1) every voxel row uses the time embedding of its own batch element (the published
denoiser mis-assigns rows at coarse levels when a batch mixes timesteps); (2) the conditioning MLPs
(``latent_*``, ``*_temp``, ``latemp_*``) are evaluated once per *condition cell* and gathered to the
voxels that pick that cell, instead of once per voxel - the same function, ~100x less work.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import nn

from .. import sparse
from ..errors import CloudFormatError
from ..sparse import caching_allowed, pack_keys, static_shapes, tensor_version
from .config import ModelConfig

SITES = ("stage1", "stage2", "stage3", "stage4", "up1", "up2", "up3", "up4")


class Condition(NamedTuple):
    """Output of the condition encoder: stride-16 cells sorted by (b, x, y, z) and their features."""
    coords: torch.Tensor  # (E, 4) int64, integer 0.05 m voxel units, multiples of 16
    feats: torch.Tensor   # (E, C)

    def to(self, device) -> "Condition":
        return Condition(self.coords.to(device), self.feats.to(device))

    def select_batch(self, b: int, new_index: int = 0) -> "Condition":
        """The cells of batch element ``b``, relabelled as element ``new_index``."""
        m = self.coords[:, 0] == b
        c = self.coords[m].clone()
        c[:, 0] = new_index
        return Condition(c, self.feats[m])

    @staticmethod
    def concat(conds: Sequence["Condition"]) -> "Condition":
        """Stack single- or multi-element conditions, renumbering batch elements consecutively."""
        coords, feats, base = [], [], 0
        for c in conds:
            cc = c.coords.clone()
            n = int(cc[:, 0].max()) + 1 if cc.numel() else 0
            cc[:, 0] += base
            base += n
            coords.append(cc)
            feats.append(c.feats)
        return Condition(torch.cat(coords), torch.cat(feats))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [sin(t f_i), cos(t f_i)], f_i = exp(-i ln(10000) / (dim/2 - 1)).

    Frequencies in float64 cast to float32; the product in float32 (as the reference)."""
    key = (dim, str(t.device))
    freq = _FREQS.get(key)
    if freq is None:   # a constant: made once per device (five kernels less per denoiser call),
        half = dim // 2  # outside inference mode (an inference tensor cannot join a later backward)
        with torch.inference_mode(False):
            i = torch.arange(half, dtype=torch.float64, device=t.device)
            freq = _FREQS[key] = torch.exp(-math.log(10000.0) * i / (half - 1)).float().view(1, -1)
    arg = t.float().view(-1, 1) * freq
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


_FREQS: dict = {}


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, cout))


def _stack_mlps(mlps: Sequence[nn.Sequential]) -> tuple:
    """S MLPs of one shape as (first layer's weights concatenated (S h, in) and bias (S h), second
    layer's weights (S, out, h) and bias (S, 1, out))."""
    return (torch.cat([m[0].weight for m in mlps]), torch.cat([m[0].bias for m in mlps]),
            torch.stack([m[2].weight for m in mlps]), torch.stack([m[2].bias for m in mlps]).unsqueeze(1))


def _apply_stacked(stacked: tuple, x: torch.Tensor) -> torch.Tensor:
    """The S MLPs of :func:`_stack_mlps` on the same rows x (N, in): (S, N, out), in three calls
    instead of 3 S (each row and MLP the same function as its own nn.Sequential)."""
    w1, b1, w2, b2 = stacked
    s = w2.shape[0]
    h = torch.addmm(b1, x, w1.t()).view(x.shape[0], s, -1).transpose(0, 1)
    return torch.baddbmm(b2, nn.functional.leaky_relu(h, 0.1), w2.transpose(1, 2))


class BasicConvolutionBlock(nn.Module):
    """conv(k=2, s=2) -> BN -> ReLU."""

    def __init__(self, B, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(B.Convolution(cin, cout, kernel_size=2, stride=2), B.BatchNorm(cout), B.ReLU())

    def forward(self, x):
        return self.net(x)


class BasicDeconvolutionBlock(nn.Module):
    """transposed conv(k=2, s=2) -> BN -> ReLU."""

    def __init__(self, B, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(B.ConvolutionTranspose(cin, cout, kernel_size=2, stride=2), B.BatchNorm(cout),
                                 B.ReLU())

    def forward(self, x):
        return self.net(x)


class ResidualBlock(nn.Module):
    """conv3-BN-ReLU-conv3-BN plus identity (or 1x1 conv + BN when the width changes), then ReLU."""

    def __init__(self, B, cin: int, cout: int):
        super().__init__()
        self._B = B
        self.net = nn.Sequential(B.Convolution(cin, cout, 3, 1), B.BatchNorm(cout), B.ReLU(),
                                 B.Convolution(cout, cout, 3, 1), B.BatchNorm(cout))
        if cin == cout:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(B.Convolution(cin, cout, 1, 1), B.BatchNorm(cout))
        self.relu = B.ReLU()   # no parameters: the state dict keeps the published names

    def forward(self, x):
        return self.relu(self.net(x) + self.downsample(x))


def _stem(B, cin: int, c: int) -> nn.Sequential:
    return nn.Sequential(B.Convolution(cin, c, 3, 1), B.BatchNorm(c), B.ReLU(),
                         B.Convolution(c, c, 3, 1), B.BatchNorm(c), B.ReLU())


def _stage(B, cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(BasicConvolutionBlock(B, cin, cin), ResidualBlock(B, cin, cout), ResidualBlock(B, cout, cout))


def _up(B, cin: int, cout: int, skip: int) -> nn.ModuleList:
    return nn.ModuleList([BasicDeconvolutionBlock(B, cin, cout),
                          nn.Sequential(ResidualBlock(B, cout + skip, cout), ResidualBlock(B, cout, cout))])


class _SparseNet(nn.Module):
    def __init__(self, config: ModelConfig, backend: str | None):
        super().__init__()
        self.config = config
        self.backend = sparse.resolve_backend(backend)
        self._B = sparse.get_backend(self.backend)

    def _voxelize(self, points: torch.Tensor, batch: torch.Tensor | None):
        if points.dim() != 2 or points.shape[0] == 0 or points.shape[1] < 3:
            raise CloudFormatError(f"expected a non-empty (N, 3) point tensor, got shape {tuple(points.shape)}")
        if batch is None:
            batch = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        # the tensor itself when it has 3 columns: sparse.shared_maps recognises a points tensor by identity
        return self._B.voxelize(points if points.shape[1] == 3 else points[:, :3], batch, self.config.voxel_size)


class ConditionEncoder(_SparseNet):
    """LiDiff's ``MinkGlobalEnc``: stem + four stages; output the stride-16 cells (0.8 m) and features."""

    def __init__(self, config: ModelConfig | None = None, backend: str | None = None):
        config = config or ModelConfig.full()
        super().__init__(config, backend)
        B, cs = self._B, config.channels
        self.stem = _stem(B, config.in_channels, cs[0])
        self.stage1 = _stage(B, cs[0], cs[1])
        self.stage2 = _stage(B, cs[1], cs[2])
        self.stage3 = _stage(B, cs[2], cs[3])
        self.stage4 = _stage(B, cs[3], cs[4])

    def forward(self, points: torch.Tensor, batch: torch.Tensor | None = None) -> Condition:
        B = self._B
        _, x = self._voxelize(points, batch)
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        coords = B.coords(x).long()
        feats = B.feats(x)
        order = torch.argsort(pack_keys(coords))
        return Condition(coords[order], feats[order])

    def empty_condition(self, num_points: int, batch_size: int = 1, device=None) -> Condition:
        """The unconditional condition: the encoding of ``num_points`` points all at the origin."""
        device = device or next(self.parameters()).device
        pts = torch.zeros(num_points * batch_size, 3, dtype=torch.float32, device=device)
        batch = torch.arange(batch_size, device=device).repeat_interleave(num_points)
        return self(pts, batch)


class Denoiser(_SparseNet):
    """LiDiff's ``MinkUNetDiff``: U-Net whose 8 stage inputs are scaled by a condition/time weight."""

    def __init__(self, config: ModelConfig | None = None, backend: str | None = None):
        config = config or ModelConfig.full()
        super().__init__(config, backend)
        B, cs = self._B, config.channels
        cd, td = config.cond_dim, config.time_dim
        self.stem = _stem(B, config.in_channels, cs[0])
        site_width = dict(zip(SITES, (cs[0], cs[1], cs[2], cs[3], cs[4], cs[5], cs[6], cs[7])))
        for i, site in enumerate(SITES):
            width = site_width[site]
            hidden = cd if i <= 4 else width  # latemp hidden: cond width up to up1, stage width after
            setattr(self, f"latent_{site}", _mlp(cd, cd, cd))
            setattr(self, f"latemp_{site}", _mlp(2 * cd, hidden, width))
            setattr(self, f"{site}_temp", _mlp(td, td, cd))
            if i < 4:
                setattr(self, site, _stage(B, cs[i], cs[i + 1]))
            else:
                j = i - 4  # up1..up4: in cs[4+j] -> out cs[5+j], skip from the encoder level 3-j
                setattr(self, site, _up(B, cs[4 + j], cs[5 + j], cs[3 - j]))
        self.last = nn.Sequential(nn.Linear(cs[8], config.head_hidden), nn.LeakyReLU(0.1),
                                  nn.Linear(config.head_hidden, 3))
        self._latent_cache = None       # inference only, see _latents
        self._stack_cache: dict = {}    # inference only, see _stacked

    # -- conditioning ---------------------------------------------------------------------------
    def _stacked(self, kind: str) -> tuple:
        """The 8 sites' ``latent_*`` (kind "latent") or ``*_temp`` (kind "temp") MLPs stacked for
        :func:`_apply_stacked` (all 8 of a kind have one shape). Kept at inference until a weight
        changes (pointer and version counter); made afresh, differentiably, while autograd records."""
        mlps = [getattr(self, f"latent_{s}" if kind == "latent" else f"{s}_temp") for s in SITES]
        params = [p for m in mlps for p in m.parameters()]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return _stack_mlps(mlps)
        stamp = (tuple((p.data_ptr(), tensor_version(p)) for p in params), torch.is_inference_mode_enabled())
        hit = self._stack_cache.get(kind)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = self._stack_cache[kind] = (stamp, _stack_mlps(mlps))
        return hit[1]

    def _latents(self, conds: Sequence[Condition]) -> torch.Tensor:
        """``latent_<site>`` of the cells of all conditions (rows concatenated in order): (8, E, cd).
        It depends on the conditions alone, so at inference (no autograd) it is kept across solver
        steps for the same condition tensors and recomputed when they or the weights change."""
        feats = [c.feats for c in conds]
        stacked = self._stacked("latent")
        rows = torch.cat(feats) if len(feats) > 1 else feats[0]
        if torch.is_grad_enabled() or not caching_allowed():
            return _apply_stacked(stacked, rows)
        # the tensors themselves (kept alive by the cache, so their identity cannot be reused)
        versions = (torch.is_inference_mode_enabled(), *(tensor_version(f) for f in feats))
        hit = self._latent_cache
        if (hit is not None and hit[0] is stacked and hit[1] == versions and len(hit[2]) == len(feats)
                and all(a is f for a, f in zip(hit[2], feats))):
            return hit[3]
        out = _apply_stacked(stacked, rows)
        self._latent_cache = (stacked, versions, feats, out)
        return out

    def _site_weights(self, i: int, conds: Sequence[Condition], latents: torch.Tensor,
                      tau_b: torch.Tensor, batch: torch.Tensor) -> list:
        """Modulation weights of every condition's cells at the ``i``-th site: one (E_g, C_site)
        matrix per condition, from one ``latemp_<site>`` call over all of them. ``tau_b``: the site's
        time MLP output per batch element; ``batch``: the cells' batch elements, concatenated."""
        site = SITES[i]
        p = latents[i]
        # index_select, not tau_b[batch]: the backward of advanced indexing accumulates with atomic
        # adds on a multi-threaded CPU (many cells share one batch element's row), so two identical
        # training runs ended with different weights; index_select's backward adds in a fixed order
        tau = tau_b.index_select(0, batch)
        h = torch.cat([tau, p], dim=1) if site == "up1" else torch.cat([p, tau], dim=1)
        w = getattr(self, f"latemp_{site}")(h)
        return list(torch.split(w, [c.coords.shape[0] for c in conds])) if len(conds) > 1 else [w]

    def _modulate(self, x, conds: Sequence[Condition], weights: list, cache: dict):
        """features * weight of the nearest condition cell; with several conditions, one feature set
        per condition (group dimension in front)."""
        B = self._B
        stride = B.stride(x)
        coords = None
        rows = []
        for g, cond in enumerate(conds):
            key = (stride, g)
            if key not in cache:
                if coords is None:
                    coords = B.coords(x).long()
                # the first lookup of a condition in this pass checks that every batch element
                # has cells; the other levels hold the same batch elements
                first = all(k[1] != g for k in cache)
                cache[key] = B.nearest_cell(coords, cond.coords, check_batches=first)
            rows.append(cache[key])
        return B.modulate(x, weights, rows)     # (G, M, C) with several conditions

    def _conditioning(self, conds: Sequence[Condition], emb: torch.Tensor):
        """A function of the site index giving the modulation weights of every condition there
        (the time MLPs of all sites and the latent MLPs of all sites run once, batched)."""
        taus = _apply_stacked(self._stacked("temp"), emb)        # (8, B, cd)
        latents = self._latents(conds)                           # (8, E, cd)
        batch = torch.cat([c.coords[:, 0] for c in conds]) if len(conds) > 1 else conds[0].coords[:, 0]
        if static_shapes() is not None:   # padding cells carry batch PAD_BATCH: any valid row will do
            batch = batch.clamp(max=emb.shape[0] - 1)
        return lambda i: self._site_weights(i, conds, latents, taus[i], batch)

    def _unet(self, x, conds: Sequence[Condition], emb: torch.Tensor):
        B = self._B
        cache = {}
        weights = self._conditioning(conds, emb)
        x0 = self.stem(x)
        x1 = self.stage1(self._modulate(x0, conds, weights(0), cache))
        x2 = self.stage2(self._modulate(x1, conds, weights(1), cache))
        x3 = self.stage3(self._modulate(x2, conds, weights(2), cache))
        x4 = self.stage4(self._modulate(x3, conds, weights(3), cache))
        y = x4
        for i, skip in ((4, x3), (5, x2), (6, x1), (7, x0)):
            up = getattr(self, SITES[i])
            y = up[0](self._modulate(y, conds, weights(i), cache))
            y = up[1](B.cat(y, skip))
        return y

    def forward(self, points: torch.Tensor, batch: torch.Tensor | None, t: torch.Tensor,
                cond: Condition) -> torch.Tensor:
        """Predicted noise (N, 3) for noisy points ``points`` (N, 3) of batch elements ``batch`` at
        integer timesteps ``t`` (B,), conditioned on ``cond`` (cells of the same batch elements)."""
        field, x = self._voxelize(points, batch)
        t = torch.as_tensor(t, device=points.device).view(-1)
        emb = timestep_embedding(t, self.config.time_dim)
        y = self._unet(x, [cond], emb)
        return self.last(self._B.slice(y, field))

    def forward_cfg(self, points: torch.Tensor, batch: torch.Tensor | None, t: torch.Tensor,
                    cond: Condition, uncond: Condition):
        """Conditional and unconditional predictions for the same noisy points in one pass.

        Both passes see the same coordinates, so on the torch backend they share the voxelisation,
        every kernel map and the stem, and run as two feature groups. On MinkowskiEngine they run as
        one batch of twice the size."""
        t = torch.as_tensor(t, device=points.device).view(-1)
        if getattr(self._B, "supports_groups", False):
            field, x = self._voxelize(points, batch)
            emb = timestep_embedding(t, self.config.time_dim)
            y = self._unet(x, [cond, uncond], emb)
            out = self.last(self._B.slice(y, field))
            return out[0], out[1]
        if batch is None:
            batch = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        nb = int(t.shape[0])
        both = Condition.concat([cond, uncond])  # concat renumbers uncond's elements to nb..
        out = self.forward(torch.cat([points, points]), torch.cat([batch, batch + nb]), torch.cat([t, t]), both)
        n = points.shape[0]
        return out[:n], out[n:]


class Refiner(_SparseNet):
    """LiDiff's refinement ``MinkUNet``: U-Net without conditioning, head -> tanh, 6 offsets per point."""

    def __init__(self, config: ModelConfig | None = None, backend: str | None = None):
        config = config or ModelConfig.full()
        super().__init__(config, backend)
        B, cs = self._B, config.channels
        self.stem = _stem(B, config.in_channels, cs[0])
        for i in range(4):
            setattr(self, f"stage{i + 1}", _stage(B, cs[i], cs[i + 1]))
        for j in range(4):
            setattr(self, f"up{j + 1}", _up(B, cs[4 + j], cs[5 + j], cs[3 - j]))
        self.last = nn.Sequential(nn.Linear(cs[8], config.head_hidden), nn.LeakyReLU(0.1),
                                  nn.Linear(config.head_hidden, 3 * config.refine_up), nn.Tanh())

    def forward(self, points: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        """Raw output (N, 3 * refine_up) in (-1, 1): offsets in metres, point j = columns 3j..3j+2."""
        B = self._B
        field, x = self._voxelize(points, batch)
        x0 = self.stem(x)
        x1 = self.stage1(x0)
        x2 = self.stage2(x1)
        x3 = self.stage3(x2)
        x4 = self.stage4(x3)
        y = x4
        for j, skip in enumerate((x3, x2, x1, x0)):
            up = getattr(self, f"up{j + 1}")
            y = up[1](B.cat(up[0](y), skip))
        return self.last(B.slice(y, field))

    def upsample(self, points: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        """Refined cloud: every input point replaced by ``refine_up`` points (input + offset)."""
        off = self(points, batch).view(points.shape[0], self.config.refine_up, 3)
        return (points[:, None, :3] + off).reshape(-1, 3)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
