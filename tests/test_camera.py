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
