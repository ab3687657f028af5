"""Values the settings, the command line and the pipeline share, in a module that imports nothing
heavy: building the command line (``lidar-completion <command> --help``, a usage error) and commands
without a model read them here without loading torch. The modules that act on them re-export them.
"""
from __future__ import annotations

__all__ = ["DEFAULTS", "BACKENDS", "PROCESSES", "MAX_STAMP_S"]

#: Published pre/post-processing limits (docs/method.md, "Data and ground truth"): ranges in metres,
#: the scan's farthest-point sample size ``n_fps`` and how many times it is tiled into the starting
#: cloud (``tile``). Applied by :mod:`lidar_completion.preprocess`.
DEFAULTS = dict(min_range=3.5, max_range=50.0, min_z=-4.0, n_fps=18000, tile=10)

#: Sparse-convolution backends (:mod:`lidar_completion.sparse`).
BACKENDS = ("auto", "minkowski", "torch", "triton")

#: Diffusion processes the sampler solves (:mod:`lidar_completion.diffusion.sampler`). "vp": the
#: published sampler (diffusers' formulas for x_t = alpha_t x_0 + sigma_t eps applied to the offsets
#: from x_init, although the networks are trained on x_t = x_0 + sigma_t eps); "local": the same
#: solver for the process the networks are trained on (alpha_t = 1).
PROCESSES = ("vp", "local")

#: The latest second a bag stamp holds: builtin_interfaces/Time's seconds are an int32 (2038).
MAX_STAMP_S = 2**31 - 1
