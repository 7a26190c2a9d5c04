"""Test-time refinement shrink-wraps a mesh onto the input points where they are, leaves it alone
where there are none, never moves a vertex further than allowed, and keeps the mesh closed."""

from dataclasses import replace

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from backend.extraction import grid_to_mesh, mise
from backend.extraction.refine import RefineSettings, surface_projection, refine_to_points


def sphere_mesh(radius):
    grid = mise(lambda p: radius - p.norm(dim=1), 32, 1)
    return grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)


def sphere_points(radius, count, noise, seed=0):
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions * radius + rng.normal(scale=noise, size=(count, 3))


def radial_error(vertices, radius):
    return np.abs(np.linalg.norm(vertices, axis=1) - radius).mean()


def test_a_surface_several_cells_off_is_pulled_onto_noisy_points():
    mesh = sphere_mesh(0.30)                       # the network's surface: 0.04 too small
    points = sphere_points(0.34, 3000, noise=0.005)
    refined = refine_to_points(mesh.vertices, mesh.faces, points)
    assert radial_error(mesh.vertices, 0.34) > 0.035 and radial_error(refined, 0.34) < 0.004


def test_a_vertex_of_no_face_stays_where_it_is_and_the_rest_are_refined():
    mesh = sphere_mesh(0.30)
    stray = np.array([[0.0, 0.0, 0.0]])
    points = sphere_points(0.34, 3000, noise=0.005)
    refined = refine_to_points(np.vstack([stray, mesh.vertices]), mesh.faces + 1, points)
    assert np.array_equal(refined[0], stray[0])
    assert radial_error(refined[1:], 0.34) < 0.004


def test_on_a_curved_surface_the_quadratic_fits_land_closer_than_planes():
    """A plane through a small ball's nearby points lies inside the ball (their centroid does), so
    planes pull the surface in; the quadratic height field over the same points follows the bend."""
    mesh = sphere_mesh(0.13)
    points = sphere_points(0.15, 3000, noise=0.005)
    planes = refine_to_points(mesh.vertices, mesh.faces, points, RefineSettings(curved_neighbours=None))
    curved = refine_to_points(mesh.vertices, mesh.faces, points)
    inward = lambda vertices: 0.15 - np.linalg.norm(vertices, axis=1).mean()
    assert radial_error(curved, 0.15) < 0.9 * radial_error(planes, 0.15)
    assert 0 < inward(curved) < 0.75 * inward(planes)


def test_the_quadratic_height_field_recovers_a_sphere_and_declines_too_few_points():
    from backend.extraction.refine import quadratic_fit, quadratic_height

    rng = np.random.default_rng(0)
    polar, azimuth = rng.uniform(0, 0.25, 200), rng.uniform(0, 2 * np.pi, 200)
    cap = 0.3 * np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], axis=1)
    centre = cap.mean(axis=0)
    offsets, up = (cap - centre)[None].astype(np.float32), np.array([[0.0, 0.0, 1.0]])
    above = (np.array([0.0, 0.0, 0.2]) - centre)[None]
    height = quadratic_height(*quadratic_fit(offsets, np.ones((1, 200), np.float32), up), above)
    assert abs(centre[2] + height[0] - 0.3) < 1e-4          # the plane alone is 0.0036 short
    aside = (np.array([0.03, -0.02, 0.2]) - centre)[None]     # one fit serves nearby vertices too
    height = quadratic_height(*quadratic_fit(offsets, np.ones((1, 200), np.float32), up), aside)
    assert abs(np.linalg.norm([0.03, -0.02, centre[2] + height[0]]) - 0.3) < 1e-4
    few = np.zeros((1, 200), np.float32)
    few[0, :5] = 1.0                                        # five points cannot fix six coefficients
    assert quadratic_height(*quadratic_fit(offsets, few, up), above)[0] == 0.0


def test_vertices_far_from_any_point_stay():
    mesh = sphere_mesh(0.30)
    cap = sphere_points(0.31, 5000, noise=0.0)
    cap = cap[cap[:, 2] > 0.1]                     # only the top cap was scanned
    settings = RefineSettings(radius=0.05)
    move = surface_projection(mesh.vertices.astype(np.float64), cKDTree(cap), cap, settings)
    bottom = mesh.vertices[:, 2] < -0.1
    assert not move[bottom].any()
    assert np.abs(move[~bottom]).max() > 0.005


