"""MISE must give the dense grid's mesh at a fraction of the evaluations, and find what plain MISE
loses (a plate thinner than a coarse cell)."""

import numpy as np
import pytest
import torch
import trimesh

from backend.extraction import dense_grid, grid_to_mesh, mise, simplify_mesh
from backend.models import build_model


def sphere(p: torch.Tensor) -> torch.Tensor:
    return 0.35 - p.norm(dim=1)


def torus(p: torch.Tensor) -> torch.Tensor:
    ring = torch.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) - 0.3
    return 0.1 - torch.sqrt(ring ** 2 + p[:, 1] ** 2)


def random_decoder(seed: int = 0):
    """A conditional-batch-norm decoder with random weights and a random global code: a smooth,
    shapeless occupancy function, and its median value in the box as the level, so that a surface
    runs through the box."""
    torch.manual_seed(seed)
    config = {"input": {"kind": "points"}, "encoder": {"name": "resnet_pointnet", "c_dim": 16, "hidden": 16},
              "decoder": {"name": "cbatchnorm", "c_dim": 16, "hidden": 32, "n_blocks": 3}}
    model = build_model(config).eval()
    for block in model.decoder.blocks:  # random residual branches, not the identity of a fresh model
        torch.nn.init.normal_(block.fc_1.weight, std=0.3)
    code = torch.randn(1, 16)

    def evaluate(p):
        with torch.no_grad():
            return model.decoder(p[None] * 4.0, code)[0]

    probe = evaluate(torch.rand(20000, 3) * 1.1 - 0.55)
    return evaluate, float(probe.median())


def meshes_match(a, b, atol=1e-5) -> bool:
    """Same triangles, same topology, vertices equal up to float noise (batched evaluation can
    round the last bit differently)."""
    return (a.faces.shape == b.faces.shape and np.array_equal(a.faces, b.faces)
            and np.allclose(a.vertices, b.vertices, atol=atol))


def surface_corner_mask(values: np.ndarray, level: float) -> np.ndarray:
    """Grid points (R+1,)^3 that are corners of a cell through which the surface passes."""
    inside = values > level
    r = values.shape[0] - 1
    any_in = np.zeros((r, r, r), bool)
    any_out = np.zeros((r, r, r), bool)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                corner = inside[dx:dx + r, dy:dy + r, dz:dz + r]
                any_in |= corner
                any_out |= ~corner
    cells = any_in & any_out
    mask = np.zeros_like(inside)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                mask[dx:dx + r, dy:dy + r, dz:dz + r] |= cells
    return mask


CASES = [("sphere", sphere, 0.0), ("torus", torus, 0.0)]


@pytest.mark.parametrize("resolution", [64, 128])
@pytest.mark.parametrize("name", ["sphere", "torus", "random_network"])
def test_mise_equals_dense_grid(name, resolution):
    if name == "random_network":
        evaluate, level = random_decoder()
    else:
        evaluate, level = dict((n, (f, l)) for n, f, l in CASES)[name]
    steps = {64: 1, 128: 2}[resolution]
    sparse = mise(evaluate, 32, steps, level=level)
    dense = dense_grid(evaluate, resolution)
    assert sparse.values.shape == dense.values.shape == (resolution + 1,) * 3
    # Every grid point that shapes the dense mesh has the same sign, and in fact the same value.
    matters = surface_corner_mask(dense.values, level)
    assert matters.sum() > 1000
    assert np.array_equal(sparse.values[matters] > level, dense.values[matters] > level)
    assert np.allclose(sparse.values[matters], dense.values[matters], atol=1e-5)
    # Everywhere else the sign agrees too: no surface appears or vanishes.
    assert np.array_equal(sparse.values > level, dense.values > level)
    mesh_sparse = grid_to_mesh(sparse.values, level, sparse.box_min, sparse.spacing)
    mesh_dense = grid_to_mesh(dense.values, level, dense.box_min, dense.spacing)
    assert meshes_match(mesh_sparse, mesh_dense)
    # Far fewer network evaluations than the dense grid.
    assert dense.evaluations == (resolution + 1) ** 3
    assert sparse.evaluations < dense.evaluations / (3 if resolution == 64 else 7)


