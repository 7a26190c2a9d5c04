"""Reading and validating inputs: point clouds and images, from files or arrays.

Every failure is an InputError naming the file and the problem; a damaged or hostile file never
escapes as another exception, and memory stays bounded by the limits below.
"""

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import InputError

TEXT_POINT_SUFFIXES = (".xyz", ".txt", ".pts", ".csv")
POINT_SUFFIXES = (".ply", ".obj", ".off", *TEXT_POINT_SUFFIXES, ".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Coordinates beyond this magnitude are refused: the mesh is extracted in a box padded around the
# cloud, and mapped back to the cloud's units its vertices must still be finite 32-bit floats
# (float32 ends at 3.4e38).
MAX_COORDINATE = 1e37
# A compressed .npz may expand to at most this many bytes (about 90 million float64 points): a
# small file of compressed zeros must not fill the memory. Plain .npy files are bounded by their size.
MAX_NPZ_BYTES = 2 * 2**30
# Images are reduced on reading to at most this many pixels per side. The image model looks at
# 128-224 pixels, so nothing is lost, and memory stays bounded whatever the file.
MAX_IMAGE_SIDE = 2048
# The most pixels decoded at full resolution: Pillow's own decompression-bomb threshold, about
# 89.5 million pixels (360 MB as RGBA). JPEGs are decoded at 1/2, 1/4 or 1/8 scale first, so far
# larger photos still load; Pillow refuses any file declaring more than twice this many pixels.
MAX_DECODED_PIXELS = 89_478_485
# Pillow's greyscale modes of more than 8 bits and the value that means white in each ("I", 32-bit
# integers, is judged by its values: see grey_full_scale).
GREY_FULL_SCALE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "F": 1.0}
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


@contextmanager
def quiet_decoding():
    """Silence warnings while a third-party parser reads a file. Their remarks on damaged files
    (Pillow's "Tag data larger than file", numpy deprecations inside trimesh, Pillow's
    decompression-bomb warning, which MAX_DECODED_PIXELS replaces) would break the promise of one
    `error:` line; a real problem raises, and becomes an InputError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def input_kind(path) -> str:
    """'points' or 'image' from a file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix in POINT_SUFFIXES:
        return "points"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    raise InputError(f"{path}: unknown input format {suffix or '(no extension)'!r}; point clouds: "
                     f"{' '.join(POINT_SUFFIXES)}; images: {' '.join(IMAGE_SUFFIXES)}")


