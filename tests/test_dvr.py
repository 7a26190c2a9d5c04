"""DVR (training/dvr.py, training/posed_images.py, backend/models/textured.py): the textured field,
posed views and their rays, the losses, and fits of analytic shapes from their views. The fits
are the evidence that the whole chain learns: masks alone recover an ellipsoid; depth carves a
bowl's hollow that no silhouette shows, and only through the implicit depth gradient."""

import json

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

import backend.raymarch
from backend.camera import project
from backend.checkpoint import load_checkpoint
from backend.models import build_model
from training import dvr
from training.metrics import occupancy_iou
from training.posed_images import (cast_views, field_caster, load_folder_views, load_prepared_views,
                                   PosedViews)
from training.render import random_cameras

FIELD_CONFIG = {"input": {"kind": "none"}, "encoder": {"name": "none"},
                "decoder": {"name": "textured_field", "hidden": 64, "n_blocks": 3, "texture": True}}
ELLIPSOID_HALF = torch.tensor([0.45, 0.3, 0.2], dtype=torch.float64)
BOWL_CENTRE = torch.tensor([0.0, 0.0, 0.2], dtype=torch.float64)


@pytest.fixture(autouse=True)
def one_thread():
    """Small networks on a shared machine: a second thread buys nothing and, when the cores are
    busy, costs up to ten times the time (measured on a 2-core box under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ellipsoid(p):
    return 10.0 * (1.0 - ((p / ELLIPSOID_HALF.to(p)) ** 2).sum(-1))


def bowl(p):
    """A ball of radius 0.45 hollowed from above by a ball of radius 0.38: a bowl opening up (+z),
    whose hollow no silhouette shows (the rim hides it), but the depth seen from above does."""
    outer = 10.0 * (0.45 - p.norm(dim=-1))
    hollow = 10.0 * (0.38 - (p - BOWL_CENTRE.to(p)).norm(dim=-1))
    return torch.minimum(outer, -hollow)


def stripes(points):
    """A colour field that differs on every side of an object."""
    return (0.5 + 0.4 * np.sin(6.0 * points)).astype(np.float32)


def analytic_views(shape, views: int, size: int, seed: int = 0) -> PosedViews:
    world_mats, camera_mats = random_cameras(np.random.default_rng(seed), views, size)
    return cast_views(field_caster(shape), world_mats, camera_mats, size, stripes)


def fitted_iou(shape, views: PosedViews, losses: dict, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(FIELD_CONFIG)
    settings = dvr.FitSettings.from_config({"rays": 512, "steps": steps, "lr": 1e-3, "losses": losses,
                                            "ray_steps": [[0, 16], [steps // 2, 32]]})
    dvr.fit(model, views, settings)
    points = np.random.default_rng(1).uniform(-0.55, 0.55, (50000, 3)).astype(np.float32)
    truth = shape(torch.from_numpy(points).double()).numpy() >= 0.0
    return occupancy_iou(dvr.predicted_occupancy(model, points), truth)


# ---------------------------------------------------------------------------------------------
# The textured field


def test_textured_field_returns_occupancy_and_colour():
    model = build_model(FIELD_CONFIG)
    p = torch.rand(2, 7, 3) - 0.5
    logits, rgb = model.decoder(p, None, with_colour=True)
    assert logits.shape == (2, 7) and rgb.shape == (2, 7, 3)
    assert ((rgb >= 0) & (rgb <= 1)).all()
    assert torch.equal(model.decode(p, model.encode(None)), logits)   # the usual contract: logits only


def test_texture_head_is_off_unless_asked_for():
    config = json.loads(json.dumps(FIELD_CONFIG))
    del config["decoder"]["texture"]
    model = build_model(config)
    with pytest.raises(ValueError, match="no texture head"):
        model.decoder(torch.zeros(1, 1, 3), None, with_colour=True)


def test_fitted_field_survives_a_checkpoint_round_trip(tmp_path):
    from backend.checkpoint import save_checkpoint

    config = dict(FIELD_CONFIG, decoder=dict(FIELD_CONFIG["decoder"], frequencies=2))
    model = build_model(config)
    save_checkpoint(tmp_path / "m.safetensors", model, config)
    loaded, loaded_config, _ = load_checkpoint(tmp_path / "m.safetensors")
    p = torch.rand(1, 5, 3)
    assert loaded_config == config
    assert torch.allclose(loaded.decoder(p, None, with_colour=True)[1], model.decoder(p, None, with_colour=True)[1])


# ---------------------------------------------------------------------------------------------
# Posed views and rays


def test_ray_depths_are_distances_whose_points_have_the_views_camera_depth():
    views = analytic_views(ellipsoid, 2, 16)
    rays = dvr.view_rays(views)
    seen = torch.nonzero(rays.masks).squeeze(1)
    assert len(seen) > 0 and torch.isfinite(rays.depths[seen]).all()
    points = (rays.origins + rays.depths[:, None] * rays.directions)[seen].double().numpy()
    view = (seen // (16 * 16)).numpy()
    pixel = (seen % (16 * 16)).numpy()
    for v in (0, 1):
        uv, z = project(views.world_mats[v], views.camera_mats[v], points[view == v])
        assert np.allclose(uv[:, 0], pixel[view == v] % 16, atol=1e-3)     # the pixel's column
        assert np.allclose(z, views.depths[v].ravel()[pixel[view == v]], atol=1e-4)
    assert np.abs(ellipsoid(torch.from_numpy(points)).numpy()).max() < 1e-2   # on the surface


def test_ray_sampler_keeps_the_share_of_rays_inside_the_masks():
    views = analytic_views(ellipsoid, 2, 16)
    sampler = dvr.RaySampler(dvr.view_rays(views), inside_fraction=0.25, seed=0)
    batch = sampler.sample(400)
    assert int(batch.masks.sum()) == 100


def test_random_points_lie_on_their_rays_inside_the_padded_cube():
    views = analytic_views(ellipsoid, 1, 8)
    rays = dvr.view_rays(views)
    crosses = backend.raymarch.ray_box_interval(rays.origins, rays.directions)[2]
    assert crosses.any() and not crosses.all()      # the corners' rays miss the cube
    points = dvr.random_points_in_cube(rays, torch.Generator().manual_seed(0))
    assert (points[crosses].abs() <= 0.55 + 1e-5).all()
    offsets = points - rays.origins
    along = torch.cross(offsets, rays.directions, dim=-1).norm(dim=-1)
    assert along.max() < 1e-4


def test_ray_samples_refine_on_schedule():
    schedule = [[0, 16], [100, 32], [300, 64]]
    assert [dvr.ray_steps_at(step, schedule) for step in (0, 99, 100, 299, 300, 10**6)] == [16, 16, 32, 32, 64, 64]


def test_prepared_views_load_in_the_prepare_format(tmp_path):
    views = analytic_views(ellipsoid, 2, 16)
    (tmp_path / "images").mkdir()
    for v in range(2):
        rgba = np.concatenate([views.colours[v] * 255, views.masks[v, ..., None] * 255.0], axis=2)
        Image.fromarray(rgba.round().astype(np.uint8)).save(tmp_path / "images" / f"{v:03d}.png")
    np.savez(tmp_path / "cameras.npz", world_mat=views.world_mats.astype(np.float32),
             camera_mat=views.camera_mats.astype(np.float32))
    np.savez(tmp_path / "depth.npz", depth=views.depths.astype(np.float16))
    loaded = load_prepared_views(tmp_path)
    assert np.array_equal(loaded.masks, views.masks)
    assert np.abs(loaded.colours - views.colours).max() <= 0.5 / 255 + 1e-6
    assert np.allclose(loaded.depths[views.masks], views.depths[views.masks], rtol=1e-3)
    assert np.allclose(loaded.world_mats, views.world_mats, atol=1e-6)


def test_a_users_folder_of_posed_images_loads(tmp_path):
    views = analytic_views(ellipsoid, 2, 16)
    entries = []
    for v in range(2):
        Image.fromarray((views.colours[v] * 255).astype(np.uint8)).save(tmp_path / f"{v}.png")
        Image.fromarray(views.masks[v].astype(np.uint8) * 255).save(tmp_path / f"{v}_mask.png")
        entries.append({"image": f"{v}.png", "mask": f"{v}_mask.png",
                        "world_mat": views.world_mats[v].tolist(), "camera_mat": views.camera_mats[v].tolist()})
    (tmp_path / "cameras.json").write_text(json.dumps({"views": entries}))
    loaded = load_folder_views(tmp_path)
    assert np.array_equal(loaded.masks, views.masks)
    assert np.allclose(loaded.camera_mats, views.camera_mats)

    del entries[1]["mask"]             # an opaque picture without a mask says nothing about the object
    (tmp_path / "cameras.json").write_text(json.dumps({"views": entries}))
    with pytest.raises(ValueError, match="view 1.*no transparency"):
        load_folder_views(tmp_path)


# ---------------------------------------------------------------------------------------------
# Losses and rendering


class TrueShape(torch.nn.Module):
    """The analytic ellipsoid as a fitted model: its own logits (times sharpness), and the views'
    colour field as its texture head."""
    texture = True

    def __init__(self, sharpness):
        super().__init__()
        self.sharpness = torch.nn.Parameter(torch.tensor(sharpness))
        self.decoder = self

    def decode(self, p, c):
        return self.sharpness * ellipsoid(p.double()).float()

    def __call__(self, p, c, with_colour):
        return self.decode(p, c), torch.from_numpy(stripes(p.detach().numpy()))


def test_the_true_shape_has_no_depth_or_colour_loss_and_its_mask_loss_falls_as_it_sharpens():
    views = analytic_views(ellipsoid, 2, 16)
    rays = dvr.view_rays(views)

    weights = {"mask": 1.0, "depth": 1.0, "rgb": 1.0, "normal": 0.0}
    losses = {}
    for sharpness in (1.0, 10.0):
        shape = TrueShape(sharpness)
        losses[sharpness] = dvr.ray_losses(dvr.occupancy_field(shape), rays, weights, 64, 8,
                                           torch.Generator().manual_seed(0), colour=lambda p: dvr.colour_at(shape, p))
    blurred, sharp = losses[1.0], losses[10.0]
    assert sharp["depth"].item() < 1e-4 and sharp["rgb"].item() < 1e-3
    assert sharp["mask"].item() < 0.1 * blurred["mask"].item()


def test_rays_that_miss_inside_the_mask_are_told_to_be_inside_where_they_came_closest():
    """The views show the ellipsoid; the field is a ball inside it that the rim's rays miss. Their
    occupancy target is the marched sample where the field was largest ("likeliest"), not a
    random point of the ray (DVR's "random"): there the field is already nearest to inside, so
    that part of the mask loss is smaller, and its pull lands next to what the field has."""
    views = analytic_views(ellipsoid, 2, 16)
    rays = dvr.view_rays(PosedViews(views.world_mats, views.camera_mats, views.masks, views.colours, None))
    small_ball = lambda p: 10.0 * (0.15 - p.norm(dim=-1))
    weights = {"mask": 1.0, "depth": 0.0, "rgb": 0.0, "normal": 0.0}
    losses = {target: dvr.ray_losses(small_ball, rays[rays.masks], weights, 64, 8, torch.Generator().manual_seed(0),
                                     missed_rays=target)["mask"].item() for target in dvr.MISSED_RAY_TARGETS}
    assert losses["likeliest"] < 0.5 * losses["random"]
    with pytest.raises(ValueError, match="unknown missed_rays"):
        dvr.FitSettings.from_config({"missed_rays": "nearest"})


def test_rendering_the_true_shape_reproduces_its_views():
    views = analytic_views(ellipsoid, 2, 24)
    masks, colours = dvr.render(TrueShape(10.0), views)
    assert (masks != views.masks).mean() < 0.01                # a few rim pixels at most
    assert dvr.psnr(colours, views.colours) > 30.0


def test_normal_smoothness_is_zero_on_a_plane_and_positive_on_a_ball():
    points = torch.rand(50, 3) * 0.2
    plane = lambda p: p[..., 2] * 3.0
    ball = lambda p: 0.3 - p.norm(dim=-1)
    for field, expect_zero in ((plane, True), (ball, False)):
        spread = (dvr.unit_normals(field, points) - dvr.unit_normals(field, points + 0.05)).norm(dim=-1).mean()
        assert (spread.item() < 1e-6) == expect_zero


def test_a_loss_without_its_data_is_refused():
    views = analytic_views(ellipsoid, 1, 8)
    views_without_depth = PosedViews(views.world_mats, views.camera_mats, views.masks, views.colours, None)
    settings = dvr.FitSettings.from_config({"losses": {"mask": 1.0, "depth": 1.0}})
    with pytest.raises(ValueError, match="'depth' is on"):
        dvr.fit(build_model(FIELD_CONFIG), views_without_depth, settings)
    with pytest.raises(ValueError, match="unknown loss"):
        dvr.FitSettings.from_config({"losses": {"silhouette": 1.0}})


def test_a_loss_the_config_does_not_name_is_off():
    assert dvr.FitSettings.from_config({"losses": {"points": 1.0}}).losses == \
        {"mask": 0.0, "depth": 0.0, "rgb": 0.0, "normal": 0.0, "points": 1.0}
    assert dvr.FitSettings.from_config({}).losses["mask"] == 1.0      # no losses at all: silhouettes


def test_learning_rate_decays_to_a_twentieth():
    assert dvr.learning_rate(1e-3, 0.0) == pytest.approx(1e-3)
    assert dvr.learning_rate(1e-3, 1.0) == pytest.approx(5e-5)


# ---------------------------------------------------------------------------------------------
# Fits (about 15 s each on one core)


def test_masks_alone_recover_an_ellipsoid():
    # The untrained field is empty (IoU 0); by hand, turning the mask loss off leaves it there.
    iou = fitted_iou(ellipsoid, analytic_views(ellipsoid, 6, 40), {"mask": 1.0}, steps=250)
    assert iou > 0.85


BOWL_BOUND = 0.61  # halfway: masks alone reach 0.53 (the visual hull fills the hollow), masks + depth 0.69


@pytest.fixture(scope="module")
def bowl_views():
    return analytic_views(bowl, 8, 40)


def test_depth_carves_the_hollow_that_masks_cannot_see(bowl_views):
    assert fitted_iou(bowl, bowl_views, {"mask": 1.0, "depth": 1.0}, steps=300) > BOWL_BOUND


def test_without_the_implicit_depth_gradient_the_hollow_stays_filled(bowl_views, monkeypatch):
    # The same fit with ImplicitDepth's gradient zeroed: the depth loss then teaches nothing, and
    # the bound above fails. It is what makes the test above evidence for the gradient.
    def no_gradient(ctx, grad_depth):
        return None, torch.zeros_like(grad_depth), None, None
    monkeypatch.setattr(backend.raymarch.ImplicitDepth, "backward", staticmethod(no_gradient))
    assert fitted_iou(bowl, bowl_views, {"mask": 1.0, "depth": 1.0}, steps=300) < BOWL_BOUND


# ---------------------------------------------------------------------------------------------
# Command line


def test_command_line_fit_writes_a_loadable_checkpoint(tmp_path):
    views = analytic_views(ellipsoid, 3, 16)
    entries = []
    for v in range(3):
        rgba = np.concatenate([views.colours[v] * 255, views.masks[v, ..., None] * 255.0], axis=2)
        Image.fromarray(rgba.astype(np.uint8)).save(tmp_path / f"{v}.png")
        entries.append({"image": f"{v}.png", "world_mat": views.world_mats[v].tolist(),
                        "camera_mat": views.camera_mats[v].tolist()})
    (tmp_path / "cameras.json").write_text(json.dumps({"views": entries}))
    config = {"data": {"folder": str(tmp_path)}, "held_out_views": [2], "model": FIELD_CONFIG,
              "losses": {"mask": 1.0, "rgb": 1.0}, "rays": 256, "steps": 40}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert dvr.main([str(tmp_path / "config.json"), "--out", str(tmp_path / "run")]) == 0
    model, loaded_config, metadata = load_checkpoint(tmp_path / "run" / "model_last.safetensors")
    assert loaded_config == FIELD_CONFIG
    assert metadata["dvr"]["steps"] == 40 and "held_out_psnr" in metadata["dvr"]
    assert (tmp_path / "run" / "log.csv").read_text().count("\n") == 41
    mesh = trimesh.load(tmp_path / "run" / "mesh.ply", process=False)
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)   # the texture head's colours


def test_fitted_mesh_of_the_true_shape_is_the_shape_with_its_colours():
    vertices, faces, colours = dvr.fitted_mesh(TrueShape(10.0), resolution0=16, upsampling_steps=1)
    on_surface = ((vertices / ELLIPSOID_HALF.numpy()) ** 2).sum(axis=1)
    assert len(faces) > 0 and np.abs(on_surface - 1.0).max() < 0.05
    assert np.allclose(colours, stripes(vertices), atol=1e-6)
