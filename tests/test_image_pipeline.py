"""The viewer-centred image path end to end (backend.pipeline with backend.viewer): the mask is
law, the result is placed as docs/CONTRACTS.md says, and bad pictures fail or warn clearly.

A "solid" model (tests/conftest.py: every point inside, camera level) makes the result the mask's
extrusion through the viewer box, so what must come back is known exactly without any training."""

import numpy as np
import pytest
import torch

from backend.camera import VIEW_HALF_EXTENT
from backend.errors import OccnetError
from backend.pipeline import ReconstructOptions, Reconstructor
from backend.viewer import OUTSIDE_LOGIT, inside_mask, masked_logits


def ell_picture(size=200, alpha=True):
    """An L: a tall bar on the left and a foot to the right along the bottom, on white."""
    mask = np.zeros((size, size), bool)
    mask[40:160, 60:90] = True      # the bar
    mask[130:160, 60:150] = True    # the foot, to the right
    rgb = np.ones((size, size, 3))
    rgb[mask] = [0.2, 0.4, 0.8]
    channels = [rgb, mask[..., None].astype(float)] if alpha else [rgb]
    return (np.concatenate(channels, axis=-1) * 255).astype(np.uint8), mask


def test_a_point_outside_the_mask_is_empty_whatever_the_network_says():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[20:40, 20:40] = True
    points = torch.tensor([[0.0, 0.0, 0.0], [0.45, 0.45, 0.0], [0.0, 0.0, -5.0]])  # centre, corner, behind
    logits = masked_logits(lambda p: torch.full((len(p),), 30.0), points, mask, focal=1.4)
    assert logits[0] == 30.0
    assert logits[1] == OUTSIDE_LOGIT and logits[2] == OUTSIDE_LOGIT
    assert inside_mask(points, mask, 1.4).tolist() == [True, False, False]


def test_the_result_is_the_picture_seen_from_the_front_resting_on_the_ground(solid_pixel_checkpoint):
    picture, mask = ell_picture()
    result = Reconstructor("cpu").reconstruct_image(
        picture, ReconstructOptions(checkpoint=solid_pixel_checkpoint, resolution=64))
    v = result.vertices
    assert v[:, 2].min() == pytest.approx(0.0, abs=1e-5), "rests on z = 0"
    assert (v[:, 0].min() + v[:, 0].max()) / 2 == pytest.approx(0.0, abs=1e-5)
    assert (v[:, 1].min() + v[:, 1].max()) / 2 == pytest.approx(0.0, abs=1e-5)
    height = v[:, 2].max()
    width = v[:, 0].max() - v[:, 0].min()
    assert height / width == pytest.approx(120 / 90, rel=0.12), "the picture's proportions, upright"
    top, bottom = v[v[:, 2] > 0.6 * height], v[v[:, 2] < 0.2 * height]
    # Front view: x is the picture's right. The foot sticks out to the right, the bar is left.
    assert bottom[:, 0].max() > top[:, 0].max() + 0.3 * width
    assert result.stats["mask_source"] == "alpha" and result.stats["warnings"] == []
    assert result.stats["elevation_deg"] == pytest.approx(0.0, abs=1e-3)


def test_a_picture_and_its_mirror_image_give_mirrored_results(tmp_path):
    """The network is asked about the picture and about its mirror image, the second answer
    mirrored back (viewer.MirrorAveraged): even an untrained network, whose answers are lopsided
    at random, returns mirrored meshes for mirrored pictures: the same faces, every vertex within
    half a grid cell of its mirror image (the grids are mirror images; the smoothing after marching
    cubes follows each mesh's own triangulation, which marching cubes does not mirror). A network
    asked about the picture alone puts them cells apart."""
    from scipy.spatial import cKDTree

    from backend.checkpoint import save_checkpoint
    from backend.models import build_model, preset

    torch.manual_seed(0)
    config = preset("tiny_pixel_image")
    save_checkpoint(tmp_path / "random.safetensors", build_model(config).eval(), config)
    options = ReconstructOptions(checkpoint=str(tmp_path / "random.safetensors"), resolution=32)
    picture = np.full((200, 200, 4), 255, np.uint8)
    picture[..., 3] = 0
    picture[50:150, 60:90] = picture[120:150, 60:140] = (50, 100, 200, 255)  # an L whose crop is
    reconstructor = Reconstructor("cpu")                                   # the picture's middle
    result = reconstructor.reconstruct_image(picture, options)
    mirrored = reconstructor.reconstruct_image(np.ascontiguousarray(picture[:, ::-1]), options)
    assert len(mirrored.faces) == len(result.faces)
    distances, _ = cKDTree(result.vertices).query(mirrored.vertices * np.array([-1.0, 1.0, 1.0], np.float32))
    cell = 2 * VIEW_HALF_EXTENT / options.resolution
    assert distances.max() < 0.5 * cell


