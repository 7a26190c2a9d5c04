"""Tests of training.prepare / meshprep / render on tiny meshes written into tmp_path."""

from __future__ import annotations

import importlib.util
import json
import os
import signal

import numpy as np
import pytest
import trimesh

from backend import camera
from training import meshprep, prepare, render
from training.dataset import viewer_view

SPHERE_RADIUS = 0.4  # in file units; normalisation maps the sphere's bounding box to edge 1
POINTS = 4000


def write_meshes(folder):
    """A watertight sphere, the same sphere with a cap cut off, a NaN mesh and an unreadable file."""
    folder.mkdir(parents=True)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=SPHERE_RADIUS)
    # Shift it so normalisation has to move it back (center must be recorded and applied).
    sphere.apply_translation([3.0, -1.0, 0.5])
    sphere.export(folder / "sphere.obj")
    open_sphere = sphere.copy()
    centroids_z = open_sphere.triangles_center[:, 2] - 0.5
    open_sphere.update_faces(centroids_z < 0.8 * SPHERE_RADIUS)  # a hole of ~37 degrees half-angle
    assert not open_sphere.is_watertight
    open_sphere.export(folder / "open_sphere.ply")
    (folder / "nan.obj").write_text("v 0 0 0\nv nan 1 0\nv 0 0 1\nv 1 1 1\nf 1 2 3\nf 1 3 4\n")
    (folder / "unreadable.off").write_text("this is not an OFF file\n")
    return folder


def run_prepare(mesh_dir, out_dir, *extra):
    argv = [str(mesh_dir), str(out_dir), "--workers", "2", "--points", str(POINTS), *extra]
    assert prepare.main(argv) == 0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    mesh_dir = write_meshes(root / "toys")
    out_dir = root / "out"
    run_prepare(mesh_dir, out_dir, "--views", "0")
    return mesh_dir, out_dir


def canonical_sphere(shape_dir):
    """Centre (3,) and radius of the true sphere in the shape's canonical coordinates."""
    info = json.loads((shape_dir / "shape.json").read_text())
    return (np.array([3.0, -1.0, 0.5]) - np.array(info["center"])) / info["scale"], SPHERE_RADIUS / info["scale"]


def analytic_signed_distance(shape_dir, points):
    """Signed distance (N,) of canonical points (N, 3) to the true sphere the toy meshes approximate."""
    centre, radius = canonical_sphere(shape_dir)
    return np.linalg.norm(points - centre, axis=1) - radius


@pytest.mark.parametrize("shape_id", ["toys_sphere", "toys_open_sphere"])
def test_occupancy_matches_analytic_sphere(prepared, shape_id):
    _, out_dir = prepared
    with np.load(out_dir / shape_id / "points.npz") as data:
        for points_key, occupancy_key in (("points", "occupancies"), ("near_points", "near_occupancies")):
            points = data[points_key]
            assert points.dtype == np.float16 and points.shape == (POINTS, 3)
            assert data[occupancy_key].dtype == np.uint8
            occupied = np.unpackbits(data[occupancy_key])[:POINTS].astype(bool)
            distance = analytic_signed_distance(out_dir / shape_id, points.astype(np.float64))
            # The icosphere's flat facets sit up to ~0.003 inside the true sphere: judge away from it.
            away = np.abs(distance) > 0.02
            assert away.sum() > POINTS // 4
            agreement = np.mean(occupied[away] == (distance[away] < 0))
            assert agreement > 0.98, f"{shape_id} {points_key}: only {agreement:.3f} agree"
        assert np.abs(data["points"]).max() <= np.float16(0.55)


def test_near_points_straddle_the_surface(prepared):
    _, out_dir = prepared
    with np.load(out_dir / "toys_sphere" / "points.npz") as data:
        distance = analytic_signed_distance(out_dir / "toys_sphere", data["near_points"].astype(np.float64))
        occupied = np.unpackbits(data["near_occupancies"])[:POINTS]
    assert np.median(np.abs(distance)) < 0.03
    assert 0.3 < occupied.mean() < 0.7