def test_mesh_is_watertight_and_in_place():
    grid = mise(sphere, 32, 2)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume == pytest.approx(4 / 3 * np.pi * 0.35 ** 3, rel=0.01)  # positive: faces wind outwards
    assert np.allclose(tm.bounds, [[-0.35] * 3, [0.35] * 3], atol=0.005)


# Values exactly at the level (0) where scikit-image's marching cubes makes a degenerate face and
# drops it, leaving one vertex of no face behind (found by a random search over {-1, 0, 1}^(4x4x4)).
ON_THE_LEVEL = np.array([
    [[1, -1, 0, 0], [1, 1, 1, 1], [-1, 1, -1, -1], [0, 0, 0, -1]],
    [[-1, 0, 0, 0], [0, 1, -1, 0], [1, 0, 1, 1], [-1, 1, 1, 1]],
    [[0, -1, 0, 0], [1, 1, 0, -1], [1, 1, 1, 1], [1, 1, -1, 1]],
    [[0, -1, 1, 1], [0, 1, 1, 1], [-1, 0, 1, 0], [0, 0, 0, -1]]], dtype=np.float32)


def test_values_on_the_level_leave_no_vertex_without_a_face():
    from skimage import measure

    from backend.extraction.marching import OUTSIDE

    padded = np.pad(ON_THE_LEVEL, 1, constant_values=OUTSIDE)  # as grid_to_mesh pads
    verts, faces, _, _ = measure.marching_cubes(padded, level=0.0, allow_degenerate=False)
    assert len(np.setdiff1d(np.arange(len(verts)), faces)) == 1  # what scikit-image leaves
    mesh = grid_to_mesh(ON_THE_LEVEL, 0.0, 0.0, 1.0)
    assert np.array_equal(np.unique(mesh.faces), np.arange(len(mesh.vertices)))
    # the faces are the same triangles, renumbered
    assert np.allclose(np.sort(mesh.vertices[mesh.faces].reshape(-1, 3), axis=0),
                       np.sort((verts[faces[:, ::-1]] - 1.0).reshape(-1, 3), axis=0))


def test_shape_cut_by_the_box_is_still_closed():
    grid = mise(lambda p: 0.7 - p.norm(dim=1), 32, 1)  # a sphere larger than the box
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    assert trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).is_watertight


def thin_plate(p: torch.Tensor, z0: float = 0.017, half_thickness: float = 0.006) -> torch.Tensor:
    """A 0.012-thick square plate: thinner than a 32^3 cell (0.034), between the coarse grid planes."""
    inside_z = half_thickness - (p[:, 2] - z0).abs()
    inside_xy = 0.3 - p[:, :2].abs().max(dim=1).values
    return torch.minimum(inside_z, inside_xy)


