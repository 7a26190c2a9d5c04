"""Reading point-cloud files as users have them: one reader for the CLI, the server, the batch and
the add-on (which asks the backend process to read, see backend/server.py's read_points).

    cloud = load_point_cloud(path)   # PointCloud: points (N, 3) float64, colors (N, 3) float32
                                     # in [0, 1] or None, normals (N, 3) float32 or None

Formats: PLY (ascii, binary; colours, normals), LAS/LAZ (laspy, lazrs), E57 (pye57), PCD (ascii,
binary, binary_compressed; pypcd4), XYZ/TXT/PTS/CSV (colour and normal columns), NPY/NPZ, and the
vertices of OBJ/OFF meshes. The optional libraries come with the `scans` extra; a missing one is a
MissingPackageError naming the package. Parsing is vectorised (numpy's C parsers, structured
reads, the libraries' chunked readers): no Python work per point. Every failure is an InputError
naming the file and the problem; a damaged or hostile file never escapes as another exception.
"""

import importlib
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, MissingPackageError
from .preprocess import bounding_box

TEXT_POINT_SUFFIXES = (".xyz", ".txt", ".pts", ".csv")
SCAN_SUFFIXES = (".las", ".laz", ".e57", ".pcd")
POINT_SUFFIXES = (".ply", *SCAN_SUFFIXES, *TEXT_POINT_SUFFIXES, ".npy", ".npz", ".obj", ".off")

# Coordinates beyond this magnitude are refused: the mesh is extracted in a box padded around the
# cloud, and mapped back to the cloud's units its vertices must still be finite 32-bit floats
# (float32 ends at 3.4e38).
MAX_COORDINATE = 1e37
# Fewer points than this outline no surface.
MIN_POINTS = 3
# A compressed .npz may expand to at most this many bytes (about 90 million float64 points): a
# small file of compressed zeros must not fill the memory. Plain .npy files are bounded by their size.
MAX_NPZ_BYTES = 2 * 2**30
# Rows of a headerless text or array cloud looked at to tell colour columns from normal columns.
SAMPLE_ROWS = 2000
# Points per chunk when a library reads a file piece by piece (LAS/LAZ): bounds the temporaries.
CHUNK_POINTS = 1_000_000


@dataclass(frozen=True)
class PointCloud:
    points: np.ndarray                  # (N, 3) float64, the file's own coordinates
    colors: np.ndarray | None = None    # (N, 3) float32 in [0, 1]
    normals: np.ndarray | None = None   # (N, 3) float32

    def subset(self, keep: np.ndarray) -> "PointCloud":
        """The points, with their colours and normals, where keep (N,) bool holds."""
        return PointCloud(self.points[keep], None if self.colors is None else self.colors[keep],
                          None if self.normals is None else self.normals[keep])


@contextmanager
def quiet_decoding():
    """Silence warnings while a third-party parser reads a file. Their remarks on damaged files
    (Pillow's "Tag data larger than file", numpy deprecations inside trimesh, Pillow's
    decompression-bomb warning) would break the promise of one `error:` line; a real problem
    raises, and becomes an InputError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def require_file(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: is not a regular file")


def require_package(module: str, package: str, suffix: str):
    """Import an optional reader library, or say which package a file of this suffix needs."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingPackageError(f"reading {suffix} files", package) from exc


# --- validation ----------------------------------------------------------------------------------

