"""Thin and flat objects, and the point-cloud safety net (backend/extraction/support.py).

Unit tests drive SupportNet with made-up networks (analytic logits), so each failure mode is
staged on purpose: a phantom blob far from the points, a bubble inside a closed scan, a scan with
a hole, a thin part the network lost. The end-to-end tests run the shipped point model on a rod,
a board and a plate of 3000 noisy points (unit longest edge), as the issue asks: every output
vertex within 0.03 of an input point, enclosed volume within 35% of the truth."""

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from backend.extraction import grid_to_mesh
from backend.extraction.spacing import median_spacing
from backend.extraction.support import SupportNet, SupportSettings

BOX = (-0.55, 0.55)
SLOPE = 100.0  # logits per unit length of the made-up networks


def sphere_points(n, radius=0.3, seed=0, hole=None):
    """n points on a sphere; hole (direction (3,), angular radius): a cap left unsampled."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(4 * n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    if hole is not None:
        direction, angle = hole
        d = d[d @ np.asarray(direction, float) < np.cos(angle)]
    return radius * d[:n]


def box_points(dims, n, seed=0, noise=0.0):
    """n points uniform on the surface of a box centred at the origin, plus Gaussian noise."""
    mesh = trimesh.creation.box(extents=dims)
    rng = np.random.default_rng(seed)
    area = mesh.area_faces
    faces = rng.choice(len(area), n, p=area / area.sum())
    u = rng.random((n, 2))
    flip = u.sum(axis=1) > 1
    u[flip] = 1 - u[flip]
    tri = mesh.triangles[faces]
    points = tri[:, 0] + u[:, :1] * (tri[:, 1] - tri[:, 0]) + u[:, 1:] * (tri[:, 2] - tri[:, 0])
    return points + rng.normal(scale=noise, size=points.shape)


def sphere_logits(radius=0.3, center=(0.0, 0.0, 0.0)):
    center = torch.tensor(center, dtype=torch.float32)
    return lambda p: SLOPE * (radius - (p - center).norm(dim=1))


def extract(points, decode, resolution=96, settings=SupportSettings()):
    """The net around decode on a dense grid -> (mesh, net)."""
    net = SupportNet(points, BOX, settings)
    with torch.inference_mode():
        net.prepare(decode, 0.0, "cpu")
        axis = torch.linspace(BOX[0], BOX[1], resolution + 1)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        values = net.wrap(decode, 0.0)(grid).reshape((resolution + 1,) * 3).numpy()
    mesh = grid_to_mesh(values, 0.0, BOX[0], (BOX[1] - BOX[0]) / resolution)
    return trimesh.Trimesh(mesh.vertices, mesh.faces, process=False), net


def test_tau_follows_the_spacing_of_the_points():
    sparse, dense = sphere_points(500), sphere_points(8000)
    assert median_spacing(dense) < 0.5 * median_spacing(sparse)
    net_sparse, net_dense = SupportNet(sparse, BOX), SupportNet(dense, BOX)
    assert net_sparse.tau == pytest.approx(SupportSettings().spacing_multiple * median_spacing(sparse))
    assert net_dense.tau < net_sparse.tau
    # Never below a cell and a half of the net's own grid, however dense the points.
    assert SupportNet(sphere_points(200_000), BOX).tau >= 1.5 * 1.1 / 128 - 1e-12


def test_a_good_answer_is_left_as_it_is():
    points = sphere_points(3000)
    mesh, net = extract(points, sphere_logits())
    truth = 4 / 3 * np.pi * 0.3 ** 3
    assert abs(mesh.volume / truth - 1) < 0.05
    assert net.report.unexplained < 0.02 and net.report.added == 0
    assert net.report.warning() is None


def test_over_dense_points_a_network_surface_a_cell_outside_them_is_cut_but_no_removal():
    """At 100,000 points tau is a cell and a half of the net's grid, so a network whose surface lies
    one cell outside the points (beyond tau / 2) is cut back to them; that is the network's
    precision, not surface far from every point: nothing counts as removed, nothing is worth a
    warning."""
    points = sphere_points(100_000)
    h = (BOX[1] - BOX[0]) / 128
    mesh, net = extract(points, sphere_logits(0.3 + h), resolution=128)
    assert net.h == pytest.approx(h) and net.tau / 2 < h < net.far
    assert net.report.trimmed > 0 and net.report.removed == 0
    assert net.report.warning() is None
    assert abs(mesh.volume / (4 / 3 * np.pi * 0.3 ** 3) - 1) < 0.02


def test_a_phantom_blob_far_from_the_points_vanishes():
    points = sphere_points(3000)
    sphere, blob = sphere_logits(), sphere_logits(0.06, (0.42, 0.42, 0.42))
    mesh, net = extract(points, lambda p: torch.maximum(sphere(p), blob(p)))
    distance, _ = cKDTree(points).query(mesh.vertices)
    assert distance.max() < net.tau + net.h
    assert len(mesh.split(only_watertight=False)) == 1
    assert net.report.removed > 0 and "far from every input point" in net.report.warning()


def test_a_slab_stuck_to_the_box_wall_vanishes():
    points = sphere_points(3000)
    sphere = sphere_logits()
    mesh, net = extract(points, lambda p: torch.maximum(sphere(p), SLOPE * (p[:, 0] - 0.45)))
    distance, _ = cKDTree(points).query(mesh.vertices)
    assert distance.max() < net.tau + net.h
    assert abs(mesh.volume / (4 / 3 * np.pi * 0.3 ** 3) - 1) < 0.05


def test_a_bubble_inside_a_closed_scan_takes_the_majority_vote():
    points = sphere_points(3000)
    sphere, bubble = sphere_logits(), sphere_logits(0.1)
    mesh, net = extract(points, lambda p: torch.minimum(sphere(p), -bubble(p)))
    assert net.report.enclosed_pieces >= 1
    assert len(mesh.split(only_watertight=False)) == 1        # no inner surface left
    assert abs(mesh.volume / (4 / 3 * np.pi * 0.3 ** 3) - 1) < 0.05


@pytest.mark.parametrize("hole_over_tau", [0.5, 0.9])
def test_a_scan_with_a_small_hole_stays_closed(hole_over_tau):
    """A cap as wide as (hole_over_tau x tau) missing from the scan: the inside stays enclosed,
    so the network's answer (a full sphere) is kept, not carved hollow through the hole."""
    tau = SupportNet(sphere_points(3000), BOX).tau
    angle = hole_over_tau * tau / 0.3
    points = sphere_points(3000, hole=((0.0, 0.0, 1.0), angle))
    mesh, net = extract(points, sphere_logits())
    assert net.report.enclosed_pieces >= 1
    assert abs(mesh.volume / (4 / 3 * np.pi * 0.3 ** 3) - 1) < 0.05


