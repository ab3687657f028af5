"""rosbag2 reading and writing (sqlite3 and mcap) with ``rosbags``; no ROS installation needed.

Reading is forgiving by design: a bag whose storage file was cut short (a recorder killed mid-write, a
partial copy) is not rejected; :class:`BagReader` falls back to reading whatever complete messages the
storage still holds and records in :attr:`BagReader.problems` what could not be read, with the counts
the bag's ``metadata.yaml`` promised. Everything a user can get wrong (missing bag, missing topic, wrong
message type) raises :class:`~lidar_completion.errors.BagError` with a message that lists what is there.
"""
from __future__ import annotations

import collections
import functools
import logging
import re
import shutil
import sqlite3
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .. import pointcloud2
from ..errors import BagError, CloudFormatError

log = logging.getLogger(__name__)

CLOUD_TYPE = "sensor_msgs/msg/PointCloud2"
TF_TYPE = "tf2_msgs/msg/TFMessage"
TF_STATIC_TOPIC = "/tf_static"
STORAGES = ("mcap", "sqlite3")
DEFAULT_TOPIC = "/velodyne_points"
DEFAULT_FRAME = "velodyne"
_STORAGE_SUFFIX = {".mcap": "mcap", ".db3": "sqlite3"}


@functools.lru_cache(maxsize=1)
def typestore():
    """The rosbags type store (ROS 2 Kilted message definitions; PointCloud2 and TFMessage are stable
    across ROS 2 distributions)."""
    from rosbags.typesys import Stores, get_typestore
    return get_typestore(Stores.ROS2_KILTED)


def warm_up() -> None:
    """Build rosbags' (lazily generated) PointCloud2 / TFMessage codecs now, outside any timing."""
    cloud = make_cloud(np.zeros((1, 3), np.float32), 1, DEFAULT_FRAME)
    deserialize(serialize(cloud), CLOUD_TYPE)
    deserialize(serialize(make_tf(1, "odom", DEFAULT_FRAME, np.eye(4))), TF_TYPE)


def msg_class(msgtype: str):
    """rosbags dataclass of a message type, e.g. ``msg_class("sensor_msgs/msg/PointCloud2")``."""
    try:
        return typestore().types[msgtype]
    except KeyError:
        raise BagError(f"unknown message type {msgtype!r}: not in the ROS 2 type store") from None


def serialize(msg) -> bytes:
    """CDR bytes of a rosbags message object."""
    return bytes(typestore().serialize_cdr(msg, msg.__msgtype__))


def deserialize(data, msgtype: str):
    """rosbags message object from CDR bytes (array fields are zero-copy numpy views)."""
    return typestore().deserialize_cdr(data, msgtype)