def validate_points(points, source: str = "input") -> np.ndarray:
    """Any array-like -> (N, 3) float64 with finite values of a safe magnitude, or InputError
    naming the problem. Columns after the third (colours, normals) are dropped. float64 keeps
    survey coordinates (10^5..10^7 m from the origin) exact until they are normalised."""
    try:
        arr = np.asarray(points)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InputError(f"{source}: expected an (N, 3) array of points ({exc})") from exc
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise InputError(f"{source}: expected an (N, 3) array of points, got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise InputError(f"{source}: point coordinates must be real numbers, got {arr.dtype}")
    xyz = arr[:, :3]
    if len(xyz) == 0:
        raise InputError(f"{source}: the point cloud is empty")
    if not np.isfinite(xyz).all():
        bad = ~np.isfinite(xyz).all(axis=1)
        raise InputError(f"{source}: {int(bad.sum())} of {len(xyz)} points have NaN or infinite coordinates")
    lowest, highest = (corner.astype(np.float64) for corner in bounding_box(xyz))
    largest = max(abs(float(lowest.min())), abs(float(highest.max())))
    if largest > MAX_COORDINATE:
        raise InputError(f"{source}: coordinates reach {largest:.3g}, beyond the supported +-{MAX_COORDINATE:.0e} "
                         f"(a mesh around them would overflow 32-bit floats); scale the points down")
    xyz = np.ascontiguousarray(xyz, dtype=np.float64)
    if len(xyz) < MIN_POINTS:
        raise InputError(f"{source}: a point cloud needs at least {MIN_POINTS} points, got {len(xyz)}")
    if float((highest - lowest).max()) == 0.0:
        raise InputError(f"{source}: the points span no volume (all {len(xyz)} lie at one place)")
    return xyz


def validate_per_point(values, count: int, what: str, source: str) -> np.ndarray | None:
    """(N, 3) colours or normals matching count points -> float32, or InputError; None stays None."""
    if values is None:
        return None
    arr = np.asarray(values)
    if arr.ndim != 2 or arr.shape[1] < 3 or len(arr) != count or arr.dtype.kind not in "iuf":
        raise InputError(f"{source}: expected {what} as a ({count}, 3) array of numbers, got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr[:, :3], dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{source}: some {what} are NaN or infinite")
    return arr


def colour_unit(values: np.ndarray) -> float:
    """The value that means full intensity in a colour channel: 1 for fractions (0..1), 255 for
    8-bit whole numbers, 65535 for 16-bit ones (LAS stores 16 bits, but many writers put 8-bit
    values there, so the values decide, as PDAL and CloudCompare do)."""
    arr = np.asarray(values)
    if arr.size == 0:
        return 1.0
    largest = float(arr.max())
    integral = arr.dtype.kind in "iu" or bool(np.all(arr == np.round(arr)))
    if not integral and largest <= 1.0:
        return 1.0
    return 255.0 if largest <= 255.0 else 65535.0


def unit_colours(values, source: str = "input") -> np.ndarray:
    """Colours (N, 3) read from a file, in 0..1, 0..255 or 0..65535 (the values decide, see
    colour_unit) -> (N, 3) float32 in [0, 1]."""
    arr = validate_per_point(values, len(values), "colours", source)
    if arr.size and float(arr.min()) < 0.0:
        raise InputError(f"{source}: colours must not be negative (lowest {float(arr.min()):g})")
    arr /= np.float32(colour_unit(values))  # in place: validate_per_point made a float32 copy already
    return np.clip(arr, 0.0, 1.0, out=arr)


def colour_array(values, count: int, source: str = "input") -> np.ndarray | None:
    """Colours (N, 3) handed over as an array -> (N, 3) float32 in [0, 1]; the dtype decides:
    uint8 is 0..255, uint16 0..65535, floats must already lie in [0, 1] (the readers' output)."""
    if values is None:
        return None
    kind = np.asarray(values).dtype
    arr = validate_per_point(values, count, "colours", source)
    unit = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(kind, 1.0)
    if kind.kind == "f" and arr.size and (float(arr.min()) < 0.0 or float(arr.max()) > 1.0):
        raise InputError(f"{source}: colours as floats must lie in [0, 1] (found {float(arr.min()):g}.."
                         f"{float(arr.max()):g}); pass 0..255 values as uint8")
    return arr / np.float32(unit) if unit != 1.0 else arr


def checked_cloud(points, colors=None, normals=None, source: str = "input") -> PointCloud:
    """A PointCloud from raw arrays, validated: points as validate_points, colours as colour_array,
    normals (N, 3) float32."""
    xyz = validate_points(points, source)
    return PointCloud(xyz, colour_array(colors, len(xyz), source),
                      validate_per_point(normals, len(xyz), "normals", source))


def file_cloud(points, colors=None, normals=None, source: str = "input") -> PointCloud:
    """checked_cloud for arrays read from a file, whose colour scale the values tell (unit_colours)."""
    return checked_cloud(points, None if colors is None else unit_colours(colors, source), normals, source)


# --- column layout of text and array clouds ----------------------------------------------------------

COLOUR_NAMES = ({"r", "red", "diffuse_red"}, {"g", "green", "diffuse_green"}, {"b", "blue", "diffuse_blue"})
NORMAL_NAMES = ({"nx", "normal_x", "normalx"}, {"ny", "normal_y", "normaly"}, {"nz", "normal_z", "normalz"})
AXIS_NAMES = ({"x", "//x"}, {"y"}, {"z"})


def named_columns(names: list[str], groups) -> tuple[int, int, int] | None:
    """Indices of the three columns whose (lower-case) names are in groups' three sets, or None."""
    found = [next((i for i, n in enumerate(names) if n in group), None) for group in groups]
    return None if None in found else tuple(found)


def columns_from_names(names: list[str]) -> dict:
    """{"points": (i, j, k), "colors": ... or None, "normals": ... or None} from a header line."""
    lower = [n.strip().strip('"').lower() for n in names]
    return {"points": named_columns(lower, AXIS_NAMES) or (0, 1, 2),
            "colors": named_columns(lower, COLOUR_NAMES), "normals": named_columns(lower, NORMAL_NAMES)}


def looks_like_normals(block: np.ndarray) -> bool:
    """(M, 3) values that are unit vectors in every row (and not all non-negative whole numbers,
    which are colours such as (255, 0, 0) scaled or (1, 0, 0))."""
    lengths = np.linalg.norm(block, axis=1)
    return bool(np.all(np.abs(lengths - 1.0) < 1e-2)) and bool((block < 0).any() or (block != np.round(block)).any())


def looks_like_colours(block: np.ndarray) -> bool:
    """(M, 3) values in 0..255 that are whole numbers, or fractions within 0..1."""
    if block.size == 0 or float(block.min()) < 0.0:
        return False
    integral = bool(np.all(block == np.round(block)))
    return (integral and float(block.max()) <= 65535.0) or float(block.max()) <= 1.0


def columns_from_values(sample: np.ndarray) -> dict:
    """Guess the columns of a headerless (M, C) sample: x y z first; then normals where three
    columns hold unit vectors, colours where three hold 0..255 whole numbers or 0..1 fractions,
    trying the layouts tools write (x y z r g b, x y z nx ny nz, x y z r g b nx ny nz,
    x y z i r g b as Leica's PTS, x y z nx ny nz r g b). A header line removes the guess."""
    width = sample.shape[1]
    normals = next((s for s in range(3, width - 2) if looks_like_normals(sample[:, s:s + 3])), None)
    taken = set() if normals is None else set(range(normals, normals + 3))
    preferred = (4, 3, 6) if width in (7, 10) else (3, 6, 4)  # 7 or 10 columns: an intensity first
    colour_starts = [s for s in preferred if s + 3 <= width and not taken & {s, s + 1, s + 2}]
    colours = next((s for s in colour_starts if looks_like_colours(sample[:, s:s + 3])), None)
    return {"points": (0, 1, 2), "colors": triple(colours), "normals": triple(normals)}


def triple(start: int | None) -> tuple[int, int, int] | None:
    return None if start is None else (start, start + 1, start + 2)


def wanted_columns(layout: dict) -> tuple[list[int], dict]:
    """The file's columns a layout uses, in order, and the layout re-indexed into a table that
    holds just those columns."""
    wanted = [c for key in ("points", "colors", "normals") if layout[key] for c in layout[key]]
    position = {c: i for i, c in enumerate(wanted)}
    return wanted, {key: columns and tuple(position[c] for c in columns) for key, columns in layout.items()}


def split_columns(table: np.ndarray, layout: dict, source: str) -> PointCloud:
    """A PointCloud from an (N, C) table and a layout {"points"|"colors"|"normals": column
    indices or None}."""
    picked = {key: None if columns is None else table[:, list(columns)] for key, columns in layout.items()}
    return file_cloud(picked["points"], picked["colors"], picked["normals"], source)


# --- text ------------------------------------------------------------------------------------------

def is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def text_layout(path: Path) -> tuple[int, str | None, list[str] | None]:
    """(lines to skip, delimiter, column names or None) of a text point cloud, from its first line
    that is not blank or a # comment. That line is skipped when it is a column header (no numbers:
    "x,y,z,r,g,b", CloudCompare's "//X Y Z R G B") or a .pts point count (one whole number).
    Commas separate columns if that line has any."""
    with open(path, encoding="utf-8-sig") as f:
        for index, line in enumerate(f):
            content = line.strip()
            if not content or content.startswith("#"):
                continue
            delimiter = "," if "," in content else None
            tokens = [t.strip() for t in content.split(delimiter)]
            if not any(is_number(t) for t in tokens):
                return index + 1, delimiter, tokens
            if len(tokens) == 1 and tokens[0].isdigit():
                return index + 1, delimiter, None
            return index, delimiter, None
    raise InputError(f"{path}: expected lines of at least three numbers (x y z), found none")


def first_data_row(path: Path, skip: int) -> str:
    """The first line after skip lines that is not blank or a # comment."""
    with open(path, encoding="utf-8-sig") as f:
        for index, line in enumerate(f):
            if index >= skip and line.strip() and not line.lstrip().startswith("#"):
                return line.strip()
    return ""


def parse_text(path: Path, skip: int, delimiter: str | None, columns, max_rows=None) -> np.ndarray:
    """(N, len(columns)) float64 via numpy's streaming C parser (no per-line Python work)."""
    return np.loadtxt(path, dtype=np.float64, comments="#", delimiter=delimiter, skiprows=skip, usecols=columns,
                      max_rows=max_rows, ndmin=2, encoding="utf-8-sig")


def read_text(path: Path) -> PointCloud:
    """Lines "x y z [r g b] [nx ny nz] ...", separated by spaces, tabs or commas; colour and normal
    columns by the header's names, else guessed from the first rows (columns_from_values)."""
    skip, delimiter, names = text_layout(path)
    if names is not None:
        layout = columns_from_names(names)
    else:  # as many columns as the first row has: rows with more (a ragged file) are not guessed from
        width = len(first_data_row(path, skip).split(delimiter))
        layout = columns_from_values(parse_text(path, skip, delimiter, range(width), SAMPLE_ROWS))
    wanted, table_layout = wanted_columns(layout)
    table = parse_text(path, skip, delimiter, wanted)
    if len(table) == 0:
        raise InputError(f"{path}: expected lines of at least three numbers (x y z), found none")
    return split_columns(table, table_layout, str(path))


# --- numpy -----------------------------------------------------------------------------------------

def read_npy(path: Path) -> PointCloud:
    """An (N, >=3) array; extra columns as in a headerless text cloud."""
    table = np.load(path, allow_pickle=False, mmap_mode="r")
    if table.ndim != 2 or table.shape[1] < 3:
        raise InputError(f"{path}: expected an (N, 3) array of points, got shape {table.shape}")
    layout = columns_from_values(np.asarray(table[:SAMPLE_ROWS], dtype=np.float64)) if table.dtype.kind in "iuf" \
        else {"points": (0, 1, 2), "colors": None, "normals": None}
    return split_columns(table, layout, str(path))


def read_npz(path: Path) -> PointCloud:
    """Arrays "points" (else the first), optional "colors" (or "colours") and "normals"."""
    with np.load(path, allow_pickle=False) as data:
        if not data.files:
            raise InputError(f"{path}: the .npz file holds no arrays")
        expanded = sum(member.file_size for member in data.zip.infolist())
        if expanded > MAX_NPZ_BYTES:
            raise InputError(f"{path}: the .npz file expands to {expanded / 2**30:.1f} GiB, more than the "
                             f"{MAX_NPZ_BYTES / 2**30:.0f} GiB this program reads")
        points = data["points" if "points" in data.files else data.files[0]]
        colour_key = next((k for k in ("colors", "colours") if k in data.files), None)
        colors = data[colour_key] if colour_key else None
        normals = data["normals"] if "normals" in data.files else None
    return file_cloud(points, colors, normals, str(path))


# --- PLY -------------------------------------------------------------------------------------------

PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


def ply_header(f, path: Path) -> tuple[str, int, list[tuple[str, str]], int]:
    """(format, vertex count, [(property, ply type)], header lines) of a PLY file opened in binary
    mode, left at the start of its data. The vertex element must come first, without lists."""
    if f.readline().strip() != b"ply":
        raise InputError(f"{path}: not a PLY file (no 'ply' magic line)")
    fmt, elements, lines = None, [], 1
    while True:
        line = f.readline()
        lines += 1
        if not line or lines > 10_000:
            raise InputError(f"{path}: the PLY header has no end_header")
        words = line.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) >= 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) >= 3:
            if words[1] == "list" or words[1] not in PLY_TYPES:
                elements[-1][2].append((words[-1], words[1]))
            else:
                elements[-1][2].append((words[2], words[1]))
        else:
            raise InputError(f"{path}: unreadable PLY header line {line[:60]!r}")
    if fmt not in PLY_FORMATS:
        raise InputError(f"{path}: unsupported PLY format {fmt!r}")
    if not elements or elements[0][0] != "vertex":
        raise InputError(f"{path}: the PLY file has no leading 'vertex' element")
    _, count, properties = elements[0]
    bad = [f"{name} ({kind})" for name, kind in properties if kind not in PLY_TYPES]
    if bad:
        raise InputError(f"{path}: PLY vertex properties of unsupported types: {', '.join(bad)}")
    return fmt, count, properties, lines


