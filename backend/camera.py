"""The one camera contract (docs/CONTRACTS.md, "Cameras"): pinhole maths shared by the renderer
that makes training data, the image models, training and inference. Pure numpy, no bpy.

Conventions
-----------
* Camera frame: OpenCV axes (x right, y down, z forward). `world_mat` (4, 4) maps world points to
  camera coordinates; `camera_mat` (3, 3) holds intrinsics in pixels, with pixel centres at
  integer coordinates: pixel (row r, col c) is centred at (u, v) = (c, r).
* The *viewer frame* of an image model: the model sees a square crop around the object's mask
  (side = the mask's larger extent times 1 + 2 CROP_MARGIN), resized to S x S, taken by a camera
  whose optical axis runs through the crop's centre, with focal length f * S pixels (f: the focal
  length as a fraction of the crop's width). Viewer coordinates v = q - (0, 0, object_depth(f)) for
  a point q in that camera's frame, with object_depth(f) = f (1 + 2 CROP_MARGIN): the object's
  centre lies at viewer depth 0 (off the axis where its silhouette is lopsided) and an object whose
  image spans the crop (less its margin) is one unit wide, so results come out at about unit size.
  Occupancy is predicted in the viewer box [-VIEW_HALF_EXTENT, VIEW_HALF_EXTENT]^3.
* Training knows f for every render; at inference f is the photo's own (from its EXIF focal length)
  or the canonical FOCAL, a "50 mm" lens. A wrong guess changes the perspective of the result, never
  its outline, since every point is projected with the same f that the mask is tested with.
* A rendered view becomes such a crop by rotating the camera about its centre so that the ray
  through the crop box's centre becomes the optical axis, and resampling the render through that
  rotation (a homography, so the crop is exact); a photo's crop assumes its centre is on the axis.
  Then a shift along the axis and a uniform scale about the camera put the object's centre at
  depth object_depth(f): every point stays on its pixel's ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FOCAL = 50.0 / 36.0          # focal length as a fraction of the crop width (a "50 mm" lens)
CROP_MARGIN = 0.08           # crop margin around the mask, as a fraction of its larger extent
VIEW_HALF_EXTENT = 0.65      # the viewer box, where occupancy is predicted

# Blender cameras look down -z with y up; OpenCV looks down +z with y down.
BLENDER_FROM_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


def intrinsics(image_size: int, focal_fraction: float = FOCAL) -> np.ndarray:
    """(3, 3) pinhole intrinsics of a square S x S image, principal point at its centre."""
    focal_px = focal_fraction * image_size
    centre = (image_size - 1) / 2.0
    return np.array([[focal_px, 0.0, centre], [0.0, focal_px, centre], [0.0, 0.0, 1.0]])


def look_at(eye: np.ndarray, target: np.ndarray = np.zeros(3), up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """(4, 4) world->camera matrix, OpenCV axes, of a camera at eye (3,) looking at target (3,)."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    right = right / np.linalg.norm(right)
    down = np.cross(forward, right)
    world_mat = np.eye(4)
    world_mat[:3, :3] = np.stack([right, down, forward])
    world_mat[:3, 3] = -world_mat[:3, :3] @ eye
    return world_mat