def test_moves_are_capped_per_round_and_the_mesh_stays_closed():
    mesh = sphere_mesh(0.30)
    points = sphere_points(0.45, 5000, noise=0.0)  # far off: every move is capped
    settings = RefineSettings()
    step = np.linalg.norm(surface_projection(mesh.vertices.astype(np.float64), cKDTree(points), points, settings), axis=1)
    assert step.max() <= settings.max_move + 1e-9
    refined = refine_to_points(mesh.vertices, mesh.faces, points, settings)
    assert np.linalg.norm(refined, axis=1).max() <= 0.31 + settings.rounds * settings.max_move
    assert trimesh.Trimesh(refined, mesh.faces, process=False).is_watertight
    assert refined.dtype == np.float32 and refined.shape == mesh.vertices.shape


def octahedron_points(radius, count, seed=0):
    """count points on the surface |x| + |y| + |z| = radius."""
    rng = np.random.default_rng(seed)
    p = rng.exponential(size=(count, 3)) * rng.choice([-1.0, 1.0], size=(count, 3))
    return p / np.abs(p).sum(axis=1, keepdims=True) * radius


def octahedron_error(vertices, radius):
    return np.abs(np.abs(vertices).sum(axis=1) - radius).mean() / np.sqrt(3.0)


def test_the_pipeline_refines_point_cloud_meshes_by_default(tmp_path, monkeypatch):
    """The network says |x|+|y|+|z| < 0.4 of the canonical box; the scanned points (normalised to the
    canonical box like any input) lie on |x|+|y|+|z| = 0.5, about 0.06 further out. Refined, the
    mesh follows the points; with refine=False it stays the network's."""
    from backend.pipeline import Reconstructor, ReconstructOptions
    from conftest import make_octahedron_checkpoint

    from backend import pipeline

    monkeypatch.setattr(pipeline, "POINT_SUPPORT", None, raising=False)  # the network's surface, as it is
    checkpoint = str(make_octahedron_checkpoint(tmp_path / "octa.safetensors", radius=0.4))
    scan = octahedron_points(0.5, 3000)
    reconstructor = Reconstructor("cpu")
    raw = reconstructor.reconstruct_points(scan, ReconstructOptions(checkpoint=checkpoint, resolution=64, refine=False))
    refined = reconstructor.reconstruct_points(scan, ReconstructOptions(checkpoint=checkpoint, resolution=64))
    assert octahedron_error(raw.vertices, 0.5) > 0.05
    assert octahedron_error(refined.vertices, 0.5) < 0.01
    assert "refine" in refined.stats["seconds"] and "refine" not in raw.stats["seconds"]


def test_the_pipeline_hands_the_points_own_normals_to_the_refinement(tmp_path, monkeypatch):
    """Normals read with a scan (a PLY's nx ny nz) steer the refinement's planes; the refinement
    fits to a covering subset of a large cloud, and the normals must follow the same points."""
    from backend.pipeline import Reconstructor, ReconstructOptions
    from conftest import make_octahedron_checkpoint

    from backend import pipeline

    seen = {}

    def spy(vertices, faces, points, normals=None, **kwargs):
        seen.update(points=points, normals=normals)
        return vertices

    monkeypatch.setattr(pipeline, "refine_to_points", spy)
    monkeypatch.setattr(pipeline, "MAX_REFINE_POINTS", 500)
    checkpoint = str(make_octahedron_checkpoint(tmp_path / "octa.safetensors", radius=0.4))
    scan = octahedron_points(0.4, 3000)
    normals = np.sign(scan) / np.sqrt(3.0)  # an octahedron's face normals, point by point
    Reconstructor("cpu").reconstruct_points(scan, ReconstructOptions(checkpoint=checkpoint, resolution=32),
                                            normals=normals)
    assert len(seen["points"]) == 500
    # the subset's own normals: each point, back in the scan's coordinates, still has its face's
    from backend.inputs import normalisation

    centre, scale = normalisation(scan)
    original = seen["points"].astype(np.float64) * scale + centre
    np.testing.assert_allclose(seen["normals"], np.sign(original) / np.sqrt(3.0), atol=1e-6)