def plate_points(n: int = 2000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * 0.6 - 0.3
    return torch.cat([xy, torch.full((n, 1), 0.017)], dim=1)


def test_plain_mise_loses_a_thin_plate_that_the_dense_grid_finds():
    dense = dense_grid(thin_plate, 128)
    assert (dense.values > 0).sum() > 1000
    plain = mise(thin_plate, 32, 2)
    assert (plain.values > 0).sum() == 0


@pytest.mark.parametrize("variant", ["seed_points", "margin"])
def test_mise_finds_the_thin_plate(variant):
    kwargs = {"seed_points": plate_points()} if variant == "seed_points" else {"margin": 0.03}
    grid = mise(thin_plate, 32, 2, **kwargs)
    dense = dense_grid(thin_plate, 128)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert tm.is_watertight
    assert tm.bounds[0][:2] == pytest.approx([-0.3, -0.3], abs=0.01)
    assert tm.bounds[1][:2] == pytest.approx([0.3, 0.3], abs=0.01)
    assert np.array_equal(grid.values > 0, dense.values > 0)
    assert grid.evaluations < dense.evaluations / 4


def test_seed_points_let_mise_start_coarser_with_the_same_result():
    """Every cell that holds an input point is refined, so a point cloud's grid may start at 16^3:
    the plate comes out exactly as from 32^3, for fewer evaluations."""
    from_32 = mise(thin_plate, 32, 2, seed_points=plate_points())
    from_16 = mise(thin_plate, 16, 3, seed_points=plate_points())
    assert np.array_equal(from_16.values > 0, from_32.values > 0)
    assert from_16.evaluations < from_32.evaluations


def test_progress_and_cancel():
    fractions = []
    mise(sphere, 32, 2, progress=fractions.append, batch_points=4096)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 5
    calls = []

    def cancel_after_three():
        calls.append(1)
        return len(calls) > 3

    from backend.errors import Cancelled
    with pytest.raises(Cancelled):
        mise(sphere, 32, 2, batch_points=4096, should_cancel=cancel_after_three)
    assert len(calls) == 4  # checked between batches, stopped at the first check that said so


def test_empty_grid_gives_empty_mesh():
    grid = mise(lambda p: -torch.ones(len(p)), 32, 1)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    assert mesh.faces.shape == (0, 3)
    assert grid.evaluations == 33 ** 3  # nothing to refine


def test_simplify_to_face_budget():
    pytest.importorskip("fast_simplification")
    grid = mise(torus, 32, 2)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    small = simplify_mesh(mesh, 2000)
    assert 1000 < len(small.faces) <= 2000
    assert np.abs(small.vertices).max() < 0.45


def test_simplify_checks_cancel_before_each_pass():
    pytest.importorskip("fast_simplification")
    from backend.errors import Cancelled
    grid = mise(torus, 32, 2)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    with pytest.raises(Cancelled):
        simplify_mesh(mesh, 2000, should_cancel=lambda: True)
    assert simplify_mesh(mesh, 2000, should_cancel=lambda: False).faces.shape == simplify_mesh(mesh, 2000).faces.shape


def box(p: torch.Tensor) -> torch.Tensor:
    return 0.3 - p.abs().max(dim=1).values


def surface_error(mesh, distance_to_truth, count=20000):
    points, _ = trimesh.sample.sample_surface(trimesh.Trimesh(mesh.vertices, mesh.faces, process=False), count, seed=0)
    return np.abs(distance_to_truth(points))


@pytest.mark.parametrize("tolerance", [0.0005, 0.002])
def test_simplify_to_tolerance_keeps_the_surface_within_it(tolerance):
    """Where the surface bends (a sphere) faces go in proportion to the tolerance, and the surface
    stays within it (this bound rests on fast-simplification's threshold schedule); where it is
    flat (a box) almost every face goes; the mesh stays closed."""
    pytest.importorskip("fast_simplification")
    from backend.extraction.marching import simplify_to_tolerance

    grid = mise(sphere, 32, 2)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    small = simplify_to_tolerance(mesh, tolerance)
    assert len(small.faces) < len(mesh.faces) / (4 if tolerance < 0.001 else 10)
    assert surface_error(small, lambda p: np.linalg.norm(p, axis=1) - 0.35).max() < tolerance
    assert trimesh.Trimesh(small.vertices, small.faces, process=False).is_watertight
    grid = mise(box, 32, 2)
    cube = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)   # its edges cut by marching cubes
    small = simplify_to_tolerance(cube, tolerance)
    assert len(small.faces) < 300
    error = surface_error(cube, lambda p: np.abs(p).max(axis=1) - 0.3).max()
    assert surface_error(small, lambda p: np.abs(p).max(axis=1) - 0.3).max() < error + tolerance


