"""Colours and placement of reconstructions from point clouds: vertex colours from the nearest
points (backend.colours), through the pipeline, the mesh files and the command line; survey
coordinates far from the origin land in place."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from backend.colours import transfer_cells, transfer_colours
from backend.mesh_io import save_mesh
from backend.pipeline import Reconstructor, ReconstructOptions
from conftest import make_octahedron_checkpoint

REPO = Path(__file__).resolve().parents[1]
SURVEY_OFFSET = np.array([412_345.678, 5_312_345.678, 231.5])  # UTM: 5 * 10^6 m north


@pytest.fixture(scope="module")
def octahedron(tmp_path_factory):
    return make_octahedron_checkpoint(tmp_path_factory.mktemp("ckpt") / "octa.safetensors", radius=0.4)


def colour_by_side(points: np.ndarray) -> np.ndarray:
    """(N, 3) colours: red where x is below the cloud's middle, blue above."""
    middle = (points[:, 0].min() + points[:, 0].max()) / 2
    return np.where((points[:, 0] < middle)[:, None], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]).astype(np.float32)


def sphere_points(n=3000, radius=5.0, center=(0.0, 0.0, 0.0), seed=0):
    directions = np.random.default_rng(seed).normal(size=(n, 3))
    return np.asarray(center) + radius * directions / np.linalg.norm(directions, axis=1, keepdims=True)


def test_each_vertex_takes_the_colour_of_its_nearest_points():
    points = sphere_points(20_000)
    colours = colour_by_side(points)
    vertices = np.array([[-5.0, 0, 0], [5.0, 0, 0], [-3, 4, 0], [3, 0, -4]])
    rgba = transfer_colours(vertices, points, colours)
    assert rgba.shape == (4, 4) and rgba.dtype == np.float32
    assert np.allclose(rgba, [[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 1], [0, 0, 1, 1]], atol=1e-6)


def test_colours_are_weighted_by_distance_between_two_points():
    points = np.array([[0.0, 0, 0], [1.0, 0, 0], [0, 5, 0], [0, 0, 5]])
    colours = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0]])
    rgba = transfer_colours(np.array([[0.25, 0, 0]]), points, colours, k=2)
    assert np.allclose(rgba[0, :3], [0.75, 0.25, 0.0], atol=1e-6)  # weights 1/0.25 and 1/0.75


def test_colour_detail_follows_the_mesh_grid():
    """Stripes one point wide survive a fine averaging grid and blend on the grid of a coarse mesh."""
    points = np.stack([np.arange(64) / 64.0, np.zeros(64), np.zeros(64)], axis=1)
    colours = np.zeros((64, 3))
    colours[::2, 0] = 1.0                                             # red, blue, red, blue, ...
    colours[1::2, 2] = 1.0
    vertex = points[20:21]
    assert transfer_cells(8) == 32 and transfer_cells(512) == 1024    # 4 per grid cell, at most 1024
    assert np.allclose(transfer_colours(vertex, points, colours, cells=transfer_cells(512))[0, :3], [1, 0, 0], atol=1e-3)
    blended = transfer_colours(vertex, points, colours, cells=transfer_cells(8))[0, :3]
    assert abs(blended[0] - 0.5) < 0.05 and abs(blended[2] - 0.5) < 0.05


def test_a_large_cloud_is_averaged_in_slabs_alike_and_a_cancel_lands_between_them(monkeypatch):
    """cell_means averages slabs of about CHUNK_POINTS points: the cell means equal those of one
    pass, and should_cancel is asked before every slab, so a cancel stops the colour transfer
    mid-way."""
    from backend import colours
    from backend.errors import Cancelled

    points = sphere_points(10_000)
    rgb = np.random.default_rng(1).uniform(size=(10_000, 3))
    whole = colours.cell_means(points, rgb, 64)
    monkeypatch.setattr(colours, "CHUNK_POINTS", 1_000)
    asked = []
    slabs = colours.cell_means(points, rgb, 64, should_cancel=lambda: asked.append(1) and False)
    assert len(asked) == 10 and len(whole[0]) < 10_000
    np.testing.assert_array_equal(slabs[0], whole[0])
    np.testing.assert_array_equal(slabs[1], whole[1])
    asked.clear()
    with pytest.raises(Cancelled):
        colours.transfer_colours(points[:5], points, rgb, should_cancel=lambda: len(asked) >= 3 or asked.append(1))
    assert len(asked) == 3