def ell_result_in_the_crop(checkpoint):
    """The solid model's result for the L picture at 64^3, seen through the crop camera: its faces
    (F, 3), its vertices' crop pixels (V, 2) in the crop's mask image, and that mask (M, M)."""
    from backend import camera, viewer
    from backend.foreground import object_mask

    picture, mask = ell_picture()
    result = Reconstructor("cpu").reconstruct_image(picture, ReconstructOptions(checkpoint=checkpoint, resolution=64))
    to_output = np.array(result.stats["viewer_to_output"])
    in_viewer = (result.vertices - to_output[:3, 3]) @ to_output[:3, :3]
    rgba = picture.astype(np.float32) / 255.0
    view = viewer.viewer_input(rgba, object_mask(rgba), viewer.photo_camera(*mask.shape), 64)
    uv, _ = camera.project_viewer(in_viewer, view.mask.shape[0], view.crop.focal)
    return result.faces, uv, view.mask


def test_the_outline_of_the_result_is_the_mask(solid_pixel_checkpoint):
    """Projected back through the crop camera, the result covers the mask and nothing else."""
    from scipy.ndimage import binary_dilation

    _, uv, crop_mask = ell_result_in_the_crop(solid_pixel_checkpoint)
    col, row = np.clip(np.round(uv).astype(int), 0, crop_mask.shape[0] - 1).T
    near_mask = binary_dilation(crop_mask, iterations=6)   # a voxel of the 64^3 grid is ~5 mask pixels
    assert near_mask[row, col].all(), "no vertex outside the mask"


def test_the_silhouette_follows_the_outline_to_a_fraction_of_a_grid_cell(solid_pixel_checkpoint):
    """Drawn back through the crop camera, the result's triangles fill the mask: silhouette IoU
    0.98 at 64^3, where a surface cut at the last inside grid point (a cell of ~5 mask pixels
    short all round) reaches 0.92."""
    from PIL import Image, ImageDraw

    faces, uv, crop_mask = ell_result_in_the_crop(solid_pixel_checkpoint)
    canvas = Image.new("1", crop_mask.shape[::-1], 0)
    draw = ImageDraw.Draw(canvas)
    for triangle in uv[faces]:
        draw.polygon([tuple(p) for p in triangle], fill=1)
    drawn = np.asarray(canvas, bool)
    assert (drawn & crop_mask).sum() / (drawn | crop_mask).sum() > 0.96


def test_the_result_takes_the_pictures_colours_without_its_background(solid_pixel_checkpoint):
    """A model without a texture head colours each vertex with the picture's colour on its ray:
    the bar red, the foot green, and no vertex takes the white background, not even on the outline."""
    picture, mask = ell_picture()
    picture[130:160, 90:150, :3] = [40, 200, 60]     # the foot, right of the bar, is green
    picture[40:160, 60:90, :3] = [220, 30, 30]       # the bar is red
    options = ReconstructOptions(checkpoint=solid_pixel_checkpoint, resolution=64)
    result = Reconstructor("cpu").reconstruct_image(picture, options)
    v, rgb = result.vertices, result.colors[:, :3]
    assert result.colors.shape == (len(v), 4) and (result.colors[:, 3] == 1).all()
    height, left = v[:, 2].max(), v[:, 0].min()
    width = v[:, 0].max() - left
    bar = v[:, 2] > 0.5 * height
    foot = (v[:, 2] < 0.2 * height) & (v[:, 0] > left + 0.6 * width)
    assert np.allclose(rgb[bar], [220 / 255, 30 / 255, 30 / 255], atol=0.02)
    assert np.allclose(rgb[foot], [40 / 255, 200 / 255, 60 / 255], atol=0.02)
    assert rgb.sum(axis=1).max() < 2.0, "no vertex takes the white background"
    options.colours = False
    assert Reconstructor("cpu").reconstruct_image(picture, options).colors is None


