"""ament_python package `lidar_completion_pkg` and the ROS-free core library `lidar_completion`.

One setup.py serves both ways of installing it:
  * ROS 2 / colcon:  colcon build (the workspace in ros2_ws/ links this folder), then
    `ros2 run lidar_completion_pkg completion_node`;
  * pip:              pip install -e lidar_completion_pkg   (core library + CLI, no ROS needed).
"""
import os
import sys
from glob import glob

from setuptools import find_namespace_packages, setup

PACKAGE = "lidar_completion_pkg"
HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return [os.path.relpath(p, HERE) for p in glob(os.path.join(HERE, pattern))]


def _launch_files():
    """data_files of the repository's files beside this package: the ROS 2 launch folder
    (../launch) and ../LICENSE (installed to share/lidar_completion_pkg/). An sdist
    cannot carry a folder outside its project (setuptools even copied it into the tree as
    lidar_completion_pkg/launch/), so an sdist leaves it out and a wheel built without it stops here:
    a wheel without its launch files installed a package that `ros2 launch` could not start."""
    if "sdist" in sys.argv:
        return []
    if not os.path.isfile(os.path.join(HERE, "..", "launch", "completion.launch.py")):
        sys.exit("error: ../launch/completion.launch.py is missing: build lidar_completion_pkg from "
                 "a checkout of the repository (`pip wheel ./lidar_completion_pkg`, `python -m build "
                 "--wheel lidar_completion_pkg`, or colcon), not from an sdist, which cannot hold "
                 "the launch folder beside the package")
    return [
        ("share/" + PACKAGE, _rel("../LICENSE")),
        ("share/" + PACKAGE + "/launch", _rel("../launch/*.py") + _rel("../launch/*.xml")),
        ("share/" + PACKAGE + "/launch/params", _rel("../launch/params/*.yaml")),
        ("share/" + PACKAGE + "/launch/rviz", _rel("../launch/rviz/*.rviz")),
    ]


setup(
    name="lidar-completion",
    version="0.2.0",
    description="Few-step diffusion LiDAR scene completion (Distillation-DPO) with a ROS 2 node",
    license="MIT",
    # namespace-aware: the weights folder holds no __init__.py but is package data of
    # its own (with find_packages setuptools warned, on every install, that it would be left out)
    packages=find_namespace_packages(include=["lidar_completion", "lidar_completion.*",
                                              "lidar_completion_pkg", "lidar_completion_pkg.*"],
                                     exclude=["*.__pycache__"]),
    package_data={"lidar_completion": ["weights/*.pt", "weights/*.json"],
                  "lidar_completion_pkg": ["*.xml"]},
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE]),
        ("share/" + PACKAGE, ["package.xml"]),
        *_launch_files(),
    ],
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.23",
        "scipy>=1.10",
        "torch>=2.1",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "POT>=0.9",
        "fpsample>=0.3",
        "rosbags>=0.10",
        "mcap>=1.1",  # reading truncated .mcap bags record by record (bags.io)
        "psutil",
        "python-neo-lzf>=0.3",  # LZF of PCL's binary_compressed .pcd files (io); prebuilt wheels
    ],
    extras_require={
        # transforms3d: the TF tests' rotations, apart from the scipy code under test; pytest-xdist:
        # `make test` runs the suite in two processes (tests/conftest.py keeps the ROS 2 files in one)
        "test": ["pytest>=7", "pytest-timeout", "pytest-xdist>=3.5", "diffusers>=0.30", "transforms3d"],
        # the node; tf2_msgs (its frames) is not on PyPI: make setup builds it; the launch / CLI
        # tools come with a system ROS 2 (make setup installs them from ROS2_CLI_WHEELS)
        "ros": ["ros-kilted-rclpy[fastrtps]", "ros-kilted-sensor-msgs", "ros-kilted-std-msgs",
                "ros-kilted-diagnostic-msgs", "ros-kilted-geometry-msgs", "ros-kilted-lifecycle-msgs"],
    },
    zip_safe=True,
    entry_points={
        "console_scripts": [
            "lidar-completion = lidar_completion.cli:main",
            "lidar-completion-node = lidar_completion_pkg.completion_node:main",
            "completion_node = lidar_completion_pkg.completion_node:main",
            "lifecycle_completion_node = lidar_completion_pkg.completion_node:main_lifecycle",
            "play_when_ready = lidar_completion_pkg.play_when_ready:main",
        ],
        # `lidar-completion bag-bench --live`: the core finds the ROS 2 replay through this group
        "lidar_completion.live_bench": [
            "ros2 = lidar_completion_pkg.live_bench:bench_live",
        ],
    },
)