@pytest.mark.parametrize("resolution, dense", [(64, False), (32, True)])
def test_over_points_denser_than_the_mesh_the_refinement_fits_its_own_planes(tmp_path, monkeypatch, resolution,
                                                                             dense):
    """The scan's own normals did better than the fitted planes' only over points sparser than the
    grid's mesh (docs/performance.md, "Do input normals help?"): 3000 points are sparser than a
    64^3 grid's mesh and denser than a 32^3 one's, and the rounds slide exactly where they are denser."""
    from backend.pipeline import Reconstructor, ReconstructOptions
    from conftest import make_octahedron_checkpoint

    from backend import pipeline

    seen = {}

    def spy(vertices, faces, points, normals=None, slide=False, **kwargs):
        seen.update(normals=normals, slide=slide)
        return vertices

    monkeypatch.setattr(pipeline, "refine_to_points", spy)
    checkpoint = str(make_octahedron_checkpoint(tmp_path / "octa.safetensors", radius=0.4))
    scan = octahedron_points(0.4, 3000)
    Reconstructor("cpu").reconstruct_points(scan, ReconstructOptions(checkpoint=checkpoint, resolution=resolution),
                                            normals=np.sign(scan) / np.sqrt(3.0))
    assert seen["slide"] is dense
    assert (seen["normals"] is None) is dense


def test_progress_every_round_and_the_same_result_with_callbacks():
    mesh = sphere_mesh(0.30)
    points = sphere_points(0.34, 3000, noise=0.005)
    fractions = []
    observed = refine_to_points(mesh.vertices, mesh.faces, points, progress=fractions.append,
                                should_cancel=lambda: False)
    assert fractions == [(i + 1) / RefineSettings().rounds for i in range(RefineSettings().rounds)]
    np.testing.assert_array_equal(observed, refine_to_points(mesh.vertices, mesh.faces, points))


def test_blocks_of_vertices_give_bit_identical_results(monkeypatch):
    from backend.extraction import refine

    mesh = sphere_mesh(0.30)
    points = sphere_points(0.34, 3000, noise=0.005)
    monkeypatch.setattr(refine, "PROJECTION_BLOCK", 10 ** 9)
    whole = refine_to_points(mesh.vertices, mesh.faces, points)
    monkeypatch.setattr(refine, "PROJECTION_BLOCK", 1000)
    np.testing.assert_array_equal(refine_to_points(mesh.vertices, mesh.faces, points), whole)


def test_cancel_is_checked_before_every_block_of_every_round(monkeypatch):
    from backend.errors import Cancelled
    from backend.extraction import refine

    monkeypatch.setattr(refine, "PROJECTION_BLOCK", 2000)
    mesh = sphere_mesh(0.30)                       # 5694 vertices: 3 blocks per round
    points = sphere_points(0.34, 3000, noise=0.005)
    fractions = []
    checks = []

    def cancel_at_eighth_check():
        checks.append(len(fractions))
        return len(checks) == 8

    with pytest.raises(Cancelled):
        refine_to_points(mesh.vertices, mesh.faces, points, progress=fractions.append,
                         should_cancel=cancel_at_eighth_check)
    # three checks while the mesh's thickness is measured, three in round 1, the eighth is the
    # second block of round 2, which it stops
    assert len(mesh.vertices) == 5694 and checks == [0, 0, 0, 0, 0, 0, 1, 1] and fractions == [0.2]


def reference_refinement(vertices, faces, points, settings):
    """The refinement as first written: a fresh k-nearest search, a fresh plane and LAPACK's
    eigensolver for every vertex in every round."""
    mesh = trimesh.Trimesh(np.asarray(vertices, np.float64), faces, process=False)
    averaging = trimesh.smoothing.laplacian_calculation(mesh)
    tree = cKDTree(points)
    for _ in range(settings.rounds):
        v = np.asarray(mesh.vertices)
        distances, index = tree.query(v, k=settings.neighbours, distance_upper_bound=settings.radius)
        valid = np.isfinite(distances)
        width = np.where(valid[:, settings.weight_rank - 1], distances[:, settings.weight_rank - 1], settings.radius)
        weights = np.where(valid, np.exp(-(np.where(valid, distances, 0) / width[:, None]) ** 2), 0.0)
        offsets = points[np.where(valid, index, 0)] - v[:, None]
        centroid = np.einsum("vk,vki->vi", weights, offsets) / weights.sum(axis=1, keepdims=True)
        spread = (offsets - centroid[:, None]) * np.sqrt(weights)[..., None]
        normal = np.linalg.eigh(spread.transpose(0, 2, 1) @ spread)[1][:, :, 0]
        move = np.einsum("vi,vi->v", centroid, normal)[:, None] * normal
        move *= np.minimum(1.0, settings.max_move / np.maximum(np.linalg.norm(move, axis=1, keepdims=True), 1e-12))
        move[valid.sum(axis=1) < settings.min_neighbours] = 0.0
        mesh.vertices = v + move
        trimesh.smoothing.filter_taubin(mesh, iterations=settings.smoothing_steps, laplacian_operator=averaging)
    return np.asarray(mesh.vertices)


