"""Synthetic SemanticKITTI-format scenes: procedural streets ray-cast with an HDL-64E pattern.

A sequence is one procedural town (:mod:`.layout`): a route of straight streets joined by rounded
corners, sidewalks, buildings, fences, hedges, lamps, signs, trees, bushes, parked cars, and moving
cars and pedestrians, all analytic primitives with closed-form ray intersections
(:mod:`.primitives`). An ego vehicle drives the route; every 0.1 s a Velodyne HDL-64E sweep
(:mod:`.lidar`) is ray-cast against the scene. :mod:`.writer` writes the sequence exactly like
SemanticKITTI. Moving things carry the moving ids (252 moving-car, 254 moving-person, 259
moving-other-vehicle) and move between scans; everything else is static. Parameters and label ids:
:mod:`.config`.
"""
from .config import (  # noqa: F401
    BUILDING, CAR, FENCE, LABEL_NAMES, MOVING_CAR, MOVING_LABELS, MOVING_OTHER_VEHICLE,
    MOVING_PERSON, OTHER_OBJECT, OTHER_VEHICLE, OUTLIER, PARKING, PERSON, POLE, ROAD, SIDEWALK,
    TERRAIN, TRAFFIC_SIGN, TRUCK, TRUNK, UNLABELED, VALID_LABELS, VEGETATION, SyntheticConfig,
)
from .lidar import Hdl64, hdl64_elevations_deg  # noqa: F401
from .layout import Town  # noqa: F401
from .writer import (  # noqa: F401
    SyntheticScene, config_dict, generate_dataset, generate_sequence, synthetic_pairs,
)

__all__ = [
    "SyntheticConfig", "SyntheticScene", "Town", "Hdl64", "hdl64_elevations_deg", "generate_dataset",
    "generate_sequence", "synthetic_pairs", "config_dict", "LABEL_NAMES", "VALID_LABELS",
    "MOVING_LABELS", "UNLABELED", "OUTLIER", "CAR", "TRUCK", "OTHER_VEHICLE", "PERSON", "ROAD",
    "PARKING", "SIDEWALK", "BUILDING", "FENCE", "VEGETATION", "TRUNK", "TERRAIN", "POLE",
    "TRAFFIC_SIGN", "OTHER_OBJECT", "MOVING_CAR", "MOVING_PERSON", "MOVING_OTHER_VEHICLE",
]
