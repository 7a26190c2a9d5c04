"""Repeated points (a cloud's copies of its own points: merged exports, a mesh's corners,
quantised coordinates) are left out before a cloud is reconstructed
(backend/extraction/repeats.py): exactly the later copies are found, float32 copies too, and a cloud
whose every point comes twice gives the mesh of the cloud without the copies. Before, such a cloud
never finished (its median spacing was 0), and one with float32 copies failed in the point field."""

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


def test_float32_copies_are_repeats_and_points_a_little_apart_are_not():
    """The same points once in float64 and once through float32 (two exports merged): the copies
    go but for the few that straddle a cell's border, and the spacing is the cloud's again."""
    from backend.extraction.spacing import median_spacing

    scan = sphere_scan(20_000) + [0.21, -0.37, 0.05]
    twins = np.concatenate([scan, scan.astype(np.float32).astype(np.float64)])
    assert median_spacing(twins) < 1e-4 * median_spacing(scan)
    repeated = repeated_points(twins)
    assert not repeated[:20_000].any() and repeated[20_000:].mean() > 0.99
    assert median_spacing(twins[~repeated]) == pytest.approx(median_spacing(scan), rel=0.02)
    apart = scan + [1e-4, 0.0, 0.0]      # 0.17 of the points' spacing: other points
    assert not repeated_points(np.concatenate([scan, apart])).any()


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


def test_a_cloud_merged_with_its_float32_copy_is_reconstructed():
    """Dense enough for the point field, whose subset of the points was one point before."""
    from backend.pipeline import Reconstructor, ReconstructOptions

    scan = sphere_scan(30_000) + np.random.default_rng(3).normal(scale=0.0005, size=(30_000, 3))
    result = Reconstructor("cpu").reconstruct_points(np.concatenate([scan, scan.astype(np.float32)]),
                                                    ReconstructOptions(resolution=64))
    assert result.stats["input_points"] == 60_000 and result.stats["repeated_points"] > 29_700
    assert result.stats["point_field"]["points"] > 1000
    assert np.abs(np.linalg.norm(result.vertices, axis=1) - 0.3).max() < 0.01
