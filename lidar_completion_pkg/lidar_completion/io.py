"""Point-cloud files and renders.

Formats (chosen by file extension):

* ``.bin`` - KITTI / SemanticKITTI velodyne scans: little-endian float32 x, y, z, intensity
  (``bin_format="xyz"``: float32 x, y, z, as ``build-gt`` writes its targets);
* ``.npy`` - a numpy array (N, >=3);
* ``.ply`` - vertex element with float/double/int properties x, y, z (+ others); ascii,
  binary_little_endian and binary_big_endian;
* ``.pcd`` - PCL point clouds with fields x, y, z (+ others), ``DATA ascii``, ``binary`` or
  ``binary_compressed`` (PCL's LZF-compressed form; written as ascii or binary).

:func:`read_cloud` returns float32 (N, 3) xyz (or every numeric column with ``xyz_only=False``);
:func:`write_cloud` writes (N, >=3) arrays. Problems raise :class:`CloudFormatError` with what was
expected and what was found. Renders use matplotlib's Agg canvas directly (no pyplot, no global
backend switch), so they work headless and in threads. Clouds and renders are written to a
temporary file renamed over the final name when complete, so a failed write never leaves a part.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import CloudFormatError
from .fileutil import atomic_write

__all__ = ["FORMATS", "BIN_FORMATS", "read_cloud", "read_bin_checked", "write_cloud",
           "render_bev_png", "render_comparison_png"]

log = logging.getLogger(__name__)

FORMATS = (".bin", ".npy", ".ply", ".pcd")
#: How a ``.bin`` is read: "kitti" little-endian float32 (x, y, z, intensity) records of 16 bytes,
#: "xyz" float32 (x, y, z) records of 12 bytes (the ground-truth cache's targets). Nothing in the
#: file says which: 3 x 16 bytes are also 4 x 12, so the caller has to.
BIN_FORMATS = ("kitti", "xyz")

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4",
              ("I", 8): "i8", ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


def _suffix(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise CloudFormatError(f"{path}: unsupported point-cloud extension {ext or '(none)'!r}; "
                               f"expected one of {', '.join(FORMATS)}")
    return ext


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def read_cloud(path, xyz_only: bool = True, bin_format: str = "kitti") -> np.ndarray:
    """Read a point cloud file; float32 (N, 3) xyz, or (N, k) every numeric column if not
    ``xyz_only`` (x, y, z first). ``bin_format`` (:data:`BIN_FORMATS`): how a ``.bin`` is read.
    Raises :class:`CloudFormatError`."""
    if bin_format not in BIN_FORMATS:
        raise CloudFormatError(f"bin_format: expected one of {', '.join(BIN_FORMATS)}, got {bin_format!r}")
    path = Path(path)
    if not path.exists():           # before the extension: "no such file" is what a typo needs to hear
        raise CloudFormatError(f"{path}: no such file")
    ext = _suffix(path)
    if path.is_dir():
        raise CloudFormatError(f"{path}: is a directory, expected a {ext} point-cloud file")
    reader = {".bin": _read_bin if bin_format == "kitti" else _read_xyz_bin, ".npy": _read_npy,
              ".ply": _read_ply, ".pcd": _read_pcd}[ext]
    try:
        cloud = reader(path)
    except CloudFormatError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as exc:
        raise CloudFormatError(f"{path}: cannot read as {ext}: {exc}") from None
    cloud = np.asarray(cloud, dtype=np.float32)
    return np.ascontiguousarray(cloud[:, :3] if xyz_only else cloud)


def _read_bin(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if len(raw) % 16:
        hint = ("; if it holds float32 (x, y, z) only, as the ground-truth cache's targets do, pass "
                "--bin-format xyz" if len(raw) % 12 == 0 else "")
        raise CloudFormatError(
            f"{path}: a KITTI .bin holds float32 (x, y, z, intensity) records of 16 bytes; the file "
            f"has {len(raw)} bytes, not a multiple of 16 (truncated or not a KITTI scan){hint}")
    return np.frombuffer(raw, dtype="<f4").reshape(-1, 4)


def _read_xyz_bin(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if len(raw) % 12:
        raise CloudFormatError(
            f"{path}: read as float32 (x, y, z) records of 12 bytes (the ground-truth cache's "
            f"targets), but the file has {len(raw)} bytes, not a multiple of 12 (truncated, or a "
            "KITTI scan of 16-byte records: --bin-format kitti)")
    return np.frombuffer(raw, dtype="<f4").reshape(-1, 3)


def read_bin_checked(path, bin_format: str = "kitti", warn=None) -> np.ndarray:
    """(N, 3) float32 points of a ``.bin`` read as ``bin_format``; a KITTI read whose "intensity"
    column holds negative values calls ``warn(message)`` (default: a logged warning). x, y, z files
    of 4k points (or 20-byte records of 4k points) divide into 16-byte records too; read as KITTI,
    their "intensity" column holds coordinates, and a scan's coordinates are negative somewhere
    (the ground below the sensor, half the azimuths) while intensities never are."""
    if bin_format != "kitti":
        return read_cloud(path, bin_format=bin_format)
    full = read_cloud(path, xyz_only=False)
    negative = int((full[:, 3] < 0).sum()) if full.shape[1] > 3 else 0
    if negative:
        (warn or log.warning)(f"{path}: read as KITTI (x, y, z, intensity), but {negative} of "
                              f"{len(full)} intensities are negative; if the file holds float32 "
                              "x, y, z only, pass --bin-format xyz")
    return np.ascontiguousarray(full[:, :3])


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise CloudFormatError(f"{path}: not a plain numeric .npy array ({exc})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):  # pragma: no cover - .npz renamed .npy
        raise CloudFormatError(f"{path}: is an .npz archive, expected a single .npy array")
    if arr.dtype.names:  # structured array with named fields
        return _columns_from_struct(path, arr, arr.dtype.names)
    if arr.dtype.kind not in "fiu":
        raise CloudFormatError(f"{path}: expected a numeric array, found dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise CloudFormatError(f"{path}: expected an array of shape (N, 3+), found {arr.shape}")
    if arr.shape[0] in (3, 4) and arr.shape[1] > 16:
        # (3, N) or (4, N) reads as 3 or 4 "points" of N coordinates: a cloud stored a column per
        # point (e.g. saved from a 3 x N matrix), not N rows of x, y, z
        raise CloudFormatError(f"{path}: an array of shape {arr.shape} holds a point per column, not "
                               f"per row; expected (N, 3+): save its transpose (array.T)")
    return arr


def _columns_from_struct(path: Path, arr: np.ndarray, names) -> np.ndarray:
    lower = {n.lower(): n for n in names}
    missing = [c for c in "xyz" if c not in lower]
    if missing:
        raise CloudFormatError(f"{path}: fields x, y, z are required; found {', '.join(names)} "
                               f"(missing {', '.join(missing)})")
    order = [lower[c] for c in "xyz"] + [n for n in names if n.lower() not in ("x", "y", "z")
                                         and arr.dtype[n].kind in "fiu" and arr.dtype[n].shape == ()]
    # a field per column, the points in row-major order: an organised (H, W) array (as read_points
    # returns a scan with reshape_organized_cloud) gives H * W rows, one per point
    return np.stack([np.asarray(arr[n], dtype=np.float64) for n in order], axis=-1).reshape(-1, len(order))


def _read_header_lines(f, path: Path, end_marker: str, max_lines: int = 200) -> list:
    lines = []
    for _ in range(max_lines):
        raw = f.readline()
        if not raw:
            raise CloudFormatError(f"{path}: header ended before '{end_marker}' (truncated file)")
        line = raw.decode("ascii", errors="replace").strip()
        lines.append(line)
        if (line.split(None, 1) or [""])[0].upper() == end_marker.upper():
            return lines
    raise CloudFormatError(f"{path}: no '{end_marker}' line in the first {max_lines} header lines")


def _read_ply(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        magic = f.readline().strip()
        if magic != b"ply":
            raise CloudFormatError(f"{path}: not a PLY file (first line {magic[:20]!r}, expected 'ply')")
        header = _read_header_lines(f, path, "end_header")
        fmt, elements = None, []
        for line in header:
            tok = line.split()
            if not tok or tok[0] in ("comment", "obj_info"):
                continue
            if tok[0] == "format":
                fmt = tok[1] if len(tok) > 1 else None
            elif tok[0] == "element":
                if len(tok) != 3:
                    raise CloudFormatError(f"{path}: malformed PLY header line {line!r}; expected "
                                           "'element NAME COUNT'")
                elements.append({"name": tok[1], "count": _count(path, tok[2], line), "props": []})
            elif tok[0] == "property":
                if not elements:
                    raise CloudFormatError(f"{path}: property before any element in the header")
                if len(tok) < (5 if tok[1:2] == ["list"] else 3):
                    raise CloudFormatError(f"{path}: malformed PLY header line {line!r}; expected "
                                           "'property TYPE NAME' or 'property list COUNT_TYPE TYPE NAME'")
                if tok[1] == "list":
                    elements[-1]["props"].append(("list", tok[4], tok[2], tok[3]))
                else:
                    if tok[1] not in _PLY_TYPES:
                        raise CloudFormatError(f"{path}: unknown PLY property type {tok[1]!r}")
                    elements[-1]["props"].append(("scalar", tok[2], _PLY_TYPES[tok[1]]))
        if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
            raise CloudFormatError(f"{path}: unknown PLY format {fmt!r}; expected ascii, "
                                   "binary_little_endian or binary_big_endian")
        names = [e["name"] for e in elements]
        if "vertex" not in names:
            raise CloudFormatError(f"{path}: no 'vertex' element (elements: {', '.join(names) or 'none'})")
        endian = ">" if fmt == "binary_big_endian" else "<"
        line_no = 1 + len(header)           # lines read so far: error messages name file lines
        for el in elements:
            if el["name"] == "vertex":
                break
            # skip an element that precedes the vertices
            if fmt == "ascii":
                for _ in range(el["count"]):
                    f.readline()
                line_no += el["count"]
            elif any(p[0] == "list" for p in el["props"]):
                raise CloudFormatError(f"{path}: element {el['name']!r} with list properties precedes "
                                       "'vertex' in a binary PLY; this reader needs vertices first")
            else:
                size = sum(np.dtype(p[2]).itemsize for p in el["props"])
                f.seek(size * el["count"], os.SEEK_CUR)
        vi = names.index("vertex")
        vertex = elements[vi]
        if any(p[0] == "list" for p in vertex["props"]):
            raise CloudFormatError(f"{path}: list properties in the vertex element are not supported")
        dtype = np.dtype([(p[1], endian + p[2]) for p in vertex["props"]])
        count = vertex["count"]
        # data after the vertices belongs to the elements declared after them (faces, edges); with
        # none (or only empty ones), more data means the header's vertex count is too small, and
        # reading just that many would silently drop the rest of the scan
        last = all(el["count"] == 0 for el in elements[vi + 1:])
        if fmt == "ascii":
            rows = [f.readline() for _ in range(count)]
            if count and not rows[-1]:
                got = sum(1 for r in rows if r)
                raise CloudFormatError(f"{path}: header announces {count} vertices, the file has {got}")
            # row by row: in one flat list of values, a row short of a value and a later one with
            # a value too many would shift every value between them into the wrong column unseen
            for i, row in enumerate(rows):
                _check_ascii_row(path, row, len(dtype.names), line_no + 1 + i, f"vertex {i}",
                                 f"{count} vertices", not row.endswith(b"\n"))
            text = b"".join(rows).decode("ascii", errors="replace")
            values = np.array(text.split(), dtype=np.float64) if count else np.zeros(0)
            if last:
                extra = sum(1 for r in f if r.strip())       # blank lines at the end are harmless
                if extra:
                    raise CloudFormatError(f"{path}: header announces {count} vertices, the file has "
                                           f"{extra} more line(s) of data after them (wrong vertex "
                                           "count in the header?)")
            values = values.reshape(count, len(dtype.names))
            arr = np.zeros(count, dtype=dtype)
            for i, n in enumerate(dtype.names):
                arr[n] = _fitting(path, n, values[:, i], dtype[n])
        else:
            need = dtype.itemsize * count
            raw = f.read(need)
            if len(raw) < need:
                raise CloudFormatError(f"{path}: truncated: {count} vertices need {need} bytes of "
                                       f"data, the file has {len(raw)}")
            if last:
                _no_extra_bytes(path, f, need, f"{count} vertices", dtype.itemsize)
            arr = np.frombuffer(raw, dtype=dtype, count=count)
    return _columns_from_struct(path, arr, dtype.names)


def _fitting(path: Path, name: str, values: np.ndarray, field: np.dtype) -> np.ndarray:
    """``values`` (float64 read from an ascii body) for a field of type ``field``: an integer field
    refuses values outside its range (numpy would wrap 300 in a uchar to 44, silently)."""
    if field.kind in "iu" and values.size:
        info = np.iinfo(field)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if low < info.min or high > info.max:
            raise CloudFormatError(f"{path}: field {name!r} is declared {field.name} "
                                   f"({info.min}..{info.max}) but holds values from {low:g} to {high:g}")
    return values


def _check_ascii_row(path: Path, row: bytes, width: int, line_no: int, what: str, announced: str,
                     cut: bool) -> None:
    """CloudFormatError naming line ``line_no`` of the file (``what``: e.g. "vertex 12") when that
    line of an ascii body does not hold ``width`` values; ``cut``: the file ends inside this line
    (no newline after it), which with too few values is a truncated file (``announced``: what the
    header announces, e.g. "1234 vertices")."""
    n = len(row.split())
    if n == width:
        return
    if cut and n < width:
        raise CloudFormatError(f"{path}: truncated: the header announces {announced}, the file ends "
                               f"inside {what} (line {line_no}, {n} of {width} values)")
    text = row.decode("ascii", errors="replace").strip()
    raise CloudFormatError(f"{path}: line {line_no} ({what}) has {n} values, the header declares "
                           f"{width}: {text[:80]!r}")


def _count(path: Path, word: str, line: str) -> int:
    """A point / element count of the header: a non-negative integer, else a CloudFormatError naming
    the file and the line (a negative count would read as "all the rest" or fail deep inside)."""
    try:
        count = int(word)
    except ValueError:
        count = -1
    if count < 0:
        raise CloudFormatError(f"{path}: header line {line!r}: expected a count >= 0, found {word!r}")
    return count


def _no_extra_bytes(path: Path, f, used: int, what: str, record: int, pcl_start: int | None = None) -> None:
    """CloudFormatError when binary data goes on after the ``used`` bytes the header declares, by
    at least one ``record`` (a point's bytes: less cannot be a point the header left out, e.g. a
    newline some writers end the file with).

    ``pcl_start`` (binary PCD: where the data starts) accepts the zero padding of older PCL
    (1.7 era), which stretched the file to ``getpagesize() + data size`` before mapping header and
    data into it: zeros that end the file at one page (4 to 64 KiB) past the header's length."""
    rest = f.read()
    extra = len(rest)
    if extra < record:
        return
    if extra and pcl_start is not None and not rest.strip(b"\0"):
        page = pcl_start + extra
        if 4096 <= page <= 65536 and page & (page - 1) == 0:
            return
    if extra:
        raise CloudFormatError(f"{path}: the header declares {what} ({used} bytes of data), the file "
                               f"has {used + extra} bytes of data: {extra} more than declared (wrong "
                               "point count in the header?)")


