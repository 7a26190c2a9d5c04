"""Over dense points, the points' own surface corrects the network's grid before marching cubes:
a corner the network filled opens up, a sheet thinner than a cell survives, a hole in the scan
does not empty the object, the normals' orientation comes from the grid, a bubble away from the
points is dropped, and noisy or sparse clouds are left to the network."""

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from backend.errors import Cancelled
from backend.extraction import grid_to_mesh, mise
from backend.extraction.pointfield import PointField, dense_enough, without_far_pieces
from backend.extraction.spacing import median_spacing
from backend.pipeline import ReconstructOptions, Reconstructor


def box_distance(p, low, high):
    """Signed distance (N,) of points (N, 3) to the box [low, high] (3,), negative inside."""
    low, high = torch.tensor(low), torch.tensor(high)
    centre, half = (low + high) / 2, (high - low) / 2
    q = (p - centre).abs() - half
    return q.clamp(min=0).norm(dim=1) + q.max(dim=1).values.clamp(max=0)


LEGS = [((-0.3, -0.3, -0.2), (0.3, -0.1, 0.2)), ((-0.3, -0.3, -0.2), (-0.1, 0.3, 0.2))]


def l_shape(p):
    return torch.minimum(box_distance(p, *LEGS[0]), box_distance(p, *LEGS[1]))


def filled_corner(p, k=0.4):
    """The L with its inner corner filled by a smooth minimum, about k / 4 = 0.1 deep: what the
    network does at real objects' concave corners, deeper than the refinement can undo."""
    a, b = box_distance(p, *LEGS[0]), box_distance(p, *LEGS[1])
    blend = (k - (a - b).abs()).clamp(min=0) / k
    return torch.minimum(a, b) - blend * blend * k / 4


def network_grid(signed_distance):
    """A 128^3 grid as MISE gives it, with logits of about the network's slope."""
    return mise(lambda p: -500.0 * signed_distance(p), 32, 2)


def surface_points(signed_distance, count, seed=0):
    grid = mise(lambda p: -signed_distance(p), 64, 1)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    return trimesh.sample.sample_surface(trimesh.Trimesh(mesh.vertices, mesh.faces), count, seed=seed)[0]


def corrected_mesh(grid, points):
    field = PointField(points, median_spacing(points), grid.spacing)
    field.correct(grid.values, 0.0, grid.box_min)
    return grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing), field.report


def corner_error(vertices):
    """Mean distance to the L of the vertices around its inner corner."""
    near = np.linalg.norm(vertices[:, :2] - np.array([-0.1, -0.1]), axis=1) < 0.1
    return np.abs(l_shape(torch.from_numpy(np.asarray(vertices[near], np.float32))).numpy()).mean()


def test_a_corner_the_network_filled_opens_up_to_the_points():
    grid = network_grid(filled_corner)
    filled = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    points = surface_points(l_shape, 150_000)
    assert dense_enough(median_spacing(points), grid.spacing)
    mesh, report = corrected_mesh(grid, points)
    assert corner_error(filled.vertices) > 0.02
    assert corner_error(mesh.vertices) < 0.5 * grid.spacing   # the refinement places the rest
    assert report.corrected > 0 and report.pieces_outside >= 1
    assert len(trimesh.Trimesh(mesh.vertices, mesh.faces).split(only_watertight=False)) == 1  # nothing floats


def test_a_sheet_thinner_than_a_cell_keeps_the_networks_thickness():
    sheet = ((-0.3, -0.3, -0.002), (0.3, 0.3, 0.002))            # 0.004 thick; a cell is 0.0086
    shell = lambda p: box_distance(p, *sheet) - 0.006                # the network's: thicker
    grid = network_grid(shell)
    rng = np.random.default_rng(0)
    points = np.concatenate([np.c_[rng.uniform(-0.3, 0.3, (60_000, 2)), np.full(60_000, z)] for z in (-0.002, 0.002)])
    mesh, _ = corrected_mesh(grid, points)
    surface = trimesh.Trimesh(mesh.vertices, mesh.faces)
    _, distance, _ = trimesh.proximity.closest_point(surface, points[::200])
    assert distance.max() < grid.spacing                              # the whole sheet is still there
    assert abs(surface.area - 2 * 0.36) < 0.15 * 2 * 0.36