def test_near_sigmas_set_how_far_the_near_points_stray_and_are_recorded(tmp_path):
    """--near-sigmas 0.003: every near-surface sample within a few sigma of the sphere (the default
    0.01 and 0.03 stray ten times as far), labelled by the side it fell on; meta.json says so, and
    a later run into the same folder with other sigmas is refused before it writes anything."""
    mesh_dir = tmp_path / "toys"
    mesh_dir.mkdir()
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=SPHERE_RADIUS)
    sphere.apply_translation([3.0, -1.0, 0.5])  # where analytic_signed_distance expects it
    sphere.export(mesh_dir / "sphere.obj")
    run_prepare(mesh_dir, tmp_path / "out", "--views", "0", "--near-sigmas", "0.003")
    shape_dir = tmp_path / "out" / "toys_sphere"
    with np.load(shape_dir / "points.npz") as data:
        distance = analytic_signed_distance(shape_dir, data["near_points"].astype(np.float64))
        occupied = np.unpackbits(data["near_occupancies"])[:POINTS].astype(bool)
    # sphere radius 0.5 in canonical units: the facets sit within 0.001 of it
    assert np.abs(distance).max() < 6 * 0.003 + 0.002
    assert 0.0012 < np.median(np.abs(distance)) < 0.003  # 0.67 sigma along the normal
    clear = np.abs(distance) > 0.002
    assert np.mean(occupied[clear] == (distance[clear] < 0)) > 0.98
    meta = tmp_path / "out" / "meta.json"
    assert json.loads(meta.read_text())["near_sigmas"] == [0.003]

    before = meta.read_text()
    (mesh_dir / "second.obj").write_bytes((mesh_dir / "sphere.obj").read_bytes())
    assert prepare.main([str(mesh_dir), str(tmp_path / "out"), "--views", "0", "--points", str(POINTS)]) == 2
    assert meta.read_text() == before and not (tmp_path / "out" / "toys_second").exists()


def test_surface_points_normals_and_shape_json(prepared):
    _, out_dir = prepared
    for shape_id, watertight in (("toys_sphere", True), ("toys_open_sphere", False)):
        info = json.loads((out_dir / shape_id / "shape.json").read_text())
        assert info["id"] == shape_id and info["class"] == "toys"
        assert info["watertight_input"] is watertight
        with np.load(out_dir / shape_id / "pointcloud.npz") as cloud:
            points, normals = cloud["points"], cloud["normals"]
        assert points.dtype == np.float32 and points.shape == (POINTS, 3)
        assert np.abs(analytic_signed_distance(out_dir / shape_id, points.astype(np.float64))).max() < 0.01
        assert np.allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-4)
        outward = points - canonical_sphere(out_dir / shape_id)[0]
        assert np.mean(np.sum(outward * normals, axis=1) > 0) > 0.99
        assert np.abs(points).max() <= 0.5 + 1e-5


def test_broken_meshes_end_in_failures_json(prepared):
    _, out_dir = prepared
    failures = {f["id"]: f for f in json.loads((out_dir / "failures.json").read_text())}
    assert set(failures) == {"toys_nan", "toys_unreadable"}
    assert "NaN" in failures["toys_nan"]["error"]
    assert failures["toys_unreadable"]["source"].endswith("unreadable.off")
    assert not (out_dir / "toys_nan").exists()


def test_split_files_cover_completed_shapes_once(prepared):
    _, out_dir = prepared
    listed = {name: (out_dir / "split" / f"{name}.txt").read_text().split() for name in prepare.SPLIT_NAMES}
    all_ids = sum(listed.values(), [])
    assert sorted(all_ids) == ["toys_open_sphere", "toys_sphere"]
    for name, ids in listed.items():
        assert all(prepare.split_of(i) == name for i in ids)
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["format"] == 1 and meta["points_per_shape"] == POINTS and meta["views"] == 0


def test_split_is_deterministic_and_roughly_80_10_10():
    ids = [f"blocks_{i:03d}" for i in range(2000)]
    counts = {name: sum(prepare.split_of(i) == name for i in ids) for name in prepare.SPLIT_NAMES}
    assert 1500 < counts["train"] < 1700 and 130 < counts["val"] < 270 and 130 < counts["test"] < 270
    # Pinned: a change of the hash would silently move shapes between splits of one dataset.
    assert [prepare.split_of(i) for i in ("blocks_006", "blocks_007", "blocks_008", "capod_m1")] == [
        "train", "val", "test", "train"]