def test_remembered_neighbours_and_planes_give_the_reference_result():
    """Kept candidates (searched again only beyond their slack) and closed-form normals, every
    vertex its own site: with refit_spacing 0 the reference result to float rounding; the
    default, which keeps planes of vertices that barely moved, within a small fraction of a grid
    cell of it."""
    mesh = sphere_mesh(0.30)
    points = sphere_points(0.34, 3000, noise=0.005)
    # the reference smooths in full, shrink and all; these points lie at 0.69 of the mesh's median
    # edge, above the sliding line, and naming it keeps the comparison whatever that line is
    planes = RefineSettings(curved_neighbours=None, site_spacing=0.0, dense_slide=None, shrink_cell=None)
    reference = reference_refinement(mesh.vertices, mesh.faces, points, planes)
    exact = refine_to_points(mesh.vertices, mesh.faces, points, replace(planes, refit_spacing=0.0))
    assert np.abs(exact - reference).max() < 1e-5
    default = refine_to_points(mesh.vertices, mesh.faces, points, planes)
    assert np.abs(default - reference).mean() < 1e-4 and np.abs(default - reference).max() < 0.005


def count_searches_and_fits(monkeypatch, settings, points=3000):
    """Sites searched and fitted per block while refining a sphere's 5694 vertices (one block per
    round) onto noisy points."""
    from backend.extraction import refine

    searched, fitted = [], []
    search, fit = refine.search_neighbours, refine.fits_on_two_threads
    monkeypatch.setattr(refine, "search_neighbours", lambda v, *a: searched.append(len(v)) or search(v, *a))
    monkeypatch.setattr(refine, "fits_on_two_threads", lambda v, *a: fitted.append(len(v)) or fit(v, *a))
    mesh = sphere_mesh(0.30)
    refined = refine_to_points(mesh.vertices, mesh.faces, sphere_points(0.34, points, noise=0.005), settings)
    monkeypatch.undo()
    return searched, fitted, refined


def test_later_rounds_search_and_fit_few_vertices(monkeypatch):
    searched, fitted, _ = count_searches_and_fits(monkeypatch, RefineSettings(site_spacing=0.0))
    later = (RefineSettings().rounds - 1) * 5694   # what searching and fitting every vertex every round costs
    assert searched[0] == fitted[0] == 5694
    assert sum(searched[1:]) < 0.6 * later and sum(fitted[1:]) < 0.95 * later


def test_nearby_vertices_share_a_fit_and_land_where_their_own_would_put_them(monkeypatch):
    """Sites a point spacing wide (about 0.02 here, a little more than the mesh's edges): about half
    the fits, the same surface to a hundredth of the points' spacing."""
    _, own_fits, own = count_searches_and_fits(monkeypatch, RefineSettings(site_spacing=0.0), points=1000)
    _, shared_fits, shared = count_searches_and_fits(monkeypatch, RefineSettings(), points=1000)
    assert shared_fits[0] < 0.6 * own_fits[0] and sum(shared_fits) < 0.6 * sum(own_fits)
    assert np.abs(shared - own).mean() < 2e-4 and radial_error(shared, 0.34) < 1.05 * radial_error(own, 0.34)


@pytest.mark.parametrize("kind", ["random", "flat", "line", "point", "zero"])
def test_closed_form_normals_are_lapacks(kind):
    from backend.extraction.refine import smallest_eigenvectors

    rng = np.random.default_rng(1)
    spread = rng.normal(size=(500, 16, 3)) * {"random": [1.0, 0.7, 0.4], "flat": [1.0, 1.0, 1e-3],
                                               "line": [1.0, 1e-4, 1e-4], "point": [1e-9, 1e-9, 1e-9],
                                               "zero": [0.0, 0.0, 0.0]}[kind]
    spread = spread @ np.linalg.qr(rng.normal(size=(3, 3)))[0]          # turned: not along the axes
    a = spread.transpose(0, 2, 1) @ spread
    found = smallest_eigenvectors(a[:, 0, 0], a[:, 0, 1], a[:, 0, 2], a[:, 1, 1], a[:, 1, 2], a[:, 2, 2])
    assert np.allclose(np.linalg.norm(found, axis=1), 1.0)
    values, vectors = np.linalg.eigh(a)
    # An eigenvector of the smallest eigenvalue: A n = lambda n, up to the matrix's own scale.
    residual = np.linalg.norm(np.einsum("vij,vj->vi", a, found) - values[:, :1] * found, axis=1)
    assert (residual <= 1e-6 * np.maximum(values[:, 2], 1e-300)).all() or kind == "zero"
    if kind in ("random", "flat"):                 # a unique answer: LAPACK's, up to sign
        assert np.allclose(np.abs(np.einsum("vi,vi->v", found, vectors[:, :, 0])), 1.0, atol=1e-6)


