"""MinkowskiEngine backend (the reference): its own modules, so parameter names and layouts are
MinkowskiEngine's by construction. Imported only when this backend is selected."""
from __future__ import annotations

import torch

from . import import_minkowski
from .coords import Field, check_coordinate_range, voxel_indices
from .nearest import nearest_cell

ME = import_minkowski()


def _convolution(in_channels, out_channels, kernel_size=3, stride=1):
    return ME.MinkowskiConvolution(in_channels, out_channels, kernel_size=kernel_size, stride=stride, dimension=3)


def _convolution_transpose(in_channels, out_channels, kernel_size=2, stride=2):
    return ME.MinkowskiConvolutionTranspose(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                                            dimension=3)


class MinkowskiBackend:
    name = "minkowski"
    supports_groups = False

    Convolution = staticmethod(_convolution)
    ConvolutionTranspose = staticmethod(_convolution_transpose)
    BatchNorm = ME.MinkowskiBatchNorm
    ReLU = ME.MinkowskiReLU

    @staticmethod
    def voxelize(points: torch.Tensor, batch: torch.Tensor, voxel_size: float):
        if not points.is_floating_point():
            points = points.float()
        points = points.contiguous()
        idx = voxel_indices(points, voxel_size)  # always from float32 values, as LiDiff
        coords = torch.cat([batch.long().view(-1, 1).to(idx.device), idx], dim=1)
        check_coordinate_range(coords, points)
        field = ME.TensorField(features=points, coordinates=coords.int(),
                               quantization_mode=ME.SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE,
                               minkowski_algorithm=ME.MinkowskiAlgorithm.SPEED_OPTIMIZED,
                               device=str(points.device))
        return Field(field, points.shape[0]), field.sparse()

    @staticmethod
    def slice(x, field: Field) -> torch.Tensor:
        return x.slice(field.inverse).F

    @staticmethod
    def feats(x) -> torch.Tensor:
        return x.F

    @staticmethod
    def modulate(x, weights: list, rows: list):
        if len(weights) != 1:
            raise ValueError("MinkowskiEngine tensors carry no feature groups: one condition per pass")
        return MinkowskiBackend.with_feats(x, x.F * weights[0].index_select(0, rows[0]))

    @staticmethod
    def with_feats(x, feats: torch.Tensor):
        return ME.SparseTensor(features=feats, coordinate_map_key=x.coordinate_map_key,
                               coordinate_manager=x.coordinate_manager)

    @staticmethod
    def coords(x) -> torch.Tensor:
        return x.C.long()

    @staticmethod
    def stride(x) -> int:
        return int(x.tensor_stride[0])

    @staticmethod
    def cat(a, b):
        return ME.cat(a, b)

    @staticmethod
    def cache(x) -> dict:
        return {}

    nearest_cell = staticmethod(nearest_cell)


BACKEND = MinkowskiBackend()
