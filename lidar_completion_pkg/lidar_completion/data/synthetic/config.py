"""Parameters of the synthetic generator and the SemanticKITTI label ids it writes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ...errors import ConfigError

# SemanticKITTI ids used by the generator
UNLABELED, OUTLIER = 0, 1
CAR, TRUCK, OTHER_VEHICLE, PERSON = 10, 18, 20, 30
ROAD, PARKING, SIDEWALK = 40, 44, 48
BUILDING, FENCE = 50, 51
VEGETATION, TRUNK, TERRAIN = 70, 71, 72
POLE, TRAFFIC_SIGN, OTHER_OBJECT = 80, 81, 99
MOVING_CAR, MOVING_PERSON, MOVING_OTHER_VEHICLE = 252, 254, 259

LABEL_NAMES = {
    0: "unlabeled", 1: "outlier", 10: "car", 18: "truck", 20: "other-vehicle", 30: "person",
    40: "road", 44: "parking", 48: "sidewalk", 50: "building", 51: "fence", 70: "vegetation",
    71: "trunk", 72: "terrain", 80: "pole", 81: "traffic-sign", 99: "other-object",
    252: "moving-car", 254: "moving-person", 259: "moving-other-vehicle",
}
VALID_LABELS = frozenset(LABEL_NAMES)
MOVING_LABELS = frozenset(k for k in LABEL_NAMES if k >= 252)


@dataclass
class SyntheticConfig:
    """Sensor and scene parameters (defaults resemble a KITTI HDL-64E drive)."""
    azimuth_steps: int = 2048
    max_range: float = 120.0
    min_range: float = 0.9
    range_noise: float = 0.015          # metres (std, along the ray)
    dropout: float = 0.02               # random loss of returns
    grazing_dropout: float = 0.5        # extra loss at grazing incidence
    outlier_fraction: float = 3e-4      # spurious returns (label 1)
    unlabeled_fraction: float = 0.004   # points whose label is 0
    sensor_height: float = 1.73
    rate_hz: float = 10.0
    speed_range: Tuple[float, float] = (5.0, 9.0)
    max_slope: float = 0.04             # ground grade (rise over run)
    margin: float = 140.0               # scene built this far behind the start and past the end

    def validate(self) -> "SyntheticConfig":
        if self.azimuth_steps < 64:
            raise ConfigError(f"azimuth_steps must be >= 64, found {self.azimuth_steps}")
        if not 0 < self.max_range <= 1000:
            raise ConfigError(f"max_range must be in (0, 1000] m, found {self.max_range}")
        if self.rate_hz <= 0:
            raise ConfigError(f"rate_hz must be positive, found {self.rate_hz}")
        return self
