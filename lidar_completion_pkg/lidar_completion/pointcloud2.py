"""sensor_msgs/PointCloud2 <-> numpy on duck-typed messages (no ROS import at module level).

rclpy's message classes and rosbags' dataclasses have the same attributes (header, height, width,
fields[name, offset, datatype, count], is_bigendian, point_step, row_step, data, is_dense), so the node
and the bag tools share this one converter. The names mirror ``sensor_msgs_py.point_cloud2`` (which is
not published on PyPI): :func:`read_points`, :func:`read_points_numpy`, :func:`create_cloud`,
:func:`create_cloud_xyz32` (and :func:`create_cloud_xyz64`, which it lacks).

Reading builds a structured dtype from the fields, offsets, ``point_step`` and endianness and takes a
``np.frombuffer`` view of ``msg.data`` (no copy); rows padded to a ``row_step`` larger than
``width * point_step`` are handled with a strided view. Anything that does not describe a usable cloud
raises :class:`~lidar_completion.errors.CloudFormatError` with a message naming the problem.

Writing assigns ``msg.data`` a bytes-like object (``array.array('B')`` for rclpy, a ``uint8`` array for
rosbags), never a Python list: with ``ROS_PYTHON_CHECK_FIELDS=1`` rclpy validates a list element by
element, which costs ~80 ms for a 2 MB cloud.
"""
from __future__ import annotations

import array
import sys
import types
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import CloudFormatError

__all__ = [
    "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "FLOAT32", "FLOAT64",
    "DATATYPES", "read_points", "read_points_numpy", "create_cloud", "create_cloud_xyz32",
    "create_cloud_xyz64",
    "make_fields_xyz32", "make_field", "dtype_from_fields", "CloudFormatError",
]

# sensor_msgs/msg/PointField datatype constants.
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)
DATATYPES = {
    INT8: np.dtype("i1"), UINT8: np.dtype("u1"), INT16: np.dtype("i2"), UINT16: np.dtype("u2"),
    INT32: np.dtype("i4"), UINT32: np.dtype("u4"), FLOAT32: np.dtype("f4"), FLOAT64: np.dtype("f8"),
}
_DATATYPE_NAMES = {INT8: "INT8", UINT8: "UINT8", INT16: "INT16", UINT16: "UINT16", INT32: "INT32",
                   UINT32: "UINT32", FLOAT32: "FLOAT32", FLOAT64: "FLOAT64"}
_NP_TO_DATATYPE = {v.str.lstrip("<>|="): k for k, v in DATATYPES.items()}


# --------------------------------------------------------------------------------------------- reading
def _error(reason: str, message: str) -> CloudFormatError:
    """CloudFormatError with a short machine-readable ``reason`` (the node counts rejections by it):
    empty, missing_field, truncated, inconsistent_step, inconsistent_header, unsupported_datatype,
    no_finite_points, bad_data, bad_field, not_pointcloud2, bad_request."""
    exc = CloudFormatError(message)
    exc.reason = reason
    return exc


def _as_int(msg, name: str) -> int:
    try:
        value = int(getattr(msg, name))
    except AttributeError:
        raise _error("not_pointcloud2", f"not a PointCloud2: the message has no '{name}' attribute") from None
    except (TypeError, ValueError):
        raise _error("inconsistent_header", f"PointCloud2.{name} must be an integer, found "
                               f"{getattr(msg, name)!r}") from None
    if value < 0:
        raise _error("inconsistent_header", f"PointCloud2.{name} must be >= 0, found {value}")
    return value


