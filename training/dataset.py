"""Reading the prepared data (docs/CONTRACTS.md, "Prepared data") for training and evaluation.

Two layers:
  * small pure functions on numpy arrays (sampling, augmentation, image compositing), each with
    the array shapes in its docstring, so they can be tested without files;
  * `ShapeStore` (cached file access) and `OccupancyDataset` (a torch Dataset) on top of them.

Randomness never comes from a global generator: every sample draws from
`np.random.default_rng([seed, epoch, index])`, so a sample depends only on what it is, not on
which worker made it or when. That is what makes `--resume` exact and DDP ranks independent.
"""

from __future__ import annotations

import io
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend import camera, viewer
from backend.inputs import normalisation
from backend.preprocess import image_to_model_input, over_background, premultiply, resample

# Half the edge of the padded query box, [-0.55, 0.55]^3 for the contract's padding 0.1.
DEFAULT_PADDING = 0.1
# Surface points used to re-fit the canonical box after an augmentation.
BOX_FIT_POINTS = 8192


def query_half_extent(padding: float) -> float:
    """Half edge of the padded query box for a canonical shape in [-0.5, 0.5]^3."""
    return 0.5 + padding / 2.0


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------

def unpack_occupancies(packed: np.ndarray, count: int) -> np.ndarray:
    """np.packbits output (ceil(count/8),) uint8 -> occupancies (count,) bool."""
    return np.unpackbits(packed)[:count].astype(bool)