def test_a_texture_head_colours_what_the_picture_hides_and_the_picture_what_it_shows(tmp_path):
    """The solid model's result is the mask extruded through the viewer box: its front, towards the
    camera (Blender's -y after placement), takes the picture's red; its back the head's colour
    (yellow) lit as the picture lights the front: per channel, the gain that turns the head's
    colour on the front into the picture's (red 220/255 from 1, green 30/255 from 1, blue none)."""
    from conftest import make_solid_pixel_checkpoint

    checkpoint = make_solid_pixel_checkpoint(tmp_path / "yellow.safetensors", texture_rgb=(1, 1, 0))
    picture, mask = ell_picture()
    picture[mask, :3] = [220, 30, 30]
    result = Reconstructor("cpu").reconstruct_image(picture, ReconstructOptions(checkpoint=str(checkpoint),
                                                                                resolution=64))
    v, rgb = result.vertices, result.colors[:, :3]
    depth = v[:, 1] - v[:, 1].min()
    front, back = depth < 0.02 * depth.max(), depth > 0.95 * depth.max()
    assert front.sum() > 100 and back.sum() > 100
    assert np.allclose(rgb[front], [220 / 255, 30 / 255, 30 / 255], atol=0.02)
    # (a few vertices of the back's outline share a depth-buffer cell with nothing in front)
    assert np.mean(np.abs(rgb[back] - [220 / 255, 30 / 255, 0.0]).max(axis=1) < 0.01) > 0.99


def test_matched_to_picture_carries_the_pictures_light_over_to_the_head():
    from backend.viewer import matched_to_picture

    head = np.array([[0.2, 0.4, 0.0], [0.4, 0.2, 0.0]])
    picture = head * [2.0, 0.5, 1.0] + [0.0, 0.0, 0.3]
    np.testing.assert_allclose(matched_to_picture(head, picture), [2.0, 0.5, 1.0])  # black blue: left as is
    np.testing.assert_allclose(matched_to_picture(head, 10 * head), [4.0, 4.0, 1.0])  # at most 4x brighter


def test_picture_where_shown_and_the_lit_head_elsewhere():
    from backend.viewer import picture_where_shown

    head = np.array([[0.2, 0.4, 0.1], [0.4, 0.2, 0.1], [0.3, 0.3, 0.3]])
    shown = np.array([True, True, False])
    picture = head[shown] * [2.0, 0.5, 1.0]
    np.testing.assert_allclose(picture_where_shown(head, picture, shown), [*picture, [0.6, 0.15, 0.3]])


def test_a_picture_without_transparency_uses_the_estimated_mask_and_says_so(solid_pixel_checkpoint):
    picture, _ = ell_picture(alpha=False)
    result = Reconstructor("cpu").reconstruct_image(
        picture, ReconstructOptions(checkpoint=solid_pixel_checkpoint, resolution=32))
    assert result.stats["mask_source"] == "estimate"
    assert any("estimated" in w for w in result.stats["warnings"])


def test_bad_pictures_fail_or_warn_clearly(solid_pixel_checkpoint):
    options = ReconstructOptions(checkpoint=solid_pixel_checkpoint, resolution=32)
    reconstructor = Reconstructor("cpu")
    empty = np.zeros((50, 50, 4), np.uint8)
    with pytest.raises(OccnetError, match="no object"):
        reconstructor.reconstruct_image(empty, options)
    speck = empty.copy()
    speck[20:23, 20:23] = 255
    with pytest.raises(OccnetError, match="too few") as error:
        reconstructor.reconstruct_image(speck, options)
    assert error.value.code == "empty_mask"
    picture, _ = ell_picture()
    with pytest.raises(OccnetError, match="same proportions"):
        reconstructor.reconstruct_image(picture, options, mask=np.ones((10, 20)))
    cut = picture[:, 70:]                                    # the bar runs into the left edge
    result = reconstructor.reconstruct_image(cut, options)
    assert result.stats["cut_off"] and any("cut off" in w for w in result.stats["warnings"])
    noise = (np.random.default_rng(0).uniform(0, 1, (80, 80, 3)) * 255).astype(np.uint8)
    with pytest.raises(OccnetError, match="background") as error:
        reconstructor.reconstruct_image(noise, options)
    assert error.value.code == "no_mask"