def read_ply(path: Path) -> PointCloud:
    """PLY vertices (ascii or binary), with red/green/blue and nx/ny/nz when present."""
    with open(path, "rb") as f:
        fmt, count, properties, header_lines = ply_header(f, path)
        names = [name.lower() for name, _ in properties]
        layout = {"points": named_columns(names, ({"x"}, {"y"}, {"z"})), "colors": named_columns(names, COLOUR_NAMES),
                  "normals": named_columns(names, NORMAL_NAMES)}
        if layout["points"] is None:
            raise InputError(f"{path}: PLY vertices need x, y and z properties (have {', '.join(names)})")
        order = PLY_FORMATS[fmt]
        if order is None:
            wanted, table_layout = wanted_columns(layout)
            table = np.loadtxt(path, dtype=np.float64, skiprows=header_lines, max_rows=count, usecols=wanted,
                               ndmin=2, encoding="ascii")
            found = len(table)
            groups = {key: None if c is None else table[:, list(c)] for key, c in table_layout.items()}
        else:  # each group straight from the records, in the file's own types
            record = np.dtype([(f"p{i}", order + PLY_TYPES[kind]) for i, (_, kind) in enumerate(properties)])
            records = np.fromfile(f, dtype=record, count=count)
            found = len(records)
            groups = {key: None if c is None else np.column_stack([records[f"p{i}"] for i in c])
                      for key, c in layout.items()}
    if found < count:
        raise InputError(f"{path}: the PLY file declares {count} vertices but holds {found}")
    return file_cloud(groups["points"], groups["colors"], groups["normals"], str(path))


