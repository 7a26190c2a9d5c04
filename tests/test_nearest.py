"""The extraction's nearest-point search answers as scipy's cKDTree does: the same nearest points
and distances, inf and n where fewer than k lie within the bound, shapes that follow the queries."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from backend.extraction.nearest import NearestPoints


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("bound", [np.inf, 0.08])
def test_the_nearest_points_are_scipys(k, bound):
    rng = np.random.default_rng(k)
    points, queries = rng.random((500, 3)), rng.random((300, 3))
    distances, indices = NearestPoints(points).query(queries, k=k, distance_upper_bound=bound)
    expected_distances, expected_indices = cKDTree(points).query(queries, k=k, distance_upper_bound=bound)
    assert indices.dtype == np.int64 and indices.shape == expected_indices.shape
    assert np.array_equal(indices, expected_indices)
    assert np.allclose(distances, expected_distances)
    if bound < np.inf:  # some queries find fewer than k within the bound: inf and n, as scipy says
        assert (indices == len(points)).any() and np.isinf(distances[indices == len(points)]).all()


def test_asking_for_more_points_than_there_are_fills_with_inf_and_n():
    points = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    distances, indices = NearestPoints(points).query(np.array([[0.2, 0.0, 0.0]]), k=4)
    assert indices.tolist() == [[0, 1, 2, 2]]
    assert np.allclose(distances[0, :2], [0.2, 0.8]) and np.isinf(distances[0, 2:]).all()
    distances, indices = NearestPoints(np.zeros((0, 3))).query(np.zeros((2, 3)), k=2)
    assert indices.tolist() == [[0, 0], [0, 0]] and np.isinf(distances).all()


def test_queries_of_any_leading_shape():
    rng = np.random.default_rng(0)
    search = NearestPoints(rng.random((100, 3)))
    assert search.query(rng.random((4, 5, 3)))[0].shape == (4, 5)
    assert search.query(rng.random((4, 5, 3)), k=3)[1].shape == (4, 5, 3)