def _read_pcd(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        header = _read_header_lines(f, path, "DATA")
        meta = {}
        for line in header:
            if not line or line.startswith("#"):
                continue
            key, *rest = line.split()       # any whitespace between words, as PCL reads them
            meta[key.upper()] = rest
        for key in ("FIELDS", "SIZE", "TYPE", "DATA"):
            if key not in meta:
                raise CloudFormatError(f"{path}: PCD header lacks the {key} line")
        fields, sizes, types = meta["FIELDS"], meta["SIZE"], meta["TYPE"]
        counts = meta.get("COUNT", ["1"] * len(fields))
        if not (len(fields) == len(sizes) == len(types) == len(counts)):
            raise CloudFormatError(f"{path}: FIELDS/SIZE/TYPE/COUNT have different lengths "
                                   f"({len(fields)}/{len(sizes)}/{len(types)}/{len(counts)})")
        npts = _pcd_points(path, meta)
        _pcd_viewpoint(path, meta)
        cols = []
        for name, size, typ, cnt in zip(fields, sizes, types, counts):
            key = (typ.upper(), int(size))
            if key not in _PCD_TYPES:
                raise CloudFormatError(f"{path}: unsupported PCD field type {typ}{size} for {name!r}")
            word = cnt
            try:
                cnt = int(word)
            except ValueError:
                cnt = 0
            if cnt < 1:    # 0 would read as a field without values, -1 fail deep inside numpy
                raise CloudFormatError(f"{path}: header line 'COUNT {' '.join(counts)}': field {name!r} "
                                       f"has COUNT {word!r}, expected an integer >= 1 (values per point)")
            if cnt == 1:
                cols.append((name, "<" + _PCD_TYPES[key]))
            else:
                cols.append((name, "<" + _PCD_TYPES[key], (cnt,)))
        # fields named "_" are padding in PCL; make them unique for numpy
        seen = {}
        uniq = []
        for c in cols:
            n = c[0]
            seen[n] = seen.get(n, 0) + 1
            uniq.append((n if seen[n] == 1 else f"{n}__{seen[n]}",) + tuple(c[1:]))
        dtype = np.dtype(uniq)
        mode = meta["DATA"][0].lower()
        if mode == "ascii":
            # one point a line; blank lines are harmless. Checked row by row: in one flat list of
            # values, a short row and a long one would shift every value between them unseen
            lines = f.read().split(b"\n")
            first = len(header) + 1
            numbered = [(first + i, row) for i, row in enumerate(lines) if row.strip()]
            width = sum(int(c) for c in counts)
            end = first + len(lines) - 1         # the last line: cut when the file ends inside it
            for k, (no, row) in enumerate(numbered):
                _check_ascii_row(path, row, width, no, f"point {k}", f"{npts} points", no == end)
            if len(numbered) != npts:
                got = len(numbered)
                more = (f": {got - npts} more than declared (wrong point count in the header?)"
                        if got > npts else " (truncated file?)")
                raise CloudFormatError(f"{path}: the header declares {npts} points, the file has {got} "
                                       f"lines of point values{more}")
            text = b" ".join(row for _, row in numbered).decode("ascii", errors="replace")
            values = np.array(text.split(), dtype=np.float64) if npts else np.zeros(0)
            values = values.reshape(npts, width)
            arr = np.zeros(npts, dtype=dtype)
            col = 0
            for name in dtype.names:
                w = int(np.prod(dtype[name].shape)) if dtype[name].shape else 1
                arr[name] = _fitting(path, name, values[:, col] if w == 1 else values[:, col:col + w],
                                     dtype[name].base)
                col += w
        elif mode == "binary":
            need = dtype.itemsize * npts
            start = f.tell()
            raw = f.read(need)
            if len(raw) < need:
                raise CloudFormatError(f"{path}: truncated: {npts} points need {need} bytes of data, "
                                       f"the file has {len(raw)}")
            _no_extra_bytes(path, f, need, f"{npts} points", dtype.itemsize, pcl_start=start)
            arr = np.frombuffer(raw, dtype=dtype, count=npts)
        elif mode == "binary_compressed":
            padding = [u[0] for u, c in zip(uniq, cols) if c[0] == "_"]
            arr = _pcd_decompress(path, f.read(), dtype, npts, padding)
        else:
            raise CloudFormatError(f"{path}: unknown PCD DATA mode {mode!r}; expected ascii, binary "
                                   "or binary_compressed")
    return _columns_from_struct(path, arr, dtype.names)


def _pcd_viewpoint(path: Path, meta: dict) -> None:
    """Warn about a VIEWPOINT other than PCL's identity (``0 0 0 1 0 0 0``: translation, then the
    quaternion w x y z): such a cloud is in a map or world frame with the sensor elsewhere, while
    the networks assume the sensor at the origin. The points are returned as stored."""
    words = meta.get("VIEWPOINT")
    if words is None:
        return
    try:
        ok = len(words) == 7 and np.allclose([float(w) for w in words], [0, 0, 0, 1, 0, 0, 0])
    except ValueError:
        ok = False
    if not ok:
        log.warning("%s: VIEWPOINT %s: the sensor is not at the origin of the cloud's frame; the "
                    "points are read as stored, but completion assumes the sensor at the origin "
                    "(transform the cloud into the sensor frame first)", path, " ".join(words))


def _pcd_points(path: Path, meta: dict) -> int:
    """The point count of a PCD header: POINTS, which must equal WIDTH x HEIGHT (HEIGHT 1 when
    missing) where both are given, or WIDTH x HEIGHT without POINTS."""
    def count(key):
        if key not in meta:
            return None
        words = meta[key]
        return _count(path, words[0] if words else "", f"{key} {' '.join(words)}".strip())

    points, width = count("POINTS"), count("WIDTH")
    height = count("HEIGHT")
    height = 1 if height is None else height
    if points is None and width is None:
        raise CloudFormatError(f"{path}: PCD header gives no valid POINTS or WIDTH/HEIGHT")
    if width is None:
        return points
    if points is not None and width * height != points:
        # one of them is wrong and nothing tells which: reading either count could drop points
        raise CloudFormatError(f"{path}: PCD header is inconsistent: POINTS announces {points} points, "
                               f"WIDTH x HEIGHT = {width} x {height} = {width * height}")
    return width * height


def _pcd_decompress(path: Path, raw: bytes, dtype: np.dtype, npts: int, padding=()) -> np.ndarray:
    """PCL's ``DATA binary_compressed`` body: little-endian uint32 compressed and uncompressed sizes,
    then one LZF stream holding the fields one after another (all points' x, then all y, ...), each
    field ``npts x COUNT`` values; padding fields (named ``_``, listed in ``padding``) are not stored.
    Returns the points as the interleaved record array of ``binary``. LZF decoding is
    python-neo-lzf's C extension (a byte loop in Python would take seconds per scan)."""
    stored = [n for n in dtype.names if n not in padding]
    if len(raw) < 8:
        raise CloudFormatError(f"{path}: truncated: 'DATA binary_compressed' needs an 8-byte size "
                               f"header, the file has {len(raw)} bytes after DATA")
    csize, usize = (int(v) for v in np.frombuffer(raw[:8], dtype="<u4"))
    point = sum(dtype.fields[n][0].itemsize for n in stored)
    need = point * npts
    if usize != need:
        raise CloudFormatError(f"{path}: the compressed block unpacks to {usize} bytes, {npts} points "
                               f"of {point} bytes need {need}")
    if len(raw) - 8 < csize:
        raise CloudFormatError(f"{path}: truncated: the compressed block is {csize} bytes, the file "
                               f"has {len(raw) - 8}")
    if need == 0:
        return np.zeros(npts, dtype=dtype)
    try:
        import lzf
    except ImportError:
        raise CloudFormatError(f"{path}: reading PCD 'DATA binary_compressed' needs the LZF decoder: "
                               "pip install python-neo-lzf") from None
    try:
        data = lzf.decompress(raw[8:8 + csize], need)
    except ValueError as e:
        raise CloudFormatError(f"{path}: corrupt compressed PCD data ({e})") from None
    if data is None or len(data) != need:
        got = "more" if data is None else len(data)
        raise CloudFormatError(f"{path}: corrupt compressed PCD data: it unpacks to {got} bytes, "
                               f"the header says {need}")
    arr = np.zeros(npts, dtype=dtype)
    start = 0
    for name in stored:
        field = dtype.fields[name][0]                 # e.g. <f4 or ('<f4', (3,)) for COUNT 3
        size = field.itemsize * npts
        arr[name] = np.frombuffer(data, dtype=field.base, count=size // field.base.itemsize,
                                  offset=start).reshape((npts,) + field.shape)
        start += size
    return arr


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def write_cloud(path, points, binary: bool = True, field_names=None, durable: bool = True,
                bin_format: str = "kitti") -> Path:
    """Write an (N, >=3) array; the format follows the extension. ``binary`` selects binary or
    ascii for .ply/.pcd. ``.bin`` writes float32 x, y, z, intensity (0 when not given) records, or
    x, y, z records with ``bin_format="xyz"`` (the layout of the ground-truth cache). Extra columns
    go to .npy as they are and to .ply/.pcd as ``field_names[3:]`` (default ``intensity`` for the
    fourth, ``f4``, ``f5``... after it). Values are written as float32, or as float64 when the array
    is float64 (except ``.bin``, float32 by its format). Creates missing parent directories.

    The file is written under a temporary name in its folder and renamed over ``path`` when
    complete (:func:`lidar_completion.fileutil.atomic_write`): a write that fails (disk full, a file
    size limit, Ctrl-C) leaves the previous file as it was, never a truncated one that a resumed
    batch would take for done. ``durable`` also fsyncs it before the rename."""
    path = Path(path)
    ext = _suffix(path)
    if bin_format not in BIN_FORMATS:
        raise CloudFormatError(f"bin_format: expected one of {', '.join(BIN_FORMATS)}, got {bin_format!r}")
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] < 3 or pts.dtype.kind not in "fiu":
        raise CloudFormatError(f"{path}: can only write a numeric (N, 3+) array, got shape "
                               f"{pts.shape} dtype {pts.dtype}")
    # float32, as read_cloud returns; float64 stays float64 in .npy / .ply / .pcd (coordinates far
    # from the origin, e.g. a completion moved into a UTM map frame, where float32 steps by up to 1 m)
    pts = pts.astype(np.float64 if pts.dtype == np.float64 and ext != ".bin" else np.float32)
    names = list(field_names) if field_names else ["x", "y", "z"] + [
        "intensity" if i == 3 else f"f{i}" for i in range(3, pts.shape[1])]
    if len(names) != pts.shape[1]:
        raise CloudFormatError(f"{path}: {len(names)} field names for {pts.shape[1]} columns")

    def write(f):
        if ext == ".bin":
            width = 4 if bin_format == "kitti" else 3
            out = np.zeros((len(pts), width), dtype="<f4")
            out[:, :min(width, pts.shape[1])] = pts[:, :width]
            f.write(out.tobytes())
        elif ext == ".npy":
            np.save(f, pts)    # to a file object, so no ".npy" is appended to the temporary name
        elif ext == ".ply":
            _write_ply(f, pts, names, binary)
        else:
            _write_pcd(f, pts, names, binary)

    return atomic_write(path, write, durable=durable)