# ------------------------------------------------------------------------------------------ messages
def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time (sec, nanosec) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int):
    """Integer nanoseconds -> rosbags builtin_interfaces/Time."""
    ns = int(ns)
    if ns < 0:
        raise BagError(f"time stamps must be >= 0 ns, found {ns}")
    return msg_class("builtin_interfaces/msg/Time")(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def make_header(stamp_ns: int, frame_id: str):
    return msg_class("std_msgs/msg/Header")(stamp=ns_to_stamp(stamp_ns), frame_id=str(frame_id))


def make_cloud(points, stamp_ns: int, frame_id: str = DEFAULT_FRAME,
               field_names: Sequence[str] = ("x", "y", "z")):
    """rosbags PointCloud2 with float32 fields ``field_names`` from an (N, >=len(field_names)) array."""
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < len(field_names):
        raise CloudFormatError(f"points must be (N, >={len(field_names)}) for fields "
                               f"{list(field_names)}, found shape {arr.shape}")
    field_cls = msg_class("sensor_msgs/msg/PointField")
    fields = [field_cls(name=n, offset=4 * i, datatype=pointcloud2.FLOAT32, count=1)
              for i, n in enumerate(field_names)]
    return pointcloud2.create_cloud(make_header(stamp_ns, frame_id), fields,
                                    np.asarray(arr[:, :len(field_names)], dtype=np.float32),
                                    msg_factory=msg_class(CLOUD_TYPE))


def make_tf(stamp_ns: int, parent: str, child: str, matrix):
    """tf2_msgs/TFMessage with one transform parent -> child from a 4x4 homogeneous matrix."""
    from scipy.spatial.transform import Rotation

    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise BagError(f"a transform must be a finite 4x4 matrix, found shape {m.shape}")
    qx, qy, qz, qw = Rotation.from_matrix(m[:3, :3]).as_quat()
    vec = msg_class("geometry_msgs/msg/Vector3")(x=float(m[0, 3]), y=float(m[1, 3]), z=float(m[2, 3]))
    quat = msg_class("geometry_msgs/msg/Quaternion")(x=float(qx), y=float(qy), z=float(qz), w=float(qw))
    ts = msg_class("geometry_msgs/msg/TransformStamped")(
        header=make_header(stamp_ns, parent), child_frame_id=child,
        transform=msg_class("geometry_msgs/msg/Transform")(translation=vec, rotation=quat))
    return msg_class(TF_TYPE)(transforms=[ts])


def tf_to_matrix(transform) -> np.ndarray:
    """4x4 matrix of a geometry_msgs/Transform."""
    from scipy.spatial.transform import Rotation

    r, t = transform.rotation, transform.translation
    m = np.eye(4)
    m[:3, :3] = Rotation.from_quat([r.x, r.y, r.z, r.w]).as_matrix()
    m[:3, 3] = (t.x, t.y, t.z)
    return m


# ------------------------------------------------------------------------------------------- reading
@dataclass
class TopicInfo:
    name: str
    msgtype: str
    count: int | None  # messages the bag's index / metadata announces (None when unknown)


@dataclass
class RawMessage:
    """One serialized message as stored in the bag (``data`` is CDR with its 4-byte header)."""
    topic: str
    msgtype: str
    log_time_ns: int
    data: bytes


@dataclass
class CloudMessage:
    """One PointCloud2 of a topic. ``points`` is None and ``error`` says why when it is unusable."""
    index: int
    log_time_ns: int
    stamp_ns: int | None
    frame_id: str | None
    points: np.ndarray | None
    data: bytes
    n_points: int = 0
    error: str | None = None


def _is_ros1_bag(path: Path) -> bool:
    """A ROS 1 bag starts with the line '#ROSBAG V2.0'."""
    try:
        with open(path, "rb") as f:
            return f.read(13) == b"#ROSBAG V2.0\n"
    except OSError:
        return False


def _load_metadata(path: Path) -> dict | None:
    meta = path / "metadata.yaml" if path.is_dir() else None
    if meta is None or not meta.exists():
        return None
    try:
        import yaml
        info = yaml.safe_load(meta.read_text()) or {}
        return info.get("rosbag2_bagfile_information") or None
    except Exception as exc:  # a damaged metadata.yaml is one more thing to report, not fatal
        log.warning("cannot parse %s: %s", meta, exc)
        return None


def _storage_files(path: Path, meta: dict | None) -> list[Path]:
    if path.is_file():
        return [path]
    names = list((meta or {}).get("relative_file_paths") or [])
    files = [path / n for n in names if (path / n).exists()]
    if not files:
        # a split bag's files in their split order (bag_2 before bag_10), as rosbag2 numbers them
        files = sorted((p for p in path.iterdir() if p.suffix in _STORAGE_SUFFIX), key=_natural_key)
    return files


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


class BagReader:
    """Read a rosbag2 bag (directory with metadata.yaml, or a bare .mcap / .db3 file).

    >>> with BagReader("drive_bag") as bag:
    ...     bag.require_topic("/velodyne_points", CLOUD_TYPE)
    ...     for cloud in bag.clouds("/velodyne_points"):
    ...         ...
    ...     print(bag.problems)          # what could not be read, if anything

    ``topics`` maps topic -> :class:`TopicInfo`. After iterating, ``read_counts`` holds how many
    messages were read per topic and ``problems`` lists damage found (truncation, unreadable records).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f"bag not found: {self.path} (expected a rosbag2 directory with "
                           "metadata.yaml, or a .mcap / .db3 file)")
        if self.path.is_file() and _is_ros1_bag(self.path):
            out = self.path.with_name(self.path.stem + "_ros2")
            raise BagError(f"{self.path} is a ROS 1 bag; convert it once to rosbag2 with rosbags' "
                           f"converter (installed with this package): rosbags-convert --src {self.path} "
                           f"--dst {out} --dst-storage mcap, then pass {out}")
        if self.path.is_file() and self.path.suffix not in _STORAGE_SUFFIX:
            raise BagError(f"{self.path} is not a rosbag2 bag: expected a directory or a .mcap / .db3 "
                           f"file, found a '{self.path.suffix}' file")
        self.problems: list[str] = []
        self.read_counts: dict[str, int] = {}
        self.salvaged = False
        self._meta = _load_metadata(self.path)
        self._reader = None
        self._salvage: _Salvage | None = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._open()

    # -- opening
    def _open(self) -> None:
        from rosbags.rosbag2 import Reader, ReaderError

        try:
            reader = Reader(self.path)
            reader.open()
            self._reader = reader
        except (ReaderError, OSError, KeyError, ValueError) as exc:
            files = _storage_files(self.path, self._meta)
            if not files:
                packed = sorted(self.path.glob("*.zstd")) if self.path.is_dir() else []
                hint = (f"; {packed[0].name} is compressed as a whole file (rosbag2's file "
                        f"compression): decompress it first (zstd -d {packed[0]})" if packed else "")
                raise BagError(f"cannot read bag {self.path}: {exc}; no .mcap or .db3 storage file "
                               f"found in it{hint}") from None
            if self.path.is_dir() and not (self.path / "metadata.yaml").exists():
                # not damage: rosbag2 writes metadata.yaml when a recording ends (or it was not copied)
                log.warning("%s has no metadata.yaml (a recording still running or stopped without it, "
                            "or a copy without it): reading its storage file(s) %s directly", self.path,
                            ", ".join(f.name for f in files))
            else:
                self.problems.append(f"the bag cannot be opened normally ({exc}); it looks truncated or "
                                     "damaged, so only the complete messages still in its storage were read")
                log.warning("%s: %s; salvaging what is readable", self.path, exc)
            self.salvaged = True
            self._tmpdir = tempfile.TemporaryDirectory(prefix="lc_bag_salvage_")
            self._salvage = _Salvage(files, Path(self._tmpdir.name),
                                     int((self._meta or {}).get("message_count") or 0))
            self.problems.extend(self._salvage.problems)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._salvage is not None:
            self._salvage.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- metadata
    @property
    def expected_counts(self) -> dict[str, int]:
        """Messages per topic according to metadata.yaml (empty when the bag has none)."""
        out = {}
        for entry in (self._meta or {}).get("topics_with_message_count") or []:
            try:
                out[entry["topic_metadata"]["name"]] = int(entry["message_count"])
            except (KeyError, TypeError, ValueError):
                continue
        return out

    @property
    def topics(self) -> dict[str, TopicInfo]:
        expected = self.expected_counts
        out: dict[str, TopicInfo] = {}
        if self._reader is not None:
            for name, info in self._reader.topics.items():
                out[name] = TopicInfo(name, info.msgtype or "?", int(info.msgcount))
        else:
            for name, msgtype in self._salvage.topic_types.items():
                out[name] = TopicInfo(name, msgtype, expected.get(name))
        for entry in (self._meta or {}).get("topics_with_message_count") or []:
            try:
                md = entry["topic_metadata"]
                out.setdefault(md["name"], TopicInfo(md["name"], md["type"], int(entry["message_count"])))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def describe_topics(self) -> str:
        topics = self.topics
        if not topics:
            return "the bag has no topics"
        return "; ".join(f"{t.name} ({t.msgtype}, {t.count if t.count is not None else '?'} msgs)"
                         for t in sorted(topics.values(), key=lambda t: t.name))

    def require_topic(self, topic: str, msgtype: str | None = CLOUD_TYPE) -> TopicInfo:
        """The topic's info; BagError naming the topics present when it is absent or of another type."""
        topics = self.topics
        if topic not in topics:
            damage = self._salvage.open_problems if self._salvage is not None else []
            if not topics and damage:
                raise BagError(f"no message of bag {self.path} can be read (so neither can {topic!r}): "
                               + "; ".join(damage))
            raise BagError(f"topic {topic!r} is not in bag {self.path}; topics present: "
                           f"{self.describe_topics()}")
        info = topics[topic]
        if msgtype is not None and info.msgtype != msgtype:
            raise BagError(f"topic {topic!r} in bag {self.path} carries {info.msgtype}, expected "
                           f"{msgtype}")
        return info

    def expected_count(self, topic: str) -> int | None:
        """Messages the bag should hold on ``topic`` (metadata.yaml first, then the storage index)."""
        exp = self.expected_counts.get(topic)
        if exp is not None:
            return exp
        info = self.topics.get(topic)
        return None if info is None or self.salvaged else info.count

    # -- messages
    def messages(self, topics: Iterable[str] | None = None) -> Iterator[RawMessage]:
        """Serialized messages of the given topics (all when None) in storage order (log time).

        Damage found while reading ends the iteration and is appended to ``problems``.
        """
        wanted = None if topics is None else set(topics)
        if self._reader is not None:
            source = self._messages_rosbags(wanted)
        else:
            source = self._salvage.messages(wanted)
        for msg in source:
            self.read_counts[msg.topic] = self.read_counts.get(msg.topic, 0) + 1
            yield msg
        if self._salvage is not None:
            for problem in self._salvage.problems:
                if problem not in self.problems:
                    self.problems.append(problem)
        for topic in sorted(wanted if wanted is not None else self.topics):
            exp, got = self.expected_count(topic), self.read_counts.get(topic, 0)
            if exp is not None and got < exp:
                note = f"{topic}: read {got} of {exp} messages; {exp - got} could not be read"
                if note not in self.problems:
                    self.problems.append(note)

    def _messages_rosbags(self, wanted) -> Iterator[RawMessage]:
        conns = [c for c in self._reader.connections if wanted is None or c.topic in wanted]
        if not conns:
            return
        done: collections.Counter = collections.Counter()     # (topic, log time) already yielded
        try:
            for conn, t, data in self._reader.messages(connections=conns):
                done[(conn.topic, int(t))] += 1
                yield RawMessage(conn.topic, conn.msgtype, int(t), bytes(data))
            return
        except _storage_errors() as exc:
            self.problems.append(f"reading stopped at damaged storage ({type(exc).__name__}: {exc}); "
                                 "the messages after it were salvaged one by one")
            log.warning("%s: reading stopped at damaged storage (%s); salvaging the messages after it",
                        self.path, exc)
        yield from self._salvage_rest(wanted, done)

    def _salvage_rest(self, wanted, done: collections.Counter) -> Iterator[RawMessage]:
        """The messages a damaged page or chunk cut off from the normal reader: the storage read
        record by record (row by row), skipping what was already yielded."""
        files = _storage_files(self.path, self._meta)
        if not files:
            return
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="lc_bag_salvage_")
        salvage = _Salvage(files, Path(self._tmpdir.name), int((self._meta or {}).get("message_count") or 0))
        try:
            for raw in salvage.messages(wanted):
                key = (raw.topic, raw.log_time_ns)
                if done[key] > 0:
                    done[key] -= 1
                    continue
                yield raw
        finally:
            salvage.close()
        for problem in salvage.problems:
            if problem not in self.problems:
                self.problems.append(problem)

    def clouds(self, topic: str, field_names: Sequence[str] = ("x", "y", "z"),
               limit: int | None = None) -> Iterator[CloudMessage]:
        """PointCloud2 messages of ``topic`` as arrays; an unusable message is yielded with ``error``
        set (and ``points`` None) so that callers can account for every message."""
        self.require_topic(topic, CLOUD_TYPE)
        for index, raw in enumerate(self.messages([topic])):
            if limit is not None and index >= limit:
                break
            yield decode_cloud(raw, index, field_names)