def test_the_points_own_normals_steer_the_planes_whichever_side_they_point_to():
    mesh = sphere_mesh(0.30)
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(3000, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    points = directions * 0.34 + rng.normal(scale=0.005, size=(3000, 3))
    planes = RefineSettings(curved_neighbours=None)
    fitted = refine_to_points(mesh.vertices, mesh.faces, points, planes)
    steered = refine_to_points(mesh.vertices, mesh.faces, points, planes, normals=directions)
    assert radial_error(steered, 0.34) < 0.95 * radial_error(fitted, 0.34)
    unoriented = directions * rng.choice([-2.0, 1.0], size=(3000, 1))     # either side, any length
    np.testing.assert_array_equal(refine_to_points(mesh.vertices, mesh.faces, points, planes, normals=unoriented),
                                  steered)


def test_the_mesh_says_where_it_is_thin_and_the_far_faces_points_are_left_out():
    """local_thickness: on a 0.03 plate the faces' vertices find the other face 0.03 behind them;
    on a ball nothing is thin. without_far_sheet then drops, for a vertex on the top face, the
    input points of the bottom face and keeps those of its own."""
    from backend.extraction.refine import local_thickness, outward_normals, without_far_sheet

    plate = trimesh.creation.box(extents=(1.0, 0.7, 0.03)).subdivide_to_size(0.01)
    vertices, faces = np.asarray(plate.vertices), np.asarray(plate.faces)
    normals = outward_normals(vertices, faces)
    top = (vertices[:, 2] > 0.014) & (np.abs(vertices[:, :2]) < [0.45, 0.3]).all(axis=1)
    np.testing.assert_allclose(normals[top], np.tile([0.0, 0.0, 1.0], (top.sum(), 1)), atol=1e-9)   # outward
    thickness = local_thickness(vertices, normals, vertices, normals, reach=0.06)
    np.testing.assert_allclose(thickness[top], 0.03, atol=1e-6)
    # against fewer samples of the surface (every fourth vertex), the same
    np.testing.assert_allclose(local_thickness(vertices, normals, vertices[::4], normals[::4], reach=0.06)[top], 0.03,
                               atol=1e-6)
    ball = trimesh.creation.icosphere(4, radius=0.3)
    sphere, sphere_normals = np.asarray(ball.vertices), np.asarray(ball.vertex_normals)
    assert np.isinf(local_thickness(sphere, sphere_normals, sphere, sphere_normals, reach=0.06)).all()

    rng = np.random.default_rng(0)
    lateral = rng.uniform(-0.03, 0.03, size=(24, 2))
    two_faces = np.concatenate([lateral, np.repeat([[0.015], [-0.015]], 12, axis=0)], axis=1)
    two_faces[:, 2] += rng.normal(0.0, 0.003, 24)
    vertex, up = np.array([[0.0, 0.0, 0.015]]), np.array([[0.0, 0.0, 1.0]])
    kept = without_far_sheet(vertex, np.arange(24)[None], two_faces.astype(np.float32), up, np.array([0.03]))
    assert kept.tolist() == [list(range(12)) + [24] * 12]      # 24 = len(points): none
    # an open sheet: one layer of points in the middle of the network's shell stays whole
    one_layer = np.concatenate([lateral, rng.normal(0.0, 0.003, (24, 1))], axis=1).astype(np.float32)
    kept = without_far_sheet(vertex, np.arange(24)[None], one_layer, up, np.array([0.03]))
    assert kept.tolist() == [list(range(24))]


def test_fits_on_two_threads_equal_those_on_one(monkeypatch):
    """The sites' local surfaces fitted in two halves at once are those of one call over all."""
    from scipy.spatial import cKDTree

    from backend.extraction import refine

    settings = RefineSettings()
    points = sphere_points(0.34, 3000, noise=0.005)
    sites = np.asarray(sphere_mesh(0.30).vertices)
    candidates, _ = refine.search_neighbours(sites, cKDTree(points), settings)
    curved = np.arange(len(sites)) % 3 > 0
    whole = refine.fit_local_surfaces(sites, points.astype(np.float32), candidates, settings, None, curved)
    monkeypatch.setattr(refine, "MIN_SITES_PER_THREAD", 100)
    halves = refine.fits_on_two_threads(sites, points.astype(np.float32), candidates, settings, None, curved)
    for name in ("origin", "normal", "usable", "frame", "spread", "coefficients"):
        np.testing.assert_array_equal(getattr(halves, name), getattr(whole, name))


def box_distance(p, low, high):
    """Signed distance (N,) of points (N, 3) to the box [low, high] (3,), negative inside."""
    centre, half = (low + high) / 2, (high - low) / 2
    q = (p - centre).abs() - half
    return q.clamp(min=0).norm(dim=1) + q.max(dim=1).values.clamp(max=0)


def test_over_dense_points_the_rounds_pull_the_surface_into_a_concave_corner():
    """An L-shaped solid whose inner corner the network's mesh fills with a fillet (as the network
    does at real objects' concave corners): over points far denser than the mesh's edges the
    rounds' smoothing only slides vertices along the surface, so it no longer pulls them back out
    of the corner."""
    import torch

    legs = [(torch.tensor([-0.3, -0.3, -0.2]), torch.tensor([0.3, -0.1, 0.2])),
            (torch.tensor([-0.3, -0.3, -0.2]), torch.tensor([-0.1, 0.3, 0.2]))]

    def l_shape(p):
        return torch.minimum(box_distance(p, *legs[0]), box_distance(p, *legs[1]))

    def filled_corner(p, k=0.15):  # a polynomial smooth minimum: a fillet of about k / 4
        a, b = box_distance(p, *legs[0]), box_distance(p, *legs[1])
        blend = (k - (a - b).abs()).clamp(min=0) / k
        return torch.minimum(a, b) - blend * blend * k / 4

    sharp, start = mise(lambda p: -l_shape(p), 64, 2), mise(lambda p: -filled_corner(p), 32, 1)
    sharp = grid_to_mesh(sharp.values, 0.0, sharp.box_min, sharp.spacing)
    start = grid_to_mesh(start.values, 0.0, start.box_min, start.spacing)
    points = trimesh.sample.sample_surface(trimesh.Trimesh(sharp.vertices, sharp.faces), 60000, seed=0)[0]

    def corner_error(vertices):  # mean distance to the L of the vertices around its inner corner
        near = np.linalg.norm(vertices[:, :2] - np.array([-0.1, -0.1]), axis=1) < 0.06
        return np.abs(l_shape(torch.from_numpy(np.asarray(vertices[near], np.float32))).numpy()).mean()

    sliding = refine_to_points(start.vertices, start.faces, points)
    pulled_back = refine_to_points(start.vertices, start.faces, points, RefineSettings(dense_slide=None))
    assert corner_error(start.vertices) > 0.02
    assert corner_error(sliding) < 0.001 and corner_error(sliding) < 0.5 * corner_error(pulled_back)


def test_the_rounds_smoothing_keeps_a_rods_thickness_and_still_takes_out_the_ripple():
    """Taubin steps with equal shrink and inflate factors, three a round, take a little off every
    curved surface, and off a rod 0.06 thick a large share of it. Their displacement along the
    normals, averaged over ten edges, is put back: the radius stays, while the vertex-to-vertex
    ripple the fits leave is still smoothed away."""
    import torch
    from backend.extraction.refine import median_edge, outward_normals, without_shrink

    def rod(p, radius=0.03, half_length=0.35):   # a capsule along z
        axial = (p[:, 2].abs() - half_length).clamp(min=0)
        return radius - torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2 + axial ** 2)

    grid = mise(rod, 64, 1)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    vertices, faces = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces)
    normals = outward_normals(vertices, faces)
    rippled = vertices + np.random.default_rng(0).normal(scale=0.002, size=len(vertices))[:, None] * normals
    smoothed = trimesh.Trimesh(rippled, faces, process=False)
    trimesh.smoothing.filter_taubin(smoothed, iterations=3)
    kept = without_shrink(rippled, np.asarray(smoothed.vertices), normals, 10 * median_edge(vertices, faces))

    middle = np.abs(vertices[:, 2]) < 0.25
    radius = lambda v: np.linalg.norm(v[middle, :2], axis=1)
    truth = radius(vertices).mean()
    shrink = truth - radius(np.asarray(smoothed.vertices)).mean()
    assert shrink > 0.0002                                    # one round's Taubin steps: 0.0003 thinner
    assert abs(radius(kept).mean() - truth) < 0.35 * shrink   # put back: within 0.0001
    assert radius(kept).std() < 0.5 * radius(rippled).std()   # and the ripple is gone all the same