# --- LAS / LAZ, E57, PCD ------------------------------------------------------------------------------

# LAZ writers use chunks of 50,000 points; a chunk holds at most this many (lazrs allocates a chunk).
MAX_LAZ_CHUNK_POINTS = 10_000_000
# LAZ compresses point records about 5-15 times; a header that claims more than this many times the
# file's bytes of records is a lie that would cost gigabytes of preallocated arrays.
MAX_LAZ_RATIO = 100
LAS_VLR_HEADER_BYTES = 54


def check_las_header(path: Path) -> None:
    """Refuse a LAS/LAZ file whose public header does not fit the file (its VLR count, point-data
    offset), before laspy reads it: laspy would create a VLR object per claimed VLR (billions, for
    one flipped byte)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(104)
    if len(head) < 104 or head[:4] != b"LASF":
        raise InputError(f"{path}: not a LAS file (no LASF signature)")
    header_size, offset, vlrs = struct.unpack_from("<HII", head, 94)
    if not header_size <= offset <= size or vlrs * LAS_VLR_HEADER_BYTES > offset - header_size:
        raise InputError(f"{path}: damaged LAS header ({vlrs} VLRs and point data at byte {offset} "
                         f"do not fit a {header_size}-byte header in a {size}-byte file)")


LASZIP_VLR = (b"laszip encoded", 22204)
VARIABLE_CHUNKS = 0xFFFFFFFF


def check_laz_tables(path: Path) -> None:
    """Refuse a LAZ file whose chunk size or chunk table cannot be right, before lazrs reads them:
    lazrs allocates what they claim and aborts the whole process when that fails (a flipped byte in
    the chunk count asked for 48 GB)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(104)
        header_size, offset, vlrs = struct.unpack_from("<HII", head, 94)
        f.seek(header_size)
        records = f.read(offset - header_size)  # the VLRs: check_las_header saw that they fit
        f.seek(offset)
        table = struct.unpack("<q", f.read(8).ljust(8, b"\xff"))[0]
        if table == -1:  # written at the end by a writer that could not seek back
            f.seek(max(size - 8, 0))
            table = struct.unpack("<q", f.read(8).ljust(8, b"\0"))[0]
        if not offset + 8 <= table <= size - 8:
            raise InputError(f"{path}: damaged LAZ file (its chunk table at byte {table} lies outside the points)")
        f.seek(table + 4)
        chunks = struct.unpack("<I", f.read(4).ljust(4, b"\0"))[0]
    if chunks > size:  # every chunk takes at least a byte
        raise InputError(f"{path}: damaged LAZ file ({chunks} chunks in {size} bytes)")
    at = 0
    for _ in range(vlrs):
        if at + 54 > len(records):
            break
        user, record, length = struct.unpack_from("<2x16sHH", records, at)
        if (user.rstrip(b"\0"), record) == LASZIP_VLR and length >= 16 and at + 54 + 16 <= len(records):
            chunk_size = struct.unpack_from("<I", records, at + 54 + 12)[0]
            if chunk_size != VARIABLE_CHUNKS and chunk_size > MAX_LAZ_CHUNK_POINTS:
                raise InputError(f"{path}: damaged LAZ header (chunks of {chunk_size} points)")
        at += 54 + length


