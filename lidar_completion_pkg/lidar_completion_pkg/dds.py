"""The shipped Fast DDS profile and the environment set-up done before rclpy starts (no rclpy import).

Large clouds (MBs) sent with best-effort QoS are lost between processes with Fast DDS defaults: they go
over UDP in fragments and one lost fragment drops the sample. The shipped profile enlarges the
shared-memory segment and keeps UDP on loopback as the fallback. Fast DDS reads it from
``FASTDDS_DEFAULT_PROFILES_FILE`` once per process, when the first participant is created, so it must be
in the environment before ``rclpy.init``; the sending process is the one that needs it.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Callable, MutableMapping, Optional

PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"
PROFILE_NAME = "fastdds_profile.xml"
SHM_DIR = "/dev/shm"
_NS = "{http://www.eprosima.com}"


def profile_path() -> str:
    """Absolute path of the shipped profile (installed next to this module, pip or colcon)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), PROFILE_NAME)


def segment_size_bytes(path: Optional[str] = None) -> int:
    """The shared-memory segment size a Fast DDS profile asks for (0 when it configures no SHM)."""
    root = ET.parse(path or profile_path()).getroot()
    sizes = [int(el.text) for el in root.iter(_NS + "segment_size") if el.text and el.text.strip()]
    return max(sizes, default=0)


def shm_free_bytes(directory: str = SHM_DIR) -> Optional[int]:
    """Free bytes in the shared-memory file system, or None when it does not exist or is unreadable."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def uses_fastdds(environ: MutableMapping[str, str]) -> bool:
    rmw = environ.get("RMW_IMPLEMENTATION", "")
    return rmw in ("", "rmw_fastrtps_cpp", "rmw_fastrtps_dynamic_cpp")


def check_shared_memory(path: str, warn: Callable[[str], None] = print,
                        shm_dir: str = SHM_DIR) -> bool:
    """Warn when ``shm_dir`` lacks the space the profile's SHM segment needs; True when it fits."""
    try:
        needed = segment_size_bytes(path)
    except (ET.ParseError, OSError, ValueError) as exc:
        warn(f"cannot read the Fast DDS profile {path} ({exc}); Fast DDS will report what it makes "
             "of it")
        return False
    free = shm_free_bytes(shm_dir)
    if needed and (free is None or free < needed):
        have = "does not exist" if free is None else f"has {free / 2**20:.1f} MiB free"
        warn(f"shared memory {shm_dir} {have} but the Fast DDS profile's segment needs "
             f"{needed / 2**20:.0f} MiB per process: the shared-memory transport may fail and clouds "
             "then travel over loopback UDP, where large best-effort clouds can be lost. Give the "
             "container more shared memory (docker run --shm-size=512m) or use reliable QoS.")
        return False
    return True


def configure_environment(environ: MutableMapping[str, str] = os.environ,
                          warn: Callable[[str], None] = print,
                          shm_dir: str = SHM_DIR) -> Optional[str]:
    """Point FASTDDS_DEFAULT_PROFILES_FILE at the shipped profile unless the user chose one.

    Returns the profile in effect (None when none is set). Never raises: when the shared-memory
    file system is missing or has less free space than the profile's segment needs, it warns and
    keeps the profile (Fast DDS then logs that the SHM transport could not be created and carries the
    samples over loopback UDP, where large best-effort clouds may be lost; verified with an 8 MB
    /dev/shm).
    """
    current = environ.get(PROFILE_ENV)
    if current:
        if not os.path.isfile(current):
            warn(f"{PROFILE_ENV}={current} does not exist; Fast DDS will run with its defaults "
                 "(large best-effort clouds may be lost between processes)")
        else:
            check_shared_memory(current, warn, shm_dir)
        return current
    if not uses_fastdds(environ):
        return None
    path = profile_path()
    if not os.path.isfile(path):
        warn(f"the shipped Fast DDS profile {path} is missing; running with Fast DDS defaults "
             "(large best-effort clouds may be lost between processes)")
        return None
    check_shared_memory(path, warn, shm_dir)
    environ[PROFILE_ENV] = path
    return path
