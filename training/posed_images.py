"""Posed views of one object: where the images, masks, depths and cameras that DVR learns from
come from.

Every source ends in the same `PosedViews`, in the one camera convention of backend.camera
(docs/CONTRACTS.md, "Cameras"): world_mat (4, 4) maps world points to OpenCV camera coordinates
(x right, y down, z forward), camera_mat (3, 3) holds intrinsics in pixels, pixel (row r, col c)
is centred at (u, v) = (c, r). The object is expected inside the canonical box [-0.5, 0.5]^3 of
its world, the cube where DVR looks for its surface.

Sources:
  * `load_prepared_views`: a shape folder written by `training.prepare` (images/*.png with alpha,
    cameras.npz, depth.npz). Its renders get a random look per view (training.render), so their
    colours differ between views: good for masks and depth, not for fitting colour.
  * `load_folder_views`: a user's folder of images (alpha, or separate masks) with cameras.json.
  * `cast_views`: exact views of an analytic occupancy field (`field_caster`, by the ray marcher:
    tests) or of a triangle mesh (`mesh_caster`, Open3D's ray casting: benchmarks). Their colours
    come from a colour field on the surface, the same from every side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from backend.camera import pixel_rays
from backend.raymarch import find_surface

# points (N, 3) -> RGB (N, 3) in [0, 1]: the colour a synthetic object has at each surface point
ColourField = Callable[[np.ndarray], np.ndarray]


@dataclass
class PosedViews:
    """V views of H x W pixels. depths: camera z (not the distance along the ray), inf where the
    object is not seen or the depth is unknown; None when no view has depth."""
    world_mats: np.ndarray           # (V, 4, 4) float64
    camera_mats: np.ndarray          # (V, 3, 3) float64
    masks: np.ndarray                # (V, H, W) bool
    colours: np.ndarray | None       # (V, H, W, 3) float32 in [0, 1]
    depths: np.ndarray | None        # (V, H, W) float32

    def __len__(self) -> int:
        return len(self.world_mats)

    def subset(self, indices) -> "PosedViews":
        """The views at indices (held-out views, a handful for a test)."""
        pick = np.asarray(indices)
        return PosedViews(self.world_mats[pick], self.camera_mats[pick], self.masks[pick],
                          None if self.colours is None else self.colours[pick],
                          None if self.depths is None else self.depths[pick])


def rgba_to_view(rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGBA (H, W, 4) uint8 -> colours (H, W, 3) float32 in [0, 1], mask (H, W) bool (alpha > half:
    anti-aliased rims count with the side they mostly belong to)."""
    return rgba[..., :3].astype(np.float32) / 255.0, rgba[..., 3] >= 128


def load_prepared_views(shape_dir) -> PosedViews:
    """The rendered views of a shape folder of `training.prepare` (docs/CONTRACTS.md)."""
    shape_dir = Path(shape_dir)
    paths = sorted((shape_dir / "images").glob("*.png"))
    if not paths or not (shape_dir / "cameras.npz").is_file():
        raise FileNotFoundError(f"{shape_dir} has no rendered views (images/*.png and cameras.npz)")
    colours, masks = zip(*(rgba_to_view(np.asarray(Image.open(p).convert("RGBA"))) for p in paths))
    with np.load(shape_dir / "cameras.npz") as f:
        world_mats, camera_mats = f["world_mat"].astype(np.float64), f["camera_mat"].astype(np.float64)
    depths = None
    if (shape_dir / "depth.npz").is_file():
        with np.load(shape_dir / "depth.npz") as f:
            depths = f["depth"].astype(np.float32)
    return PosedViews(world_mats, camera_mats, np.stack(masks), np.stack(colours), depths)