def project(world_mat: np.ndarray, camera_mat: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates uv (N, 2) (u = column, v = row) and camera depth z (N,) of points (N, 3)."""
    cam = points @ world_mat[:3, :3].T + world_mat[:3, 3]
    z = cam[:, 2]
    uv = (cam @ camera_mat.T)[:, :2] / z[:, None]
    return uv, z


def pixel_rays(world_mat: np.ndarray, camera_mat: np.ndarray, pixels_rc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray origin (3,) and unit world directions (N, 3) through pixel centres pixels_rc (N, 2) = (row, col)."""
    rotation, translation = world_mat[:3, :3], world_mat[:3, 3]
    homogeneous = np.stack([pixels_rc[:, 1], pixels_rc[:, 0], np.ones(len(pixels_rc))], axis=1)
    directions = np.linalg.solve(camera_mat, homogeneous.T).T @ rotation  # R^T d, row-wise
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return -rotation.T @ translation, directions


def fitting_distance(focal_fraction: float, radius: float = math.sqrt(3) / 2, margin: float = 1.02) -> float:
    """Camera distance at which a sphere of `radius` around the target just fits the square image
    of a camera with that focal length (fraction of the width), times margin."""
    return radius / math.sin(math.atan(1.0 / (2.0 * focal_fraction))) * margin


# ---------------------------------------------------------------------------------------------
# The viewer frame


def object_depth(focal: float):
    """Camera depth of the viewer frame's origin for a crop focal length f (fraction of the width);
    works on floats and on arrays or tensors of them."""
    return focal * (1.0 + 2.0 * CROP_MARGIN)


def crop_pixel_width(image_size: int) -> float:
    """Width, in viewer units, of one pixel of an image_size crop at the viewer origin's depth
    (whatever the focal length: the crop always spans 1 + 2 CROP_MARGIN units there)."""
    return (1.0 + 2.0 * CROP_MARGIN) / image_size


def project_viewer(points: np.ndarray, image_size: int, focal: float = FOCAL) -> tuple[np.ndarray, np.ndarray]:
    """Viewer points (N, 3) -> crop pixel coordinates uv (N, 2) and camera depth (N,)."""
    q = points + np.array([0.0, 0.0, object_depth(focal)])
    uv = (q @ intrinsics(image_size, focal).T)[:, :2] / q[:, 2:3]
    return uv, q[:, 2]


def unproject_viewer(uv: np.ndarray, depth: np.ndarray, image_size: int, focal: float = FOCAL) -> np.ndarray:
    """Crop pixel coordinates uv (N, 2) at camera depth (N,) -> viewer points (N, 3)."""
    homogeneous = np.concatenate([uv, np.ones((len(uv), 1))], axis=1)
    q = np.linalg.solve(intrinsics(image_size, focal), homogeneous.T).T * depth[:, None]
    return q - np.array([0.0, 0.0, object_depth(focal)])


def crop_box(mask: np.ndarray, margin: float = CROP_MARGIN) -> tuple[int, int, int]:
    """(left, top, side) in pixels of the square crop around a mask (H, W) bool: centred on the
    mask's bounding box, side = its larger extent times (1 + 2 margin). May reach past the image.
    Raises ValueError for an empty mask."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        raise ValueError("the mask is empty")
    centre_x = (cols.min() + cols.max() + 1) / 2.0
    centre_y = (rows.min() + rows.max() + 1) / 2.0
    side = max(int(round(max(cols.max() - cols.min() + 1, rows.max() - rows.min() + 1) * (1.0 + 2.0 * margin))), 1)
    return int(round(centre_x - side / 2.0)), int(round(centre_y - side / 2.0)), side


def crop_centre(box: tuple[int, int, int]) -> tuple[float, float]:
    """(u, v) pixel coordinates of a crop box's centre (pixel centres at integers)."""
    left, top, side = box
    return left - 0.5 + side / 2.0, top - 0.5 + side / 2.0


def rotation_to_optical_axis(direction: np.ndarray) -> np.ndarray:
    """(3, 3) rotation R with R @ d / |d| = (0, 0, 1), the smallest such rotation (Rodrigues)."""
    d = direction / np.linalg.norm(direction)
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(d, z)
    sin, cos = np.linalg.norm(axis), float(d @ z)
    if sin < 1e-12:
        return np.eye(3) if cos > 0 else np.diag([1.0, -1.0, -1.0])
    k = axis / sin
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + sin * kx + (1.0 - cos) * kx @ kx


@dataclass(frozen=True)
class CropCamera:
    """The camera of a crop: it looks along the ray through the crop box's centre."""
    rotation: np.ndarray     # (3, 3) original camera frame -> the crop camera's frame
    focal: float             # focal length as a fraction of the crop's width


def crop_camera(camera_mat: np.ndarray, box: tuple[int, int, int]) -> CropCamera:
    """The crop camera of a crop box (left, top, side) in the pixels of the image that
    camera_mat (3, 3) describes."""
    u, v = crop_centre(box)
    rotation = rotation_to_optical_axis(np.linalg.solve(camera_mat, np.array([u, v, 1.0])))
    return CropCamera(rotation, float(camera_mat[0, 0] / box[2]))


def viewer_from_world(world_mat: np.ndarray, crop: CropCamera, object_centre: np.ndarray = np.zeros(3)) -> np.ndarray:
    """(4, 4) similarity from world points to the viewer frame of a crop of a view taken by
    world_mat (4, 4); object_centre (3,), in front of the camera, lands at viewer depth 0."""
    linear = crop.rotation @ world_mat[:3, :3]
    translation = crop.rotation @ world_mat[:3, 3]
    centre_depth = (linear @ object_centre + translation)[2]
    scale = object_depth(crop.focal) / centre_depth
    similarity = np.eye(4)
    similarity[:3, :3] = scale * linear
    # A scale about the camera and a shift along the axis keep every point on its pixel's ray.
    similarity[:3, 3] = scale * (translation - np.array([0.0, 0.0, centre_depth]))
    return similarity


def crop_rays(crop: CropCamera, size: int) -> np.ndarray:
    """(size, size, 3) direction, in the original camera's frame, of the crop camera's ray through
    each crop pixel's centre, scaled to unit depth in the crop camera."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    rays = np.stack([cols, rows, np.ones_like(rows)], axis=-1) @ np.linalg.inv(intrinsics(size, crop.focal)).T
    return rays @ crop.rotation            # R^T d, row-wise


def crop_source_pixels(camera_mat: np.ndarray, crop: CropCamera, size: int) -> np.ndarray:
    """(size, size, 2) pixel coordinates (u, v) in the original image of each crop pixel's centre:
    the crop camera's ray through it, rotated back into the original camera."""
    projected = crop_rays(crop, size) @ camera_mat.T
    return projected[..., :2] / projected[..., 2:3]


def crop_viewer_depth(depth: np.ndarray, world_mat: np.ndarray, camera_mat: np.ndarray, crop: CropCamera,
                      size: int) -> np.ndarray:
    """A depth map (H, W) of camera z in the original image -> (size, size) viewer z of the same
    surface along each crop pixel's ray (viewer_from_world with the object's centre at the world
    origin); the original pixel nearest to where the ray meets the image; NaN where the map has
    no surface (inf) or the ray leaves the image."""
    rays = crop_rays(crop, size)
    projected = rays @ camera_mat.T
    cols = np.rint(projected[..., 0] / projected[..., 2]).astype(np.int64)
    rows = np.rint(projected[..., 1] / projected[..., 2]).astype(np.int64)
    inside = (rows >= 0) & (rows < depth.shape[0]) & (cols >= 0) & (cols < depth.shape[1])
    z = np.full((size, size), np.nan)
    z[inside] = depth[rows[inside], cols[inside]]
    z[~np.isfinite(z)] = np.nan
    # A point at camera z on a ray of depth rays_z in the original camera lies at z / rays_z
    # along the crop camera's axis; the viewer frame scales that about the camera (viewer_from_world).
    centre_depth = (crop.rotation @ world_mat[:3, 3])[2]
    return object_depth(crop.focal) * (z / rays[..., 2] / centre_depth - 1.0)


def source_pixels_of_viewer_points(points: np.ndarray, camera_mat: np.ndarray, crop: CropCamera) -> np.ndarray:
    """Viewer points (N, 3) of a crop -> (N, 2) pixel coordinates (u, v) in the original image
    that camera_mat (3, 3) describes: the crop camera's frame rotated back into the original's."""
    q = points + np.array([0.0, 0.0, object_depth(crop.focal)])
    projected = (q @ crop.rotation) @ camera_mat.T
    return projected[:, :2] / projected[:, 2:3]


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (4, 4) affine matrix to points (N, 3)."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def up_in_viewer(similarity: np.ndarray, world_up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """Unit (3,) direction of the world's up axis in the viewer frame of a similarity (4, 4)."""
    up = similarity[:3, :3] @ world_up
    return up / np.linalg.norm(up)


def elevation_of_up(up: np.ndarray) -> float:
    """Camera elevation in radians (positive: looking down on the object) from the world's up
    direction (3,) in the viewer frame (OpenCV axes: up is roughly -y)."""
    return float(math.asin(np.clip(-up[2], -1.0, 1.0)))


def blender_from_viewer(up: np.ndarray) -> np.ndarray:
    """(3, 3) rotation from the viewer frame to Blender's world (z up) such that Blender's Front
    view (numpad 1: looking along +y, x right) shows the object as the picture did, upright.
    up (3,): the world's up direction in the viewer frame (predicted for a photo)."""
    up = up / np.linalg.norm(up)
    forward = np.array([0.0, 0.0, 1.0]) - up[2] * up
    if np.linalg.norm(forward) < 1e-6:          # looking straight down: keep the picture's y as depth
        forward = np.array([0.0, 1.0, 0.0]) - up[1] * up
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    return np.stack([right, forward, up])       # rows: Blender x, y, z in viewer coordinates
