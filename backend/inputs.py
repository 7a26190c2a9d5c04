"""Reading and validating inputs: point clouds and images, from files or arrays."""

from pathlib import Path

import numpy as np

from .errors import InputError

POINT_SUFFIXES = (".ply", ".obj", ".off", ".xyz", ".txt", ".pts", ".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def input_kind(path) -> str:
    """'points' or 'image' from a file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix in POINT_SUFFIXES:
        return "points"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    raise InputError(f"{path}: unknown input format {suffix or '(no extension)'!r}; point clouds: "
                     f"{' '.join(POINT_SUFFIXES)}; images: {' '.join(IMAGE_SUFFIXES)}")


def validate_points(points, source: str = "input") -> np.ndarray:
    """Any array-like -> (N, 3) float32 with finite values, or InputError naming the problem."""
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise InputError(f"{source}: expected an (N, 3) array of points, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{source}: point coordinates must be numbers, got {arr.dtype}")
    arr = arr[:, :3].astype(np.float32)
    if len(arr) == 0:
        raise InputError(f"{source}: the point cloud is empty")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise InputError(f"{source}: {int(bad.sum())} of {len(arr)} points have NaN or infinite coordinates")
    if len(arr) < 3 or float(np.ptp(arr, axis=0).max()) == 0.0:
        raise InputError(f"{source}: the points span no volume ({len(arr)} points, all at one place)")
    return arr


def load_points(path) -> np.ndarray:
    """(N, 3) float32 points from .ply, .obj/.off (vertices), .xyz/.txt/.pts, .npy/.npz."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".npz"):
            data = np.load(path, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                key = "points" if "points" in data.files else (data.files[0] if data.files else None)
                if key is None:
                    raise InputError(f"{path}: the .npz file holds no arrays")
                data = data[key]
            arr = data
        elif suffix in (".xyz", ".txt", ".pts"):
            text = path.read_text(errors="strict").replace(",", " ")
            rows = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            widths = {len(r) for r in rows}
            if not rows or min(widths) < 3:
                raise InputError(f"{path}: expected lines of at least three numbers (x y z)")
            arr = np.array([r[:3] for r in rows], dtype=np.float64)
        elif suffix in (".ply", ".obj", ".off"):
            import trimesh
            loaded = trimesh.load(path, process=False)
            arr = getattr(loaded, "vertices", None)
            if arr is None and hasattr(loaded, "geometry"):  # a scene: all its geometry's vertices
                parts = [g.vertices for g in loaded.geometry.values() if hasattr(g, "vertices")]
                arr = np.concatenate(parts) if parts else np.zeros((0, 3))
            if arr is None:
                raise InputError(f"{path}: holds no vertices")
        else:
            input_kind(path)  # raises the unknown-format error
            raise InputError(f"{path}: is an image, not a point cloud")
    except InputError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, KeyError, IndexError) as exc:
        raise InputError(f"{path}: cannot read points ({exc})") from exc
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


def load_image(path) -> np.ndarray:
    """(H, W, 4) float32 RGBA in [0, 1] from an image file; the alpha channel, if any, is the mask."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the image ({exc})") from exc
    return validate_image(arr, str(path))


def normalisation(points: np.ndarray) -> tuple[np.ndarray, float]:
    """(center (3,), scale) that map points into the canonical box: (x - center) / scale."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return ((lo + hi) / 2.0).astype(np.float64), float((hi - lo).max())
