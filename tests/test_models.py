"""Model shapes, the checkpoint round trip and the refusal of checkpoints that do not fit."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from backend.checkpoint import load_checkpoint, read_header, save_checkpoint
from backend.errors import CheckpointError
from backend.models import PRESETS, build_model, preset


def example_input(config, batch=2):
    if config["input"]["kind"] == "image":
        size = config["input"]["image_size"]
        return torch.rand(batch, 3, size, size)
    return torch.rand(batch, 300, 3) - 0.5


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_maps_points_to_one_logit_each(name):
    config = preset(name)
    model = build_model(config).eval()
    p = torch.rand(2, 123, 3) * 1.1 - 0.55
    with torch.no_grad():
        logits = model(p, example_input(config))
    assert logits.shape == (2, 123)
    assert torch.isfinite(logits).all()


def test_paper_models_have_the_papers_sizes():
    image = build_model(preset("onet_image"))
    assert image.encoder.fc.out_features == 256
    assert len(image.decoder.blocks) == 5 and image.decoder.fc_p.out_channels == 256
    points = build_model(preset("onet_points"))
    assert points.encoder.fc_c.out_features == 512 and len(points.encoder.blocks) == 5
    with torch.no_grad():
        c = points.encode(torch.rand(1, 300, 3))
    assert c.shape == (1, 512)


def test_local_model_produces_three_feature_planes():
    config = preset("local_points")
    model = build_model(config).eval()
    with torch.no_grad():
        planes = model.encode(torch.rand(1, 3000, 3) - 0.5)
    assert sorted(planes) == ["xy", "xz", "yz"]
    assert all(p.shape == (1, 32, 64, 64) for p in planes.values())


def test_local_features_are_local():
    """Moving input points in one corner changes the occupancy far away only a little."""
    torch.manual_seed(0)
    model = build_model(preset("local_points")).eval()
    pts = torch.rand(1, 2000, 3) - 0.5
    moved = pts.clone()
    corner = (pts[0] > 0.3).all(dim=1)
    moved[0, corner] += 0.05
    probes = torch.tensor([[[0.4, 0.4, 0.4], [-0.45, -0.45, -0.45]]])
    with torch.no_grad():
        change = (model(probes, pts) - model(probes, moved)).abs()[0]
    near, far = change.tolist()
    # Group norm and the U-Net's receptive field leak a trace; the effect stays where the points moved.
    assert near > 20 * far


def test_unknown_or_inconsistent_configs_are_refused():
    config = preset("local_points")
    config["encoder"]["name"] = "resnet18"
    with pytest.raises(ValueError, match="cannot take points input|produces global features"):
        build_model(config)
    config = preset("local_points")
    config["decoder"]["name"] = "nope"
    with pytest.raises(ValueError, match="unknown decoder 'nope'"):
        build_model(config)


def test_checkpoint_round_trip(tmp_path):
    config = preset("tiny_points")
    model = build_model(config).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, config, metadata={"epochs": 3})
    loaded, loaded_config, metadata = load_checkpoint(path)
    assert loaded_config == config and metadata["epochs"] == 3
    assert not loaded.training
    p, x = torch.rand(1, 50, 3) - 0.5, torch.rand(1, 100, 3) - 0.5
    with torch.no_grad():
        assert torch.equal(model(p, x), loaded(p, x))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_mismatched_checkpoint_is_refused_naming_the_tensor(tmp_path):
    config = preset("tiny_points")
    model = build_model(config)
    wider = preset("tiny_points")
    wider["decoder"]["hidden"] = 16
    save_checkpoint(tmp_path / "bad.safetensors", model, wider)
    with pytest.raises(CheckpointError, match=r"wrong shape \(e.g. decoder\.\S+: configuration wants \[16"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_missing_tensors_are_named(tmp_path):
    config = preset("tiny_points")
    state = {k: v for k, v in build_model(config).state_dict().items() if not k.startswith("decoder.fc_out")}
    header = {"format": "occnet-checkpoint/1", "config": json.dumps(config), "metadata": "{}"}
    save_file(state, tmp_path / "partial.safetensors", metadata=header)
    with pytest.raises(CheckpointError, match="missing tensors .*decoder.fc_out"):
        load_checkpoint(tmp_path / "partial.safetensors")


@pytest.mark.parametrize("content,message", [
    (b"", "not a safetensors checkpoint"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "not a safetensors checkpoint"),
    (None, "does not exist"),
])
def test_broken_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    save_file({"w": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not an occnet checkpoint"):
        read_header(tmp_path / "foreign.safetensors")


def test_truncated_checkpoint_is_refused(tmp_path):
    config = preset("tiny_points")
    save_checkpoint(tmp_path / "m.safetensors", build_model(config), config)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "m.safetensors")


# -- the silhouette prior of pixel-aligned models ---------------------------------------------------

def prior_model(temperature=0.05):
    """The tiny pixel-aligned model with a silhouette prior and a silent network (fc_out zero):
    its logits are the prior's alone."""
    config = preset("tiny_pixel_image")
    config["decoder"]["prior_temperature"] = temperature
    model = build_model(config).eval()
    with torch.no_grad():
        model.decoder.fc_out.weight.zero_()
        model.decoder.fc_out.bias.zero_()
    return model


