"""A checkpoint says at which of its own probabilities its surface lies (surface_probability,
chosen on validation by `training.calibrate`); the pipeline puts the user's threshold 0.5 there,
and other thresholds stay relative to it."""

import math

import numpy as np
import pytest
from safetensors import safe_open

from backend.checkpoint import read_header, with_new_header
from backend.errors import CheckpointError
from backend.models import preset, validate_config
from backend.pipeline import ReconstructOptions, Reconstructor
from training.calibrate import main as calibrate

from conftest import make_octahedron_checkpoint
from helpers_data import make_prepared_dataset

RADIUS = 0.4  # the octahedron checkpoint's logit is RADIUS - (|x| + |y| + |z|)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def tensors(path) -> dict:
    with safe_open(str(path), framework="np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def octahedron_radius(checkpoint, threshold: float) -> float:
    """How far the canonical image model's mesh reaches along the axes (its L1 radius)."""
    image = np.zeros((64, 64, 3), np.uint8)
    result = Reconstructor("cpu").reconstruct_image(
        image, ReconstructOptions(checkpoint=str(checkpoint), resolution=64, threshold=threshold))
    return float(np.abs(result.vertices).max())


def test_the_surface_lies_at_the_checkpoints_own_probability(tmp_path):
    checkpoint = make_octahedron_checkpoint(tmp_path / "octahedron.safetensors", "image", radius=RADIUS)
    assert octahedron_radius(checkpoint, 0.5) == pytest.approx(RADIUS, abs=0.01)
    config, metadata = read_header(checkpoint)
    # Its surface calibrated to the probability sigmoid(-0.1): the network's logit -0.1, 0.1 further out.
    with_new_header(checkpoint, {**config, "surface_probability": sigmoid(-0.1)}, metadata)
    assert octahedron_radius(checkpoint, 0.5) == pytest.approx(RADIUS + 0.1, abs=0.01)
    # A higher threshold still means less inside, by the same logits as before.
    assert octahedron_radius(checkpoint, sigmoid(0.2)) == pytest.approx(RADIUS + 0.1 - 0.2, abs=0.01)


def test_a_new_header_keeps_the_weights_bit_for_bit_and_must_fit_them(tmp_path):
    checkpoint = make_octahedron_checkpoint(tmp_path / "octahedron.safetensors", "points")
    before, raw = tensors(checkpoint), checkpoint.read_bytes()
    config, metadata = read_header(checkpoint)
    with_new_header(checkpoint, {**config, "surface_probability": 0.4}, {**metadata, "note": "calibrated"})
    after = tensors(checkpoint)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert read_header(checkpoint) == ({**config, "surface_probability": 0.4}, {**metadata, "note": "calibrated"})
    # A configuration for other tensors is refused and the file stays as it was.
    calibrated = checkpoint.read_bytes()
    wider = {**config, "decoder": {**config["decoder"], "hidden": 16}}
    with pytest.raises(CheckpointError, match="does not fit its tensors"):
        with_new_header(checkpoint, wider, metadata)
    assert checkpoint.read_bytes() == calibrated != raw


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.2, "0.4", True, None])
def test_a_surface_probability_outside_zero_to_one_is_refused(value):
    with pytest.raises(ValueError, match="surface_probability"):
        validate_config({**preset("tiny_points"), "surface_probability": value})


def test_calibrate_writes_the_probability_with_the_best_validation_iou(tmp_path, capsys):
    data = make_prepared_dataset(tmp_path / "prepared", n_train=1, n_val=2, n_test=1, points_per_shape=20000,
                                 views=1, image_size=32)
    checkpoint = make_octahedron_checkpoint(tmp_path / "octahedron.safetensors", "points", radius=RADIUS)
    weights = tensors(checkpoint)
    # At probability 0.999 the octahedron's surface lies 6.9 logits in: nothing is inside (IoU 0).
    # The best is the other candidate, whichever order they come in.
    assert calibrate([str(checkpoint), str(data), "--probabilities", "0.999", "0.5", "--resolution", "32",
                      "--surface-points", "2000", "--device", "cpu", "--write"]) == 0
    config, metadata = read_header(checkpoint)
    assert config["surface_probability"] == 0.5
    sweep = metadata["calibration"]["by_probability"]
    assert sweep["0.999"]["iou"] == 0.0 < sweep["0.5"]["iou"] and sweep["0.5"]["shapes"] == 2
    assert metadata["calibration"]["split"] == "val"
    assert all(np.array_equal(weights[k], v) for k, v in tensors(checkpoint).items())
    assert "best by mean IoU: surface_probability 0.5" in capsys.readouterr().out


def test_calibrate_relative_to_a_calibrated_checkpoint_sweeps_the_networks_own_probabilities(tmp_path, capsys):
    data = make_prepared_dataset(tmp_path / "prepared", n_train=1, n_val=1, n_test=1, points_per_shape=20000,
                                 views=1, image_size=32)
    plain = make_octahedron_checkpoint(tmp_path / "plain.safetensors", "points", radius=RADIUS)
    shifted = make_octahedron_checkpoint(tmp_path / "shifted.safetensors", "points", radius=RADIUS)
    config, metadata = read_header(shifted)
    with_new_header(shifted, {**config, "surface_probability": 0.3}, metadata)
    common = ["--probabilities", "0.45", "--resolution", "32", "--surface-points", "2000", "--device", "cpu"]
    assert calibrate([str(plain), str(data), *common]) == 0
    first = capsys.readouterr().out
    assert calibrate([str(shifted), str(data), *common]) == 0
    line = [row for row in first.splitlines() if row.startswith("p = 0.450")]
    assert line and line == [row for row in capsys.readouterr().out.splitlines() if row.startswith("p = 0.450")]
