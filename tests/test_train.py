"""Training: data sampling and augmentation, loss going down, exact resume after a kill at any
point, a full disk while checkpointing, set-up problems as one line, the time budget, and the DDP
(gloo) path."""

import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from backend.checkpoint import load_checkpoint, save_checkpoint
from backend.models import build_model, preset
from backend.preprocess import image_to_model_input
from training import dataset as ds
from training.errors import TrainingError
from training.train import Trainer, learning_rate, load_config, main
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


def write_config(path, data_dir, out_dir, **settings) -> Path:
    """A copy of test_tiny_points.json at path, for runs in a child process."""
    given = json.loads((CONFIGS / "test_tiny_points.json").read_text())
    given.update(data_dir=str(data_dir), out_dir=str(out_dir))
    given.update(settings)
    path.write_text(json.dumps(given))
    return path


def state_step(state_path) -> int:
    return json.loads(read_header_metadata(state_path)["progress"])["step"]


def log_rows(out_dir) -> list[dict]:
    with open(Path(out_dir) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


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
    with pytest.raises(TrainingError, match="differs"):
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


RESUME_SCHEDULE = {"epochs": 8, "decay": "cosine", "warmup_steps": 3}
RESUME_STEPS = 16  # 8 epochs of 2 steps

# Runs training.train in a child process that stops (touching a marker file, then sleeping) at a
# chosen point, so that the test's SIGKILL lands exactly there.
PAUSING_CHILD = """
import pathlib, sys, time
from training import train, train_state
config, marker, point = sys.argv[1:4]

def pause():
    pathlib.Path(marker).touch()
    time.sleep(600)

if point == "between_steps":
    train_step = train.Trainer.train_step
    def pausing_train_step(self, item, step):
        if step == 5:
            pause()
        return train_step(self, item, step)
    train.Trainer.train_step = pausing_train_step
elif point == "writing_the_state":
    save_file, calls = train_state.save_file, []
    def half_written(tensors, temp, metadata):
        save_file(tensors, temp, metadata=metadata)
        calls.append(temp)
        if len(calls) == 5:
            with open(temp, "r+b") as f:
                f.truncate(pathlib.Path(temp).stat().st_size // 2)
            pause()
    train_state.save_file = half_written
else:  # just before or just after the log row of epoch 2
    append_csv = train.Trainer.append_csv
    def pausing_append_csv(self, row):
        if point == "before_logging_an_epoch" and row["epoch"] == 2:
            pause()
        append_csv(self, row)
        if point == "after_logging_an_epoch" and row["epoch"] == 2:
            pause()
    train.Trainer.append_csv = pausing_append_csv
sys.exit(train.main([config]))
"""


@pytest.fixture(scope="module")
def uninterrupted_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    Trainer(config("test_tiny_points.json", data_dir, out, schedule=RESUME_SCHEDULE), resume=False,
            command="pytest").run()
    return out


def kill_at(point: str, cfg_path: Path, marker: Path) -> None:
    """Run training in a child until it reaches point, then SIGKILL it. The child uses as many
    threads as this process, whose runs it is compared with bit for bit (a sum over another number
    of threads rounds differently)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_CHILD, str(cfg_path), str(marker), point], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    stderr = proc.communicate(timeout=60)[1].decode(errors="replace")
    assert marker.exists(), f"the child never reached {point}: {stderr[-2000:]}"
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", ["between_steps", "writing_the_state", "before_logging_an_epoch",
                                   "after_logging_an_epoch"])
def test_killed_at_any_point_resumes_where_it_stopped_and_ends_bit_identical(data_dir, tmp_path, uninterrupted_run,
                                                                             point):
    out = tmp_path / "killed"
    # A state after every step, so that the resumed run has progress to lose.
    cfg_path = write_config(tmp_path / "killed.json", data_dir, out, checkpoint_minutes=1e-9,
                            schedule=RESUME_SCHEDULE)
    kill_at(point, cfg_path, tmp_path / "reached")
    killed_at = state_step(out / "state.safetensors")
    assert 0 < killed_at < RESUME_STEPS

    trainer = Trainer(load_config(cfg_path), resume=True, command="pytest")
    assert not list(out.glob(".*.tmp"))  # a write cut short leaves no orphan once resumed
    steps_taken, train_step = [], trainer.train_step

    def counted_train_step(item, step):
        steps_taken.append(step)
        return train_step(item, step)

    trainer.train_step = counted_train_step
    assert trainer.run()["step"] == RESUME_STEPS
    # It went on from the killed run's last state, not from the start: a restart from scratch
    # would end bit-identical too, training being deterministic.
    assert steps_taken == list(range(killed_at, RESUME_STEPS))
    a, b = final_weights(uninterrupted_run), final_weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The log holds each epoch once, as the uninterrupted run logged it.
    columns = ("epoch", "step", "val_iou")
    assert [[row[c] for c in columns] for row in log_rows(out)] == \
        [[row[c] for c in columns] for row in log_rows(uninterrupted_run)]


def limit_file_size(limit: int):
    """preexec_fn: files of the child may not grow beyond limit bytes; a write past it fails with
    EFBIG, as on a full disk (SIGXFSZ, which would kill the child instead, is ignored)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoints_and_says_so(data_dir, tmp_path):
    cfg_path = write_config(tmp_path / "full.json", data_dir, tmp_path / "run",
                            schedule={"epochs": 1, "decay": "constant", "warmup_steps": 0})
    Trainer(load_config(cfg_path), resume=False, command="pytest").run()
    names = ("state.safetensors", "model_last.safetensors", "model_best.safetensors")
    before = {name: (tmp_path / "run" / name).read_bytes() for name in names}
    limit = len(before["model_last.safetensors"]) // 2  # no checkpoint fits; the log's rows do
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "training.train", str(cfg_path), "--resume", "--epochs", "2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
                         preexec_fn=limit_file_size(limit))
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot write ") and "File too large" in last_line, last_line
    assert "continue with --resume" in last_line
    for name in names:
        assert (tmp_path / "run" / name).read_bytes() == before[name], name
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no temporary file left behind
    load_checkpoint(tmp_path / "run" / "model_last.safetensors")
    trainer = Trainer(load_config(cfg_path), resume=True, command="pytest")
    assert trainer.progress["step"] == 2


