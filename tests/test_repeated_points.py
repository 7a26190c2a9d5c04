"""Repeated points (a cloud's exact copies of its own points: merged exports, a mesh's corners,
quantised coordinates) are left out before a cloud is reconstructed
(backend/extraction/repeats.py): exactly the later copies are found, and a cloud whose every point
comes twice gives the mesh of the cloud without the copies. Before, such a cloud never finished:
its median spacing was 0."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.extraction.repeats import repeated_points
from backend.preprocess import subsample_indices

REPO = Path(__file__).resolve().parents[1]


def sphere_scan(count, radius=0.3, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(count, 3))
    return radius * d / np.linalg.norm(d, axis=1, keepdims=True)


def test_the_later_copies_are_repeats_and_the_first_of_each_is_kept():
    scan = sphere_scan(5000)
    rng = np.random.default_rng(1)
    copies = scan[rng.integers(0, 5000, 3000)]   # some points copied several times
    cloud = np.concatenate([scan, copies])
    order = rng.permutation(len(cloud))
    shuffled = cloud[order]
    repeated = repeated_points(shuffled)
    kept = shuffled[~repeated]
    assert len(kept) == 5000 and len(np.unique(kept, axis=0)) == 5000
    # of each set of equal points, the first in the cloud's order stays
    _, first = np.unique(shuffled, axis=0, return_index=True)
    assert not repeated[first].any() and repeated.sum() == len(cloud) - len(first)


def test_only_exact_copies_are_repeats():
    scan = sphere_scan(2000)
    nudged = np.nextafter(scan, np.inf)            # one float step away: a different point
    assert not repeated_points(np.concatenate([scan, nudged])).any()
    signed_zero = np.array([[0.0, 0.0, 0.0], [-0.0, 0.0, -0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(repeated_points(signed_zero), [False, True, False])
    assert not repeated_points(scan).any()


def test_a_subset_of_no_points_is_refused_rather_than_searched_for():
    with pytest.raises(ValueError, match="at least one point"):
        subsample_indices(sphere_scan(100), 0)


def test_a_cloud_given_twice_gives_the_mesh_of_the_cloud(tmp_path):
    """The command line, as a user runs it, on 3000 points and on the same points given twice
    (in another order): the same mesh, where before the second never finished."""
    scan = sphere_scan(3000) + np.random.default_rng(2).normal(scale=0.002, size=(3000, 3))
    np.save(tmp_path / "once.npy", scan)
    np.save(tmp_path / "twice.npy", np.concatenate([scan, scan[::-1]]))
    meshes = []
    for name in ("once", "twice"):
        out = tmp_path / f"{name}.obj"
        proc = subprocess.run([sys.executable, "-m", "backend", "reconstruct", str(tmp_path / f"{name}.npy"),
                               "-o", str(out), "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        meshes.append(out.read_text())
    assert meshes[0] == meshes[1]