def decode_cloud(raw: RawMessage, index: int, field_names: Sequence[str] = ("x", "y", "z")) -> CloudMessage:
    """Deserialize one PointCloud2 RawMessage into a CloudMessage (errors captured, not raised)."""
    data = raw.data
    try:
        msg = deserialize(data, CLOUD_TYPE)
    except Exception as exc:  # rosbags raises assorted errors on damaged CDR
        return CloudMessage(index, raw.log_time_ns, None, None, None, data,
                            error=f"cannot deserialize PointCloud2: {exc}")
    stamp, frame = stamp_to_ns(msg.header.stamp), msg.header.frame_id
    n = int(msg.width) * int(msg.height)
    try:
        points = pointcloud2.read_points_numpy(msg, field_names, skip_nans=True)
    except CloudFormatError as exc:
        return CloudMessage(index, raw.log_time_ns, stamp, frame, None, data, n, error=str(exc))
    return CloudMessage(index, raw.log_time_ns, stamp, frame, points, data, int(points.shape[0]))


def _decompressed(data: bytes) -> bytes:
    """``data`` itself, or its content when it is a zstd frame: rosbag2's per-message compression,
    which only metadata.yaml announces (rosbags decompresses such messages when it is there; a
    bag read without it, or salvaged, hands them over compressed). A CDR message never starts
    with zstd's magic number (its first bytes are the encapsulation header 00 01 00 00)."""
    if data[:4] != ZSTD_MAGIC:
        return data
    try:
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except Exception:  # noqa: BLE001 - not a complete frame after all: the deserializer says so
        return data