def test_chords_onto_surface_puts_the_faces_between_a_spheres_vertices_on_it_on_average():
    """Vertices on a sphere leave the faces between them inside it (0.86% of its volume at 642
    vertices); lifted by a quarter of their umbrella vectors, the faces enclose the sphere's volume
    to within a twentieth of that. On a plane nothing moves."""
    from backend.extraction import MeshArrays
    from backend.extraction.refine import chords_onto_surface

    sphere = trimesh.creation.icosphere(subdivisions=3)
    truth = 4.0 / 3.0 * np.pi
    lifted = chords_onto_surface(MeshArrays(sphere.vertices.astype(np.float32), sphere.faces))
    assert truth - sphere.volume > 0.008 * truth
    assert abs(trimesh.Trimesh(lifted.vertices, lifted.faces).volume - truth) < 0.05 * (truth - sphere.volume)

    plane = trimesh.creation.box(extents=(1.0, 1.0, 0.2)).subdivide().subdivide()
    top = np.flatnonzero((np.abs(plane.vertices[:, 2] - 0.1) < 1e-9) & (np.abs(plane.vertices[:, :2]).max(axis=1) < 0.4))
    assert len(top) > 0
    flat = chords_onto_surface(MeshArrays(plane.vertices.astype(np.float32), plane.faces))
    assert np.abs(flat.vertices[top] - plane.vertices[top]).max() < 1e-6