def test_a_hole_in_the_scan_does_not_empty_the_object():
    """A box scanned from above and the sides only (its underside is missing): inside and outside
    meet through the hole, so there the network's values decide."""
    solid = lambda p: box_distance(p, (-0.3, -0.3, -0.3), (0.3, 0.3, 0.3))
    points = surface_points(solid, 150_000)
    points = points[points[:, 2] > -0.29]
    grid = network_grid(solid)
    mesh, _ = corrected_mesh(grid, points)
    surface = trimesh.Trimesh(mesh.vertices, mesh.faces)
    assert surface.is_watertight and abs(surface.volume - 0.216) < 0.05 * 0.216


def test_dense_enough_means_at_most_a_cell_between_neighbouring_points():
    cell = 1.1 / 128
    assert dense_enough(0.5 * cell, cell) and not dense_enough(1.5 * cell, cell) and not dense_enough(0.0, cell)


def test_a_spacing_that_thins_the_cloud_to_a_handful_leaves_the_grid_to_the_network():
    """Pairs of points far closer than the rest (a scan and a copy of it a hair away) give a median
    spacing that thins 3000 points to one: no plane to fit, so nothing is corrected."""
    rng = np.random.default_rng(0)
    d = rng.normal(size=(3000, 3))
    field = PointField(0.3 * d / np.linalg.norm(d, axis=1, keepdims=True), 1e-7, 1.1 / 128)
    assert not field.report.applied and field.report.points < 16


def test_a_noisy_cloud_leaves_the_grid_to_the_network():
    """Points scattered a third of a cell off their surface cannot place it better than the network."""
    grid = network_grid(filled_corner)
    before = grid.values.copy()
    points = surface_points(l_shape, 150_000)
    noisy = points + np.random.default_rng(0).normal(scale=0.35 * grid.spacing, size=points.shape)
    field = PointField(noisy, median_spacing(noisy), grid.spacing)
    field.correct(grid.values, 0.0, grid.box_min)
    assert not field.report.applied and field.report.noise_cells > 0.2
    np.testing.assert_array_equal(grid.values, before)


def test_the_pipeline_corrects_dense_clouds_only_and_only_when_refining():
    reconstructor = Reconstructor("cpu")
    dense = surface_points(l_shape, 100_000)
    refined = reconstructor.reconstruct_points(dense, ReconstructOptions(resolution=64))
    assert refined.stats["point_field"]["applied"]
    assert "point_field" not in reconstructor.reconstruct_points(dense, ReconstructOptions(resolution=64, refine=False)).stats
    sparse = dense[np.random.default_rng(0).choice(len(dense), 300, replace=False)]
    assert "point_field" not in reconstructor.reconstruct_points(sparse, ReconstructOptions(resolution=64)).stats


def test_a_bubble_away_from_the_points_is_dropped_and_the_body_kept():
    solid = lambda p: box_distance(p, (-0.3, -0.3, -0.3), (0.3, 0.3, 0.3))
    bubble = lambda p: -(p.norm(dim=1) - 0.1)           # a hollow 0.1 across in the middle of the box
    grid = network_grid(lambda p: torch.maximum(solid(p), bubble(p)))
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    points = surface_points(solid, 50_000)
    vertices, faces, dropped = without_far_pieces(mesh.vertices, mesh.faces, cKDTree(points), grid.spacing)
    body = trimesh.Trimesh(vertices, faces)
    assert dropped == 1 and body.is_watertight and len(vertices) == len(np.unique(faces))
    assert abs(body.volume - 0.216) < 0.02 * 0.216


def test_a_cancel_during_the_point_field_stops_the_request():
    stages = []
    with pytest.raises(Cancelled):
        Reconstructor("cpu").reconstruct_points(surface_points(l_shape, 100_000), ReconstructOptions(resolution=64),
                                                progress=lambda stage, fraction: stages.append(stage),
                                                should_cancel=lambda: "point_field" in stages)
    assert stages[-1] == "point_field"