def require_file(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: is not a regular file")


def validate_points(points, source: str = "input") -> np.ndarray:
    """Any array-like -> (N, 3) float32 with finite values of a safe magnitude, or InputError
    naming the problem. Columns after the third (colours, normals) are dropped."""
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
    bad = ~np.isfinite(xyz).all(axis=1)
    if bad.any():
        raise InputError(f"{source}: {int(bad.sum())} of {len(xyz)} points have NaN or infinite coordinates")
    largest = max(abs(float(xyz.min())), abs(float(xyz.max())))
    if largest > MAX_COORDINATE:
        raise InputError(f"{source}: coordinates reach {largest:.3g}, beyond the supported +-{MAX_COORDINATE:.0e} "
                         f"(a mesh around them would overflow 32-bit floats); scale the points down")
    xyz = xyz.astype(np.float32)
    if len(xyz) < 3 or float(np.ptp(xyz, axis=0).max()) == 0.0:
        raise InputError(f"{source}: the points span no volume ({len(xyz)} points, all at one place)")
    return xyz


def is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def text_layout(path: Path) -> tuple[int, str | None]:
    """(lines to skip, delimiter) of a text point cloud, from its first line that is not blank
    or a # comment. That line is skipped when it is a column header (no numbers: "x,y,z") or
    a .pts point count (a single whole number). Commas separate columns if that line has any."""
    with open(path, encoding="utf-8-sig") as f:
        for index, line in enumerate(f):
            content = line.strip()
            if not content or content.startswith("#"):
                continue
            delimiter = "," if "," in content else None
            tokens = [t.strip() for t in content.split(delimiter)]
            is_header = not any(is_number(t) for t in tokens)
            is_count = len(tokens) == 1 and tokens[0].isdigit()
            return (index + 1 if is_header or is_count else index), delimiter
    raise InputError(f"{path}: expected lines of at least three numbers (x y z), found none")


def load_text_points(path: Path) -> np.ndarray:
    """(N, 3) float64 from lines "x y z [more columns]", separated by spaces, tabs or commas.
    numpy's C parser streams the file: no per-line Python work, memory about the result's size."""
    skip, delimiter = text_layout(path)
    arr = np.loadtxt(path, dtype=np.float64, comments="#", delimiter=delimiter, skiprows=skip,
                     usecols=(0, 1, 2), ndmin=2, encoding="utf-8-sig")
    if len(arr) == 0:
        raise InputError(f"{path}: expected lines of at least three numbers (x y z), found none")
    return arr


def load_array_points(path: Path) -> np.ndarray:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        return data
    with data:
        if not data.files:
            raise InputError(f"{path}: the .npz file holds no arrays")
        expanded = sum(member.file_size for member in data.zip.infolist())
        if expanded > MAX_NPZ_BYTES:
            raise InputError(f"{path}: the .npz file expands to {expanded / 2**30:.1f} GiB, more than the "
                             f"{MAX_NPZ_BYTES / 2**30:.0f} GiB this program reads")
        return data["points" if "points" in data.files else data.files[0]]


def load_mesh_vertices(path: Path) -> np.ndarray:
    import trimesh

    loaded = trimesh.load(path, process=False)
    if hasattr(loaded, "geometry"):  # a scene: all its geometry's vertices
        parts = [g.vertices for g in loaded.geometry.values() if hasattr(g, "vertices")]
        return np.concatenate(parts) if parts else np.zeros((0, 3))
    vertices = getattr(loaded, "vertices", None)
    if vertices is None:
        raise InputError(f"{path}: holds no vertices")
    return vertices


POINT_READERS = {
    **{suffix: load_text_points for suffix in TEXT_POINT_SUFFIXES},
    ".npy": load_array_points, ".npz": load_array_points,
    ".ply": load_mesh_vertices, ".obj": load_mesh_vertices, ".off": load_mesh_vertices,
}


def load_points(path) -> np.ndarray:
    """(N, 3) float32 points from .ply, .obj/.off (vertices), .xyz/.txt/.pts/.csv, .npy/.npz."""
    path = Path(path)
    require_file(path)
    reader = POINT_READERS.get(path.suffix.lower())
    if reader is None:
        input_kind(path)  # raises the unknown-format error for anything but an image
        raise InputError(f"{path}: is an image, not a point cloud")
    try:
        with quiet_decoding():
            arr = reader(path)
    except InputError:
        raise
    except Exception as exc:  # parsers of damaged files raise all kinds (zipfile, struct, trimesh's own)
        raise InputError(f"{path}: cannot read points ({type(exc).__name__}: {exc})") from exc
    return validate_points(arr, str(path))


def validate_image(pixels, source: str = "input") -> np.ndarray:
    """(H, W), (H, W, 3) or (H, W, 4), uint8 or float in [0, 1] -> (H, W, 4) float32 RGBA, row 0 = top.
    Images without alpha get an opaque alpha."""
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 8:
        raise InputError(f"{source}: expected an image of shape (H, W, 3|4) with H, W >= 8, got {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    else:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise InputError(f"{source}: the image has NaN or infinite pixels")
        arr = np.clip(arr, 0.0, 1.0)
    if arr.shape[2] == 3:
        arr = np.concatenate([arr, np.ones_like(arr[..., :1])], axis=2)
    if arr[..., 3].max() <= 0.0:
        raise InputError(f"{source}: the image is fully transparent, there is no object to reconstruct")
    return arr


def grey_full_scale(img) -> float:
    """The value meaning white in a high-depth greyscale image. Pillow reads 16-bit PNGs as "I"
    or "I;16" depending on its version, and true 32-bit integers only come from rare TIFFs."""
    if img.mode != "I":
        return GREY_FULL_SCALE[img.mode]
    return 65535.0 if img.getextrema()[1] <= 65535 else float(np.iinfo(np.int32).max)


def to_standard_mode(img):
    """RGB or RGBA (8 bits per channel), or "F" (greyscale float in [0, 1]) for greyscale of more
    than 8 bits, which an 8-bit conversion would clip to almost white."""
    from PIL import Image

    if img.mode in GREY_FULL_SCALE or img.mode == "I":
        grey = np.asarray(img.convert("F"), dtype=np.float32) / grey_full_scale(img)
        return Image.fromarray(grey)
    has_alpha = img.mode in ALPHA_MODES or "transparency" in img.info
    return img.convert("RGBA" if has_alpha else "RGB")


def decode_bounded(img, path: Path) -> np.ndarray:
    """Decode an opened image upright, reduced to MAX_IMAGE_SIDE: (H, W) float32 or (H, W, 3|4) uint8."""
    from PIL import ImageOps

    if img.format == "JPEG":  # let libjpeg decode at a reduced scale: memory ~ the reduced size
        img.draft(None, (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    width, height = img.size
    if width * height > MAX_DECODED_PIXELS:
        raise InputError(f"{path}: {width}x{height} pixels is more than the {MAX_DECODED_PIXELS / 1e6:.0f} megapixels "
                         f"this program decodes (JPEGs excepted); scale the image down first")
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    img = to_standard_mode(img)
    img.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    return np.asarray(img)


def load_image(path) -> np.ndarray:
    """(H, W, 4) float32 RGBA in [0, 1] from an image file, upright (EXIF orientation applied)
    and at most MAX_IMAGE_SIDE pixels per side; the alpha channel, if any, is the mask."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    require_file(path)
    try:
        with quiet_decoding(), Image.open(path) as img:
            arr = decode_bounded(img, path)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: cannot read the image: it is not a PNG, JPEG, BMP, TIFF or WebP file, "
                         f"or a damaged one") from exc
    except Exception as exc:  # Pillow's decoders raise many types on damaged files (OSError, SyntaxError, ...)
        raise InputError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from exc
    return validate_image(arr, str(path))


def load_mask(path) -> np.ndarray:
    """(H, W) float32 in [0, 1] from a mask picture: its alpha channel where it has transparency,
    else its brightness (white = object). Loaded like load_image, so it matches the picture's size."""
    rgba = load_image(path)
    if (rgba[..., 3] < 0.99).any():
        return rgba[..., 3]
    return rgba[..., :3].mean(axis=-1)


# EXIF: the Exif sub-IFD, and in it the 35 mm equivalent focal length in millimetres.
EXIF_IFD, FOCAL_LENGTH_IN_35MM = 0x8769, 0xA405


def exif_focal_35mm(path) -> float | None:
    """The 35 mm equivalent focal length a camera wrote into a photo's EXIF, if any (else None)."""
    from PIL import Image

    try:
        with quiet_decoding(), Image.open(path) as img:
            value = img.getexif().get_ifd(EXIF_IFD).get(FOCAL_LENGTH_IN_35MM)
    except Exception:  # no EXIF, or damaged EXIF: the focal length is simply unknown
        return None
    return float(value) if value and 1 <= float(value) <= 2000 else None


def normalisation(points: np.ndarray) -> tuple[np.ndarray, float]:
    """(center (3,), scale) that map points into the canonical box: (x - center) / scale.
    Computed in float64: in float32, lo + hi overflows for large coordinates."""
    lo, hi = points.min(axis=0).astype(np.float64), points.max(axis=0).astype(np.float64)
    return (lo + hi) / 2.0, float((hi - lo).max())
