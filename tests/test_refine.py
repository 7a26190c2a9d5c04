"""Test-time refinement pulls a mesh onto the input points where they are dense and leaves it
alone where there are none; the mesh stays closed."""

import numpy as np
import torch
import trimesh

from backend.extraction import grid_to_mesh, mise
from backend.extraction.refine import project_onto_points, refine_to_points


def sphere_mesh(radius):
    grid = mise(lambda p: radius - p.norm(dim=1), 32, 1)
    return grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)


def sphere_points(radius, count, noise, seed=0):
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions * radius + rng.normal(scale=noise, size=(count, 3))


def test_vertices_move_onto_dense_points():
    mesh = sphere_mesh(0.30)                       # the network's surface: 0.01 too small
    points = sphere_points(0.31, 5000, noise=0.003)
    moved = project_onto_points(mesh.vertices.astype(np.float64), points)
    before = np.abs(np.linalg.norm(mesh.vertices, axis=1) - 0.31).mean()
    after = np.abs(np.linalg.norm(moved, axis=1) - 0.31).mean()
    assert before > 0.008 and after < 0.003


def test_vertices_far_from_any_point_stay():
    mesh = sphere_mesh(0.30)
    half = sphere_points(0.31, 5000, noise=0.0)
    half = half[half[:, 2] > 0.1]                  # only the top cap was scanned
    moved = project_onto_points(mesh.vertices.astype(np.float64), half)
    bottom = mesh.vertices[:, 2] < -0.1
    assert np.array_equal(moved[bottom], mesh.vertices[bottom].astype(np.float64))
    assert np.abs(moved[~bottom] - mesh.vertices[~bottom]).max() > 0.005


def test_moves_are_bounded_and_mesh_stays_closed():
    mesh = sphere_mesh(0.30)
    points = sphere_points(0.40, 5000, noise=0.0)  # far off: every move is capped
    refined = refine_to_points(mesh.vertices, mesh.faces, points)
    step = np.linalg.norm(project_onto_points(mesh.vertices.astype(np.float64), points) - mesh.vertices, axis=1)
    assert step.max() <= 0.015 + 1e-9
    assert trimesh.Trimesh(refined, mesh.faces, process=False).is_watertight
    assert refined.dtype == np.float32 and refined.shape == mesh.vertices.shape