def test_a_scan_without_its_bottom_keeps_the_networks_inside():
    """A big hole (the underside a scanner never saw, 60 degrees wide): the inside is no longer
    enclosed, but it sees the points in most directions, so it is sheltered, not carved hollow.
    Only what the network invented far from every point, across the hole, is cut: at most the
    cap under the hole (16% of the sphere)."""
    points = sphere_points(3000, hole=((0.0, 0.0, -1.0), np.radians(60)))
    mesh, net = extract(points, sphere_logits())
    assert net.report.enclosed_pieces == 0 and net.sheltered.any()
    assert 0.8 < mesh.volume / (4 / 3 * np.pi * 0.3 ** 3) < 1.01
    assert len(mesh.split(only_watertight=False)) == 1


def test_a_thin_part_the_network_lost_is_rebuilt_from_the_points():
    dims = (1.0, 0.05, 0.05)
    points = box_points(dims, 3000, noise=0.0)
    mesh, net = extract(points, lambda p: torch.full((len(p),), -5.0), resolution=128)
    distance, _ = cKDTree(points).query(mesh.vertices)
    assert distance.max() < 0.03
    assert abs(mesh.volume / np.prod(dims) - 1) < 0.35
    assert net.report.unexplained == 1.0 and "rebuilt" in net.report.warning()
    # Where the points' own surface corrected the grid (dense clouds), what the net rebuilt lies on
    # the points: no warning.
    assert net.report.warning(points_surface=True) is None


