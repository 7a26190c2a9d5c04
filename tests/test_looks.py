"""A render's look is data: a flat-lit Workbench render shows exactly the albedo training.looks
computes at the surface point each pixel sees, for every kind of look the renders use."""

import numpy as np
import pytest
import trimesh

from backend import camera
from training import looks, render

SIZE = 192
PALETTE = ((0.8, 0.1, 0.05), (0.05, 0.3, 0.9))
PATTERNS = {
    "single colour": None,
    "stripes": looks.Pattern("stripes", PALETTE, direction=(0.0, 0.6, 0.8), frequency=12.0),
    "blobs": looks.Pattern("blobs", PALETTE, centres=tuple(map(tuple, np.random.default_rng(0).uniform(-0.5, 0.5, (6, 3))))),
    "faces": looks.Pattern("faces", PALETTE, face_seed=5),
}


@pytest.fixture(scope="module")
def renderer():
    pytest.importorskip("bpy")
    renderer = render.BlenderRenderer(SIZE)
    renderer.scene.display.render_aa = "OFF"  # each pixel one surface point, not a blend of several
    return renderer


@pytest.mark.parametrize("name", list(PATTERNS))
def test_flat_render_shows_the_looks_albedo(renderer, name, tmp_path):
    from mathutils import Matrix, Vector
    from mathutils.bvhtree import BVHTree
    from PIL import Image

    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.45)  # large faces: corner colours blend
    look = looks.Look("FLAT", -1, 0.0, (0.2, 0.7, 0.3), PATTERNS[name], False, False, False, 0.5)
    world_mats, camera_mats = render.random_cameras(np.random.default_rng(3), 1, SIZE)
    renderer.set_mesh(np.asarray(ball.vertices), np.asarray(ball.faces))
    renderer.apply_look(look)
    renderer.camera.data.lens = float(camera_mats[0][0, 0] / SIZE * render.SENSOR_MM)
    renderer.camera.matrix_world = Matrix(np.linalg.inv(render.BLENDER_FROM_OPENCV @ world_mats[0]).tolist())
    renderer.scene.render.filepath = str(tmp_path / "flat.png")
    renderer.bpy.ops.render.render(write_still=True)
    picture = np.asarray(Image.open(tmp_path / "flat.png")).astype(np.float64) / 255.0

    covered = np.argwhere(picture[:, :, 3] == 1.0)
    origin, directions = camera.pixel_rays(world_mats[0], camera_mats[0], covered.astype(np.float64))
    polygons = renderer.polygons()
    tree = BVHTree.FromPolygons(np.asarray(ball.vertices).tolist(), polygons.tolist(), all_triangles=True)
    hits = [tree.ray_cast(Vector(origin), Vector(d)) for d in directions.tolist()]
    seen = np.array([h[0] is not None for h in hits])
    points = np.array([tuple(h[0]) for h, s in zip(hits, seen) if s])
    faces = np.array([h[2] for h, s in zip(hits, seen) if s])
    expected = looks.albedo(look, points, np.asarray(ball.vertices)[polygons[faces]], faces, len(polygons))

    shown = picture[covered[seen, 0], covered[seen, 1], :3]
    # All but a few pixels whose ray passes within rounding of a stripe's or a blob's edge.
    assert seen.mean() > 0.99 and np.mean(np.abs(shown - expected).max(axis=1) < 0.02) > 0.97