def test_the_pipeline_lifts_the_chords_over_dense_points_only(tmp_path, monkeypatch):
    """Over points denser than the mesh the refined vertices lie on the surface, so its chords are
    lifted onto it; over sparse points the vertices come from smoothing, and nothing is lifted. The
    rounds slide exactly when the chords are lifted: one decision for both."""
    from backend import pipeline
    from backend.pipeline import Reconstructor, ReconstructOptions
    from conftest import make_octahedron_checkpoint

    lifted, slid = [], []
    monkeypatch.setattr(pipeline, "chords_onto_surface", lambda mesh, averaging: lifted.append(len(mesh.vertices)) or mesh)
    refine = pipeline.refine_to_points
    monkeypatch.setattr(pipeline, "refine_to_points", lambda *args, slide, **kwargs:
                        slid.append(slide) or refine(*args, slide=slide, **kwargs))
    checkpoint = str(make_octahedron_checkpoint(tmp_path / "octa.safetensors", radius=0.4))
    reconstructor = Reconstructor("cpu")
    reconstructor.reconstruct_points(sphere_points(0.4, 300, 0.0), ReconstructOptions(checkpoint=checkpoint, resolution=32))
    assert lifted == [] and slid == [False]
    result = reconstructor.reconstruct_points(sphere_points(0.4, 20000, 0.0),
                                              ReconstructOptions(checkpoint=checkpoint, resolution=32))
    assert len(lifted) == 1 and lifted[0] >= len(result.vertices) and slid == [False, True]