def test_second_run_skips_completed_shapes(prepared, capsys):
    mesh_dir, out_dir = prepared
    points_file = out_dir / "toys_sphere" / "points.npz"
    before = points_file.stat().st_mtime_ns
    run_prepare(mesh_dir, out_dir, "--views", "0")
    assert points_file.stat().st_mtime_ns == before
    # Only the two broken files are attempted again.
    assert "2 already complete, 2 to process" in capsys.readouterr().err


def test_find_sources_classes_limits_and_recursion(tmp_path):
    capod = tmp_path / "capod"
    (capod / "class1").mkdir(parents=True)
    (capod / "class2").mkdir()
    (capod / "CAPOD.cla").write_text("PSB 1\n2 3\n\nHuman 0 2\n1\n2\n\nChair 0 1\n3\n")
    for folder, stem in (("class1", "m1"), ("class1", "m2"), ("class2", "m3")):
        (capod / folder / f"{stem}.obj").write_text("")
    blocks = tmp_path / "blocks"
    (blocks / "sub").mkdir(parents=True)
    for stem in ("000", "001", "002"):
        (blocks / "sub" / f"{stem}.OBJ").write_text("")
    (blocks / "notes.txt").write_text("")
    sources, failures = prepare.find_sources([capod, blocks], max_per_dir=2)
    assert failures == []
    assert [(s.id, s.class_name) for s in sources] == [
        ("capod_m1", "Human"), ("capod_m2", "Human"), ("blocks_000", "block"), ("blocks_001", "block")]
    sources, _ = prepare.find_sources([capod], max_per_dir=None)
    assert sources[-1].class_name == "Chair"