def test_the_net_can_be_switched_off_for_benchmarks():
    import backend.pipeline as pipeline

    assert isinstance(pipeline.POINT_SUPPORT, SupportSettings)


# --- the shipped point model, end to end ---------------------------------------------------------

THIN_SHAPES = {"rod": (1.0, 0.05, 0.05), "board": (1.0, 0.25, 0.04), "plate": (1.0, 0.7, 0.03)}


@pytest.fixture(scope="module")
def reconstructor():
    from backend.defaults import default_checkpoint
    from backend.pipeline import Reconstructor

    try:
        default_checkpoint("points")
    except Exception as exc:  # noqa: BLE001 - the message says why
        pytest.skip(f"no shipped point model: {exc}")
    return Reconstructor("cpu")


def reconstruct_thin(reconstructor, name):
    """(volume / true volume, farthest vertex from the input points, the same for the true surface,
    result) for 3000 noisy points on the thin box `name`."""
    from backend.pipeline import ReconstructOptions

    dims = THIN_SHAPES[name]
    points = box_points(dims, 3000, seed=1, noise=0.005)
    result = reconstructor.reconstruct_points(points, ReconstructOptions(resolution=128))
    mesh = trimesh.Trimesh(result.vertices, result.faces, process=False)
    tree = cKDTree(points)
    truth, _ = trimesh.sample.sample_surface(trimesh.creation.box(extents=dims), 200000, seed=0)
    return mesh.volume / np.prod(dims), tree.query(result.vertices)[0].max(), tree.query(truth)[0].max(), result


@pytest.mark.parametrize("name", ["rod", "board", "plate"])
def test_thin_shapes_come_back_where_the_points_are(reconstructor, name):
    """Every vertex within 0.03 of an input point, or, where 3000 points leave wider holes than
    that on the true surface itself (the plate: 0.037), no farther than the truth's own farthest
    point (+10%); the enclosed volume within 35% of the truth's (both faces of a 0.03 plate kept
    apart, refine.far_sheet)."""
    volume_ratio, farthest, truth_farthest, result = reconstruct_thin(reconstructor, name)
    bound = max(0.03, 1.1 * truth_farthest)
    assert farthest < bound, f"a vertex lies {farthest:.3f} from every input point (bound {bound:.3f})"
    assert abs(volume_ratio - 1) < 0.35, f"volume {volume_ratio:.2f} of the truth"


def test_the_result_says_when_the_net_was_used(reconstructor):
    *_, result = reconstruct_thin(reconstructor, "rod")
    assert result.stats["support"]["changed"]
    assert any("safety net" in w for w in result.stats["warnings"])


def test_over_a_dense_scan_what_the_net_rebuilt_lies_on_the_points_and_no_warning_comes(reconstructor):
    """30,000 points on a board: the network misses most of it (it was trained on 300 to 3000
    points) and the net rebuilds it, but the points' own surface corrects the grid, so the result
    lies on the points and there is nothing for the user to check."""
    from backend.pipeline import ReconstructOptions

    dims = (1.0, 0.25, 0.04)
    points = box_points(dims, 30000, seed=1, noise=0.0005)
    result = reconstructor.reconstruct_points(points, ReconstructOptions(resolution=128))
    support = result.stats["support"]
    assert support["unexplained_points"] > 0.5 and support["filled_places"] > 0
    assert result.stats["point_field"]["applied"]
    assert not any("safety net" in w for w in result.stats["warnings"])
    mesh = trimesh.Trimesh(result.vertices, result.faces, process=False)
    assert cKDTree(points).query(result.vertices)[0].max() < 0.01
    assert abs(mesh.volume / np.prod(dims) - 1) < 0.1