def test_over_points_far_denser_than_the_grid_the_mesh_is_split_before_refining(tmp_path, monkeypatch):
    """Where even the grid's mesh with its edges halved is coarser than the points (at 128^3, scans
    of a hundred thousand points and more, up to MAX_SPLIT_POINTS), the mesh is split once, so that
    its vertices follow the points at twice the density; over sparser points it is refined as the
    grid gave it."""
    from backend import pipeline
    from backend.extraction.marching import subdivided
    from backend.pipeline import Reconstructor, ReconstructOptions
    from conftest import make_octahedron_checkpoint

    split, refined = [], []
    monkeypatch.setattr(pipeline, "subdivided", lambda mesh: split.append(len(mesh.faces)) or subdivided(mesh))
    refine = pipeline.refine_to_points
    monkeypatch.setattr(pipeline, "refine_to_points", lambda vertices, faces, *args, **kwargs:
                        refined.append(len(faces)) or refine(vertices, faces, *args, **kwargs))
    checkpoint = str(make_octahedron_checkpoint(tmp_path / "octa.safetensors", radius=0.4))
    reconstructor = Reconstructor("cpu")
    options = ReconstructOptions(checkpoint=checkpoint, resolution=32)
    reconstructor.reconstruct_points(sphere_points(0.4, 3000, 0.0), options)    # denser than the mesh, not twice
    assert split == [] and len(refined) == 1
    reconstructor.reconstruct_points(sphere_points(0.4, 20000, 0.0), options)
    assert len(split) == 1 and refined[1] == 4 * split[0]
    # ... but not over more points than MAX_SPLIT_POINTS (what a split refinement costs there)
    monkeypatch.setattr(pipeline, "MAX_SPLIT_POINTS", 10_000)
    reconstructor.reconstruct_points(sphere_points(0.4, 20000, 0.0), options)
    assert len(split) == 1 and len(refined) == 3


def test_a_mesh_is_split_over_dense_points_on_grids_up_to_128_and_up_to_half_a_million_points():
    """The split needs points denser than the split mesh, a grid of at most MAX_SPLIT_RESOLUTION
    (300,000 points on homer at 128^3: yes; the same at 256^3: no) and at most MAX_SPLIT_POINTS."""
    from backend.pipeline import MAX_SPLIT_POINTS, worth_splitting

    cell = 1.1 / 128
    assert worth_splitting(0.00088, cell, 128, 300_000)                     # homer at 128^3
    assert worth_splitting(0.00088, 2 * cell, 64, 300_000)
    assert not worth_splitting(0.00088, cell / 2, 256, 300_000)             # ... at 256^3
    assert not worth_splitting(0.0027, cell, 128, 30_000)                   # 30,000 points: not dense enough
    assert not worth_splitting(0.00048, cell, 128, MAX_SPLIT_POINTS + 1)


def test_a_split_mesh_has_every_edge_halved_and_the_same_surface():
    from backend.extraction.marching import MeshArrays, subdivided
    from backend.extraction.refine import median_edge

    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
    mesh = MeshArrays(sphere.vertices.astype(np.float32), sphere.faces)
    split = subdivided(mesh)
    assert len(split.faces) == 4 * len(mesh.faces)
    assert median_edge(split.vertices, split.faces) == pytest.approx(median_edge(mesh.vertices, mesh.faces) / 2, rel=1e-5)
    result = trimesh.Trimesh(split.vertices, split.faces, process=False)
    assert result.is_watertight and result.volume == pytest.approx(sphere.volume, rel=1e-5)


def test_on_a_split_mesh_the_vertices_where_no_point_is_near_and_only_they_span_the_rim(tmp_path, monkeypatch):
    """A dense scan of an octahedron with a hole in one face: over the hole the mesh follows no point,
    so its vertices there (and only there) are handed to marching.spanned (whose membrane
    test_extraction checks: here the refinement's fits from the rim already put the hole on the
    face's plane, so the result's shape could not tell)."""
    from backend import pipeline
    from backend.extraction.marching import spanned
    from backend.pipeline import Reconstructor, ReconstructOptions
    from conftest import make_octahedron_checkpoint

    calls = []
    monkeypatch.setattr(pipeline, "spanned", lambda mesh, free, averaging:
                        calls.append((mesh.vertices.copy(), free)) or spanned(mesh, free, averaging))
    directions = sphere_points(1.0, 30000, 0.0)
    points = 0.5 * directions / np.abs(directions).sum(axis=1, keepdims=True)   # on the network's octahedron
    centre = np.full(3, 0.5 / 3)
    points = points[np.linalg.norm(points - centre, axis=1) >= 0.15]            # a hole around one face's centre
    checkpoint = str(make_octahedron_checkpoint(tmp_path / "octa.safetensors", radius=0.5))
    Reconstructor("cpu").reconstruct_points(points, ReconstructOptions(checkpoint=checkpoint, resolution=32))
    (vertices, free), = calls
    distance = cKDTree(points).query(vertices)[0]
    assert (np.linalg.norm(vertices[free] - centre, axis=1) < 0.15).all()     # over the hole only
    assert free[distance > 0.1].all() and free.sum() > (distance > 0.1).sum()  # ... all of its middle