def test_a_damaged_state_is_refused_by_name(data_dir, tmp_path):
    cfg = config("test_tiny_points.json", data_dir, tmp_path, schedule={"epochs": 1})
    Trainer(cfg, resume=False, command="pytest").run()
    state = tmp_path / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a disk that lost its tail
    with pytest.raises(TrainingError, match="cannot resume from .*state.safetensors"):
        Trainer(cfg, resume=True, command="pytest")


def test_a_state_of_another_model_is_refused_by_name(data_dir, tmp_path):
    Trainer(config("test_tiny_points.json", data_dir, tmp_path, schedule={"epochs": 1}), resume=False,
            command="pytest").run()
    wider = config("test_tiny_points.json", data_dir, tmp_path)
    wider["model"]["decoder"]["hidden"] += 8
    with pytest.raises(TrainingError, match="another model's state"):
        Trainer(wider, resume=True, command="pytest")


@pytest.mark.parametrize("problem, settings, message", [
    ("bad JSON", None, "cannot read it as JSON"),
    ("misspelt setting", {"bach_size": 8}, "unknown setting 'bach_size'"),
    ("unknown model", {"model": "tiny_pointz"}, "unknown model preset 'tiny_pointz'"),
    ("unknown optimizer", {"optimizer": {"name": "adagrad"}}, "unknown optimizer 'adagrad'"),
    ("unknown decay", {"schedule": {"decay": "linear"}}, "unknown learning-rate decay 'linear'"),
    ("no data folder", {"data_dir": "{tmp}/nowhere"}, "nowhere/split/train.txt does not exist"),
    ("no shapes", {"data_dir": "{tmp}/empty"}, "no training shapes in"),
    ("other architecture for init_weights", {"init_weights": "{tmp}/wide.safetensors"}, "differs from this run's model"),
])
def test_setup_problems_are_one_line_and_exit_code_1(data_dir, tmp_path, capsys, problem, settings, message):
    (tmp_path / "empty" / "split").mkdir(parents=True)
    for split in ("train", "val"):
        (tmp_path / "empty" / "split" / f"{split}.txt").write_text("")
    wide = preset("tiny_points")
    wide["decoder"]["hidden"] += 8
    save_checkpoint(tmp_path / "wide.safetensors", build_model(wide), wide)
    cfg_path = tmp_path / "run.json"
    if settings is None:
        cfg_path.write_text('{"batch_size": 4,}')
    else:
        settings = json.loads(json.dumps(settings).replace("{tmp}", str(tmp_path)))
        write_config(cfg_path, settings.pop("data_dir", data_dir), tmp_path / "out", **settings)
    assert main([str(cfg_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


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


def test_the_squash_augmentation_is_read_from_the_configuration(tmp_path):
    """`augmentation.squash_probability` / `squash_range` reach training's sampling (thin shapes for
    the point model, docs/pointclouds.md); validation is never squashed."""
    from training.train import load_config, sampling_config

    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "pointcloud_local.json"
    cfg = load_config(config, {"augmentation": {"squash_probability": 0.15, "squash_range": [0.05, 0.2]}})
    training, validation = sampling_config(cfg), sampling_config(cfg, validation=True)
    assert training.squash_probability == 0.15 and training.squash_range == (0.05, 0.2)
    assert training.augments and validation.squash_probability == 0.0


def test_a_silhouette_prior_is_added_to_a_trained_pixel_model_without_changing_its_weights(data_dir, tmp_path):
    from conftest import make_solid_pixel_checkpoint

    source = make_solid_pixel_checkpoint(tmp_path / "plain.safetensors")
    model = preset("tiny_pixel_image")
    model["decoder"]["prior_temperature"] = 0.05
    cfg = config("test_tiny_image.json", data_dir, tmp_path / "prior", model=model, init_weights=str(source))
    trainer = Trainer(cfg, resume=False, command="pytest")
    expected = load_file(str(source))
    for key, value in trainer.module.state_dict().items():
        if key.startswith("decoder.fc_prior."):
            assert not value.any(), key          # new: starts at zero, so the old network is kept
        else:
            assert torch.equal(value, expected[key]), key
    wider = preset("tiny_pixel_image")
    wider["decoder"]["hidden"] += 8
    with pytest.raises(TrainingError, match="differs"):
        Trainer(config("test_tiny_image.json", data_dir, tmp_path / "wider", model=wider, init_weights=str(source)),
                resume=False, command="pytest")


def test_a_shape_only_run_starts_from_a_file_with_a_texture_head_and_leaves_the_head_out(data_dir, tmp_path,
                                                                                         capsys):
    """The shipped warm start carries a texture head; image_layers.json trains shape only from it."""
    from conftest import make_solid_pixel_checkpoint

    source = make_solid_pixel_checkpoint(tmp_path / "textured.safetensors", texture_rgb=(1, 0, 0))
    cfg = config("test_tiny_image.json", data_dir, tmp_path / "shape", model=preset("tiny_pixel_image"),
                 init_weights=str(source))
    trainer = Trainer(cfg, resume=False, command="pytest")
    expected = load_file(str(source))
    state = trainer.module.state_dict()
    assert set(expected) - set(state) == {k for k in expected if k.startswith("decoder.colour_head.")} != set()
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key
    assert "left out, this run's model has none: decoder.colour_head" in capsys.readouterr().out


def test_viewer_queries_can_be_drawn_inside_the_masks_cone_only():
    """Outside the mask's cone the mask law decides at inference: uniform_in_mask spends every
    uniform query where the network has to guess, and each keeps its true occupancy."""
    from backend import camera, viewer

    rng = np.random.default_rng(0)
    uniform = rng.uniform(-0.55, 0.55, size=(50000, 3)).astype(np.float16)
    ball = np.linalg.norm(uniform.astype(np.float64), axis=1) < 0.3
    shape = ds.ShapeArrays("ball", "test", uniform, ball, uniform[:0], ball[:0])
    rows, cols = np.mgrid[:48, :48]
    mask = torch.from_numpy(np.hypot(rows - 23.5, cols - 23.5) < 12)
    identity = ds.AffineAugmentation(np.eye(3), np.zeros(3), 1.0)
    points, occupancies = ds.sample_queries_in_mask(shape, 1000, rng, identity, camera.VIEW_HALF_EXTENT, 0.55,
                                                    mask, camera.FOCAL)
    assert points.shape == (1000, 3) and occupancies.shape == (1000,)
    assert viewer.inside_mask(torch.from_numpy(points), mask, camera.FOCAL).all()
    np.testing.assert_array_equal(occupancies, np.linalg.norm(points, axis=1) < 0.3)
    assert 0.2 < occupancies.mean() < 0.9   # the ball fills much of the cone, little of the box


def test_soft_iou_loss_is_zero_for_the_truth_and_one_for_its_opposite():
    from training.train import soft_iou_loss

    occupancies = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    confident = (occupancies * 2 - 1) * 30.0
    assert soft_iou_loss(confident, occupancies) < 1e-6
    assert soft_iou_loss(-confident, occupancies) > 1 - 1e-6
    half = soft_iou_loss(torch.zeros(2, 4), occupancies)           # p = 0.5 everywhere
    assert half == pytest.approx(1 - (1.0 / 3.0 + 0.5 / 2.5) / 2)


def test_layer_loss_compares_upsampled_layers_where_the_truth_is_known():
    from training.train import layer_loss

    predicted = torch.zeros(1, 2, 4, 4, requires_grad=True)
    target = torch.full((1, 2, 8, 8), float("nan"))
    assert layer_loss(predicted, target) == 0.0                      # nothing known: no loss
    target[0, 0, :4] = 0.5                                           # known on the top half of the front
    loss = layer_loss(predicted, target)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert predicted.grad[0, 1].abs().sum() == 0                     # the unknown back gets no gradient
    assert predicted.grad[0, 0, :2].abs().sum() > 0
    assert layer_loss(torch.full((1, 2, 4, 4), 0.5), target) == 0.0


def test_relative_layer_loss_ignores_where_a_layer_sits_but_not_its_relief():
    from training.train import layer_loss, relative_layer_loss

    target = torch.full((2, 2, 8, 8), float("nan"))
    assert relative_layer_loss(torch.zeros(2, 2, 8, 8), target) == 0.0  # nothing known: no loss
    target[:, :, 2:6, 2:6] = torch.linspace(-0.2, 0.2, 4)             # a slope across the object
    moved = target.nan_to_num(0.0) + torch.tensor([0.3, -0.1]).view(1, 2, 1, 1)
    assert relative_layer_loss(moved, target).item() == pytest.approx(0.0, abs=1e-6)
    assert layer_loss(moved, target) > 0.15
    flat = torch.zeros(2, 2, 8, 8, requires_grad=True)                # no relief, at any depth
    assert relative_layer_loss(flat, target).item() == pytest.approx(2 / 15, abs=1e-5)  # about the median
    assert relative_layer_loss(flat + 0.4, target).item() == pytest.approx(relative_layer_loss(flat, target).item())
    relative_layer_loss(flat, target).backward()
    assert flat.grad[:, :, 2:6, 2:6].abs().sum() > 0
    assert flat.grad[:, :, :2].abs().sum() == 0                       # unknown pixels get no gradient


def test_a_layer_head_is_added_to_a_trained_pixel_model_without_changing_its_weights(data_dir, tmp_path):
    from conftest import make_solid_pixel_checkpoint

    source = make_solid_pixel_checkpoint(tmp_path / "plain.safetensors")
    model = preset("tiny_pixel_image")
    model["encoder"].update(layers=True, layer_context=True)
    model["decoder"].update(prior="layers", prior_temperature=0.1)
    cfg = config("test_tiny_image.json", data_dir, tmp_path / "layers", model=model, init_weights=str(source),
                 preload=False)           # the synthetic shapes have no depth maps to train the head on
    trainer = Trainer(cfg, resume=False, command="pytest")
    expected = load_file(str(source))
    new = {key for key in trainer.module.state_dict() if key not in expected}
    assert {key.split(".")[1] for key in new} == {"layer_head", "layer_context", "fc_prior"}
    for key in expected:
        assert torch.equal(trainer.module.state_dict()[key], expected[key]), key


def test_a_texture_head_learns_the_looks_colours_while_the_shape_network_stays_frozen(tmp_path):
    """train_only "texture" on real renders (training.prepare: Blender views with random looks and
    their looks.npz): the head's colour error at validation surface points falls, and every other
    weight and batch-norm statistic is bit for bit the checkpoint it started from."""
    import trimesh

    from conftest import make_solid_pixel_checkpoint
    from training import prepare

    meshes = tmp_path / "meshes"
    meshes.mkdir()
    for i, radii in enumerate([(0.5, 0.4, 0.3), (0.3, 0.5, 0.4), (0.45, 0.45, 0.2)]):
        blob = trimesh.creation.icosphere(subdivisions=3)
        blob.apply_scale(radii)
        blob.export(meshes / f"blob{i}.obj")
    data = tmp_path / "prepared"
    assert prepare.main([str(meshes), str(data), "--views", "4", "--image-size", "64", "--points", "4000",
                         "--workers", "1"]) == 0
    ids = sorted(p.name for p in data.iterdir() if (p / "looks.npz").is_file())
    assert len(ids) == 3
    for split in ("train", "val"):   # few shapes: the hash split may leave one empty
        (data / "split" / f"{split}.txt").write_text("\n".join(ids) + "\n")

    source = make_solid_pixel_checkpoint(tmp_path / "plain.safetensors")
    model = preset("tiny_pixel_image")
    model["decoder"]["texture"] = True
    cfg = config("test_tiny_image.json", data, tmp_path / "texture", model=model, init_weights=str(source),
                 train_only="texture", augmentation={"background": "random"}, colour_points=256,
                 optimizer={"name": "adam", "lr": 0.01}, schedule={"epochs": 40, "decay": "constant"},
                 val_every_epochs=2)
    trainer = Trainer(cfg, resume=False, command="pytest")
    result = trainer.run()

    rows = log_rows(tmp_path / "texture")
    errors = [float(r["val_colour_l1"]) for r in rows if r["val_iou"]]
    assert len(errors) == 20 and all(r["val_colour_l1"] == "" for r in rows if not r["val_iou"])
    assert errors[-1] < 0.6 * errors[0], errors
    assert result["best_val_colour_l1"] == pytest.approx(min(errors), abs=1e-5)
    start, end = load_file(str(source)), final_weights(tmp_path / "texture")
    assert {k for k in end if k not in start} == {k for k in end if k.startswith("decoder.colour_head.")}
    for key, value in start.items():
        assert torch.equal(end[key], value), key