def test_mesh_validation_messages():
    faces = np.array([[0, 1, 2]])
    with pytest.raises(meshprep.MeshError, match="NaN"):
        meshprep.validate_mesh(np.array([[0, 0, 0], [np.inf, 0, 0], [0, 1, 0.0]]), faces)
    with pytest.raises(meshprep.MeshError, match="no triangles"):
        meshprep.validate_mesh(np.zeros((3, 3)), np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(meshprep.MeshError, match="out of range"):
        meshprep.validate_mesh(np.zeros((3, 3)), np.array([[0, 1, 3]]))


def test_glb_scene_is_merged_into_one_mesh(tmp_path):
    box = trimesh.creation.box()
    ball = trimesh.creation.icosphere(subdivisions=1).apply_translation([3.0, 0.0, 0.0])
    trimesh.Scene([box, ball]).export(tmp_path / "two.glb")
    vertices, faces = meshprep.load_mesh(tmp_path / "two.glb")
    assert len(faces) == len(box.faces) + len(ball.faces)
    assert np.allclose(vertices.min(axis=0), [-0.5, -1.0, -1.0]) and np.allclose(vertices.max(axis=0), [4.0, 1.0, 1.0])


def test_inverted_mesh_still_has_inside():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    queries = np.array([[0.0, 0.0, 0.0], [0.1, 0.1, 0.0], [0.45, 0.0, 0.0]])
    expected = [True, True, False]
    assert list(meshprep.inside(sphere.vertices, sphere.faces, queries)) == expected
    assert list(meshprep.inside(sphere.vertices, sphere.faces[:, ::-1], queries)) == expected


def crash_on_two(task):
    """Worker function for the pool test: task 2 dies like a segfaulting native library."""
    if task == 2:
        os.kill(os.getpid(), signal.SIGSEGV)
    if task == 3:
        raise ValueError("bad task")
    return task * 10


def test_pool_survives_a_segfaulting_worker():
    results = {task: (ok, value) for task, ok, value in prepare.run_isolated(crash_on_two, [1, 2, 3, 4, 5], workers=2)}
    assert results[1] == (True, 10) and results[4] == (True, 40) and results[5] == (True, 50)
    assert results[2][0] is False and "SIGSEGV" in results[2][1]
    assert results[3] == (False, "ValueError: bad task")


def test_camera_projection_and_rays_agree():
    world_mats, camera_mats = render.random_cameras(np.random.default_rng(1), 5, 64)
    points = np.random.default_rng(2).uniform(-0.5, 0.5, (100, 3))
    for world_mat, camera_mat in zip(world_mats, camera_mats):
        assert np.allclose(world_mat[:3, :3] @ world_mat[:3, :3].T, np.eye(3))
        uv, z = camera.project(world_mat, camera_mat, np.zeros((1, 3)))
        assert np.allclose(uv, 31.5)
        assert np.isclose(z[0], camera.fitting_distance(camera_mat[0, 0] / 64)), "each lens has its own distance"
        uv, z = camera.project(world_mat, camera_mat, points)
        assert (uv > -0.5).all() and (uv < 63.5).all(), "the canonical box must stay in the frame"
        origin, directions = camera.pixel_rays(world_mat, camera_mat, uv[:, ::-1])
        # Each point lies on the ray through its own projection.
        along = (points - origin) @ directions.T
        closest = origin + np.diag(along)[:, None] * directions
        assert np.allclose(closest, points, atol=1e-9)
        # The camera's up (-y in OpenCV) is the canonical +z, projected.
        assert world_mat[1, 2] < 0
    focal_fractions = camera_mats[:, 0, 0] / 64
    assert len(np.unique(focal_fractions)) == 5, "focal lengths are jittered"
    lo, hi = render.FOCAL_FRACTION_RANGE
    assert ((focal_fractions >= lo) & (focal_fractions <= hi)).all()


def test_gltf_meshes_are_turned_from_y_up_to_z_up(tmp_path):
    tall = trimesh.creation.box(extents=[0.2, 1.0, 0.3])    # tall along glTF's up axis, y
    tall.export(tmp_path / "tall.glb")
    vertices, _ = meshprep.load_mesh(tmp_path / "tall.glb")
    extents = vertices.max(axis=0) - vertices.min(axis=0)
    assert np.allclose(extents, [0.2, 0.3, 1.0]), "the tall axis must become z, Blender's up"


def write_ell(folder):
    """An asymmetric shape (a bar and a block floating over one end), so a flipped or rotated
    camera shows. Separate parts: overlapping ones would put hidden faces inside the solid."""
    bar = trimesh.creation.box(extents=[1.0, 0.25, 0.25])
    block = trimesh.creation.box(extents=[0.3, 0.3, 0.5], transform=trimesh.transformations.translation_matrix([0.35, 0.0, 0.5]))
    trimesh.util.concatenate([bar, block]).export(folder / "ell.stl")


@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy (Blender as a Python module) is not installed")
def test_render_stage_adds_views_consistent_with_cameras(tmp_path):
    mesh_dir = write_meshes(tmp_path / "toys")
    write_ell(mesh_dir)
    out_dir = tmp_path / "out"
    run_prepare(mesh_dir, out_dir, "--views", "0")
    points_mtime = (out_dir / "toys_sphere" / "points.npz").stat().st_mtime_ns
    size, views = 64, 2
    run_prepare(mesh_dir, out_dir, "--views", str(views), "--image-size", str(size))
    assert (out_dir / "toys_sphere" / "points.npz").stat().st_mtime_ns == points_mtime, "render stage must not resample"

    from PIL import Image

    for shape_id in ("toys_sphere", "toys_open_sphere", "toys_ell"):
        shape_dir = out_dir / shape_id
        with np.load(shape_dir / "cameras.npz") as cameras:
            world_mats, camera_mats = cameras["world_mat"].astype(np.float64), cameras["camera_mat"].astype(np.float64)
        with np.load(shape_dir / "depth.npz") as data:
            depth = data["depth"]
        with np.load(shape_dir / "pointcloud.npz") as cloud:
            surface, normals = cloud["points"].astype(np.float64), cloud["normals"].astype(np.float64)
        assert world_mats.shape == (views, 4, 4) and camera_mats.shape == (views, 3, 3)
        assert depth.dtype == np.float16 and depth.shape == (views, size, size)
        for view in range(views):
            image = np.asarray(Image.open(shape_dir / "images" / f"{view:03d}.png"))
            assert image.shape == (size, size, 4) and image.dtype == np.uint8
            mask = image[:, :, 3] > 0
            assert 0.05 < mask.mean() < 0.9
            assert np.isinf(depth[view][~mask]).all()
            uv, z = camera.project(world_mats[view], camera_mats[view], surface)
            col, row = np.round(uv).astype(int).T
            # Every surface point projects into the silhouette Blender drew: same camera.
            assert mask[row, col].mean() > 0.995, f"{shape_id} view {view}: points outside the mask"
            camera_centre = -world_mats[view, :3, :3].T @ world_mats[view, :3, 3]
            to_camera = camera_centre - surface
            facing = np.sum(normals * to_camera, axis=1) / np.linalg.norm(to_camera, axis=1) > 0.8
            # The depth map holds the nearest surface: never behind a facing point (3x3 minimum,
            # since near a depth edge such as the hole's rim the pixel centre may see past it),
            # and equal to it for most points facing the camera (others are hidden by parts).
            nearest_around = np.min([np.roll(depth[view], (dr, dc), (0, 1)) for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=0)
            assert np.mean(nearest_around[row[facing], col[facing]] <= z[facing] + 0.03) > 0.995
            pixel_depth = depth[view][row[facing], col[facing]].astype(np.float64)
            assert np.median(np.abs(pixel_depth - z[facing])) < 0.01
            # Colour is not flat: the scene is lit.
            assert image[mask][:, :3].astype(float).std() > 3
            # The viewer-centred crop of this view (what an image model sees and predicts in):
            # every surface point lands inside the crop's mask, through the crop's own camera.
            seen = viewer_view(image.astype(np.float32) / 255.0, world_mats[view], camera_mats[view], 48)
            uv, _ = camera.project_viewer(camera.transform_points(seen.similarity, surface), 48, seen.crop.focal)
            col, row = np.clip(np.round(uv).astype(int), 0, 47).T
            assert (seen.premultiplied[row, col, 3] > 0.25).mean() > 0.99
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["views"] == views and meta["image_size"] == size

    # The back depth: where each pixel's ray last leaves the shape. For the sphere, the far end of
    # the chord its ray cuts.
    shape_dir = out_dir / "toys_sphere"
    with np.load(shape_dir / "cameras.npz") as cameras, np.load(shape_dir / "depth.npz") as data:
        world_mats, camera_mats = cameras["world_mat"].astype(np.float64), cameras["camera_mat"].astype(np.float64)
        front, back = data["depth"].astype(np.float64), data["back"].astype(np.float64)
    centre, radius = canonical_sphere(shape_dir)
    for view in range(views):
        seen = np.isfinite(front[view])
        assert (np.isfinite(back[view]) == seen).all() and (back[view][seen] >= front[view][seen]).all()
        pixels = np.argwhere(seen).astype(np.float64)
        origin, directions = camera.pixel_rays(world_mats[view], camera_mats[view], pixels)
        offset = origin - centre
        b = directions @ offset
        leave = -b + np.sqrt(np.maximum(b ** 2 - (offset @ offset - radius ** 2), 0.0))
        far_z = leave * (directions @ world_mats[view, 2, :3])
        assert np.median(np.abs(back[view][seen] - far_z)) < 0.01

    # What a viewer-centred model with a layer head trains on: both layers through its crop, known
    # where the crop's mask is, the sphere's centre (the viewer origin) between them.
    from training.dataset import OccupancyDataset, SamplingConfig, ShapeStore

    store = ShapeStore(out_dir, ["toys_sphere"], surface=False, images=True, layers=True)
    example = OccupancyDataset(store, SamplingConfig(input_kind="image", image_size=32, frame="viewer",
                                                     layers=True, view=0))[0]
    layers, mask = example["layers"].numpy(), example["mask"].numpy()
    known = np.isfinite(layers[0])
    assert layers.shape == (2, 32, 32) and (known == np.isfinite(layers[1])).all()
    assert (known == mask).mean() > 0.95
    middle = (15, 15)
    assert layers[0][middle] < -0.3 and layers[1][middle] > 0.3       # a ball of viewer radius ~0.43

    # Renders made before the back depth existed gain it from a second run, images untouched.
    images_mtime = (shape_dir / "images" / "000.png").stat().st_mtime_ns
    np.savez(shape_dir / "depth.npz", depth=front.astype(np.float16))
    run_prepare(mesh_dir, out_dir, "--views", str(views), "--image-size", str(size))
    with np.load(shape_dir / "depth.npz") as data:
        assert np.array_equal(data["back"].astype(np.float64), back) and np.array_equal(data["depth"], front)
    assert (shape_dir / "images" / "000.png").stat().st_mtime_ns == images_mtime

    # Each view's look, and its colours at surface points (the hidden side's too: a texture head's
    # target). Renders made before looks were kept gain them by replaying the render seed: the
    # same looks, colours and points, images untouched.
    with np.load(shape_dir / "looks.npz") as data:
        recorded = {key: data[key] for key in data.files}
    drawn = json.loads(str(recorded["looks"]))
    assert len(drawn) == views and all(look["lighting"] in ("STUDIO", "MATCAP", "FLAT") for look in drawn)
    assert recorded["points"].shape == (prepare.LOOK_POINTS, 3)
    assert np.abs(analytic_signed_distance(shape_dir, recorded["points"].astype(np.float64))).max() < 0.02
    assert recorded["colours"].shape == (views, prepare.LOOK_POINTS, 3) and recorded["colours"].dtype == np.uint8
    (shape_dir / "looks.npz").unlink()
    run_prepare(mesh_dir, out_dir, "--views", str(views), "--image-size", str(size))
    with np.load(shape_dir / "looks.npz") as data:
        assert all(np.array_equal(data[key], value) for key, value in recorded.items())
    assert (shape_dir / "images" / "000.png").stat().st_mtime_ns == images_mtime


def test_an_open_sheet_is_told_from_a_solid_by_its_near_surface_samples(tmp_path):
    """training.dataset.near_inside_fraction, which training uses to leave out open sheets: about a
    half of a solid's near-surface samples are inside, almost none of a flat open sheet's."""
    from training.dataset import near_inside_fraction

    folder = tmp_path / "toys"
    folder.mkdir()
    trimesh.creation.icosphere(subdivisions=3, radius=0.4).export(folder / "ball.obj")
    sheet = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    sheet.export(folder / "sheet.obj")
    run_prepare(folder, tmp_path / "out", "--views", "0")
    assert 0.4 < near_inside_fraction(tmp_path / "out" / "toys_ball") < 0.6
    assert near_inside_fraction(tmp_path / "out" / "toys_sheet") < 0.05


def test_only_prepared_adds_stages_to_the_shapes_there_and_no_new_ones(tmp_path):
    folder = tmp_path / "toys"
    folder.mkdir()
    trimesh.creation.icosphere(subdivisions=2, radius=0.4).export(folder / "ball.obj")
    out_dir = tmp_path / "out"
    run_prepare(folder, out_dir, "--views", "0")
    trimesh.creation.box(extents=(0.5, 0.4, 0.3)).export(folder / "box.obj")

    run_prepare(folder, out_dir, "--views", "1", "--image-size", "32", "--only-prepared")

    assert (out_dir / "toys_ball" / "looks.npz").is_file() and (out_dir / "toys_ball" / "depth.npz").is_file()
    assert not (out_dir / "toys_box").exists()


def test_workers_render_when_the_calling_process_has_imported_bpy(tmp_path):
    """bpy puts Blender's script folders on sys.path, which spawned workers inherit; the pool
    starts them without those, or their own `import bpy` fails."""
    pytest.importorskip("bpy")
    import bpy  # noqa: F401

    folder = tmp_path / "toys"
    folder.mkdir()
    trimesh.creation.icosphere(subdivisions=2, radius=0.4).export(folder / "ball.obj")
    run_prepare(folder, tmp_path / "out", "--views", "1", "--image-size", "32")
    assert (tmp_path / "out" / "toys_ball" / "depth.npz").is_file()
    assert json.loads((tmp_path / "out" / "failures.json").read_text()) == []
