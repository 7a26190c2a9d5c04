"""Procedural training solids: closed meshes whose inside is the field's negative region."""

import numpy as np
import pytest

from training import procedural
from training.meshprep import inside


def test_smooth_union_is_a_lower_bound_that_equals_min_far_from_the_blend():
    a = np.array([0.0, 1.0, -0.5, 0.3])
    b = np.array([1.0, 0.0, 0.5, 0.3])
    blended = procedural.smooth_union(a, b, 0.1)
    assert np.all(blended <= np.minimum(a, b) + 1e-12)
    assert np.allclose(blended[:3], np.minimum(a, b)[:3])            # |a - b| >= k: the plain minimum
    assert blended[3] == pytest.approx(0.3 - 0.025)                  # equal values: dips by k/4


def test_primitive_distances_are_exact_on_simple_cases():
    p = np.array([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.7]])
    assert np.allclose(procedural.sdf_ellipsoid(p, np.array([0.25, 0.25, 0.25])), [-0.25, 0.25, 0.45])
    assert np.allclose(procedural.sdf_round_box(p, np.array([0.2, 0.2, 0.2]), 0.0), [-0.2, 0.3, 0.5])
    assert np.allclose(procedural.sdf_torus(p, 0.3, 0.1), [0.2, 0.1, np.hypot(0.3, 0.7) - 0.1])


@pytest.mark.parametrize("index", [0, 1, 2])
def test_shapes_are_reproducible_closed_solids_matching_their_field(index):
    vertices, faces = procedural.make_shape(seed=3, index=index, resolution=48, max_faces=4000)
    again, _ = procedural.make_shape(seed=3, index=index, resolution=48, max_faces=4000)
    assert np.array_equal(vertices, again)
    assert len(faces) <= 4100 and np.isfinite(vertices).all()
    # The mesh's inside (winding number) agrees with the field's sign away from the surface.
    field = procedural.random_solid(np.random.default_rng([3, index]))
    rng = np.random.default_rng(0)
    queries = rng.uniform(vertices.min(0), vertices.max(0), size=(4000, 3))
    values = field(queries)
    clear = np.abs(values) > 0.03  # beyond the grid's and the decimation's error
    assert (inside(vertices, faces, queries[clear]) == (values[clear] < 0)).mean() > 0.97