def check_las_count(path: Path, header) -> int:
    """The header's point count, refused when the file cannot hold that many records."""
    count, record = int(header.point_count), int(header.point_format.size)
    room = path.stat().st_size - int(header.offset_to_point_data)
    ratio = MAX_LAZ_RATIO if header.are_points_compressed else 1
    if count * record > ratio * max(room, 0):
        raise InputError(f"{path}: the LAS header declares {count} points, more than its "
                         f"{room} bytes of point data can hold")
    return count


def read_las(path: Path) -> PointCloud:
    """LAS or LAZ (laspy; LAZ through its lazrs backend), read in chunks into preallocated arrays,
    scaled and offset to real coordinates; colours where the point format has them."""
    laspy = require_package("laspy", "laspy[lazrs]", path.suffix.lower())
    check_las_header(path)
    if path.suffix.lower() == ".laz":
        check_laz_tables(path)
    try:
        with laspy.open(path) as reader:
            count = check_las_count(path, reader.header)
            has_colour = "red" in reader.header.point_format.dimension_names
            points = np.empty((count, 3))
            colors = np.empty((count, 3), np.uint16) if has_colour else None
            start = 0
            for chunk in reader.chunk_iterator(CHUNK_POINTS):
                stop = start + len(chunk)
                points[start:stop] = np.column_stack([chunk.x, chunk.y, chunk.z])
                if has_colour:
                    colors[start:stop] = np.column_stack([chunk.red, chunk.green, chunk.blue])
                start = stop
    except laspy.errors.LaspyException as exc:
        if "lazbackend" in str(exc).lower():  # laspy without lazrs (or laszip) cannot decompress
            raise MissingPackageError("reading .laz files", "laspy[lazrs]") from exc
        raise InputError(f"{path}: cannot read the LAS file ({exc})") from exc
    if start < count:
        raise InputError(f"{path}: the LAS header declares {count} points but the file holds {start}")
    return file_cloud(points, colors, None, str(path))


