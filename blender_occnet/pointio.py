"""Point-cloud and image file helpers shared by the operators and the batch command (stdlib and
numpy only). Supported point clouds: .ply (ascii, binary little/big endian), .xyz/.txt/.pts/.csv
(first three columns), .npy (N, >=3), .npz (array "points" or the first array), .obj ("v" lines)."""

import os

import numpy as np

POINT_EXTENSIONS = (".ply", ".xyz", ".txt", ".pts", ".csv", ".npy", ".npz", ".obj")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tga", ".tif", ".tiff", ".exr", ".webp")


class PointFileError(Exception):
    pass


def input_kind(path):
    ext = os.path.splitext(path)[1].lower()
    if ext in POINT_EXTENSIONS:
        return "points"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return None


def load_points(path):
    """(N, 3) float32 points from a file; raises PointFileError naming the problem."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise PointFileError(f"point-cloud file {path!r} does not exist")
    try:
        if ext == ".ply":
            pts = _load_ply(path)
        elif ext == ".npy":
            pts = np.load(path, allow_pickle=False)
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if not z.files:
                    raise PointFileError(f"{path}: the .npz file holds no arrays")
                pts = z["points"] if "points" in z.files else z[z.files[0]]
        elif ext == ".obj":
            rows = []
            with open(path, "r", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("v "):
                        rows.append(line.split()[1:4])
            pts = np.array(rows, dtype=np.float64) if rows else np.zeros((0, 3))
        elif ext in (".xyz", ".txt", ".pts", ".csv"):
            delim = "," if ext == ".csv" else None
            pts = np.loadtxt(path, delimiter=delim, ndmin=2, comments=("#", "//"))
            if ext == ".pts" and pts.shape[1] == 1:  # a count line was read as data
                raise PointFileError(f"{path}: expected at least 3 columns")
        else:
            raise PointFileError(f"{path}: unsupported point-cloud format {ext!r} "
                                 f"(supported: {', '.join(POINT_EXTENSIONS)})")
    except PointFileError:
        raise
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise PointFileError(f"{path}: cannot read the point cloud ({exc})") from exc
    pts = np.asarray(pts)
    if pts.ndim != 2 or pts.shape[1] < 3:
        raise PointFileError(f"{path}: expected an (N, 3) array of points, got shape {pts.shape}")
    if pts.dtype.kind not in "fiu":
        raise PointFileError(f"{path}: point coordinates must be numbers, got {pts.dtype}")
    pts = np.ascontiguousarray(pts[:, :3], dtype=np.float32)
    if len(pts) == 0:
        raise PointFileError(f"{path}: the file contains no points")
    if not np.isfinite(pts).all():
        raise PointFileError(f"{path}: the point cloud contains NaN or infinite coordinates")
    return pts


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def _load_ply(path):
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise PointFileError(f"{path}: not a PLY file (no 'ply' magic line)")
        fmt = None
        elements = []  # [name, count, [(prop, type) or ("list", ...)]]
        while True:
            line = f.readline()
            if not line:
                raise PointFileError(f"{path}: PLY header has no end_header")
            words = line.decode("ascii", "replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append([words[1], int(words[2]), []])
            elif words[0] == "property":
                if not elements:
                    raise PointFileError(f"{path}: PLY property before any element")
                if words[1] == "list":
                    elements[-1][2].append(("list", words[2], words[3], words[4]))
                else:
                    if words[1] not in _PLY_TYPES:
                        raise PointFileError(f"{path}: unknown PLY type {words[1]!r}")
                    elements[-1][2].append((words[2], words[1]))
            elif words[0] == "end_header":
                break
        if not elements or elements[0][0] != "vertex":
            raise PointFileError(f"{path}: the PLY file has no leading 'vertex' element")
        name, count, props = elements[0]
        names = [p[0] for p in props]
        if any(p[0] == "list" for p in props):
            raise PointFileError(f"{path}: list properties on PLY vertices are not supported")
        for axis in "xyz":
            if axis not in names:
                raise PointFileError(f"{path}: PLY vertices have no {axis!r} property")
        if fmt == "ascii":
            data = np.loadtxt(f, max_rows=count, ndmin=2)
            if data.shape[0] < count:
                raise PointFileError(f"{path}: PLY declares {count} vertices but holds {data.shape[0]}")
            cols = [names.index(a) for a in "xyz"]
            return data[:, cols]
        if fmt in ("binary_little_endian", "binary_big_endian"):
            order = "<" if fmt == "binary_little_endian" else ">"
            dt = np.dtype([(n, order + _PLY_TYPES[t]) for n, t in props])
            raw = f.read(dt.itemsize * count)
            if len(raw) < dt.itemsize * count:
                raise PointFileError(f"{path}: PLY file is truncated ({len(raw)} of "
                                     f"{dt.itemsize * count} vertex bytes)")
            v = np.frombuffer(raw, dtype=dt, count=count)
            return np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float64)
        raise PointFileError(f"{path}: unsupported PLY format {fmt!r}")


def bbox_center(points):
    points = np.asarray(points)
    return (points.min(axis=0) + points.max(axis=0)) * 0.5