def test_a_corrected_mesh_that_will_not_decimate_closed_gives_way_to_the_networks(monkeypatch):
    """An open scan at 256^3 leaves the corrected grid with hundreds of small tunnels, which the
    decimation cannot keep closed: then the network's own grid is meshed, refined and decimated."""
    import backend.pipeline as pipeline

    calls = []

    def cannot_close(mesh, tolerance, should_cancel=None, attempts=6):
        calls.append(len(mesh.faces))
        return None

    monkeypatch.setattr(pipeline, "closed_decimation", cannot_close)
    points = surface_points(l_shape, 100_000)
    reconstructor = Reconstructor("cpu")
    result = reconstructor.reconstruct_points(points, ReconstructOptions(resolution=64))
    assert calls and result.stats["point_field"]["undone"] and not result.stats["point_field"]["applied"]
    assert trimesh.Trimesh(result.vertices, result.faces).is_watertight
    # ... the very mesh the request gives without the point field
    monkeypatch.setattr(pipeline, "dense_enough", lambda *args, **kwargs: False)
    network = reconstructor.reconstruct_points(points, ReconstructOptions(resolution=64))
    assert np.array_equal(result.faces, network.faces) and np.allclose(result.vertices, network.vertices)
    counts = [{k: v for k, v in r.stats["support"].items() if k != "seconds"} for r in (result, network)]
    assert counts[0] == counts[1]  # the safety net's report counts each evaluation once


BLOCK = ((-0.3, -0.3, -0.2), (0.3, 0.3, 0.2))
SLOT = ((-0.4, -0.25, -0.009), (0.15, 0.25, 0.009))   # open on the -x face, 0.018 tall: two cells


def slotted_block(p):
    return torch.maximum(box_distance(p, *BLOCK), -box_distance(p, *SLOT))


def test_a_slot_the_network_filled_opens_when_its_walls_take_their_side_from_its_mouth():
    """A slot two cells tall and 0.45 deep, which the network fills: its walls' points lie where the
    network is sure of nothing but that it is inside (its logits flat beyond two cells' depth), so
    the grid cannot orient them. Oriented from the open surface at its mouth, neighbour by
    neighbour, they open it to the back."""
    grid = mise(lambda p: (-500.0 * box_distance(p, *BLOCK)).clamp(max=10.0), 32, 2)
    points = surface_points(slotted_block, 200_000)
    mesh, _ = corrected_mesh(grid, points)
    rng = np.random.default_rng(2)
    middle = np.c_[rng.uniform(-0.25, 0.1, 500), rng.uniform(-0.2, 0.2, 500), np.zeros(500)]
    from training.meshprep import inside
    assert inside(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64), middle).mean() < 0.05


def test_a_few_points_the_grid_orients_strongly_the_wrong_way_do_not_turn_the_weak_ones_around_them():
    """Points on the plane z = 0, outside above. The grid orients the left part strongly and the
    right part weakly the wrong way, as a network does where it is unsure; in the weak part one
    grid column says strongly the wrong thing to the few points around it. The weak part takes
    its side from the strong left part, not from those few: every normal comes out pointing up."""
    from backend.extraction.pointfield import PointFieldSettings, oriented_by_grid

    size, box_min = 64, -0.55
    cell = 1.1 / (size - 1)                         # no grid place on z = 0: the planes z = -+cell/2 hold
    axis = box_min + cell * np.arange(size)         # the values the orientation reads
    x, _, z = np.meshgrid(axis, axis, axis, indexing="ij")
    values = -z * np.where(x < 0.1, 500.0, -5.0)    # inside below; weakly the wrong way on the right
    column = np.argmin(np.abs(axis - 0.25)), np.argmin(np.abs(axis))
    below, above = size // 2 - 1, size // 2
    values[column[0], column[1], [below, above]] = [-250.0 * cell, 250.0 * cell]   # strongly the wrong way
    rng = np.random.default_rng(0)
    points = np.c_[rng.uniform(-0.3, 0.4, 4000), rng.uniform(-0.3, 0.3, 4000), np.zeros(4000)]
    _, neighbours = cKDTree(points).query(points, k=16)
    normals = np.tile([0.0, 0.0, 1.0], (len(points), 1)) * rng.choice([-1.0, 1.0], size=(len(points), 1))
    outward = oriented_by_grid(points, normals, neighbours, values, box_min, cell, PointFieldSettings())
    assert (outward[:, 2] > 0).all()
