"""Data: SemanticKITTI reader, ground-truth map builder and per-frame cache, torch datasets, and the
synthetic SemanticKITTI-format scene generator.

* :mod:`.kitti` - read/write the SemanticKITTI layout (:class:`SemanticKittiSequence`).
* :mod:`.gt` - the map and per-frame cropped and viewpoint-masked targets, resumable checksummed
  cache (:func:`build_gt`, :class:`GTCache`); built on :mod:`.voxels` (voxel keys, hash set,
  incremental voxel map, column index) and :mod:`.geometry` (rigid transforms).
* :mod:`.dataset` - :class:`TrainingDataset` / :class:`EvaluationDataset` and
  :func:`collate_completion`.
* :mod:`.synthetic` - :func:`generate_dataset` (procedural streets ray-cast with an HDL-64E pattern)
  and :func:`synthetic_pairs` ((scan, target) pairs through the same GT path as real data); one
  module each for the town layout, the primitives, the LiDAR model and the writer.

Torch is imported only by :mod:`.dataset` (lazily here).
"""
from .kitti import (  # noqa: F401
    SemanticKittiSequence, list_sequences, read_scan, read_labels, read_poses, read_calib,
    read_times, semantic_of, instance_of, cam_to_velo_poses, velo_to_cam_poses,
)
from .gt import (  # noqa: F401
    GTConfig, GTCache, BuildStats, build_gt, build_sequence, accumulate_map, frame_target,
    viewpoint_mask, static_label_mask, input_mask, iter_pairs,
)
from .voxels import VoxelMap, VoxelHashSet, MapIndex, batch_voxel_map  # noqa: F401
from .synthetic import (  # noqa: F401
    SyntheticConfig, SyntheticScene, generate_dataset, generate_sequence, synthetic_pairs,
)

__all__ = [
    "SemanticKittiSequence", "list_sequences", "read_scan", "read_labels", "read_poses", "read_calib",
    "read_times", "semantic_of", "instance_of", "cam_to_velo_poses", "velo_to_cam_poses",
    "GTConfig", "GTCache", "BuildStats", "VoxelMap", "VoxelHashSet", "MapIndex", "build_gt",
    "build_sequence", "accumulate_map", "batch_voxel_map", "frame_target", "viewpoint_mask",
    "static_label_mask", "input_mask", "iter_pairs", "SyntheticConfig", "SyntheticScene",
    "generate_dataset", "generate_sequence", "synthetic_pairs", "CompletionDataset", "TrainingDataset",
    "EvaluationDataset", "collate_completion", "augmentation_matrix", "tile_to", "fps_indices",
]

_DATASET_NAMES = ("CompletionDataset", "TrainingDataset", "EvaluationDataset", "collate_completion",
                  "augmentation_matrix", "tile_to", "fps_indices")


def __getattr__(name):
    if name in _DATASET_NAMES:
        from . import dataset
        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