def _write_ply(f, pts: np.ndarray, names, binary: bool):
    fmt = "binary_little_endian" if binary else "ascii"
    kind, text_format = ("double", "%.17g") if pts.dtype == np.float64 else ("float", "%.9g")
    header = ["ply", f"format {fmt} 1.0", "comment written by lidar_completion",
              f"element vertex {len(pts)}"] + [f"property {kind} {n}" for n in names] + ["end_header"]
    f.write(("\n".join(header) + "\n").encode("ascii"))
    if binary:
        f.write(pts.astype(f"<f{pts.itemsize}").tobytes())
    else:
        np.savetxt(f, pts, fmt=text_format)


def _write_pcd(f, pts: np.ndarray, names, binary: bool):
    k = pts.shape[1]
    header = ["# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7",
              "FIELDS " + " ".join(names), "SIZE " + " ".join([str(pts.itemsize)] * k),
              "TYPE " + " ".join(["F"] * k),
              "COUNT " + " ".join(["1"] * k), f"WIDTH {len(pts)}", "HEIGHT 1",
              "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {len(pts)}", "DATA " + ("binary" if binary else "ascii")]
    f.write(("\n".join(header) + "\n").encode("ascii"))
    if binary:
        f.write(pts.astype(f"<f{pts.itemsize}").tobytes())
    else:
        np.savetxt(f, pts, fmt="%.17g" if pts.dtype == np.float64 else "%.9g")