def sample_indices(total: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """count indices (count,) int64 into range(total): without replacement when possible."""
    if count <= total:
        return rng.choice(total, size=count, replace=False)
    return rng.integers(0, total, size=count)


def sample_surface_input(surface: np.ndarray, count: int, noise: float, rng: np.random.Generator,
                         transform=None) -> np.ndarray:
    """Noisy input cloud (count, 3) float32 from surface points (S, 3).

    transform (optional) maps (K, 3) -> (K, 3) before the noise is added, so the noise sigma is
    always in the final (canonical) frame, as at inference."""
    pts = surface[sample_indices(len(surface), count, rng)].astype(np.float32)
    if transform is not None:
        pts = transform(pts)
    if noise > 0:
        pts = pts + rng.normal(0.0, noise, size=pts.shape).astype(np.float32)
    return pts.astype(np.float32)


def random_rotation(mode: str, up_axis: int, rng: np.random.Generator) -> np.ndarray:
    """Rotation matrix (3, 3): "none" -> identity, "up" -> uniform angle about the up axis,
    "so3" -> uniform over all rotations (QR of a Gaussian matrix with the sign fix)."""
    if mode == "none":
        return np.eye(3)
    if mode == "up":
        angle = rng.uniform(0.0, 2.0 * np.pi)
        c, s = np.cos(angle), np.sin(angle)
        a, b = [axis for axis in range(3) if axis != up_axis]
        rot = np.eye(3)
        rot[a, a], rot[a, b], rot[b, a], rot[b, b] = c, -s, s, c
        return rot
    if mode == "so3":
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        return q
    raise ValueError(f"unknown rotation mode {mode!r}; use 'none', 'up' or 'so3'")


def random_axis_scales(scale_range: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Per-axis scale factors (3,), log-uniform in [low, high] (so 0.8..1.25 is symmetric)."""
    low, high = scale_range
    if low <= 0 or high < low:
        raise ValueError(f"bad scale range {scale_range}")
    return np.exp(rng.uniform(np.log(low), np.log(high), size=3))


def random_squash(probability: float, squash_range: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Per-axis factors (3,) that, with the given probability, make a shape thin: one random axis
    (a plate) or two (a rod) scaled by a factor log-uniform in squash_range (down to 1:30 for
    (1/30, 1/3)); otherwise ones. The point model's training shapes are rarely thin, and it fails on
    thin things (docs/pointclouds.md)."""
    factors = np.ones(3)
    if probability <= 0 or rng.random() >= probability:
        return factors
    low, high = squash_range
    if not 0 < low <= high <= 1:
        raise ValueError(f"bad squash range {squash_range}: factors in (0, 1]")
    axes = rng.permutation(3)[: int(rng.integers(1, 3))]
    factors[axes] = np.exp(rng.uniform(np.log(low), np.log(high), size=len(axes)))
    return factors


def bounding_box_fit(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Canonical-box normalisation of points (N, 3): (bbox centre (3,), longest bbox edge), the
    very function inference uses."""
    center, scale = normalisation(points)
    return center, max(scale, 1e-9)


@dataclass(frozen=True)
class AffineAugmentation:
    """x -> (x @ linear.T - center) / scale, and its inverse. linear (3, 3), center (3,)."""

    linear: np.ndarray
    center: np.ndarray
    scale: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(K, 3) -> (K, 3) float32."""
        return ((points.astype(np.float64) @ self.linear.T - self.center) / self.scale).astype(np.float32)

    def invert(self, points: np.ndarray) -> np.ndarray:
        """(K, 3) -> (K, 3) float64: the inverse of apply."""
        return np.linalg.solve(self.linear, (points.astype(np.float64) * self.scale + self.center).T).T


def make_augmentation(surface: np.ndarray, rotation: str, up_axis: int, scale_range, rng,
                      squash_probability: float = 0.0, squash_range=(1 / 30, 1 / 3)) -> AffineAugmentation:
    """Random rotation + anisotropic scaling (and, with squash_probability, a squash that makes the
    shape thin: random_squash), then back into the canonical box.

    surface (S, 3): the shape's surface points, used to re-fit the canonical box (bbox centre,
    longest edge), exactly the normalisation that inference applies to a given point cloud.
    Occupancy is invariant under this invertible affine map applied to inputs and queries alike."""
    scales = random_axis_scales(scale_range, rng)
    if squash_probability > 0:
        scales = scales * random_squash(squash_probability, squash_range, rng)
    linear = random_rotation(rotation, up_axis, rng) @ np.diag(scales)
    moved = surface.astype(np.float64) @ linear.T
    center, scale = bounding_box_fit(moved)
    return AffineAugmentation(linear, center, scale)


def sample_uniform_queries(points: np.ndarray, occupancies: np.ndarray, count: int, rng: np.random.Generator,
                           augmentation: AffineAugmentation | None = None, half_extent: float = 0.55,
                           source_half_extent: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """count query points uniform in the padded box [-h, h]^3 with their occupancies.

    points (P, 3) uniform in the box with occupancies (P,) bool. Without augmentation this is a
    random subset. With one, the stored points only cover the image of the original box; the rest
    of the new box lies outside the original box, hence outside the shape, so occupancy 0 is exact
    there. Fresh uniform candidates decide, per point, which of the two regions it comes from, so
    the result stays uniform over the whole box.
    source_half_extent: half edge of the box the stored points cover, when it differs from the
    new box's (the viewer box of image models).
    Returns (count, 3) float32, (count,) float32 in {0, 1}."""
    source_half_extent = half_extent if source_half_extent is None else source_half_extent
    if augmentation is None:
        idx = sample_indices(len(points), count, rng)
        return points[idx].astype(np.float32), occupancies[idx].astype(np.float32)
    candidates = rng.uniform(-half_extent, half_extent, size=(count, 3))
    outside_original = (np.abs(augmentation.invert(candidates)) > source_half_extent).any(axis=1)
    need = int((~outside_original).sum())
    chosen_pts, chosen_occ, have = [], [], 0
    for _ in range(64):
        if have >= need:
            break
        idx = rng.integers(0, len(points), size=max(4 * (need - have), 64))
        moved = augmentation.apply(points[idx])
        inside = (np.abs(moved) <= half_extent).all(axis=1)
        chosen_pts.append(moved[inside])
        chosen_occ.append(occupancies[idx][inside])
        have += int(inside.sum())
    out_pts = candidates.astype(np.float32)
    out_occ = np.zeros(count, dtype=np.float32)
    if need:
        stored_pts = np.concatenate(chosen_pts)[:need]
        stored_occ = np.concatenate(chosen_occ)[:need]
        if len(stored_pts) < need:  # degenerate transform: fall back to repeating what we have
            reps = rng.integers(0, max(len(stored_pts), 1), size=need - len(stored_pts))
            stored_pts = np.concatenate([stored_pts, stored_pts[reps]])
            stored_occ = np.concatenate([stored_occ, stored_occ[reps]])
        out_pts[~outside_original] = stored_pts
        out_occ[~outside_original] = stored_occ
    return out_pts, out_occ


def sample_queries_in_mask(shape, count: int, rng: np.random.Generator, augmentation: AffineAugmentation,
                           half_extent: float, source_half_extent: float, mask: torch.Tensor, focal: float,
                           max_rounds: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """count uniform viewer-box queries (count, 3) float32 with occupancies (count,) float32, drawn
    only inside the cone of the crop mask (S, S) bool: outside it the mask law decides at inference,
    so training spends its queries where the network must guess the depth. Rejection sampling; a
    mask too small to fill the count in max_rounds is topped up with plain uniform queries."""
    kept_p, kept_o, have = [], [], 0
    for _ in range(max_rounds):
        if have >= count:
            break
        p, o = sample_uniform_queries(shape.uniform_points, shape.uniform_occupancies, 4 * count, rng,
                                      augmentation, half_extent, source_half_extent)
        inside = viewer.inside_mask(torch.from_numpy(p), mask, focal).numpy()
        kept_p.append(p[inside])
        kept_o.append(o[inside])
        have += int(inside.sum())
    if have < count:
        p, o = sample_uniform_queries(shape.uniform_points, shape.uniform_occupancies, count - have, rng,
                                      augmentation, half_extent, source_half_extent)
        kept_p.append(p)
        kept_o.append(o)
    return np.concatenate(kept_p)[:count], np.concatenate(kept_o)[:count]


def sample_near_queries(points: np.ndarray, occupancies: np.ndarray, count: int, rng: np.random.Generator,
                        augmentation: AffineAugmentation | None = None) -> tuple[np.ndarray, np.ndarray]:
    """count near-surface points (P, 3) + occupancies (P,) -> (count, 3) float32, (count,) float32."""
    idx = sample_indices(len(points), count, rng)
    pts = points[idx].astype(np.float32)
    if augmentation is not None:
        pts = augmentation.apply(pts)
    return pts, occupancies[idx].astype(np.float32)


def decode_view(png: bytes) -> np.ndarray:
    """PNG bytes -> RGBA (H, W, 4) float32 in [0, 1]."""
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0


def pick_background(mode: str, rng: np.random.Generator) -> np.ndarray:
    """Background colour (3,) in [0, 1]: "white", "random" (uniform RGB), or "mixed" (half each)."""
    if mode == "white" or (mode == "mixed" and rng.random() < 0.5):
        return np.ones(3)
    if mode in ("random", "mixed"):
        return rng.uniform(0.0, 1.0, size=3)
    raise ValueError(f"unknown background mode {mode!r}; use 'white', 'random' or 'mixed'")


# Photos that may stand behind an object: scikit-image's sample images that ship with the package
# (public domain or CC0, see skimage/data/README.txt), loaded once per process.
BACKGROUND_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "brick", "grass",
                     "gravel", "camera", "immunohistochemistry", "moon")
_PHOTOS: list[np.ndarray] = []


def background_photos() -> list[np.ndarray]:
    """The sample photos as (H, W, 3) float32 in [0, 1]."""
    if not _PHOTOS:
        import skimage.data

        for name in BACKGROUND_PHOTOS:
            photo = np.asarray(getattr(skimage.data, name)(), np.float32) / 255.0
            _PHOTOS.append(np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3])
    return _PHOTOS


def random_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 background: a flat colour, a linear gradient, smooth noise or a
    random crop of a photo, so that image models never rely on one kind of backdrop."""
    kind = rng.choice(["flat", "gradient", "noise", "photo"], p=[0.35, 0.25, 0.15, 0.25])
    if kind == "flat":
        return np.broadcast_to(rng.uniform(0.0, 1.0, 3).astype(np.float32), (size, size, 3)).copy()
    if kind == "gradient":
        angle = rng.uniform(0.0, 2.0 * np.pi)
        ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        t = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None] + 0.5)[..., None]
        a, b = rng.uniform(0.0, 1.0, (2, 3)).astype(np.float32)
        return a * (1.0 - t) + b * t
    if kind == "noise":
        cells = int(rng.integers(2, 9))
        coarse = rng.uniform(0.0, 1.0, (cells, cells, 3)).astype(np.float32)
        return np.stack([np.asarray(Image.fromarray(coarse[..., k]).resize((size, size), Image.Resampling.BICUBIC))
                         for k in range(3)], axis=-1).clip(0.0, 1.0)
    photos = background_photos()
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(min(photo.shape[:2]) // 3, min(photo.shape[:2]) + 1))
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = photo[top:top + side, left:left + side]
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(crop[..., k])).resize((size, size), Image.Resampling.BILINEAR))
                     for k in range(3)], axis=-1).clip(0.0, 1.0)


def colour_gains(rng: np.random.Generator) -> np.ndarray:
    """(3,) random per-channel gains with a brightness change: a picture's colour jitter."""
    return rng.uniform(0.8, 1.2, 3) * rng.uniform(0.7, 1.3)


def jitter_colours(premultiplied: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """(S, S, 4) premultiplied RGBA with its colour channels times gains (3,)."""
    out = premultiplied.copy()
    out[..., :3] = np.minimum(out[..., :3] * gains.astype(np.float32), out[..., 3:4])
    return out


@dataclass(frozen=True)
class ViewerView:
    """One rendered view turned into what a viewer-centred image model sees and predicts."""
    premultiplied: np.ndarray   # (S, S, 4) float32, the object's crop
    similarity: np.ndarray      # (4, 4) canonical shape coordinates -> viewer frame
    up: np.ndarray              # (3,) the world's up direction in the viewer frame
    crop: camera.CropCamera     # the crop's camera


def viewer_view(rgba: np.ndarray, world_mat: np.ndarray, camera_mat: np.ndarray, size: int) -> ViewerView:
    """A render (H, W, 4) with its camera (4, 4), (3, 3) -> the model's crop and viewer frame
    (backend.camera), cropped around the alpha mask as inference does, resampled exactly."""
    box = camera.crop_box(rgba[..., 3] > 0.5)
    crop = camera.crop_camera(camera_mat, box)
    similarity = camera.viewer_from_world(world_mat, crop)
    pixels = resample(premultiply(rgba), camera.crop_source_pixels(camera_mat, crop, size))
    return ViewerView(pixels, similarity, camera.up_in_viewer(similarity), crop)


def similarity_augmentation(similarity: np.ndarray) -> AffineAugmentation:
    """The (4, 4) similarity p -> L p + t as an AffineAugmentation ((p L^T - center) / scale)."""
    return AffineAugmentation(similarity[:3, :3].astype(np.float64), -similarity[:3, 3].astype(np.float64), 1.0)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def read_split(data_dir: Path, split: str) -> list[str]:
    """Shape ids listed in data_dir/split/<split>.txt that have a folder (blank lines ignored)."""
    path = Path(data_dir) / "split" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {data_dir} a prepared data folder?")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [i for i in ids if (Path(data_dir) / i / "points.npz").is_file()]


def read_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class ShapeArrays:
    """Everything training needs about one shape, kept compact in memory."""

    shape_id: str
    class_name: str
    uniform_points: np.ndarray      # (P, 3) float16
    uniform_occupancies: np.ndarray  # (P,) bool
    near_points: np.ndarray         # (Q, 3) float16
    near_occupancies: np.ndarray    # (Q,) bool
    surface_points: np.ndarray | None = None  # (S, 3) float32
    surface_normals: np.ndarray | None = None  # (S, 3) float32
    views: list = field(default_factory=list)  # PNG bytes per view (decoded on demand)
    world_mats: np.ndarray | None = None   # (V, 4, 4) per view, canonical -> OpenCV camera
    camera_mats: np.ndarray | None = None  # (V, 3, 3) per view, intrinsics in pixels
    depth_layers: np.ndarray | None = None  # (V, 2, H, W) float16 camera z of the first and the last
                                            # surface along each pixel's ray, inf where none
    look_points: np.ndarray | None = None   # (N, 3) float32 surface points of looks.npz ...
    look_colours: np.ndarray | None = None  # (V, N, 3) uint8 ... and each view's colour there (sRGB)


def load_shape(shape_dir: Path, surface: bool, normals: bool, images: bool, layers: bool = False,
               looks: bool = False) -> ShapeArrays:
    """Read one prepared shape folder (see docs/CONTRACTS.md)."""
    shape_dir = Path(shape_dir)
    info_path = shape_dir / "shape.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    with np.load(shape_dir / "points.npz") as f:
        uniform = f["points"]
        near = f["near_points"]
        arrays = ShapeArrays(
            shape_id=shape_dir.name,
            class_name=str(info.get("class") or info.get("source") or "unknown"),
            uniform_points=uniform.astype(np.float16),
            uniform_occupancies=unpack_occupancies(f["occupancies"], len(uniform)),
            near_points=near.astype(np.float16),
            near_occupancies=unpack_occupancies(f["near_occupancies"], len(near)),
        )
    if surface or normals:
        with np.load(shape_dir / "pointcloud.npz") as f:
            arrays.surface_points = f["points"].astype(np.float32)
            if normals:
                arrays.surface_normals = f["normals"].astype(np.float32)
    if images:
        views = sorted((shape_dir / "images").glob("*.png"))
        if not views:
            raise FileNotFoundError(f"{shape_dir} has no rendered views (images/*.png); "
                                    "prepare the data with views > 0 for image models")
        arrays.views = [p.read_bytes() for p in views]
        if (shape_dir / "cameras.npz").is_file():
            with np.load(shape_dir / "cameras.npz") as f:
                arrays.world_mats = f["world_mat"].astype(np.float64)
                arrays.camera_mats = f["camera_mat"].astype(np.float64)
    if layers:
        depth_path = shape_dir / "depth.npz"
        with np.load(depth_path) if depth_path.is_file() else nullcontext({}) as f:
            if "back" not in f:
                raise FileNotFoundError(f"{depth_path} is missing or has no back depth; run training.prepare "
                                        "again over the same meshes (with views) to add it")
            arrays.depth_layers = np.stack([f["depth"], f["back"]], axis=1)
    if looks:
        looks_path = shape_dir / "looks.npz"
        if not looks_path.is_file():
            raise FileNotFoundError(f"{looks_path} is missing; run training.prepare again over the same meshes "
                                    "(with the same views) to add the looks of its renders")
        with np.load(looks_path) as f:
            arrays.look_points, arrays.look_colours = f["points"], f["colours"]
    return arrays


def near_inside_fraction(shape_dir) -> float:
    """Share of a prepared shape's near-surface samples that are inside: about a half for a solid
    (less for a thin one), near zero for an open sheet, whose winding-number labels say little."""
    with np.load(Path(shape_dir) / "points.npz") as f:
        return float(unpack_occupancies(f["near_occupancies"], len(f["near_points"])).mean())


def split_by_renders(data_dir, shape_ids: list[str]) -> tuple[list[str], list[str]]:
    """(ids with rendered views, ids without): a folder may mix shapes prepared with and without
    renders (procedural solids are prepared for point-cloud training only)."""
    data_dir = Path(data_dir)
    has_views = {i: any((data_dir / i / "images").glob("*.png")) for i in shape_ids}
    return [i for i in shape_ids if has_views[i]], [i for i in shape_ids if not has_views[i]]


class ShapeStore:
    """Cached access to the shapes of a prepared folder. The cache lives in the process that
    fills it: call preload() before DataLoader workers fork to share one copy among them."""

    def __init__(self, data_dir, shape_ids: list[str], surface: bool = True, normals: bool = False,
                 images: bool = False, layers: bool = False, looks: bool = False):
        self.data_dir = Path(data_dir)
        self.shape_ids = list(shape_ids)
        self.flags = dict(surface=surface, normals=normals, images=images, layers=layers, looks=looks)
        self._cache: dict[str, ShapeArrays] = {}

    def __len__(self) -> int:
        return len(self.shape_ids)

    def get(self, index: int) -> ShapeArrays:
        shape_id = self.shape_ids[index]
        if shape_id not in self._cache:
            self._cache[shape_id] = load_shape(self.data_dir / shape_id, **self.flags)
        return self._cache[shape_id]

    def forget(self, index: int) -> None:
        """Drop one shape from the cache."""
        self._cache.pop(self.shape_ids[index], None)

    def preload(self) -> None:
        for i in range(len(self)):
            self.get(i)


# ----------------------------------------------------------------------------------------------
# Torch dataset
# ----------------------------------------------------------------------------------------------

@dataclass
class SamplingConfig:
    """How one training (or validation) example is drawn. Built from the training config."""

    input_kind: str = "points"          # "points" | "image"
    num_points: int = 3000              # input points (the batch may use fewer, see train.py)
    noise: float = 0.005                # Gaussian sigma on input points, canonical units
    query_points: int = 2048            # query points per shape
    near_fraction: float = 0.5          # share of near-surface query points
    rotation: str = "none"              # "none" | "up" | "so3"
    up_axis: int = 2                    # 0 x, 1 y, 2 z (Blender's up)
    scale_range: tuple = (1.0, 1.0)     # anisotropic scaling, per-axis factor range
    squash_probability: float = 0.0     # share of examples made thin (random_squash) ...
    squash_range: tuple = (1 / 30, 1 / 3)  # ... by a factor in this range on one or two axes
    image_size: int = 128               # model input size
    background: str = "white"           # "white" | "random" | "mixed"
    view: int | None = None             # fixed view (validation/evaluation) or None for random
    frame: str = "canonical"            # image models: "canonical" or "viewer" (backend.camera)
    uniform_in_mask: bool = False       # viewer models: uniform queries only where the mask law
                                        # leaves the answer to the network (inside the mask's cone)
    layers: bool = False                # viewer models: the depth layers seen through the crop
    colour_points: int = 0              # viewer models: surface points with the view's colour there
                                        # (looks.npz), the target of a texture head
    padding: float = DEFAULT_PADDING

    @property
    def augments(self) -> bool:
        return self.input_kind == "points" and (self.rotation != "none" or tuple(self.scale_range) != (1.0, 1.0)
                                                or self.squash_probability > 0)


class OccupancyDataset(torch.utils.data.Dataset):
    """One example per shape: {"inputs": (N, 3) or (3, S, S), "points": (M, 3), "occ": (M,), "index": ()}.

    Call set_epoch(e) before each epoch: samples are a pure function of (seed, epoch, index)."""

    def __init__(self, store: ShapeStore, sampling: SamplingConfig, seed: int = 0, deterministic: bool = False):
        self.store = store
        self.sampling = sampling
        self.seed = int(seed)
        self.deterministic = deterministic  # validation: the same example every epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.store)

    def rng_for(self, index: int) -> np.random.Generator:
        epoch = 0 if self.deterministic else self.epoch
        return np.random.default_rng([self.seed, epoch, int(index)])

    def __getitem__(self, index: int) -> dict:
        s = self.sampling
        shape = self.store.get(index)
        rng = self.rng_for(index)
        h = query_half_extent(s.padding)
        source_h = h
        aug = None
        extra = {}
        if s.augments:
            # The box is re-fitted to a subset of the surface samples (they are in random order): 12x
            # cheaper than all 100k, and within the sampling density of the exact fit.
            aug = make_augmentation(shape.surface_points[:BOX_FIT_POINTS], s.rotation, s.up_axis, s.scale_range, rng,
                                    s.squash_probability, s.squash_range)
        if s.input_kind == "points":
            inputs = sample_surface_input(shape.surface_points, s.num_points, s.noise, rng,
                                          transform=aug.apply if aug is not None else None)
            inputs_t = torch.from_numpy(inputs)
        elif s.frame == "viewer":
            view = (s.view if s.view is not None else int(rng.integers(0, len(shape.views)))) % len(shape.views)
            seen = viewer_view(decode_view(shape.views[view]), shape.world_mats[view], shape.camera_mats[view],
                               s.image_size)
            aug, h = similarity_augmentation(seen.similarity), camera.VIEW_HALF_EXTENT
            if s.background == "white":
                gains = np.ones(3)
                inputs = over_background(seen.premultiplied, np.ones(3, np.float32))
            else:
                gains = colour_gains(rng)
                inputs = over_background(jitter_colours(seen.premultiplied, gains), random_background(s.image_size, rng))
            inputs_t = torch.from_numpy(inputs)
            extra["up"] = torch.from_numpy(seen.up.astype(np.float32))
            extra["focal"] = torch.tensor(seen.crop.focal, dtype=torch.float32)
            extra["mask"] = torch.from_numpy(seen.premultiplied[..., 3] >= 0.5)
            if s.layers:
                extra["layers"] = torch.from_numpy(np.stack([
                    camera.crop_viewer_depth(depth.astype(np.float64), shape.world_mats[view], shape.camera_mats[view],
                                             seen.crop, s.image_size)
                    for depth in shape.depth_layers[view]]).astype(np.float32))
        else:
            view = s.view if s.view is not None else int(rng.integers(0, len(shape.views)))
            rgba = decode_view(shape.views[view % len(shape.views)])
            inputs_t = torch.from_numpy(image_to_model_input(rgba, s.image_size, pick_background(s.background, rng)))
        n_near = int(round(s.query_points * s.near_fraction))
        n_uniform = s.query_points - n_near
        parts_p, parts_o = [], []
        if n_uniform and s.uniform_in_mask and "mask" in extra:
            p, o = sample_queries_in_mask(shape, n_uniform, rng, aug, h, source_h, extra["mask"], float(extra["focal"]))
            parts_p.append(p)
            parts_o.append(o)
        elif n_uniform:
            p, o = sample_uniform_queries(shape.uniform_points, shape.uniform_occupancies, n_uniform, rng, aug, h,
                                          source_half_extent=source_h)
            parts_p.append(p)
            parts_o.append(o)
        if n_near:
            p, o = sample_near_queries(shape.near_points, shape.near_occupancies, n_near, rng, aug)
            parts_p.append(p)
            parts_o.append(o)
        if s.colour_points and s.frame == "viewer":
            # Last, so that the draws above are those of a model without a texture head.
            chosen = sample_indices(len(shape.look_points), s.colour_points, rng)
            extra["colour_points"] = torch.from_numpy(aug.apply(shape.look_points[chosen]).astype(np.float32))
            shown = shape.look_colours[view][chosen].astype(np.float64) / 255.0 * gains
            extra["colours"] = torch.from_numpy(np.minimum(shown, 1.0).astype(np.float32))
        return {
            "inputs": inputs_t,
            "points": torch.from_numpy(np.concatenate(parts_p)),
            "occ": torch.from_numpy(np.concatenate(parts_o)),
            "index": torch.tensor(index),
            **extra,
        }