def test_taubin_smoothing_takes_out_a_ripple_without_shrinking_the_surface():
    """A sphere of radius 0.35 whose vertices were each pushed in or out by up to 0.005 (what fits
    to noisy points leave): the ripple falls to under half, the mean radius stays within 0.1%."""
    from backend.extraction.marching import MeshArrays, taubin_smoothed

    grid = mise(sphere, 32, 1)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    radial = mesh.vertices / np.linalg.norm(mesh.vertices, axis=1, keepdims=True)
    ripple = np.random.default_rng(0).uniform(-0.005, 0.005, size=(len(radial), 1))
    rough = MeshArrays((radial * (0.35 + ripple)).astype(np.float32), mesh.faces)
    smooth = taubin_smoothed(rough)
    radii = np.linalg.norm(smooth.vertices, axis=1)
    rms = lambda deviation: float(np.sqrt(np.mean(deviation ** 2)))
    assert rms(radii - 0.35) < rms(ripple) / 2
    assert radii.mean() == pytest.approx(0.35, rel=1e-3)
    assert (smooth.faces == mesh.faces).all()


def test_the_free_vertices_span_a_membrane_over_the_held_ones():
    """A flat grid whose inner vertices were pushed off the plane: freed, they come back onto the
    plane their held rim spans. A free piece that touches no held vertex stays where it was."""
    import trimesh
    from backend.extraction.marching import MeshArrays, spanned

    plane = trimesh.creation.box(extents=(1.0, 1.0, 0.2)).subdivide().subdivide().subdivide()
    top = plane.vertices[:, 2] > 0.05
    inner = top & (np.abs(plane.vertices[:, :2]).max(axis=1) < 0.3)
    bumpy = plane.vertices.copy()
    bumpy[inner, 2] += np.random.default_rng(0).uniform(0.05, 0.2, inner.sum())
    flat = spanned(MeshArrays(bumpy.astype(np.float32), plane.faces), inner)
    assert np.abs(flat.vertices[inner, 2] - 0.1).max() < 1e-5
    assert (flat.vertices[~inner] == bumpy[~inner].astype(np.float32)).all()
    everything = np.ones(len(bumpy), bool)
    assert (spanned(MeshArrays(bumpy.astype(np.float32), plane.faces), everything).vertices
            == bumpy.astype(np.float32)).all()


def test_sparser_points_get_more_smoothing_steps_up_to_a_cap():
    """The refined mesh's smoothing follows the points' spacing: the default 8 steps where they are
    denser than the mesh's edges (30,000 points at 128^3), more between sparse points (3000), up to
    a cap (300); always an even number, so the last step inflates."""
    from backend.extraction.marching import MAX_SMOOTHING_STEPS, SMOOTHING_STEPS, smoothing_steps

    edge = 0.0075
    steps = [smoothing_steps(ratio * edge, edge) for ratio in (0.0, 0.3, 0.45, 0.7, 0.9, 1.2, 2.0, 4.0)]
    assert steps[:3] == [SMOOTHING_STEPS] * 3 and steps[-2:] == [MAX_SMOOTHING_STEPS] * 2
    assert steps == sorted(steps) and SMOOTHING_STEPS < steps[4] < MAX_SMOOTHING_STEPS
    assert all(step % 2 == 0 for step in steps)


def test_over_sparse_noisy_points_the_spacings_smoothing_leaves_truer_normals():
    """300 noisy points on a ball: the mesh refined onto them keeps a ripple from fit to fit, which
    tilts its faces; the spacing's steps straighten them more than the default 8 (the faces' normals
    a sixth closer to the ball's), and the radius stays."""
    from backend.extraction.marching import SMOOTHING_STEPS, MeshArrays, smoothing_steps, taubin_smoothed
    from backend.extraction.refine import median_edge, refine_to_points
    from backend.extraction.spacing import median_spacing

    grid = mise(sphere, 64, 1)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(300, 3))
    points = 0.35 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    points += rng.normal(scale=0.005, size=points.shape)
    refined = MeshArrays(refine_to_points(mesh.vertices, mesh.faces, points), mesh.faces)
    steps = smoothing_steps(median_spacing(points), median_edge(refined.vertices, refined.faces))

    def normal_error(m):  # mean of 1 - |cos| between each face's normal and the ball's there
        corners = m.vertices[m.faces].astype(np.float64)
        normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        centres = corners.mean(axis=1)
        cosines = np.einsum("fi,fi->f", normals, centres)
        cosines /= np.linalg.norm(normals, axis=1) * np.linalg.norm(centres, axis=1)
        return float(np.mean(1.0 - np.abs(cosines)))

    default, spaced = taubin_smoothed(refined, SMOOTHING_STEPS), taubin_smoothed(refined, steps)
    assert steps > 4 * SMOOTHING_STEPS
    assert normal_error(spaced) < 0.9 * normal_error(default)      # 0.0071 against 0.0085
    assert np.linalg.norm(spaced.vertices, axis=1).mean() == pytest.approx(0.35, abs=0.002)