# E57 packs coordinates into as few bits as their range needs; 8 points per byte is far beyond any
# real scan, and a claim beyond it would cost gigabytes of buffers.
MAX_E57_POINTS_PER_BYTE = 8


def read_e57(path: Path) -> PointCloud:
    """Every scan of an E57 file (pye57), each placed by its pose; colours when every scan has them.
    Points marked invalid by the scanner are left out."""
    pye57 = require_package("pye57", "pye57", ".e57")
    e57 = pye57.E57(str(path))
    try:
        scans = []
        declared = sum(e57.get_header(index).point_count for index in range(e57.scan_count))
        if declared > MAX_E57_POINTS_PER_BYTE * path.stat().st_size:
            raise InputError(f"{path}: damaged E57 file: {declared} points declared in {path.stat().st_size} bytes")
        for index in range(e57.scan_count):
            fields = set(e57.get_header(index).point_fields)
            if "cartesianX" not in fields:
                raise InputError(f"{path}: scan {index} has no cartesian coordinates (spherical-only scans "
                                 f"are not supported)")
            data = e57.read_scan(index, colors="colorRed" in fields, transform=True, ignore_missing_fields=True)
            scans.append(data)
    finally:
        e57.close()
    if not scans:
        raise InputError(f"{path}: the E57 file holds no scans")
    points = np.concatenate([np.column_stack([s["cartesianX"], s["cartesianY"], s["cartesianZ"]]) for s in scans])
    with_colour = all("colorRed" in s for s in scans)
    colors = np.concatenate([np.column_stack([s["colorRed"], s["colorGreen"], s["colorBlue"]]) for s in scans]) \
        if with_colour else None
    return file_cloud(points, colors, None, str(path))