class _Salvage:
    """Reads complete messages from damaged storage files (.mcap records / .db3 rows)."""

    def __init__(self, files: list[Path], tmpdir: Path, expected_total: int = 0):
        self.files, self.tmpdir, self.expected_total = files, tmpdir, int(expected_total)
        self.problems: list[str] = []
        self.topic_types: dict[str, str] = {}
        self._sqlite: dict[Path, Path] = {}
        for f in files:  # first pass: topics only
            for _ in self._file_messages(f, None, collect_only=True):
                pass
        # reported again (once) by the message pass; kept apart for a bag in which no topic could be
        # read at all (e.g. cut inside its first chunk): that is what a missing topic then means
        self.open_problems = list(self.problems)
        self.problems.clear()

    def close(self) -> None:
        self._sqlite.clear()

    def messages(self, wanted) -> Iterator[RawMessage]:
        for f in self.files:
            for raw in self._file_messages(f, wanted):
                raw.data = _decompressed(raw.data)
                yield raw

    def _file_messages(self, f: Path, wanted, collect_only: bool = False) -> Iterator[RawMessage]:
        if f.suffix == ".mcap":
            yield from self._mcap(f, wanted, collect_only)
        elif f.suffix == ".db3":
            yield from self._db3(f, wanted, collect_only)
        else:
            self.problems.append(f"{f.name}: unknown storage file type")

    def _mcap(self, f: Path, wanted, collect_only: bool) -> Iterator[RawMessage]:
        from mcap.records import Channel, Message, Schema
        from mcap.stream_reader import StreamReader

        schemas: dict[int, str] = {}
        channels: dict[int, tuple[str, str]] = {}
        count = 0
        with open(f, "rb") as fh:
            try:
                for rec in StreamReader(fh, record_size_limit=1 << 31).records:
                    if isinstance(rec, Schema):
                        schemas[rec.id] = rec.name
                    elif isinstance(rec, Channel):
                        channels[rec.id] = (rec.topic, schemas.get(rec.schema_id, "?"))
                        self.topic_types.setdefault(rec.topic, schemas.get(rec.schema_id, "?"))
                    elif isinstance(rec, Message) and not collect_only:
                        topic, msgtype = channels.get(rec.channel_id, (None, None))
                        if topic is not None and (wanted is None or topic in wanted):
                            count += 1
                            yield RawMessage(topic, msgtype, int(rec.log_time), bytes(rec.data))
            except Exception as exc:  # the point where the file stops making sense
                self.problems.append(f"{f.name}: the mcap data ends in a truncated or damaged record "
                                     f"after {count} readable message(s) ({type(exc).__name__}: {exc})")

    def _db3(self, f: Path, wanted, collect_only: bool) -> Iterator[RawMessage]:
        # SQLite refuses a file shorter than its header's page count; a zero-padded copy opens, and
        # rows whose pages survived read normally while the others fail one by one.
        copy = self._sqlite.get(f)
        if copy is None:
            copy = self.tmpdir / f.name
            shutil.copyfile(f, copy)
            with open(copy, "r+b") as fh:
                header = fh.read(100)
                if len(header) == 100 and header.startswith(b"SQLite format 3\x00"):
                    page = struct.unpack(">H", header[16:18])[0]
                    page = 65536 if page == 1 else page
                    pages = struct.unpack(">I", header[28:32])[0]
                    if pages * page > copy.stat().st_size:
                        fh.truncate(pages * page)
            self._sqlite[f] = copy
        try:
            con = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            self.problems.append(f"{f.name}: cannot open the sqlite3 storage ({exc})")
            return
        try:
            try:
                rows = con.execute("SELECT id, name, type FROM topics").fetchall()
            except sqlite3.Error as exc:
                self.problems.append(f"{f.name}: the sqlite3 storage is unreadable ({exc})")
                return
            ids = None
            # Row ids from whichever structure survived: the timestamp index, the table itself, or
            # (both damaged) a probe of ids 1..N with N from metadata.yaml.
            for query in ("SELECT id FROM messages INDEXED BY timestamp_idx",
                          "SELECT id FROM messages NOT INDEXED"):
                try:
                    ids = sorted(r[0] for r in con.execute(query))
                    break
                except sqlite3.Error:
                    continue
            if ids is None:
                ids = list(range(1, self.expected_total + 1))
            topic_of = {tid: (name, msgtype) for tid, name, msgtype in rows}
            for _, name, msgtype in rows:
                self.topic_types.setdefault(name, msgtype)
            if collect_only:
                return
            bad = 0
            for mid in ids:
                try:
                    row = con.execute("SELECT topic_id, timestamp, data FROM messages WHERE id = ?",
                                      (mid,)).fetchone()
                except sqlite3.Error:
                    bad += 1
                    continue
                if row is None:
                    continue
                topic, msgtype = topic_of.get(row[0], (None, None))
                if topic is not None and (wanted is None or topic in wanted):
                    yield RawMessage(topic, msgtype, int(row[1]), bytes(row[2]))
            if bad:
                self.problems.append(f"{f.name}: {bad} of {len(ids)} stored message(s) are in "
                                     "missing or damaged pages")
        finally:
            con.close()