def test_a_sparser_cloud_is_decimated_to_a_coarser_tolerance(monkeypatch):
    """The default tolerance follows the points' spacing (ten times fewer points on a surface:
    about sqrt(10) times the spacing), never finer than the floor; a large cloud's spacing is
    measured on a sample and scaled back to the whole cloud."""
    from scipy.spatial import cKDTree

    from backend.extraction import marching
    from backend.extraction.spacing import median_spacing

    def sphere(count):
        p = np.random.default_rng(count).normal(size=(count, 3))
        return 0.5 * p / np.linalg.norm(p, axis=1, keepdims=True)

    def tolerance(points):
        return marching.cloud_tolerance(median_spacing(points))

    sparse, dense = tolerance(sphere(300)), tolerance(sphere(3000))
    assert sparse / dense == pytest.approx(np.sqrt(10), rel=0.25)
    assert tolerance(sphere(200_000)) == marching.DEFAULT_TOLERANCE
    monkeypatch.setattr(marching, "DEFAULT_TOLERANCE", 0.0)
    large = sphere(100_000)
    exact = marching.SPACING_TOLERANCE * np.median(cKDTree(large).query(large, k=2)[0][:, 1])
    assert tolerance(large) == pytest.approx(exact, rel=0.15)


def test_point_cloud_meshes_are_decimated_by_default_and_a_budget_still_rules(tmp_path, monkeypatch):
    pytest.importorskip("fast_simplification")
    from backend import pipeline
    from backend.pipeline import Reconstructor, ReconstructOptions
    from conftest import make_octahedron_checkpoint

    monkeypatch.setattr(pipeline, "POINT_SUPPORT", None, raising=False)  # the network's own octahedron

    checkpoint = str(make_octahedron_checkpoint(tmp_path / "octa.safetensors", radius=0.4))
    rng = np.random.default_rng(0)
    p = rng.exponential(size=(3000, 3)) * rng.choice([-1.0, 1.0], size=(3000, 3))
    scan = p / np.abs(p).sum(axis=1, keepdims=True) * 0.4            # on the network's own surface
    reconstructor = Reconstructor("cpu")
    every = reconstructor.reconstruct_points(scan, ReconstructOptions(checkpoint=checkpoint, max_faces=10 ** 9))
    default = reconstructor.reconstruct_points(scan, ReconstructOptions(checkpoint=checkpoint))
    budget = reconstructor.reconstruct_points(scan, ReconstructOptions(checkpoint=checkpoint, max_faces=5000))
    # flat faces end in a few large triangles; the edges, rounded over the refinement's
    # neighbourhoods, keep small ones (every face: 51,896; default: 13,090)
    assert len(default.faces) < len(every.faces) / 3 and "decimate" in default.stats["seconds"]
    assert 2500 < len(budget.faces) <= 5000


def sphere_and_damaging_decimation(monkeypatch, damage):
    """A closed sphere mesh, and fast-simplification replaced by itself followed by
    damage(vertices, faces, call number) -> faces; -> (mesh, the aggressiveness of each call)."""
    fast_simplification = pytest.importorskip("fast_simplification")
    grid = mise(sphere, 32, 1)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    real, calls = fast_simplification.simplify, []

    def damaged(points, faces, agg, **kwargs):
        calls.append(agg)
        verts, out = real(points, faces, agg=agg, **kwargs)
        return verts, damage(verts, out, len(calls))

    monkeypatch.setattr(fast_simplification, "simplify", damaged)
    return mesh, calls