# ------------------------------------------------------------------------------------------------
# renders
# ------------------------------------------------------------------------------------------------
def _subsample(points: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    if len(points) <= max_points:
        return points
    idx = np.random.default_rng(seed).choice(len(points), size=max_points, replace=False)
    return points[idx]


def _oblique(points: np.ndarray, azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Orthographic view from azimuth / elevation: screen (u, v) and depth for painter's order."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    u = -x * np.sin(az) + y * np.cos(az)
    d = x * np.cos(az) + y * np.sin(az)
    v = z * np.cos(el) - d * np.sin(el)
    depth = d * np.cos(el) + z * np.sin(el)
    return np.stack([u, v, depth], axis=1)


def _new_figure(ncols: int, nrows: int, size: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size * ncols, size * nrows), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _draw(ax, pts: np.ndarray, view: str, extent: float, zlim, point_size: float, cmap: str):
    ax.set_facecolor("black")
    if len(pts) == 0:
        ax.text(0.5, 0.5, "(empty)", color="white", ha="center", va="center", transform=ax.transAxes)
    if view == "bev":
        order = np.argsort(pts[:, 2]) if len(pts) else slice(None)
        p = pts[order]
        ax.scatter(p[:, 0], p[:, 1], c=p[:, 2], s=point_size, cmap=cmap, vmin=zlim[0], vmax=zlim[1],
                   linewidths=0, rasterized=True)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
        ax.set_xlabel("x [m]")
        ax.set_ylabel("y [m]")
    else:
        uvd = _oblique(pts, azimuth_deg=-135.0, elevation_deg=30.0)
        order = np.argsort(-uvd[:, 2]) if len(pts) else slice(None)   # far first
        ax.scatter(uvd[order, 0], uvd[order, 1], c=pts[order, 2], s=point_size, cmap=cmap,
                   vmin=zlim[0], vmax=zlim[1], linewidths=0, rasterized=True)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-0.6 * extent, 0.6 * extent)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])