def _buffer(data) -> np.ndarray:
    """A uint8 view of msg.data without copying (bytes, bytearray, array.array, memoryview, ndarray)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            data = data.view(np.uint8) if data.flags.c_contiguous else np.ascontiguousarray(data).view(np.uint8)
        return data.reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        pass
    if isinstance(data, (list, tuple)):  # a Python list of ints (slow; some hand-built messages)
        try:
            return np.asarray(data, dtype=np.uint8).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            pass
    raise _error("bad_data", f"PointCloud2.data must be a byte buffer (bytes, array.array('B'), uint8 "
                           f"array), found {type(data).__name__}")


_DUPLICATE = (-1, -1, -1)


def _field_table(msg) -> dict:
    fields = getattr(msg, "fields", None)
    if fields is None:
        raise _error("not_pointcloud2", "not a PointCloud2: the message has no 'fields' attribute")
    table = {}
    for f in fields:
        try:
            entry = (int(f.offset), int(f.datatype), int(getattr(f, "count", 1)))
        except (AttributeError, TypeError, ValueError):
            raise _error("bad_field", f"malformed PointField {f!r}: expected name, offset, datatype, "
                                   "count") from None
        name = str(f.name)
        # a name given twice is ambiguous (the last one used to win silently); kept as a marker so
        # that only a cloud whose *requested* field is doubled is refused (padding fields may repeat)
        table[name] = _DUPLICATE if name in table else entry
    return table


def dtype_from_fields(fields, point_step: int, field_names: Sequence[str] | None = None,
                      is_bigendian: bool = False) -> np.dtype:
    """Structured dtype (itemsize = point_step) for the named fields (all when None).

    Raises CloudFormatError for a missing field, an unsupported datatype, a field count other than 1 or
    a field that does not fit inside ``point_step``.
    """
    table = fields if isinstance(fields, dict) else _field_table(types.SimpleNamespace(fields=fields))
    names = list(table) if field_names is None else list(field_names)
    missing = [n for n in names if n not in table]
    if missing:
        raise _error("missing_field", f"PointCloud2 lacks field(s) {missing}; it has {sorted(table)}")
    if len(set(names)) != len(names):
        raise _error("bad_request", f"duplicate field names requested: {names}")
    doubled = [n for n in names if table[n] == _DUPLICATE]
    if doubled:
        raise _error("bad_field", f"PointCloud2 has more than one field named {doubled}: which one "
                                  "holds the values is ambiguous")
    order = ">" if is_bigendian else "<"
    formats, offsets = [], []
    for n in names:
        offset, datatype, count = table[n]
        if datatype not in DATATYPES:
            raise _error("unsupported_datatype", f"field '{n}' has unsupported datatype {datatype} "
                                   f"(expected 1..8, INT8..FLOAT64)")
        if count != 1:
            raise _error("unsupported_datatype", f"field '{n}' has count {count}; only count 1 is supported")
        dt = DATATYPES[datatype].newbyteorder(order)
        if offset + dt.itemsize > point_step:
            raise _error("inconsistent_step", f"field '{n}' ({_DATATYPE_NAMES[datatype]} at offset {offset}) "
                                   f"does not fit in point_step {point_step}")
        for other, start, size in zip(names, offsets, (f.itemsize for f in formats)):
            if offset < start + size and start < offset + dt.itemsize:
                raise _error("bad_field", f"fields '{other}' (offset {start}) and '{n}' (offset {offset}) "
                                          "overlap in each point")
        formats.append(dt)
        offsets.append(offset)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": point_step})


def read_points(msg, field_names: Sequence[str] | None = None, skip_nans: bool = False,
                reshape_organized_cloud: bool = False) -> np.ndarray:
    """Structured array of the named fields (all when None), a zero-copy view where the layout allows.

    ``skip_nans`` drops points with a NaN or inf in any requested floating-point field (the result is then
    a copy). Organised clouds (height > 1) come back flattened unless ``reshape_organized_cloud``.
    The view may be read-only (it shares memory with ``msg.data``).
    """
    height, width = _as_int(msg, "height"), _as_int(msg, "width")
    point_step, row_step = _as_int(msg, "point_step"), _as_int(msg, "row_step")
    table = _field_table(msg)
    if not table:
        raise _error("missing_field", "PointCloud2 has no fields")
    if height * width == 0:
        raise _error("empty", f"empty cloud: height={height}, width={width}")
    if point_step == 0:
        raise _error("inconsistent_step", "inconsistent PointCloud2: point_step is 0")
    dtype = dtype_from_fields(table, point_step, field_names, bool(getattr(msg, "is_bigendian", False)))
    if row_step < width * point_step:
        raise _error("inconsistent_step", f"inconsistent PointCloud2: row_step {row_step} < width {width} x "
                               f"point_step {point_step}")
    buf = _buffer(getattr(msg, "data", None))
    needed = (height - 1) * row_step + width * point_step
    if buf.size < needed:
        raise _error("truncated", f"truncated PointCloud2: data has {buf.size} bytes, the header "
                               f"(height {height}, row_step {row_step}, width {width}, point_step "
                               f"{point_step}) needs {needed}")
    if buf.size - height * row_step >= point_step:
        # a whole point or more beyond the declared rows: width / height understate the cloud, and
        # reading only what they declare would complete a fraction of the scan without a word
        raise _error("inconsistent_step", f"inconsistent PointCloud2: data has {buf.size} bytes, the header "
                                          f"(height {height} x row_step {row_step}) declares "
                                          f"{height * row_step}: wrong width or height?")
    if row_step == width * point_step:
        points = np.frombuffer(buf, dtype=dtype, count=height * width)
        if reshape_organized_cloud:
            points = points.reshape(height, width)
    else:
        grid = np.ndarray(shape=(height, width), dtype=dtype, buffer=buf, offset=0,
                          strides=(row_step, point_step))
        points = grid if reshape_organized_cloud else grid.reshape(-1)
    if skip_nans:
        floats = [n for n in dtype.names if dtype.fields[n][0].kind == "f"]
        if floats:
            keep = np.ones(points.shape, dtype=bool)
            for n in floats:
                keep &= np.isfinite(points[n])
            if not keep.all():
                points = points[keep]  # flattens organised clouds, like sensor_msgs_py
    return points


def read_points_numpy(msg, field_names: Sequence[str] = ("x", "y", "z"),
                      skip_nans: bool = True, dtype="float32") -> np.ndarray:
    """(N, k) array of the named fields, in the requested order (float32 unless ``dtype`` says).

    ``dtype="float64"`` returns float64; ``dtype="auto"`` float64 when any of the named fields is
    stored as float64 and float32 otherwise: a cloud in a frame far from its origin (UTM-sized map
    coordinates, where float32 steps by up to 1 m) keeps its precision for a transform.
    When the fields are consecutive native float32 values and rows are unpadded, the float32 result
    is a strided view of ``msg.data`` (zero-copy, read-only when the message owns immutable bytes);
    otherwise one copy.
    With ``skip_nans`` points with a NaN or inf in any requested field are dropped; a cloud in which no
    point is finite raises CloudFormatError, as do empty, truncated or inconsistent clouds, missing
    fields and unsupported datatypes.
    """
    field_names = tuple(field_names)
    if not field_names:
        raise _error("bad_request", "read_points_numpy needs at least one field name")
    if dtype not in ("float32", "float64", "auto"):
        raise _error("bad_request", f"read_points_numpy: dtype must be 'float32', 'float64' or 'auto', "
                                    f"got {dtype!r}")
    structured = read_points(msg, field_names, skip_nans=False)
    n = structured.shape[0]
    if dtype == "auto":
        stored = [structured.dtype.fields[name][0] for name in field_names]
        wide = any(f.kind == "f" and f.itemsize > 4 for f in stored)
        dtype = "float64" if wide else "float32"
    view = _float32_view(structured, field_names) if dtype == "float32" else None
    if view is None:
        out = np.empty((n, len(field_names)), dtype=dtype)
        # float64 values beyond float32's range become inf (dropped below with skip_nans) without
        # numpy's overflow warning, which would reach stderr outside the caller's logging
        with np.errstate(over="ignore", invalid="ignore"):
            for j, name in enumerate(field_names):
                out[:, j] = structured[name]
    else:
        out = view
    if skip_nans:
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            out = out[finite]
            if out.shape[0] == 0:
                raise _error("no_finite_points", f"no finite points: all {n} points have NaN or inf in "
                                       f"{list(field_names)}")
    return out


def _float32_view(structured: np.ndarray, names: Sequence[str]):
    """Read-only (N, k) float32 view when the fields are consecutive native float32s, else None."""
    dt = structured.dtype
    first = dt.fields[names[0]][1]
    for j, name in enumerate(names):
        fdt, off = dt.fields[name][:2]
        if fdt != np.dtype("=f4") or off != first + 4 * j:
            return None
    if structured.ndim != 1 or not structured.flags.c_contiguous or structured.shape[0] == 0:
        return None
    raw = structured.view(np.uint8).reshape(-1)
    out = np.ndarray(shape=(structured.shape[0], len(names)), dtype=np.float32, buffer=raw,
                     offset=first, strides=(dt.itemsize, 4))
    out.flags.writeable = False
    return out


# --------------------------------------------------------------------------------------------- writing
def _default_pointcloud2():
    try:
        from sensor_msgs.msg import PointCloud2  # lazy: this module imports no ROS
    except ImportError as exc:
        raise CloudFormatError("no msg_factory given and sensor_msgs (rclpy) is not importable; pass "
                               f"msg_factory=<PointCloud2 class> ({exc})") from None
    return PointCloud2


def _field_factory_for(msg_factory) -> Callable:
    """PointField class matching a PointCloud2 factory (rclpy, rosbags) or a plain namespace."""
    if msg_factory is None:
        from sensor_msgs.msg import PointField
        return PointField
    module = sys.modules.get(getattr(msg_factory, "__module__", "") or "")
    name = getattr(msg_factory, "__name__", "")
    if module is not None and "PointCloud2" in name:
        candidate = getattr(module, name.replace("PointCloud2", "PointField"), None)
        if candidate is not None:
            return candidate
    return types.SimpleNamespace


def _is_rosbags(factory) -> bool:
    return (getattr(factory, "__module__", "") or "").startswith("rosbags")


def make_field(name: str, offset: int, datatype: int, count: int = 1, field_factory=None):
    """One PointField (rclpy's by default)."""
    factory = field_factory if field_factory is not None else _field_factory_for(None)
    return factory(name=name, offset=offset, datatype=datatype, count=count)


def make_fields_xyz32(field_factory=None) -> list:
    """[x, y, z] float32 PointFields at offsets 0, 4, 8 (rclpy's PointField by default)."""
    return [make_field(n, 4 * i, FLOAT32, 1, field_factory) for i, n in enumerate("xyz")]


def create_cloud(header, fields: Iterable, points, msg_factory=None, field_factory=None,
                 point_step: int | None = None):
    """An unorganised (height 1) little-endian PointCloud2 with the given fields.

    ``points`` is an (N, k) array whose columns follow ``fields`` in order, or a structured array with
    the field names. ``msg_factory(**attrs)`` builds the message (rclpy's sensor_msgs.msg.PointCloud2 by
    default; pass rosbags' class for bags). ``fields`` are reused as given on the message.
    """
    fields = list(fields)
    if not fields:
        raise CloudFormatError("create_cloud needs at least one field")
    table = _field_table(types.SimpleNamespace(fields=fields))
    extent = max(off + DATATYPES[dt].itemsize if dt in DATATYPES else 0 for off, dt, _ in table.values())
    step = extent if point_step is None else int(point_step)
    dtype = dtype_from_fields(table, step, list(table), is_bigendian=False)
    arr = np.asarray(points) if not isinstance(points, np.ndarray) else points
    if arr.dtype.names is not None:
        missing = [n for n in dtype.names if n not in arr.dtype.names]
        if missing:
            raise CloudFormatError(f"structured points lack fields {missing}")
        n = arr.shape[0] if arr.ndim else 0
        cloud = np.zeros(n, dtype=dtype)
        for name in dtype.names:
            cloud[name] = arr[name].reshape(-1)
    else:
        if arr.ndim == 1 and arr.size == 0:
            arr = arr.reshape(0, len(fields))
        if arr.ndim != 2 or arr.shape[1] != len(fields):
            raise CloudFormatError(f"points must be (N, {len(fields)}) for fields "
                                   f"{list(dtype.names)}, found shape {arr.shape}")
        n = arr.shape[0]
        cloud = np.zeros(n, dtype=dtype)
        for j, name in enumerate(dtype.names):
            cloud[name] = arr[:, j]
    raw = cloud.tobytes()
    factory = msg_factory if msg_factory is not None else _default_pointcloud2()
    if _is_rosbags(factory):
        data = np.frombuffer(bytearray(raw), dtype=np.uint8)
    else:
        data = array.array("B")
        data.frombytes(raw)
    finite = all(np.isfinite(cloud[nm]).all() for nm in dtype.names if dtype.fields[nm][0].kind == "f")
    return factory(header=header, height=1, width=n, fields=fields, is_bigendian=False,
                   point_step=step, row_step=step * n, data=data, is_dense=bool(finite))


def create_cloud_xyz32(header, points, msg_factory=None, field_factory=None):
    """PointCloud2 with float32 x, y, z from an (N, >=3) array (extra columns ignored)."""
    return _create_cloud_xyz(header, points, FLOAT32, msg_factory, field_factory)


def create_cloud_xyz64(header, points, msg_factory=None, field_factory=None):
    """PointCloud2 with float64 x, y, z from an (N, >=3) array (extra columns ignored): for frames
    whose coordinates float32 would round (beyond ~131 km of the origin, by 8 mm or more)."""
    return _create_cloud_xyz(header, points, FLOAT64, msg_factory, field_factory)


def _create_cloud_xyz(header, points, datatype: int, msg_factory, field_factory):
    arr = np.asarray(points)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 3)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise CloudFormatError(f"points must be (N, 3) or wider, found shape {arr.shape}")
    if field_factory is None:
        field_factory = _field_factory_for(msg_factory)
    size = DATATYPES[datatype].itemsize
    xyz = np.ascontiguousarray(arr[:, :3], dtype=DATATYPES[datatype])
    factory = msg_factory if msg_factory is not None else _default_pointcloud2()
    n = xyz.shape[0]
    raw = xyz.tobytes()
    if _is_rosbags(factory):
        data = np.frombuffer(bytearray(raw), dtype=np.uint8)
    else:
        data = array.array("B")
        data.frombytes(raw)
    fields = [make_field(name, size * i, datatype, 1, field_factory) for i, name in enumerate("xyz")]
    return factory(header=header, height=1, width=n, fields=fields, is_bigendian=sys.byteorder == "big",
                   point_step=3 * size, row_step=3 * size * n, data=data,
                   is_dense=bool(np.isfinite(xyz).all()))