def test_pipeline_gives_coloured_points_a_coloured_mesh(octahedron):
    points = sphere_points(4000)
    colours = (colour_by_side(points) * 255).astype(np.uint8)  # 0..255 is scaled to [0, 1]
    stages = []
    result = Reconstructor("cpu").reconstruct_points(points, ReconstructOptions(checkpoint=octahedron, resolution=32),
                                                     progress=lambda stage, fraction: stages.append(stage),
                                                     colors=colours)
    assert stages[-1] == "colours"           # reported, so the add-on shows it and a cancel can land in it
    assert result.colors.shape == (len(result.vertices), 4) and result.colors.dtype == np.float32
    left = result.vertices[:, 0] < -1.0
    right = result.vertices[:, 0] > 1.0
    assert left.any() and right.any()
    assert np.allclose(result.colors[left], [1, 0, 0, 1]) and np.allclose(result.colors[right], [0, 0, 1, 1])
    assert result.stats["input_colours"]
    plain = Reconstructor("cpu").reconstruct_points(points, ReconstructOptions(checkpoint=octahedron, resolution=32))
    assert plain.colors is None and np.array_equal(plain.vertices, result.vertices)
    dropped = Reconstructor("cpu").reconstruct_points(
        points, ReconstructOptions(checkpoint=octahedron, resolution=32, colours=False), colors=colours)
    assert dropped.colors is None and np.array_equal(dropped.vertices, result.vertices)


def test_survey_coordinates_keep_their_precision(octahedron):
    """The same cloud at the origin and 5 * 10^6 m away gives the same mesh, shifted: in float32
    the far one would be off by up to 0.25 m."""
    options = ReconstructOptions(checkpoint=octahedron, resolution=32, refine=False)
    local = sphere_points()
    near = Reconstructor("cpu").reconstruct_points(local, options)
    far = Reconstructor("cpu").reconstruct_points(local + SURVEY_OFFSET, options)
    assert far.vertices.dtype == np.float64
    assert np.abs((far.vertices - SURVEY_OFFSET) - near.vertices).max() < 1e-6


def test_default_model_lands_on_a_survey_sphere():
    """The shipped model on a 5 m sphere scanned 5 * 10^6 m from the origin: the mesh lies on
    the sphere there."""
    center = SURVEY_OFFSET
    result = Reconstructor("cpu").reconstruct_points(sphere_points(3000, 5.0, center),
                                                     ReconstructOptions(resolution=64))
    distance = np.abs(np.linalg.norm(result.vertices - center, axis=1) - 5.0)
    assert np.median(distance) < 0.05 and distance.max() < 0.5, (np.median(distance), distance.max())


@pytest.mark.parametrize("suffix", [".ply", ".obj", ".glb"])
def test_mesh_files_carry_vertex_colours(tmp_path, suffix):
    mesh = trimesh.creation.icosphere(subdivisions=1)
    colours = np.random.default_rng(0).uniform(0, 1, (len(mesh.vertices), 4)).astype(np.float32)
    colours[:, 3] = 1.0
    save_mesh(tmp_path / f"m{suffix}", mesh.vertices + SURVEY_OFFSET[:1], mesh.faces, colors=colours)
    loaded = trimesh.load(tmp_path / f"m{suffix}", process=False, force="mesh")
    assert loaded.visual.kind == "vertex"
    assert np.abs(loaded.visual.vertex_colors.astype(float) - np.round(colours * 255)).max() <= 1


def test_command_line_writes_the_colours_of_a_coloured_scan(tmp_path, octahedron):
    points = sphere_points(3000, 5.0, SURVEY_OFFSET)
    colours = (colour_by_side(points) * 255).astype(np.uint8)
    np.savetxt(tmp_path / "scan.txt", np.column_stack([points, colours]), fmt="%.12g")
    out = tmp_path / "mesh.obj"
    proc = subprocess.run([sys.executable, "-m", "backend", "reconstruct", tmp_path / "scan.txt", "-o", out,
                           "--checkpoint", octahedron, "--resolution", "32", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = np.array([line.split()[1:] for line in out.read_text().splitlines() if line.startswith("v ")], float)
    assert rows.shape[1] == 6  # OBJ: v x y z r g b
    left = rows[:, 0] < SURVEY_OFFSET[0] - 1.0
    assert left.any() and np.allclose(rows[left, 3:], [1, 0, 0])
