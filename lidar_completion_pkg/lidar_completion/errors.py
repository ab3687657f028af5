"""One exception type per domain; every message says what was expected and what was found."""


class LidarCompletionError(Exception):
    """Base class of every error the library raises on purpose."""


class CloudFormatError(LidarCompletionError, ValueError):
    """A point cloud (array, file or PointCloud2 message) is malformed or unusable."""


class CheckpointError(LidarCompletionError):
    """A checkpoint is missing, corrupt, of an unknown layout or does not match the network."""


class DatasetError(LidarCompletionError):
    """A dataset (SemanticKITTI layout, GT cache) is missing files or inconsistent."""


class EmptyFrameError(DatasetError):
    """One frame has nothing to work with (a scan with no point left by the input filter, an empty
    target): that frame is left out, where a damaged dataset or cache ends the run."""


class BagError(LidarCompletionError):
    """A rosbag2 file is unreadable, truncated or lacks the requested topic / type."""


class ConfigError(LidarCompletionError, ValueError):
    """A configuration value is invalid."""


class ModelOutputError(LidarCompletionError):
    """The networks produced NaN / inf points from a valid scan (their weights or settings, e.g. a
    guidance weight far out of range, not the scan)."""


class Cancelled(LidarCompletionError):
    """A completion was abandoned because its caller asked it to stop (``should_stop``)."""