# LZF expands at most about 90 times (a 3-byte token copies at most 264 bytes): a binary_compressed
# PCD that claims more is a lie that would cost gigabytes.
MAX_LZF_RATIO = 100


def check_pcd_sizes(path: Path, pypcd4) -> None:
    """Refuse a binary_compressed PCD whose declared sizes its bytes cannot hold, before pypcd4
    allocates the declared uncompressed size and the declared points."""
    with open(path, "rb") as f:
        lines = []
        for raw in f:  # the header as pypcd4 reads it: at most 10 lines, up to DATA
            line = raw.decode("utf-8", "replace").strip()
            if line and not line.startswith("#"):
                lines.append(line)
                if line.startswith("DATA") or len(lines) >= 10:
                    break
        metadata = pypcd4.MetaData.parse_header(lines)
        if metadata.data != pypcd4.Encoding.BINARY_COMPRESSED:
            return  # ascii and binary are read as far as the file goes
        sizes = f.read(8)
    compressed, uncompressed = struct.unpack("<II", sizes) if len(sizes) == 8 else (0, 0)
    if uncompressed > MAX_LZF_RATIO * compressed or metadata.points * metadata.build_dtype().itemsize != uncompressed:
        raise InputError(f"{path}: damaged PCD: {metadata.points} points declared, {uncompressed} bytes after "
                         f"decompressing {compressed}")


