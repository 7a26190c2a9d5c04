"""Training: data sampling and augmentation, loss going down, exact resume after a kill, the time
budget, and the DDP (gloo) path."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from backend.checkpoint import load_checkpoint
from backend.preprocess import image_to_model_input
from training import dataset as ds
from training.train import Trainer, learning_rate, load_config
from training.train_state import read_header_metadata

from helpers_data import inside, make_prepared_dataset, random_shape, surface_samples

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_prepared_dataset(tmp_path_factory.mktemp("prepared"), n_train=8, n_val=2, n_test=2,
                                 points_per_shape=20000, views=2, image_size=64)


def config(name, data_dir, out_dir, **overrides):
    return load_config(CONFIGS / name, {"data_dir": str(data_dir), "out_dir": str(out_dir), **overrides})


def final_weights(out_dir):
    return load_file(str(Path(out_dir) / "model_last.safetensors"))


# -- sampling and augmentation ----------------------------------------------------------------

@pytest.mark.parametrize("rotation", ["up", "so3"])
def test_augmented_queries_keep_exact_occupancy_and_fill_the_box(rotation):
    rng = np.random.default_rng(5)
    shape = random_shape(rng, "box")
    surface, _ = surface_samples(shape, 20000, rng)
    uniform = rng.uniform(-0.55, 0.55, size=(50000, 3))
    occ = inside(shape, uniform)
    aug = ds.make_augmentation(surface, rotation, 2, (0.7, 1.4), rng)
    moved = aug.apply(surface)
    center, scale = ds.bounding_box_fit(moved)
    assert np.allclose(center, 0.0, atol=1e-5) and scale == pytest.approx(1.0, abs=1e-5)  # canonical box again
    pts, labels = ds.sample_uniform_queries(uniform, occ, 8000, rng, aug, 0.55)
    assert pts.shape == (8000, 3) and labels.shape == (8000,)
    assert np.abs(pts).max() <= 0.55 + 1e-6
    # Every label is the true occupancy of the point mapped back into the original frame.
    assert np.array_equal(labels.astype(bool), inside(shape, aug.invert(pts)))
    # Uniform over the whole box: each octant gets about 1/8 of the points.
    octants = np.bincount(((pts > 0) * [1, 2, 4]).sum(axis=1), minlength=8) / len(pts)
    assert np.all(np.abs(octants - 0.125) < 0.03)
    if rotation == "up":  # z is the up axis: heights are only scaled and re-centred
        assert np.allclose(aug.linear[2, :2], 0.0) and np.allclose(aug.linear[:2, 2], 0.0)


def test_dataset_examples_are_reproducible_and_shaped(data_dir):
    store = ds.ShapeStore(data_dir, ds.read_split(data_dir, "train"), surface=True, images=True)
    sampling = ds.SamplingConfig(num_points=300, query_points=256, near_fraction=0.25, rotation="so3",
                                 scale_range=(0.8, 1.25))
    a = ds.OccupancyDataset(store, sampling, seed=3)
    b = ds.OccupancyDataset(store, sampling, seed=3)
    x, y = a[1], b[1]
    assert x["inputs"].shape == (300, 3) and x["points"].shape == (256, 3) and x["occ"].shape == (256,)
    assert torch.equal(x["inputs"], y["inputs"]) and torch.equal(x["points"], y["points"])
    a.set_epoch(1)
    assert not torch.equal(a[1]["points"], x["points"])  # a new epoch draws new samples
    image_set = ds.OccupancyDataset(store, ds.SamplingConfig(input_kind="image", image_size=48, query_points=64,
                                                             background="random"), seed=0)
    img = image_set[0]["inputs"]
    assert img.shape == (3, 48, 48) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_image_background_fills_the_padding_of_the_crop():
    """Training varies the background; the square crop around a wide object pads beyond the image,
    and that padding must be the background colour too, not black."""
    rgba = np.zeros((40, 100, 4), np.float32)
    rgba[15:25, 5:95] = (1.0, 0.0, 0.0, 1.0)          # a wide red bar: its square crop exceeds the image
    background = np.array([0.0, 0.0, 1.0])
    image = image_to_model_input(rgba, 32, background)
    assert np.allclose(image[:, 0, 16], background, atol=0.02)   # top rows: padding beyond the image
    assert np.allclose(image[:, 16, 16], (1.0, 0.0, 0.0), atol=0.02)
    white = image_to_model_input(rgba, 32)
    assert np.allclose(white[:, 0, 16], 1.0, atol=0.02)


def test_learning_rate_schedules():
    sched = {"warmup_steps": 10, "decay": "cosine", "min_lr_factor": 0.1}
    assert learning_rate(0, 100, 1.0, sched, 10) == pytest.approx(0.1)
    assert learning_rate(10, 100, 1.0, sched, 10) == pytest.approx(1.0)
    assert learning_rate(100, 100, 1.0, sched, 10) == pytest.approx(0.1)
    step = {"decay": "step", "step_epochs": 2, "gamma": 0.5}
    assert learning_rate(39, 100, 1.0, step, 10) == pytest.approx(0.5)


# -- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["test_tiny_points.json", "test_tiny_image.json"])
def test_a_few_steps_lower_the_loss_and_write_a_loadable_checkpoint(data_dir, tmp_path, name):
    cfg = config(name, data_dir, tmp_path, schedule={"epochs": 6, "decay": "constant", "warmup_steps": 0})
    result = Trainer(cfg, resume=False, command="pytest").run()
    assert result["step"] == 12
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(rows) == 6
    losses = [float(r["train_loss"]) for r in rows]
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    model, model_cfg, meta = load_checkpoint(tmp_path / "model_best.safetensors")
    assert model_cfg == cfg["model"]
    info = meta["training"]
    assert info["command"] == "pytest" and info["val_iou"] is not None and info["train_shapes"] == 8
    assert 0.0 <= info["val_iou"] <= 1.0 and info["hardware"]


def test_init_weights_starts_from_a_model_checkpoint_and_refuses_another_architecture(data_dir, tmp_path):
    first = config("test_tiny_points.json", data_dir, tmp_path / "first", max_steps=None,
                   schedule={"epochs": 1, "decay": "constant", "warmup_steps": 0})
    Trainer(first, resume=False, command="pytest").run()
    source = tmp_path / "first" / "model_last.safetensors"
    tuned = config("test_tiny_points.json", data_dir, tmp_path / "tuned", init_weights=str(source), seed=7)
    trainer = Trainer(tuned, resume=False, command="pytest")
    expected = load_file(str(source))
    for key, value in trainer.module.state_dict().items():
        assert torch.equal(value, expected[key]), key  # not the seed-7 initialisation
    wider = config("test_tiny_points.json", data_dir, tmp_path / "wider", init_weights=str(source))
    wider["model"]["decoder"]["hidden"] += 8
    with pytest.raises(SystemExit, match="differs"):
        Trainer(wider, resume=False, command="pytest")


def test_image_training_leaves_out_shapes_prepared_without_renders(data_dir, tmp_path, capsys):
    import shutil
    mixed = tmp_path / "mixed"
    shutil.copytree(data_dir, mixed)
    bare = ds.read_split(mixed, "train")[0]
    shutil.rmtree(mixed / bare / "images")  # as `training.prepare --views 0` leaves a shape
    image_trainer = Trainer(config("test_tiny_image.json", mixed, tmp_path / "image"), resume=False, command="pytest")
    assert bare not in image_trainer.train_store.shape_ids and len(image_trainer.train_store) == 7
    assert "left out 1 shapes without rendered views" in capsys.readouterr().out
    points_trainer = Trainer(config("test_tiny_points.json", mixed, tmp_path / "points"), resume=False, command="pytest")
    assert bare in points_trainer.train_store.shape_ids


def test_time_budget_stops_cleanly_with_a_checkpoint(data_dir, tmp_path):
    cfg = config("test_tiny_points.json", data_dir, tmp_path, max_minutes=1e-6)
    result = Trainer(cfg, resume=False, command="pytest").run()
    assert "time budget" in result["stop_reason"] and result["step"] == 1
    progress = json.loads(read_header_metadata(tmp_path / "state.safetensors")["progress"])
    assert progress["step"] == 1 and progress["batch"] == 1
    assert (tmp_path / "model_last.safetensors").is_file()
    resumed = Trainer(config("test_tiny_points.json", data_dir, tmp_path), resume=True, command="pytest").run()
    assert resumed["step"] == 8


def test_resume_after_kill_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    steps = 16
    schedule = {"epochs": 8, "decay": "cosine", "warmup_steps": 3}
    straight = config("test_tiny_points.json", data_dir, tmp_path / "straight", schedule=schedule)
    Trainer(straight, resume=False, command="pytest").run()

    # The same run in a subprocess, checkpointing after every step, SIGKILLed part way.
    cfg_path = tmp_path / "killed.json"
    cfg_json = json.loads((CONFIGS / "test_tiny_points.json").read_text())
    cfg_json.update(data_dir=str(data_dir), out_dir=str(tmp_path / "killed"), checkpoint_minutes=1e-9,
                    schedule=schedule)
    cfg_path.write_text(json.dumps(cfg_json))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "training.train", str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "killed" / "state.safetensors"
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file():
            step = json.loads(read_header_metadata(state)["progress"])["step"]
            if step >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < steps, "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    resumed = Trainer(load_config(cfg_path), resume=True, command="pytest").run()
    assert resumed["step"] == steps
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ddp_with_two_gloo_processes_matches_one_process(data_dir, tmp_path):
    cfg_json = json.loads((CONFIGS / "test_tiny_points.json").read_text())
    # Plain SGD: the update is linear in the gradient, so float round-off between the two set-ups
    # stays round-off (Adam's first step is ~lr * sign(g) and would amplify it for g ~ 0).
    sgd = {"name": "sgd", "lr": 1e-3, "momentum": 0.0}
    schedule = {"epochs": 1, "decay": "constant", "warmup_steps": 0}
    cfg_json.update(data_dir=str(data_dir), out_dir=str(tmp_path / "ddp"), optimizer=sgd,
                    schedule=schedule)
    cfg_path = tmp_path / "ddp.json"
    cfg_path.write_text(json.dumps(cfg_json))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "training.train", str(cfg_path)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    progress = json.loads(read_header_metadata(tmp_path / "ddp" / "state.safetensors")["progress"])
    assert progress["step"] == 2
    # Two processes with half a batch each take the same steps as one process with the whole batch.
    single = config("test_tiny_points.json", data_dir, tmp_path / "single", optimizer=sgd,
                    schedule=schedule)
    Trainer(single, resume=False, command="pytest").run()
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
