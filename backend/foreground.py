"""The object's mask for an image model: from the alpha channel, a mask the user gives, or an
automatic estimate.

Two estimates, each with a confidence:
* the background model: the background is a colour that varies linearly across the picture,
  fitted to the border pixels (where the object is assumed not to be); foreground is every pixel
  clearly not explained by it. Exact on plain and gradient backdrops; `confidence` is low when the
  border itself is not explained (a busy background, an object touching the frame) or when the
  object barely differs from the background.
* a salient-object network, U-2-Net-P (backend/weights/u2netp.onnx, Apache-2.0, run by
  onnxruntime when it is installed: the `foreground` extra): for photos whose background is not
  plain. Its confidence is how decided its per-pixel answers are.
The background model is used when it is confident; otherwise the more confident of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

SALIENCY_MODEL = Path(__file__).resolve().parent / "weights" / "u2netp.onnx"
SALIENCY_SIZE = 320
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# The background model is trusted without a second opinion from this confidence on.
TRUSTED_CONFIDENCE = 0.6

# Width of the border band that defines the background, as a fraction of the shorter side.
BORDER_FRACTION = 0.03
# A pixel is foreground when its colour is this many noise deviations from the background model...
NOISE_DEVIATIONS = 6.0
# ... and at least this far in RGB (0..1), so that a noiseless synthetic background still
# tolerates antialiasing and compression.
MIN_COLOUR_DISTANCE = 0.08
# Pieces smaller than this fraction of the largest one are specks, not the object.
MIN_PIECE_FRACTION = 0.05


@dataclass(frozen=True)
class Mask:
    """mask (H, W) bool; source: "alpha", "user", "estimate" (background model) or "saliency"
    (U-2-Net-P); confidence in [0, 1] (1 for alpha and user masks); touches_border: the object
    runs off the picture (it is cut off)."""
    mask: np.ndarray
    source: str
    confidence: float
    touches_border: bool


def border_band(shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels within BORDER_FRACTION of the shorter side from any edge."""
    height, width = shape
    band = max(1, int(round(BORDER_FRACTION * min(height, width))))
    border = np.zeros(shape, bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    return border


def fit_linear_background(rgb: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Least-squares colour model c(x, y) = a + b x + c y (per channel) fitted to rgb (H, W, 3) at
    the pixels `where` (H, W) bool -> the model's colour at every pixel (H, W, 3)."""
    height, width = where.shape
    rows, cols = np.mgrid[0:height, 0:width]
    design = np.stack([np.ones(where.shape), cols / max(width - 1, 1), rows / max(height - 1, 1)], axis=-1)
    coefficients, *_ = np.linalg.lstsq(design[where], rgb[where], rcond=None)
    return design @ coefficients


def estimate_foreground(rgb: np.ndarray) -> Mask:
    """rgb (H, W, 3) float in [0, 1] -> the estimated object mask (see the module docstring)."""
    border = border_band(rgb.shape[:2])
    background = fit_linear_background(rgb, border)
    distance = np.linalg.norm(rgb - background, axis=-1)
    border_distance = distance[border]
    noise = 1.4826 * np.median(np.abs(border_distance - np.median(border_distance)))
    threshold = max(NOISE_DEVIATIONS * noise, MIN_COLOUR_DISTANCE)
    # Refit on every pixel the first model calls background: the border alone extrapolates badly.
    background = fit_linear_background(rgb, distance <= threshold)
    distance = np.linalg.norm(rgb - background, axis=-1)
    mask = clean_mask(distance > threshold)
    border_fit = float(np.mean(distance[border] <= threshold))
    contrast = float(np.median(distance[mask]) / threshold) if mask.any() else 0.0
    confidence = float(np.clip(border_fit, 0.0, 1.0) * np.clip((contrast - 1.0) / 2.0, 0.0, 1.0))
    return Mask(mask, "estimate", confidence, touches_border(mask))


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: a small opening removes noise, specks are dropped, holes filled."""
    mask = ndimage.binary_opening(mask, iterations=1)
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    keep = np.flatnonzero(sizes >= MIN_PIECE_FRACTION * sizes.max()) + 1
    return ndimage.binary_fill_holes(np.isin(labels, keep))


def touches_border(mask: np.ndarray) -> bool:
    """Whether a mask (H, W) reaches the picture's outermost pixels."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


_SALIENCY_SESSION = None


def saliency_session():
    """The U-2-Net-P onnxruntime session, made once; None when onnxruntime or the model file (not
    bundled with the Blender add-on) is missing."""
    global _SALIENCY_SESSION
    if _SALIENCY_SESSION is None:
        if not SALIENCY_MODEL.is_file():
            return None
        try:
            import onnxruntime
        except ImportError:
            return None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        _SALIENCY_SESSION = onnxruntime.InferenceSession(str(SALIENCY_MODEL), options,
                                                         providers=["CPUExecutionProvider"])
    return _SALIENCY_SESSION


def salient_foreground(rgb: np.ndarray) -> Mask | None:
    """rgb (H, W, 3) float in [0, 1] -> U-2-Net-P's object mask, or None without onnxruntime.
    Input: RGB at 320 x 320, ImageNet mean/std; the first output, min-max normalised, is the
    saliency, resized back and thresholded at 0.5."""
    from PIL import Image

    session = saliency_session()
    if session is None:
        return None
    small = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., k], np.float32))
                                 .resize((SALIENCY_SIZE, SALIENCY_SIZE), Image.Resampling.BILINEAR)) for k in range(3)], -1)
    batch = ((small - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None].astype(np.float32)
    saliency = session.run(None, {session.get_inputs()[0].name: batch})[0][0, 0]
    saliency = (saliency - saliency.min()) / max(float(saliency.max() - saliency.min()), 1e-6)
    full = np.asarray(Image.fromarray(saliency.astype(np.float32)).resize((rgb.shape[1], rgb.shape[0]),
                                                                          Image.Resampling.BILINEAR))
    mask = clean_mask(full > 0.5)
    confidence = float(np.mean(np.abs(2.0 * full - 1.0))) if mask.any() else 0.0
    return Mask(mask, "saliency", confidence, touches_border(mask))


def estimate_object(rgb: np.ndarray) -> Mask:
    """The better automatic estimate for rgb (H, W, 3): the background model when it is trusted,
    else whichever of it and the salient-object network is more confident."""
    background = estimate_foreground(rgb)
    if background.confidence >= TRUSTED_CONFIDENCE:
        return background
    salient = salient_foreground(rgb)
    return salient if salient is not None and salient.confidence > background.confidence else background


def mask_from_picture(picture: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1] from a mask picture (H, W, 3|4) in [0, 1]: its alpha channel where it
    has transparency, else its brightness (white = object)."""
    if picture.shape[2] == 4 and (picture[..., 3] < 0.99).any():
        return picture[..., 3].astype(np.float32)
    return picture[..., :3].mean(axis=-1).astype(np.float32)


def user_mask(mask: np.ndarray, picture_shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool of picture_shape from a user's mask: (h, w) values or an (h, w, 3|4) picture,
    uint8 (0..255), float (0..1) or bool. A mask of the picture's proportions but another size
    (the picture was scaled down on reading) is resampled to it by nearest pixel.
    Raises ValueError naming both sizes when the proportions differ."""
    mask = np.asarray(mask)
    values = mask.astype(np.float32) / (255.0 if mask.dtype == np.uint8 else 1.0)
    if values.ndim == 3:
        values = mask_from_picture(values)
    (height, width), (mask_height, mask_width) = picture_shape, values.shape[:2]
    # proportions agree when each side maps onto the other's within one pixel
    if abs(mask_width * height / mask_height - width) > 1.0 or abs(mask_height * width / mask_width - height) > 1.0:
        raise ValueError(f"the mask is {mask_width} x {mask_height} pixels but the picture is "
                         f"{width} x {height}: they must have the same proportions")
    rows = (np.arange(height) + 0.5) * mask_height / height
    cols = (np.arange(width) + 0.5) * mask_width / width
    return values[rows.astype(np.intp)[:, None], cols.astype(np.intp)[None, :]] > 0.5


def object_mask(rgba: np.ndarray, given_mask: np.ndarray | None = None) -> Mask:
    """The mask of the object in rgba (H, W, 4) float in [0, 1]: the user's mask (see user_mask) if
    given, else the alpha channel if it holds any transparency, else the automatic estimate.
    Raises ValueError when a user mask does not fit the picture."""
    if given_mask is not None:
        mask = user_mask(given_mask, rgba.shape[:2])
        return Mask(mask, "user", 1.0, touches_border(mask))
    alpha = rgba[..., 3]
    if (alpha < 0.99).any():
        mask = alpha > 0.5
        return Mask(mask, "alpha", 1.0, touches_border(mask))
    return estimate_object(rgba[..., :3])