def read_pcd(path: Path) -> PointCloud:
    """PCD (ascii, binary, binary_compressed; pypcd4) with rgb/rgba and normal_x.. fields. Organised
    clouds (depth cameras) mark missing points with NaN: those points are left out."""
    pypcd4 = require_package("pypcd4", "pypcd4", ".pcd")
    check_pcd_sizes(path, pypcd4)
    cloud = pypcd4.PointCloud.from_path(path)
    fields = list(cloud.fields)
    if not {"x", "y", "z"} <= set(fields):
        raise InputError(f"{path}: PCD points need x, y and z fields (have {', '.join(fields)})")
    points = cloud.numpy(("x", "y", "z")).astype(np.float64)
    colour_field = next((f for f in ("rgb", "rgba") if f in fields), None)
    colors = pypcd4.PointCloud.decode_rgb(cloud.numpy((colour_field,)).ravel()) if colour_field else None
    normal_fields = ("normal_x", "normal_y", "normal_z")
    normals = cloud.numpy(normal_fields) if set(normal_fields) <= set(fields) else None
    present = np.isfinite(points).all(axis=1)
    if not present.all():
        points = points[present]
        colors = None if colors is None else colors[present]
        normals = None if normals is None else normals[present]
    return file_cloud(points, colors, normals, str(path))


def read_mesh_vertices(path: Path) -> PointCloud:
    """The vertices of an OBJ or OFF mesh (or of every mesh in a scene)."""
    import trimesh

    loaded = trimesh.load(path, process=False)
    if hasattr(loaded, "geometry"):  # a scene: all its geometry's vertices
        parts = [g.vertices for g in loaded.geometry.values() if hasattr(g, "vertices")]
        vertices = np.concatenate(parts) if parts else np.zeros((0, 3))
    else:
        vertices = getattr(loaded, "vertices", None)
    if vertices is None:
        raise InputError(f"{path}: holds no vertices")
    return file_cloud(vertices, None, None, str(path))


READERS = {
    **{suffix: read_text for suffix in TEXT_POINT_SUFFIXES},
    ".ply": read_ply, ".las": read_las, ".laz": read_las, ".e57": read_e57, ".pcd": read_pcd,
    ".npy": read_npy, ".npz": read_npz, ".obj": read_mesh_vertices, ".off": read_mesh_vertices,
}


def load_point_cloud(path) -> PointCloud:
    """The PointCloud in a file of any of POINT_SUFFIXES, validated (see PointCloud)."""
    path = Path(path)
    require_file(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(f"{path}: unknown point-cloud format {path.suffix or '(no extension)'!r}; "
                         f"use one of {' '.join(POINT_SUFFIXES)}")
    try:
        with quiet_decoding():
            return reader(path)
    except (InputError, MissingPackageError):
        raise
    except MemoryError:
        raise
    except Exception as exc:  # parsers of damaged files raise all kinds (zipfile, struct, laspy's, pye57's)
        raise InputError(f"{path}: cannot read points ({type(exc).__name__}: {exc})") from exc
    except BaseException as exc:
        # A Rust parser (lazrs) that panics on a damaged file raises pyo3's PanicException, a
        # BaseException so that ordinary handlers leave it alone; here it only means a bad file.
        if type(exc).__name__ != "PanicException":
            raise
        raise InputError(f"{path}: cannot read points (the decoder failed: {exc})") from exc