def disc_mask(size=64, radius=20.0):
    rows, cols = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    return torch.from_numpy(np.hypot(rows - centre, cols - centre) <= radius)


def test_the_silhouette_prior_inflates_a_disc_into_a_ball():
    from backend import camera
    from backend.models.pixel_aligned import silhouette_half_thickness

    thickness = silhouette_half_thickness(disc_mask().numpy())
    radius = 20.0 * camera.crop_pixel_width(64)     # the disc's radius in viewer units
    assert thickness.max() == pytest.approx(radius, rel=0.05)
    model = prior_model()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        code = model.encode(image, torch.tensor([camera.FOCAL]), disc_mask()[None])
        probes = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.9 * radius], [0.0, 0.0, -0.9 * radius],
                                [0.0, 0.0, 1.2 * radius], [1.2 * radius, 0.0, 0.0], [0.5 * radius, 0.0, 0.9 * radius]]])
        inside = (model.decode(probes, code) > 0)[0].tolist()
    assert inside == [True, True, True, False, False, False]


def test_a_model_with_a_silhouette_prior_needs_the_mask():
    model = prior_model()
    with pytest.raises(ValueError, match="mask"):
        model.encode(torch.rand(1, 3, 64, 64), torch.tensor([1.4]))
    assert not build_model(preset("tiny_pixel_image")).needs_mask


# -- the depth-layer prior ---------------------------------------------------------------------------

def layers_model(temperature=0.05):
    """The tiny pixel-aligned model with a layer head and the layers prior, its network silent
    (fc_out zero) and its layer head set to say: every pixel's ray enters at z = -0.2 and leaves
    at z = 0.1 (a slab), so its logits are the prior's alone."""
    import math

    config = preset("tiny_pixel_image")
    config["encoder"]["layers"] = True
    config["decoder"].update(prior="layers", prior_temperature=temperature)
    model = build_model(config).eval()
    with torch.no_grad():
        model.decoder.fc_out.weight.zero_()
        model.decoder.fc_out.bias.zero_()
        last = model.encoder.layer_head[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-0.2, math.log(math.expm1(0.3))]))
    return model


def test_the_layer_head_predicts_a_front_and_a_back_behind_it_per_pixel():
    config = preset("tiny_pixel_image")
    config["encoder"]["layers"] = True
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.encoder.layer_head.parameters():
            parameter.normal_()                 # whatever the weights say, back stays behind front
        layers = model.encode(torch.rand(3, 3, 64, 64), torch.full((3,), 1.4))["layers"]
    assert layers.shape == (3, 2, 16, 16)
    assert (layers[:, 1] >= layers[:, 0]).all()


def test_the_layer_heads_picture_wide_context_starts_silent_and_needs_the_head():
    config = preset("tiny_pixel_image")
    config["encoder"]["layer_context"] = True
    with pytest.raises(ValueError, match="layer_context needs layers"):
        build_model(config)
    config["encoder"]["layers"] = True
    with_context = build_model(config).eval()
    config["encoder"]["layer_context"] = False
    without = build_model(config).eval()
    with torch.no_grad():
        without.encoder.layer_head[-1].weight.normal_()       # trained: it reads its input
    missing, unexpected = with_context.load_state_dict(without.state_dict(), strict=False)
    assert not unexpected and {key.split(".")[1] for key in missing} == {"layer_context"}
    images, focal = torch.rand(2, 3, 64, 64), torch.full((2,), 1.4)
    with torch.no_grad():
        assert torch.equal(with_context.encode(images, focal)["layers"], without.encode(images, focal)["layers"])
        with_context.encoder.layer_context.bias.fill_(1.0)
        assert not torch.equal(with_context.encode(images, focal)["layers"], without.encode(images, focal)["layers"])


def test_the_layers_prior_fills_the_predicted_layers_and_needs_no_mask():
    model = layers_model()
    assert not model.needs_mask
    with torch.no_grad():
        code = model.encode(torch.rand(1, 3, 64, 64), torch.tensor([1.4]))
        probes = torch.tensor([[[0.0, 0.0, -0.15], [0.1, -0.1, 0.05], [0.0, 0.0, -0.3], [0.0, 0.0, 0.2]]])
        inside = (model.decode(probes, code) > 0)[0].tolist()
    assert inside == [True, True, False, False]


def test_the_layers_prior_needs_an_encoder_that_predicts_layers():
    config = preset("tiny_pixel_image")
    config["decoder"].update(prior="layers", prior_temperature=0.1)
    with pytest.raises(ValueError, match="layers"):
        build_model(config)
    config["encoder"]["layers"] = True
    config["decoder"]["prior"] = "shading"
    with pytest.raises(ValueError, match="prior 'shading'"):
        build_model(config)
