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


# --- thin solids: rods, boards, plates --------------------------------------------------------

@pytest.mark.parametrize("kind", procedural.THIN_KINDS)
def test_thin_parts_are_as_thin_as_asked(kind):
    rng = np.random.default_rng(0)
    field, thickness = procedural.thin_part(rng, kind, 0.9)
    assert 0.9 / 30 <= thickness <= 0.9 / 10
    # Across the thin axis (z for boards and plates; y and z for rods) the part spans its thickness.
    z = np.linspace(-0.1, 0.1, 2001)
    line = np.stack([np.zeros_like(z), np.zeros_like(z), z], axis=1)
    inside = z[field(line) < 0]
    assert inside.max() - inside.min() == pytest.approx(thickness, abs=2e-4)
    along = np.stack([np.linspace(-0.6, 0.6, 2401), np.zeros(2401), np.zeros(2401)], axis=1)
    assert np.ptp(along[field(along) < 0, 0]) == pytest.approx(0.9, abs=2e-3)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_thin_shapes_are_reproducible_closed_and_thin(index):
    vertices, faces = procedural.make_thin_shape(seed=3, index=index, max_faces=4000, cells_per_thickness=2.0)
    again, _ = procedural.make_thin_shape(seed=3, index=index, max_faces=4000, cells_per_thickness=2.0)
    assert np.array_equal(vertices, again)
    import trimesh
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight and mesh.volume > 0
    # Thin: the smallest extent along the principal axes is at most a tenth of the largest, or the
    # solid holds little volume for its box (a rod or a plate crossed by another part).
    centred = vertices - vertices.mean(axis=0)
    extents = np.sort(np.ptp(centred @ np.linalg.svd(centred, full_matrices=False)[2].T, axis=0))
    assert extents[0] <= 0.12 * extents[2] or mesh.volume < 0.1 * np.prod(extents)


def test_squash_augmentation_makes_one_or_two_axes_thin():
    from training.dataset import random_squash

    rng = np.random.default_rng(0)
    draws = np.array([random_squash(1.0, (1 / 30, 1 / 3), rng) for _ in range(400)])
    squashed = (draws < 1).sum(axis=1)
    assert set(squashed) == {1, 2}
    assert draws.min() >= 1 / 30 - 1e-12 and draws[draws < 1].max() <= 1 / 3 + 1e-12
    assert draws.min() < 1 / 20                               # reaches down towards 1:30
    assert np.all(random_squash(0.0, (1 / 30, 1 / 3), rng) == 1)
    assert (np.array([random_squash(0.25, (1 / 30, 1 / 3), rng) for _ in range(2000)]) < 1).any(axis=1).mean() \
        == pytest.approx(0.25, abs=0.04)
