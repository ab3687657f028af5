"""The three LiDiff networks (exact published structure) and their configuration."""
from .config import FULL_CHANNELS, ModelConfig  # noqa: F401
from .networks import (SITES, Condition, ConditionEncoder, Denoiser, Refiner,  # noqa: F401
                       count_parameters, timestep_embedding)
