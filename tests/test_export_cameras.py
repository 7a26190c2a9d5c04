"""Export Cameras for DVR (blender_occnet/export_cameras.py) in bpy: the folder it writes is a
training input of training.posed_images, in the one camera convention of backend.camera."""

import itertools
import json

import numpy as np
import pytest
from scipy.spatial import Delaunay

from conftest import import_bpy

bpy = import_bpy()
import addon_utils  # noqa: E402  (ships with bpy)
from mathutils import Vector  # noqa: E402

from backend.camera import project  # noqa: E402
from training.posed_images import load_folder_views  # noqa: E402

ADDON = "blender_occnet"
WIDTH, HEIGHT = 48, 32
# (offset from the cube's centre, lens mm, shift_x): the last camera's frame is shifted right by a
# tenth of its width. The cube is off the origin, so a mirrored or shifted world would show.
CAMERAS = [((3.0, -3.0, 2.0), 50.0, 0.0), ((-2.5, -1.0, 3.5), 35.0, 0.0), ((0.5, 4.0, -1.0), 60.0, 0.1)]
CUBE_CENTRE = np.array([0.3, -0.2, 0.1])
CUBE_CORNERS = CUBE_CENTRE + np.array(list(itertools.product((-0.5, 0.5), repeat=3)))


@pytest.fixture(scope="module")
def cube_scene():
    """A unit cube and three cameras aimed at its centre, rendered by Workbench."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    assert addon_utils.enable(ADDON, default_set=True, handle_error=None) is not None
    scene = bpy.context.scene
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = WIDTH, HEIGHT, 100
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=tuple(CUBE_CENTRE))
    for number, (offset, lens, shift_x) in enumerate(CAMERAS):
        data = bpy.data.cameras.new(f"cam{number}")
        data.lens, data.shift_x = lens, shift_x
        camera = bpy.data.objects.new(f"cam{number}", data)
        camera.location = CUBE_CENTRE + offset
        camera.rotation_euler = (-Vector(offset)).to_track_quat("-Z", "Y").to_euler()
        scene.collection.objects.link(camera)
    yield scene
    addon_utils.disable(ADDON, default_set=True)


def test_exported_folder_loads_and_its_cameras_see_the_cube_where_it_was_rendered(cube_scene, tmp_path):
    assert bpy.ops.occnet.export_cameras("EXEC_DEFAULT", directory=str(tmp_path)) == {"FINISHED"}
    views = load_folder_views(tmp_path)
    assert len(views) == 3 and views.masks.shape == (3, HEIGHT, WIDTH)
    names = [view["camera"] for view in json.loads((tmp_path / "cameras.json").read_text())["views"]]
    assert names == ["cam0", "cam1", "cam2"]
    for world_mat, camera_mat, mask, (_, _, shift_x) in zip(views.world_mats, views.camera_mats, views.masks, CAMERAS):
        (u, v), = project(world_mat, camera_mat, CUBE_CENTRE[None])[0]
        np.testing.assert_allclose([u, v], [(WIDTH - 1) / 2 - shift_x * WIDTH, (HEIGHT - 1) / 2], atol=1e-4)
        # the rendered silhouette is the convex hull of the projected corners, up to its rim pixels
        corners, depth = project(world_mat, camera_mat, CUBE_CORNERS)
        assert (depth > 0).all()
        cols, rows = np.meshgrid(np.arange(WIDTH), np.arange(HEIGHT))
        hull = Delaunay(corners).find_simplex(np.stack([cols.ravel(), rows.ravel()], 1)).reshape(HEIGHT, WIDTH) >= 0
        assert (hull & mask).sum() / (hull | mask).sum() > 0.97
    assert cube_scene.render.film_transparent is False and cube_scene.camera is None  # settings restored


def test_selected_cameras_only_and_without_renders(cube_scene, tmp_path):
    for obj in cube_scene.objects:
        obj.select_set(obj.name == "cam1")
    res = bpy.ops.occnet.export_cameras("EXEC_DEFAULT", directory=str(tmp_path), selected_only=True, render=False)
    assert res == {"FINISHED"}
    views = json.loads((tmp_path / "cameras.json").read_text())["views"]
    assert [view["camera"] for view in views] == ["cam1"] and not list(tmp_path.glob("*.png"))


def test_no_camera_is_reported(cube_scene, tmp_path):
    for obj in cube_scene.objects:
        obj.select_set(obj.type == "MESH")
    with pytest.raises(RuntimeError, match="Select at least one camera"):
        bpy.ops.occnet.export_cameras("EXEC_DEFAULT", directory=str(tmp_path), selected_only=True)
