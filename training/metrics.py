"""Reconstruction metrics as the Occupancy Networks evaluation defines them (Mescheder et al. 2019).

All distances are in canonical units (the shape's longest bounding-box edge is 1).
  accuracy      mean distance from each predicted surface point to the nearest ground-truth point
  completeness  mean distance from each ground-truth point to the nearest predicted point
  chamfer_l1    0.5 * (accuracy + completeness)
                (the paper's tables print this value x10: see `chamfer_l1_x10`)
  normal_consistency  0.5 * (mean |<n_pred, n_gt(nearest)>| + mean |<n_gt, n_pred(nearest)>|)
  fscore        harmonic mean of precision (predicted points within `threshold` of the ground truth)
                and recall (ground-truth points within `threshold` of the prediction); the default
                threshold 0.01 is 1% of the unit cube's edge
  iou           |pred AND gt| / |pred OR gt| of occupancies at the same query points
"""

from __future__ import annotations

import math

import numpy as np

from backend.extraction.nearest import NearestPoints

# Values reported for an empty prediction (no surface at all): the worst each metric can be for
# shapes inside the unit cube. A distance can not exceed the cube's diagonal sqrt(3).
EMPTY_MESH_DISTANCE = math.sqrt(3.0)


def empty_mesh_metrics(threshold: float = 0.01) -> dict:
    """The defined worst-case metrics for an empty predicted mesh."""
    return {
        "accuracy": EMPTY_MESH_DISTANCE,
        "completeness": EMPTY_MESH_DISTANCE,
        "chamfer_l1": EMPTY_MESH_DISTANCE,
        "chamfer_l1_x10": 10.0 * EMPTY_MESH_DISTANCE,
        "chamfer_l2": 3.0,
        "normal_accuracy": 0.0,
        "normal_completeness": 0.0,
        "normal_consistency": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "fscore": 0.0,
        "fscore_threshold": threshold,
        "empty_mesh": True,
    }


def unit_normals(normals: np.ndarray) -> np.ndarray:
    """(N, 3) -> (N, 3) scaled to unit length (zero vectors stay zero)."""
    norms = np.linalg.norm(normals, axis=-1, keepdims=True)
    return normals / np.maximum(norms, 1e-12)


def nearest_neighbours(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each source point (N, 3): distance (N,) to its nearest target point (M, 3) and that
    point's index (N,)."""
    distances, indices = NearestPoints(target).query(source)
    return distances, indices


def directed_metrics(source: np.ndarray, source_normals: np.ndarray | None, target: np.ndarray,
                     target_normals: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per source point (N,): distance to the nearest target point, and |cos| between the source
    normal and that target point's normal (None without normals)."""
    distances, indices = nearest_neighbours(source, target)
    if source_normals is None or target_normals is None:
        return distances, None
    dots = np.abs(np.sum(unit_normals(source_normals) * unit_normals(target_normals)[indices], axis=-1))
    return distances, dots


def fscore(precision: float, recall: float) -> float:
    """Harmonic mean of precision and recall (0 when both are 0)."""
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def mesh_metrics(pred_points: np.ndarray, pred_normals: np.ndarray | None, gt_points: np.ndarray,
                 gt_normals: np.ndarray | None, threshold: float = 0.01) -> dict:
    """Surface metrics between points sampled on the prediction and on the ground truth.

    pred_points (N, 3), pred_normals (N, 3) or None; gt_points (M, 3), gt_normals (M, 3) or None.
    Returns a dict of floats (see the module docstring); chamfer_l1_x10 = 10 * chamfer_l1 is the
    scale the OccNet paper's tables use. An empty prediction (N = 0) gives empty_mesh_metrics()."""
    pred_points = np.asarray(pred_points, dtype=np.float64).reshape(-1, 3)
    gt_points = np.asarray(gt_points, dtype=np.float64).reshape(-1, 3)
    if len(gt_points) == 0:
        raise ValueError("ground-truth point set is empty")
    if len(pred_points) == 0:
        return empty_mesh_metrics(threshold)
    pn = None if pred_normals is None else np.asarray(pred_normals, dtype=np.float64).reshape(-1, 3)
    gn = None if gt_normals is None else np.asarray(gt_normals, dtype=np.float64).reshape(-1, 3)
    # accuracy: prediction -> ground truth; completeness: ground truth -> prediction.
    acc_d, acc_n = directed_metrics(pred_points, pn, gt_points, gn)
    comp_d, comp_n = directed_metrics(gt_points, gn, pred_points, pn)
    accuracy, completeness = float(acc_d.mean()), float(comp_d.mean())
    precision = float((acc_d < threshold).mean())
    recall = float((comp_d < threshold).mean())
    chamfer_l1 = 0.5 * (accuracy + completeness)
    out = {
        "accuracy": accuracy,
        "completeness": completeness,
        "chamfer_l1": chamfer_l1,
        "chamfer_l1_x10": 10.0 * chamfer_l1,
        "chamfer_l2": 0.5 * (float((acc_d ** 2).mean()) + float((comp_d ** 2).mean())),
        "normal_accuracy": float(acc_n.mean()) if acc_n is not None else float("nan"),
        "normal_completeness": float(comp_n.mean()) if comp_n is not None else float("nan"),
        "precision": precision,
        "recall": recall,
        "fscore": fscore(precision, recall),
        "fscore_threshold": threshold,
        "empty_mesh": False,
    }
    out["normal_consistency"] = 0.5 * (out["normal_accuracy"] + out["normal_completeness"])
    return out


def occupancy_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two occupancy arrays of the same shape (..., M), bool or {0, 1}.

    Both empty counts as perfect agreement (1.0)."""
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"occupancy shapes differ: {pred.shape} vs {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)


def sample_mesh_surface(vertices: np.ndarray, faces: np.ndarray, count: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """count points uniformly (by area) on a triangle mesh, with the face normal of each.

    vertices (V, 3), faces (F, 3) int -> points (count, 3) float32, normals (count, 3) float32.
    An empty mesh (no faces or zero area) gives two (0, 3) arrays."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    empty = np.zeros((0, 3), dtype=np.float32)
    if len(faces) == 0 or len(vertices) == 0:
        return empty, empty
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    cross = np.cross(b - a, c - a)
    areas = 0.5 * np.linalg.norm(cross, axis=1)
    total = areas.sum()
    if not np.isfinite(total) or total <= 0:
        return empty, empty
    face = rng.choice(len(faces), size=count, p=areas / total)
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    points = a[face] + u[:, None] * (b[face] - a[face]) + v[:, None] * (c[face] - a[face])
    normals = unit_normals(cross[face])
    return points.astype(np.float32), normals.astype(np.float32)
