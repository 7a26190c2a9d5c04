"""Reading and validating inputs: point clouds and images, from files or arrays.

Every failure is an InputError naming the file and the problem; a damaged or hostile file never
escapes as another exception, and memory stays bounded by the limits below.
"""

from pathlib import Path

import numpy as np

from .errors import InputError
from .pointclouds import (MAX_COORDINATE, POINT_SUFFIXES, PointCloud, load_point_cloud, quiet_decoding,  # noqa: F401
                          require_file, validate_points)
from .preprocess import bounding_box

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

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


def input_kind(path) -> str:
    """'points' or 'image' from a file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix in POINT_SUFFIXES:
        return "points"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    raise InputError(f"{path}: unknown input format {suffix or '(no extension)'!r}; point clouds: "
                     f"{' '.join(POINT_SUFFIXES)}; images: {' '.join(IMAGE_SUFFIXES)}")


def load_points(path) -> np.ndarray:
    """(N, 3) float64 points of a point-cloud file (backend.pointclouds has the colours and normals)."""
    return load_point_cloud(path).points


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
    from .foreground import mask_from_picture

    return mask_from_picture(load_image(path))


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
    lo, hi = (corner.astype(np.float64) for corner in bounding_box(points))
    return (lo + hi) / 2.0, float((hi - lo).max())
