"""The camera contract (backend.camera, docs/CONTRACTS.md "Cameras"): every conversion between a
render's camera, an image model's crop and viewer frame, and Blender's axes, checked by round trips."""

import math

import numpy as np
import pytest

from backend import camera


def random_view(rng, focal_fraction=1.4, size=224, elevation_deg=30.0):
    """A look_at camera around the origin, like training.render's, and its intrinsics."""
    azimuth, elevation = rng.uniform(0, 2 * np.pi), math.radians(elevation_deg)
    distance = camera.fitting_distance(focal_fraction)
    eye = distance * np.array([math.cos(elevation) * math.cos(azimuth),
                               math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
    return camera.look_at(eye), camera.intrinsics(size, focal_fraction)


def test_projecting_and_unprojecting_a_viewer_point_gives_it_back():
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.6, 0.6, (100, 3))
    for focal in (0.9, camera.FOCAL, 4.0):
        uv, depth = camera.project_viewer(points, 128, focal)
        assert np.allclose(camera.unproject_viewer(uv, depth, 128, focal), points)


def test_the_viewer_origin_projects_to_the_crop_centre_at_the_object_depth():
    uv, depth = camera.project_viewer(np.zeros((1, 3)), 128, 2.0)
    assert np.allclose(uv, 63.5) and np.isclose(depth[0], camera.object_depth(2.0))


@pytest.mark.parametrize("focal", [0.9, 1.4, 2.2])
@pytest.mark.parametrize("box", [(40, 50, 120), (10, 80, 90), (100, 20, 130)])
def test_a_world_point_keeps_its_pixel_through_crop_and_viewer_frame(focal, box):
    """Crop pixel -> viewer point (at any depth) -> world -> the render's pixel: it must be the
    pixel that the crop was resampled from (crop_source_pixels), for off-centre crops too."""
    rng = np.random.default_rng(1)
    world_mat, camera_mat = random_view(rng, focal)
    crop = camera.crop_camera(camera_mat, box)
    similarity = camera.viewer_from_world(world_mat, crop)
    size = 32
    source = camera.crop_source_pixels(camera_mat, crop, size)
    rows, cols = np.mgrid[0:size, 0:size]
    uv_crop = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(float)
    for depth in (camera.object_depth(crop.focal) - 0.4, camera.object_depth(crop.focal) + 0.5):
        viewer = camera.unproject_viewer(uv_crop, np.full(len(uv_crop), depth), size, crop.focal)
        world = camera.transform_points(np.linalg.inv(similarity), viewer)
        uv_render, _ = camera.project(world_mat, camera_mat, world)
        assert np.allclose(uv_render, source.reshape(-1, 2), atol=1e-6)
        # and straight from the viewer frame, as the picture's colours are looked up
        assert np.allclose(camera.source_pixels_of_viewer_points(viewer, camera_mat, crop), uv_render, atol=1e-6)


def sphere_hits(origin, directions, centre, radius):
    """Distances (N,) along unit rays from origin (3,) in directions (N, 3) to where they enter
    and leave a sphere; NaN for rays that miss it."""
    offset = origin - centre
    b = directions @ offset
    disc = b ** 2 - (offset @ offset - radius ** 2)
    root = np.sqrt(np.where(disc > 0, disc, np.nan))
    return -b - root, -b + root


@pytest.mark.parametrize("box", [(60, 60, 110), (30, 70, 140)])
def test_depth_maps_seen_through_a_crop_hold_the_viewer_depths_of_the_same_surface(box):
    """A render's depth maps (camera z of where each pixel's ray enters and leaves a sphere)
    resampled through a crop (crop_viewer_depth) must give, at each crop pixel, the viewer z where
    that pixel's ray through the viewer frame meets the same sphere there."""
    rng = np.random.default_rng(5)
    size = 224
    world_mat, camera_mat = random_view(rng, 1.4, size=size)
    centre, radius = np.array([0.1, -0.05, 0.0]), 0.35
    rows, cols = np.mgrid[0:size, 0:size]
    origin, directions = camera.pixel_rays(world_mat, camera_mat, np.stack([rows.ravel(), cols.ravel()], 1).astype(float))
    enter, leave = sphere_hits(origin, directions, centre, radius)
    z_of_direction = directions @ world_mat[2, :3]           # camera z per unit distance along the ray
    front_map = np.where(np.isnan(enter), np.inf, enter * z_of_direction).reshape(size, size)
    back_map = np.where(np.isnan(leave), np.inf, leave * z_of_direction).reshape(size, size)

    crop = camera.crop_camera(camera_mat, box)
    similarity = camera.viewer_from_world(world_mat, crop)
    crop_size = 48
    front = camera.crop_viewer_depth(front_map, world_mat, camera_mat, crop, crop_size)
    back = camera.crop_viewer_depth(back_map, world_mat, camera_mat, crop, crop_size)

    # The same sphere in the viewer frame, met by the crop camera's rays.
    scale = np.cbrt(np.linalg.det(similarity[:3, :3]))
    viewer_centre = camera.transform_points(similarity, centre[None])[0]
    crop_rows, crop_cols = np.mgrid[0:crop_size, 0:crop_size]
    uv = np.stack([crop_cols.ravel(), crop_rows.ravel()], 1).astype(float)
    along = camera.unproject_viewer(uv, np.ones(len(uv)), crop_size, crop.focal) \
        + np.array([0.0, 0.0, camera.object_depth(crop.focal)])     # points at crop camera z = 1
    unit = along / np.linalg.norm(along, axis=1, keepdims=True)
    eye = np.array([0.0, 0.0, -camera.object_depth(crop.focal)])
    enter_v, leave_v = sphere_hits(eye, unit, viewer_centre, radius * scale)
    expected_front = (eye[2] + enter_v * unit[:, 2]).reshape(crop_size, crop_size)
    expected_back = (eye[2] + leave_v * unit[:, 2]).reshape(crop_size, crop_size)

    seen = np.isfinite(front) & np.isfinite(expected_front)
    assert seen.sum() > 0.2 * crop_size ** 2
    # Where one map sees the sphere and the other not, it is the rim: a pixel's width apart.
    assert np.mean(np.isfinite(front) == np.isfinite(expected_front)) > 0.97
    assert np.isfinite(back[seen]).all()
    # Nearest-pixel resampling: off by at most the surface's slope across half a source pixel.
    assert np.median(np.abs(front[seen] - expected_front[seen])) < 5e-3
    assert np.median(np.abs(back[seen] - expected_back[seen])) < 5e-3
    assert (back[seen] >= front[seen]).all()


def test_the_object_centre_lands_at_viewer_depth_zero_and_keeps_its_size_on_screen():
    rng = np.random.default_rng(2)
    world_mat, camera_mat = random_view(rng, 1.4)
    box = (62, 62, 100)
    crop = camera.crop_camera(camera_mat, box)
    similarity = camera.viewer_from_world(world_mat, crop, object_centre=np.zeros(3))
    assert np.isclose(camera.transform_points(similarity, np.zeros((1, 3)))[0, 2], 0.0)
    # A scale, no shear: the viewer frame is a similarity of the world.
    linear = similarity[:3, :3]
    gram = linear @ linear.T
    assert np.allclose(gram, gram[0, 0] * np.eye(3))


def test_crop_box_is_a_square_around_the_mask_with_its_margin():
    mask = np.zeros((100, 200), bool)
    mask[30:50, 60:140] = True           # 80 wide, 20 tall
    left, top, side = camera.crop_box(mask)
    assert side == round(80 * (1 + 2 * camera.CROP_MARGIN))
    assert camera.crop_centre((left, top, side)) == pytest.approx((99.5, 39.5), abs=0.5)
    with pytest.raises(ValueError, match="empty"):
        camera.crop_box(np.zeros((10, 10), bool))


@pytest.mark.parametrize("elevation_deg", [-10.0, 0.0, 35.0, 70.0])
def test_elevation_is_read_back_from_the_up_direction(elevation_deg):
    world_mat, camera_mat = random_view(np.random.default_rng(3), 1.4, elevation_deg=elevation_deg)
    crop = camera.crop_camera(camera_mat, (62, 62, 100))  # the centred crop: no extra tilt
    up = camera.up_in_viewer(camera.viewer_from_world(world_mat, crop))
    assert math.degrees(camera.elevation_of_up(up)) == pytest.approx(elevation_deg, abs=1e-6)


def test_blender_front_view_shows_the_picture_upright():
    # A level camera: picture right is Blender +x, picture up (-y in OpenCV) is +z, depth is +y.
    rotation = camera.blender_from_viewer(np.array([0.0, -1.0, 0.0]))
    assert np.allclose(rotation @ [1, 0, 0], [1, 0, 0])
    assert np.allclose(rotation @ [0, -1, 0], [0, 0, 1])
    assert np.allclose(rotation @ [0, 0, 1], [0, 1, 0])
    # Looking down at 40 degrees: the world's up still becomes +z, and it stays a rotation.
    up = np.array([0.0, -math.cos(math.radians(40)), -math.sin(math.radians(40))])
    rotation = camera.blender_from_viewer(up)
    assert np.allclose(rotation @ up, [0, 0, 1])
    assert np.allclose(rotation @ rotation.T, np.eye(3)) and np.isclose(np.linalg.det(rotation), 1.0)
    assert (rotation @ [1, 0, 0])[0] > 0.99       # picture right stays right


def test_render_cameras_keep_the_whole_canonical_box_in_frame():
    from training import render

    world_mats, camera_mats = render.random_cameras(np.random.default_rng(4), 50, 64)
    corners = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    for world_mat, camera_mat in zip(world_mats, camera_mats):
        uv, depth = camera.project(world_mat, camera_mat, corners)
        assert (depth > 0).all() and (uv > -0.5).all() and (uv < 63.5).all()