def run_cli(*args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "backend", "reconstruct", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_takes_a_mask_file_and_warns_about_an_estimated_mask(solid_pixel_checkpoint, tmp_path):
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    picture, mask = ell_picture(alpha=False)
    Image.fromarray(picture).save(tmp_path / "ell.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "ell_mask.png")
    Image.fromarray(np.zeros((20, 10), np.uint8)).save(tmp_path / "narrow_mask.png")
    common = ["--checkpoint", solid_pixel_checkpoint, "--resolution", "32", "--quiet"]

    given = run_cli(tmp_path / "ell.png", "-o", tmp_path / "given.obj", "--mask", tmp_path / "ell_mask.png",
                    "--focal-length", "35", *common, cwd=root)
    assert given.returncode == 0, given.stderr
    assert (tmp_path / "given.obj").is_file() and "warning" not in given.stderr

    estimated = run_cli(tmp_path / "ell.png", "-o", tmp_path / "estimated.obj", *common, cwd=root)
    assert estimated.returncode == 0, estimated.stderr
    assert "warning: the picture has no transparency" in estimated.stderr

    wrong = run_cli(tmp_path / "ell.png", "-o", tmp_path / "wrong.obj", "--mask", tmp_path / "narrow_mask.png",
                    *common, cwd=root)
    assert wrong.returncode == 1 and wrong.stderr.strip().startswith("error:") and "same proportions" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and not (tmp_path / "wrong.obj").exists()


def test_the_focal_length_comes_from_exif_when_the_photo_has_one(tmp_path):
    from PIL import Image

    from backend.inputs import exif_focal_35mm

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 28       # Exif sub-IFD: FocalLengthIn35mmFilm
    Image.new("RGB", (60, 40)).save(tmp_path / "photo.jpg", exif=exif)
    Image.new("RGB", (60, 40)).save(tmp_path / "plain.jpg")
    assert exif_focal_35mm(tmp_path / "photo.jpg") == 28.0
    assert exif_focal_35mm(tmp_path / "plain.jpg") is None


def doubtful_ball(count=65, mask_size=256, focal=1.5):
    """A grid whose network doubts a ball: logits peak at -1 in its centre (probability 0.27, so at
    level 0 there is no surface at all), and the crop mask of the ball's outline."""
    from backend import camera

    box_min, spacing = -camera.VIEW_HALF_EXTENT, 2 * camera.VIEW_HALF_EXTENT / (count - 1)
    axis = np.arange(count) * spacing + box_min
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    values = ((0.3 - np.linalg.norm(points, axis=-1)) * 10.0 - 4.0).astype(np.float32)
    ring = np.linspace(0, 2 * np.pi, 2000)
    outline = camera.project_viewer(np.stack([0.3 * np.cos(ring), 0.3 * np.sin(ring), 0 * ring], axis=-1),
                                    mask_size, focal)[0]
    rows, cols = np.mgrid[0:mask_size, 0:mask_size]
    centre, radius = outline.mean(axis=0), np.linalg.norm(outline - outline.mean(axis=0), axis=1).mean()
    mask = (cols - centre[0]) ** 2 + (rows - centre[1]) ** 2 <= radius ** 2
    return values, box_min, spacing, mask, focal


def test_every_ray_through_the_mask_reaches_inside_at_the_networks_likeliest_depth():
    """Where the network doubts, each ray through the mask gets its likeliest points (within the
    band of its largest value) raised above the level; the rest of the grid stays as it was, and a
    network that already fills the mask is left alone."""
    from backend.viewer import fill_the_mask, ray_maxima

    values, box_min, spacing, mask, focal = doubtful_ball()
    before = values.copy()
    filled = fill_the_mask(values, box_min, spacing, mask, focal, 0.0, margin=0.25, band=0.3)
    assert filled == 1.0
    seen = mask.reshape(64, 4, 64, 4).mean(axis=(1, 3)) >= 0.5
    along = ray_maxima(values, box_min, spacing, 64, focal)[seen]
    assert (along[np.isfinite(along)] == np.float32(0.25)).all()
    changed = values != before
    assert changed.any() and (values[changed] == np.float32(0.25)).all()
    assert (before[changed] < 0).all() and changed.mean() < 0.05     # a shell at the likeliest depth
    solid = before + 5.0
    assert fill_the_mask(solid, box_min, spacing, mask, focal, 0.0) == 0.0 and (solid == before + 5.0).all()


def test_a_doubtful_network_still_returns_the_outline_and_says_its_depth_is_a_guess(solid_pixel_checkpoint,
                                                                                     monkeypatch):
    picture, _ = ell_picture()
    reconstructor = Reconstructor("cpu")
    model, _, _ = reconstructor.model_for("image", ReconstructOptions(checkpoint=solid_pixel_checkpoint))
    monkeypatch.setattr(model, "decode", lambda p, c: torch.full(p.shape[:2], -3.0))   # probability 0.05
    result = reconstructor.reconstruct_image(picture, ReconstructOptions(checkpoint=solid_pixel_checkpoint,
                                                                         resolution=64))
    assert len(result.faces) > 0 and result.stats["filled_fraction"] == 1.0
    assert any("unsure of 100%" in w for w in result.stats["warnings"])


def test_out_of_memory_during_extraction_retries_with_smaller_batches_and_says_so(solid_pixel_checkpoint,
                                                                                 tiny_checkpoints, monkeypatch):
    from backend import pipeline

    real_mise, batches = pipeline.mise, []

    def mise_short_of_memory(*args, batch_points, **kwargs):
        batches.append(batch_points)
        if batch_points > 20000:
            raise torch.OutOfMemoryError("simulated")
        return real_mise(*args, batch_points=batch_points, **kwargs)

    monkeypatch.setattr(pipeline, "mise", mise_short_of_memory)
    picture, _ = ell_picture()
    result = Reconstructor("cpu").reconstruct_image(picture, ReconstructOptions(checkpoint=solid_pixel_checkpoint, resolution=32))
    assert batches == [65536, 16384]
    assert any("out of memory" in w and "16384" in w for w in result.stats["warnings"])
    points = np.random.default_rng(0).normal(size=(500, 3))  # point clouds say so too
    result = Reconstructor("cpu").reconstruct_points(points, ReconstructOptions(
        checkpoint=str(tiny_checkpoints["points"]), resolution=32))
    assert any("out of memory" in w and "16384" in w for w in result.stats["warnings"])
    monkeypatch.setattr(pipeline, "mise", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("always")))
    with pytest.raises(OccnetError, match="ran out of memory") as error:
        Reconstructor("cpu").reconstruct_image(picture, ReconstructOptions(checkpoint=solid_pixel_checkpoint, resolution=32))
    assert error.value.code == "out_of_memory"


def test_a_gpu_out_of_memory_hands_the_request_to_the_cpu_and_says_so(solid_pixel_checkpoint, monkeypatch):
    """The meta device stands in for a GPU (the model loads and encodes there, shapes only) whose
    memory runs out at every batch size: the request is run again on the CPU and says so."""
    from backend import pipeline

    real_mise, devices = pipeline.mise, []

    def mise_without_gpu_memory(*args, device, **kwargs):
        devices.append(device.type)
        if device.type != "cpu":
            raise torch.OutOfMemoryError("simulated")
        return real_mise(*args, device=device, **kwargs)

    monkeypatch.setattr(pipeline, "mise", mise_without_gpu_memory)
    reconstructor = Reconstructor("cpu")
    reconstructor.device = torch.device("meta")
    picture, mask = ell_picture()
    result = reconstructor.reconstruct_image(picture, ReconstructOptions(checkpoint=solid_pixel_checkpoint, resolution=32))
    assert devices[-1] == "cpu" and set(devices[:-1]) == {"meta"}
    assert result.stats["device"] == "cpu" and result.stats["fell_back_from"] == "meta"
    assert any("meta ran out of memory" in w and "CPU" in w for w in result.stats["warnings"])
    assert len(result.faces) > 0
    assert not any(device == "meta" for _, device in reconstructor._models), "the GPU's models were let go"


def test_a_network_that_outputs_nan_is_reported_as_broken_not_as_empty(solid_pixel_checkpoint, monkeypatch):
    from backend import pipeline

    monkeypatch.setattr(pipeline, "masked_logits", lambda decode, p, mask, focal: torch.full((len(p),), float("nan")))
    picture, _ = ell_picture()
    with pytest.raises(OccnetError, match="not a number") as error:
        Reconstructor("cpu").reconstruct_image(picture, ReconstructOptions(checkpoint=solid_pixel_checkpoint, resolution=32))
    assert error.value.code == "bad_model"


def test_visible_vertices_are_those_facing_the_crop_camera_on_a_ball():
    import trimesh

    from backend import camera
    from backend.viewer import visible_vertices

    ball = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    vertices = np.asarray(ball.vertices)
    focal = 1.4
    eye = np.array([0.0, 0.0, -camera.object_depth(focal)])
    facing = np.einsum("ij,ij->i", vertices / 0.4, eye - vertices) / np.linalg.norm(eye - vertices, axis=1)

    seen = visible_vertices(vertices, np.asarray(ball.faces), focal)

    clear = np.abs(facing) > 0.2    # away from the grazing rim, where a cell holds both sides
    assert (seen[clear] == (facing[clear] > 0)).mean() > 0.99