def render_comparison_png(path, clouds: dict, extent: float = 30.0, max_points: int = 150_000,
                          point_size: float = 0.3, size: float = 6.0, dpi: int = 110,
                          cmap: str = "viridis", views=("bev", "oblique"), title: str | None = None) -> Path:
    """One PNG with a column per cloud (``{"input": scan, "completion": dense}``) and a row per view
    (bird's-eye and oblique), colour = height with a shared scale. Returns the path."""
    if not clouds:
        raise ValueError("nothing to render: `clouds` is empty")
    path = Path(path)
    prepared = {name: _subsample(as_xyz(c, name), max_points) for name, c in clouds.items()}
    allz = np.concatenate([p[:, 2] for p in prepared.values()]) if prepared else np.zeros(1)
    zlim = (float(np.percentile(allz, 1)), float(np.percentile(allz, 99))) if allz.size else (-2.0, 2.0)
    if zlim[1] <= zlim[0]:
        zlim = (zlim[0] - 1.0, zlim[0] + 1.0)
    heights = [1.0 if v == "bev" else 0.6 for v in views]
    fig = _new_figure(len(prepared), sum(heights), size, dpi)
    axes = fig.subplots(len(views), len(prepared), squeeze=False,
                        gridspec_kw={"height_ratios": heights})
    for j, (name, pts) in enumerate(prepared.items()):
        for i, view in enumerate(views):
            ax = axes[i][j]
            _draw(ax, pts, view, extent, zlim, point_size, cmap)
            label = "bird's-eye" if view == "bev" else "oblique"
            ax.set_title(f"{name} ({len(clouds[name]):,} points) - {label}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # through a temporary file like the clouds: an interrupted render leaves no partial PNG
    return atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:].lower() or "png"))


def render_bev_png(path, points, extent: float = 30.0, completion=None, **kwargs) -> Path:
    """Bird's-eye and oblique render of one cloud, or of input vs ``completion`` side by side."""
    clouds = {"cloud": points} if completion is None else {"input": points, "completion": completion}
    return render_comparison_png(path, clouds, extent=extent, **kwargs)


def as_xyz(points, name: str = "points") -> np.ndarray:
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise CloudFormatError(f"{name}: expected an (N, 3+) array to render, got shape {arr.shape}")
    xyz = arr[:, :3].astype(np.float32)
    return xyz[np.isfinite(xyz).all(axis=1)]
