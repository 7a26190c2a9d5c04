"""Stray points (a scanner's flying pixels) are left out before a cloud is reconstructed
(backend/extraction/outliers.py): points far from every other point are found at any offset and
any size of cloud, a clean scan loses none, and the shipped model's mesh of a scan with stray
points is the mesh of the scan without them, with a warning that says how many were left out."""

import numpy as np

from backend.extraction import outliers
from backend.extraction.outliers import stray_points


def sphere_scan(count, radius=0.3, noise=0.002, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(count, 3))
    return radius * d / np.linalg.norm(d, axis=1, keepdims=True) + rng.normal(scale=noise, size=(count, 3))


def far_points(count, low=0.45, high=0.9, seed=1):
    """count points in a shell low..high from the origin: at least 0.15 from a sphere of radius 0.3."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(count, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True) * rng.uniform(low, high, size=(count, 1))


def test_points_far_from_every_other_point_are_stray_and_the_scan_itself_is_not():
    scan, far = sphere_scan(20_000), far_points(100)
    stray = stray_points(np.concatenate([scan, far]))
    assert not stray[:20_000].any() and stray[20_000:].all()


def test_a_survey_offset_finds_the_same_points():
    cloud = np.concatenate([sphere_scan(20_000), far_points(100)])
    np.testing.assert_array_equal(stray_points(cloud + [512_000.0, 5_400_000.0, 310.0]), stray_points(cloud))


def test_a_large_cloud_is_tested_on_a_covering_subset_that_holds_every_stray_point(monkeypatch):
    """2000 of 20,100 points tested: their spacing, and so the reach, is about three times as long."""
    monkeypatch.setattr(outliers, "TESTED_POINTS", 2000)
    stray = stray_points(np.concatenate([sphere_scan(20_000), far_points(20, low=0.7, high=1.0)]))
    assert not stray[:20_000].any() and stray[20_000:].all()


def test_repeated_points_and_small_clouds_keep_every_point():
    repeated = np.repeat(np.concatenate([sphere_scan(2000), far_points(20)]), 4, axis=0)
    assert not stray_points(repeated).any()    # most 3rd neighbours at distance 0: no spacing to go by
    assert not stray_points(np.concatenate([sphere_scan(60), far_points(5)])).any()


def test_the_mesh_of_a_scan_with_stray_points_is_the_mesh_of_the_scan():
    """3000 points on a sphere and 30 flying pixels around it, some beyond its box (they would
    shrink the sphere in the model's canonical box, and the safety net would build around them)."""
    from backend.pipeline import Reconstructor, ReconstructOptions

    scan = sphere_scan(3000, noise=0.003)
    reconstructor = Reconstructor("cpu")
    clean = reconstructor.reconstruct_points(scan, ReconstructOptions())
    result = reconstructor.reconstruct_points(np.concatenate([scan, far_points(30)]), ReconstructOptions())
    assert clean.stats["stray_points"] == 0 and not any("stray" in w for w in clean.stats["warnings"])
    assert result.stats["stray_points"] == 30 and result.stats["input_points"] == 3030
    assert any("left out 30 stray points" in w for w in result.stats["warnings"])
    radius = np.linalg.norm(result.vertices, axis=1)
    assert np.abs(radius - 0.3).max() < 0.03
    np.testing.assert_allclose(result.vertices.min(axis=0), clean.vertices.min(axis=0), atol=0.005)
    np.testing.assert_allclose(result.vertices.max(axis=0), clean.vertices.max(axis=0), atol=0.005)
    # keep_stray (modelled vertices, --keep-stray, the add-on's meshes with faces): every point counts
    kept = reconstructor.reconstruct_points(np.concatenate([scan, far_points(30)]),
                                            ReconstructOptions.from_wire({"keep_stray": True}))
    assert kept.stats["stray_points"] == 0 and not any("stray" in w for w in kept.stats["warnings"])
    assert np.abs(np.linalg.norm(kept.vertices, axis=1) - 0.3).max() > 0.1