def test_a_decimation_that_opens_a_closed_mesh_is_redone_at_a_smaller_tolerance(monkeypatch):
    """fast-simplification can leave an edge with four faces where two sheets come close; the
    retry is checked with a stand-in that opens the mesh (a hole too large to close) on its first
    calls."""
    from backend.extraction.marching import is_closed, simplify_to_tolerance

    def opens_at_first(verts, faces, call):
        cap = verts[faces].mean(axis=1)[:, 2] > 0.25          # the sphere's top cap: a wide hole
        return faces[~cap] if call < 3 else faces

    mesh, calls = sphere_and_damaging_decimation(monkeypatch, opens_at_first)
    small = simplify_to_tolerance(mesh, 0.002)
    assert is_closed(small.faces) and len(small.faces) < len(mesh.faces) and len(calls) == 3
    assert calls[0] > calls[1] > calls[2]                   # each retry with a smaller tolerance
    calls.clear()
    assert simplify_to_tolerance(mesh, 0.002, attempts=2) is mesh and len(calls) == 2


def test_the_small_holes_a_decimation_leaves_are_closed_without_a_retry(monkeypatch):
    """Where fast-simplification drops back-to-back faces it leaves holes of a few edges (seven of
    4 and 8 edges on a bunny's 30,000 points): each is closed by a fan around its rim's mean, wound
    like its neighbours, at the first attempt."""
    from backend.extraction.marching import is_closed, simplify_to_tolerance

    def leaves_two_holes(verts, faces, call):
        top, bottom = np.argmax(verts[:, 2]), np.argmin(verts[:, 2])
        return faces[~np.isin(faces, [top, bottom]).any(axis=1)]   # the fans around two vertices

    mesh, calls = sphere_and_damaging_decimation(monkeypatch, leaves_two_holes)
    small = simplify_to_tolerance(mesh, 0.002)
    assert is_closed(small.faces) and len(calls) == 1
    surface = trimesh.Trimesh(small.vertices, small.faces)
    assert surface.is_watertight and surface.is_winding_consistent and surface.volume > 0
    assert surface.volume == pytest.approx(4 / 3 * np.pi * 0.35 ** 3, rel=0.03)


def test_two_sheets_pinched_at_an_edge_get_their_own_vertices():
    from backend.extraction import MeshArrays
    from backend.extraction.marching import PINCH_GAP, is_closed, split_pinches

    tetra = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, -1, 0], [0, 0, -1]], np.float32)
    # a second tetrahedron on the same edge 0-1, turned away from the first: four faces on that edge
    other = np.array([[0, 4, 1], [0, 1, 5], [1, 4, 5], [0, 5, 4]])[:, ::-1]
    pinched = MeshArrays(vertices, np.concatenate([tetra, other]).astype(np.int32))
    assert not is_closed(pinched.faces)
    split = split_pinches(pinched)
    assert is_closed(split.faces) and len(split.vertices) == len(vertices) + 2
    moved = np.linalg.norm(split.vertices[split.faces] - pinched.vertices[pinched.faces], axis=2)
    assert moved.max() == pytest.approx(PINCH_GAP, rel=1e-3)                    # the copies, a hair apart
    assert trimesh.Trimesh(split.vertices, split.faces, process=False).is_winding_consistent
    # ... so that a mesh merged by position (trimesh's default) is still closed: two tetrahedra
    merged = trimesh.Trimesh(split.vertices, split.faces)
    assert merged.is_watertight and merged.body_count == 2
    whole = split_pinches(MeshArrays(vertices[:4], tetra.astype(np.int32)))      # nothing to split
    assert len(whole.vertices) == 4 and is_closed(whole.faces)


