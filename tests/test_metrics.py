"""Metric functions on cases with known answers."""

import math

import numpy as np
import pytest

from training.metrics import (EMPTY_MESH_DISTANCE, fscore, mesh_metrics, occupancy_iou, sample_mesh_surface)


def sphere_points(n, radius, rng, center=(0.0, 0.0, 0.0)):
    u = rng.normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return u * radius + np.asarray(center), u


def test_identical_point_sets_are_perfect():
    rng = np.random.default_rng(0)
    pts, normals = sphere_points(5000, 0.4, rng)
    m = mesh_metrics(pts, normals, pts.copy(), -normals)  # normal orientation must not matter
    assert m["chamfer_l1"] == 0.0 and m["chamfer_l1_x10"] == 0.0
    assert m["fscore"] == 1.0 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["normal_consistency"] == pytest.approx(1.0)
    assert m["empty_mesh"] is False


def test_shifted_sphere_chamfer_matches_the_analytic_distance():
    # Each point of a sphere shifted by d lies | |q| - r | from the original sphere; the mean of
    # that is ~ d/2 for small d (mean |cos| over a sphere is 1/2).
    rng = np.random.default_rng(1)
    r, d = 0.3, 0.05
    shift = np.array([d, 0.0, 0.0])
    gt, gt_n = sphere_points(100000, r, rng)
    pred, pred_n = sphere_points(100000, r, rng, center=shift)
    m = mesh_metrics(pred, pred_n, gt, gt_n)
    analytic_accuracy = np.abs(np.linalg.norm(pred, axis=1) - r).mean()
    analytic_completeness = np.abs(np.linalg.norm(gt - shift, axis=1) - r).mean()
    expected = 0.5 * (analytic_accuracy + analytic_completeness)
    assert m["chamfer_l1"] == pytest.approx(expected, abs=1.5e-3)
    assert m["chamfer_l1"] == pytest.approx(d / 2, rel=0.1)
    assert m["chamfer_l1_x10"] == pytest.approx(10 * m["chamfer_l1"])
    assert 0.0 < m["fscore"] < 1.0


def test_fscore_counts_far_points_against_precision_only():
    axis = np.arange(5) * 0.1
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    pred = np.concatenate([grid, grid + 10.0])  # half of the prediction is far from everything
    m = mesh_metrics(pred, None, grid, None, threshold=0.01)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(1.0)
    assert m["fscore"] == pytest.approx(2.0 / 3.0)
    assert math.isnan(m["normal_consistency"])  # no normals given


def test_empty_prediction_gives_worst_case_values():
    gt = np.random.default_rng(2).uniform(-0.5, 0.5, size=(100, 3))
    m = mesh_metrics(np.zeros((0, 3)), np.zeros((0, 3)), gt, gt)
    assert m["empty_mesh"] is True
    assert m["chamfer_l1"] == EMPTY_MESH_DISTANCE and m["fscore"] == 0.0 and m["normal_consistency"] == 0.0
    assert fscore(0.0, 0.0) == 0.0


def test_occupancy_iou_known_cases():
    occ = np.random.default_rng(3).random(1000) > 0.5
    assert occupancy_iou(occ, occ) == 1.0
    assert occupancy_iou(occ, ~occ) == 0.0
    assert occupancy_iou(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(1.0 / 3.0)
    assert occupancy_iou(np.zeros(5, bool), np.zeros(5, bool)) == 1.0
    with pytest.raises(ValueError):
        occupancy_iou(np.zeros(3), np.zeros(4))


def test_sample_mesh_surface_on_a_cube():
    v = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    # two triangles per face of the cube (index = 4x + 2y + z over {0, 1}^3)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    pts, normals = sample_mesh_surface(v, faces, 6000, np.random.default_rng(4))
    assert pts.shape == (6000, 3) and normals.shape == (6000, 3)
    assert np.allclose(np.abs(pts).max(axis=1), 0.5, atol=1e-6)  # every point on a face
    on_axis = np.argmax(np.abs(pts), axis=1)
    assert np.allclose(np.abs(normals[np.arange(6000), on_axis]), 1.0, atol=1e-5)
    counts = np.bincount(on_axis, minlength=3)
    assert counts.min() > 1700  # faces have equal area: about 2000 points per axis
    empty_pts, empty_normals = sample_mesh_surface(v, np.zeros((0, 3), int), 10, np.random.default_rng(0))
    assert empty_pts.shape == (0, 3) and empty_normals.shape == (0, 3)