def _storage_errors() -> tuple:
    """What a damaged storage file raises through rosbags: its own ReaderError, sqlite3's errors (the
    standard library's, or apsw's, which rosbags reads sqlite3 bags with and which are not
    sqlite3.DatabaseError), errors of malformed records and I/O errors."""
    from rosbags.rosbag2 import ReaderError

    errors = (ReaderError, sqlite3.DatabaseError, struct.error, ValueError, OSError)
    try:
        import apsw
    except ImportError:
        return errors
    return errors + (apsw.Error,)


# ------------------------------------------------------------------------------------------- writing
def _latched_qos():
    """Reliable, transient-local, depth 1: the offered QoS `ros2 bag play` replays /tf_static with."""
    from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness, QosReliability,
                                    QosTime)

    zero = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, zero,
               zero, QosLiveliness.AUTOMATIC, zero, False)


def check_new_bag(path) -> None:
    """BagError when ``path`` exists: a bag is written only where nothing is (callers check before
    minutes of work that would end in writing it)."""
    if Path(path).exists():
        raise BagError(f"{path} exists already; rosbag2 bags are never overwritten, choose a new "
                       "output path")


class BagWriter:
    """Write a new rosbag2 bag (``storage`` "mcap" or "sqlite3"); never overwrites.

    >>> with BagWriter("out_bag", storage="mcap") as bag:
    ...     bag.write("/velodyne_points", make_cloud(points, stamp_ns), stamp_ns)
    """

    def __init__(self, path, storage: str = "mcap"):
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in STORAGES:
            raise BagError(f"unknown bag storage {storage!r}; expected one of {list(STORAGES)}")
        self.path = Path(path)
        check_new_bag(self.path)
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.storage = storage
        self._writer = Writer(self.path, version=9,
                              storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
        self._conns: dict[str, object] = {}
        self.counts: dict[str, int] = {}
        self._writer.open()

    def _connection(self, topic: str, msgtype: str):
        conn = self._conns.get(topic)
        if conn is None:
            qos = [_latched_qos()] if topic == TF_STATIC_TOPIC else []  # as tf2's static broadcaster
            conn = self._writer.add_connection(topic, msgtype, typestore=typestore(),
                                               offered_qos_profiles=qos)
            self._conns[topic] = conn
        elif conn.msgtype != msgtype:
            raise BagError(f"topic {topic!r} was opened with {conn.msgtype}, cannot write {msgtype}")
        return conn

    def write(self, topic: str, msg, log_time_ns: int) -> None:
        """Write a rosbags message object."""
        self.write_raw(topic, msg.__msgtype__, serialize(msg), log_time_ns)

    def write_raw(self, topic: str, msgtype: str, data, log_time_ns: int) -> None:
        """Write already serialized CDR bytes (e.g. copied from another bag)."""
        self._writer.write(self._connection(topic, msgtype), int(log_time_ns), data)
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()  # also on errors: what was written so far stays a valid bag


def write_clouds(path, clouds: Iterable[tuple[int, np.ndarray]], topic: str = DEFAULT_TOPIC,
                 storage: str = "mcap", frame_id: str = DEFAULT_FRAME,
                 field_names: Sequence[str] = ("x", "y", "z")) -> Path:
    """Write (stamp_ns, points) pairs as PointCloud2 messages (log time = stamp) into a new bag."""
    with BagWriter(path, storage) as bag:
        for stamp_ns, points in clouds:
            bag.write(topic, make_cloud(points, stamp_ns, frame_id, field_names), stamp_ns)
    return Path(path)


def read_clouds(path, topic: str = DEFAULT_TOPIC,
                field_names: Sequence[str] = ("x", "y", "z")) -> list[CloudMessage]:
    """All clouds of a topic (for small bags and tests); BagError when a message is unusable."""
    with BagReader(path) as bag:
        out = list(bag.clouds(topic, field_names))
    bad = [c for c in out if c.error]
    if bad:
        raise BagError(f"{len(bad)} message(s) on {topic} unusable, first: #{bad[0].index}: {bad[0].error}")
    return out