def test_back_to_back_faces_are_dropped():
    from backend.extraction import MeshArrays
    from backend.extraction.marching import drop_pillows, is_closed

    tetra = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, -0.5, 0]], np.float32)
    pillow = np.array([[0, 1, 4], [1, 0, 4]])                        # zero volume, on the edge 0-1
    mesh = MeshArrays(vertices, np.concatenate([tetra, pillow]).astype(np.int32))
    assert not is_closed(mesh.faces)
    kept = drop_pillows(mesh)
    np.testing.assert_array_equal(kept.faces, tetra)
    assert is_closed(kept.faces)


def test_specks_go_and_every_real_part_stays():
    """A sphere's mesh with what decimation leaves of a grid's specks beside it: a speck collapsed
    to a point (an octahedron of one vertex), two triangles back to back, a flat sliver, a
    tetrahedron smaller than a square cell; and a ball two cells wide and an open sheet, which
    stay. Far from the origin (a survey's coordinates) the answer is the same."""
    from backend.extraction import MeshArrays
    from backend.extraction.marching import without_specks

    cell = 0.01
    body = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    octahedron = [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]]
    point = trimesh.Trimesh(np.full((6, 3), 0.5), octahedron, process=False)
    pillow = trimesh.Trimesh([[0.6, 0, 0], [0.7, 0, 0], [0.6, 0.1, 0]], [[0, 1, 2], [0, 2, 1]], process=False)
    sliver = trimesh.creation.box(extents=[0.1, 0.1, 1e-6])
    sliver.apply_translation([0, 0.6, 0])
    tetra = trimesh.Trimesh(0.004 * np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]) + [0, -0.6, 0],
                            [[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]], process=False)   # 0.16 square cells
    ball = trimesh.creation.icosphere(subdivisions=2, radius=cell)                   # 12.6 square cells
    ball.apply_translation([0.6, 0.6, 0])
    sheet = trimesh.Trimesh([[-0.6, 0, 0], [-0.5, 0, 0], [-0.6, 0.1, 0]], [[0, 1, 2]], process=False)  # open
    mesh = trimesh.util.concatenate([body, point, pillow, sliver, tetra, ball, sheet])
    for offset in (0.0, 5e5):
        cleaned, dropped = without_specks(MeshArrays(mesh.vertices + offset, mesh.faces), cell)
        kept = trimesh.Trimesh(cleaned.vertices - offset, cleaned.faces, process=False)
        assert dropped == 4
        assert sorted(len(p.faces) for p in kept.split(only_watertight=False)) == [1, len(ball.faces), len(body.faces)]
        assert len(cleaned.vertices) == len(body.vertices) + len(ball.vertices) + 3
    alone, dropped = without_specks(MeshArrays(tetra.vertices, tetra.faces), cell)   # the largest always stays
    assert dropped == 0 and len(alone.faces) == 4


def test_an_open_scans_mesh_comes_without_specks():
    """1500 points on a hemisphere of radius 1 (an object scanned from above): the shipped model's
    mesh held sixteen specks beside the body, eight of them collapsed to single points (coincident
    vertices). Now every piece left has an area of a square cell or more (a cell: the 1.1-wide
    query box over 128, times the cloud's scale, 2) and encloses a volume."""
    from scipy.spatial import cKDTree

    from backend.pipeline import ReconstructOptions, Reconstructor

    rng = np.random.default_rng(0)
    d = rng.normal(size=(3000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    result = Reconstructor("cpu").reconstruct_points(d[d[:, 2] > 0], ReconstructOptions())
    assert result.stats["specks"] > 10
    cell = 2.0 * 1.1 / 128
    for piece in trimesh.Trimesh(result.vertices, result.faces, process=False).split(only_watertight=False):
        assert piece.is_watertight and piece.area > cell ** 2 and abs(piece.volume) > 0.1 * cell * piece.area
    assert (cKDTree(result.vertices).query(result.vertices, k=2)[0][:, 1] > 0).all()