def matrix(value, shape: tuple[int, int], where: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != shape or not np.isfinite(array).all():
        raise ValueError(f"{where} must be a finite {shape[0]} x {shape[1]} matrix")
    return array


def load_folder_views(folder) -> PosedViews:
    """A user's posed images: folder/cameras.json lists the views,

        {"views": [{"image": "000.png", "mask": "000_mask.png",
                    "world_mat": [[4 x 4]], "camera_mat": [[3 x 3]]}, ...]}

    paths relative to the folder; "mask" is optional (a grey image, white = object), without it
    the image's alpha is the mask. Cameras in the convention of the module docstring, every image
    the same size. Raises ValueError naming the view and what is wrong."""
    folder = Path(folder)
    entries = json.loads((folder / "cameras.json").read_text()).get("views")
    if not entries:
        raise ValueError(f"{folder / 'cameras.json'} lists no views")
    world_mats, camera_mats, colours, masks = [], [], [], []
    for number, entry in enumerate(entries):
        where = f"view {number} ({entry.get('image')})"
        rgba = np.asarray(Image.open(folder / entry["image"]).convert("RGBA"))
        colour, mask = rgba_to_view(rgba)
        if "mask" in entry:
            mask = np.asarray(Image.open(folder / entry["mask"]).convert("L")) >= 128
        elif (rgba[..., 3] == 255).all():
            raise ValueError(f"{where}: the image has no transparency and no mask is given")
        if colours and colour.shape != colours[0].shape or mask.shape != colour.shape[:2]:
            raise ValueError(f"{where}: every image and mask must have the first image's size")
        world_mats.append(matrix(entry["world_mat"], (4, 4), f"{where}: world_mat"))
        camera_mats.append(matrix(entry["camera_mat"], (3, 3), f"{where}: camera_mat"))
        colours.append(colour)
        masks.append(mask)
    return PosedViews(np.stack(world_mats), np.stack(camera_mats), np.stack(masks), np.stack(colours), None)


def camera_z_per_distance(world_mat: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """How much camera z grows per unit of distance along unit world directions (N, 3) -> (N,)."""
    return directions @ world_mat[2, :3]


def image_pixels(height: int, width: int) -> np.ndarray:
    """(H * W, 2) (row, col) of every pixel, row by row."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)


# origins (N, 3), unit directions (N, 3) -> distance (N,) along each ray to the first surface, inf on a miss
Caster = Callable[[np.ndarray, np.ndarray], np.ndarray]


def cast_views(cast: Caster, world_mats: np.ndarray, camera_mats: np.ndarray, size: int,
               colour: ColourField) -> PosedViews:
    """Exact views (size x size) through the given cameras: each pixel centre's ray's first hit
    gives the mask, the depth and, from the colour field, the colour."""
    masks, colours, depths = [], [], []
    for world_mat, camera_mat in zip(world_mats, camera_mats):
        origin, directions = pixel_rays(world_mat, camera_mat, image_pixels(size, size))
        distance = cast(np.ascontiguousarray(np.broadcast_to(origin, directions.shape)), directions)
        hit = np.isfinite(distance)
        rgb = np.zeros((size * size, 3), np.float32)
        rgb[hit] = colour(origin + distance[hit, None] * directions[hit])
        masks.append(hit.reshape(size, size))
        colours.append(rgb.reshape(size, size, 3))
        depths.append((distance * camera_z_per_distance(world_mat, directions)).reshape(size, size).astype(np.float32))
    return PosedViews(world_mats, camera_mats, np.stack(masks), np.stack(colours), np.stack(depths))


def field_caster(field, n_steps: int = 256) -> Caster:
    """Rays cast onto an analytic occupancy field (logits of float64 points (..., 3), positive
    inside) by the ray marcher."""
    def cast(origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
        hits = find_surface(field, torch.from_numpy(origins), torch.from_numpy(directions), n_steps=n_steps,
                            secant_steps=12)
        return hits.depth.numpy()
    return cast


def mesh_caster(vertices: np.ndarray, faces: np.ndarray) -> Caster:
    """Rays cast onto a triangle mesh (V, 3), (F, 3) (Open3D, the `bench` extra)."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(vertices.astype(np.float32)), o3d.core.Tensor(faces.astype(np.uint32)))

    def cast(origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
        rays = np.concatenate([origins, directions], axis=1).astype(np.float32)
        return scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy().astype(np.float64)
    return cast
