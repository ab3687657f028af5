"""Network configuration: the published LiDiff sizes and reduced-width variants of the same family."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ConfigError

FULL_CHANNELS = (32, 32, 64, 128, 256, 256, 128, 96, 96)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the three networks.

    ``channels`` is LiDiff's ``cs`` list: stem width, the four encoder stage widths and the four
    decoder stage widths. The condition width is ``channels[4]`` and the time-embedding width
    ``channels[-1]``, exactly as in the published networks.
    """

    channels: tuple = FULL_CHANNELS
    in_channels: int = 3
    voxel_size: float = 0.05
    head_hidden: int = 20
    refine_up: int = 6
    name: str = field(default="full", compare=False)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        ch = tuple(int(c) for c in self.channels)
        if len(ch) != 9 or any(c <= 0 for c in ch):
            raise ConfigError(f"channels must be 9 positive widths, got {self.channels!r}")
        if ch[-1] % 2:
            raise ConfigError(f"the time-embedding width channels[-1] must be even, got {ch[-1]}")
        object.__setattr__(self, "channels", ch)
        if self.voxel_size <= 0:
            raise ConfigError(f"voxel_size must be positive, got {self.voxel_size}")

    @property
    def cond_dim(self) -> int:
        return self.channels[4]

    @property
    def time_dim(self) -> int:
        return self.channels[-1]

    @classmethod
    def full(cls) -> "ModelConfig":
        """The published LiDiff / Distillation-DPO networks (32,672,467 + 21,722,926 parameters)."""
        return cls()

    @classmethod
    def scaled(cls, divisor: int, name: str | None = None) -> "ModelConfig":
        """Every width divided by ``divisor`` (same architecture family)."""
        ch = tuple(max(2, c // divisor) for c in FULL_CHANNELS)
        ch = ch[:-1] + (ch[-1] + ch[-1] % 2,)
        return cls(channels=ch, name=name or f"div{divisor}")

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """A quarter of the published widths: (8, 8, 16, 32, 64, 64, 32, 24, 24). For tests and the
        small models trained on synthetic data."""
        return cls.scaled(4, name="tiny")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: d[k] for k in ("channels", "in_channels", "voxel_size", "head_hidden", "refine_up",
                                    "name", "extra") if k in d}
        try:
            return cls(**known)
        except TypeError as exc:
            raise ConfigError(f"invalid model config {d!r}: {exc}") from exc
