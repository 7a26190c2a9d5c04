"""Evaluation end to end: meshes come from the user's pipeline (backend.pipeline.Reconstructor),
an oracle network (the analytic shape) scores near-perfectly through it, an empty prediction gets
the defined worst case, and the CLI writes per-shape and per-class CSVs for every kind of model."""

import csv
import json
import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from backend import pipeline
from backend.checkpoint import save_checkpoint
from backend.models import build_model, preset
from backend.pipeline import ReconstructOptions, Reconstructor
from training.dataset import ShapeStore, read_split
from training.evaluate import class_means, evaluate_shape, main
from training.metrics import EMPTY_MESH_DISTANCE

from helpers_data import HALF_EXTENT, make_prepared_dataset


IMAGE_SIZE = 32
CAMERA_DISTANCE = 20.0


def far_front_camera() -> dict:
    """cameras.npz arrays of a distant pinhole camera on +z looking down at the origin: nearly the
    helpers' orthographic view 0 (along z, row 0 = +y), which viewer-centred evaluation needs."""
    world_mat = np.eye(4)
    world_mat[:3, :3] = np.diag([1.0, -1.0, -1.0])  # OpenCV axes: x right, y down, z forward
    world_mat[2, 3] = CAMERA_DISTANCE
    focal = IMAGE_SIZE / 2 * CAMERA_DISTANCE / HALF_EXTENT
    camera_mat = np.array([[focal, 0.0, IMAGE_SIZE / 2], [0.0, focal, IMAGE_SIZE / 2], [0.0, 0.0, 1.0]])
    return {"world_mat": world_mat[None], "camera_mat": camera_mat[None]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = make_prepared_dataset(tmp_path_factory.mktemp("prepared_eval"), n_train=2, n_val=1, n_test=4,
                                 points_per_shape=30000, views=1, image_size=IMAGE_SIZE)
    for shape_id in read_split(root, "test"):
        np.savez(root / shape_id / "cameras.npz", **far_front_camera())
    return root


class AnalyticShape(nn.Module):
    """A stand-in network whose logits are the synthetic shape's exact inside test (scaled)."""

    input_kind = "points"
    has_texture = False

    def __init__(self, kind: str, half):
        super().__init__()
        self.kind, self.half = kind, torch.tensor(half, dtype=torch.float32)

    def encode(self, inputs):
        return None

    def surface_level(self, threshold):
        return math.log(threshold / (1.0 - threshold))

    def decode(self, p, c):
        q = p / self.half
        if self.kind == "ellipsoid":
            return 20.0 * (1.0 - (q ** 2).sum(-1))
        return 20.0 * (1.0 - q.abs().max(dim=-1).values)


class NothingInside(AnalyticShape):
    def decode(self, p, c):
        return torch.full(p.shape[:-1], -5.0)


ORACLE_CONFIG = {"input": {"kind": "points", "num_points": 500, "noise": 0.0}}


@pytest.fixture
def oracle_pipeline(data_dir, monkeypatch):
    """A Reconstructor whose checkpoint "<data_dir>/<shape id>" is that shape's analytic oracle
    ("nothing" for one that finds nothing inside), recording the meshes it returns."""
    def load_oracle(path, device="cpu"):
        synthetic = json.loads((Path(path) / "shape.json").read_text())["synthetic"]
        oracle = NothingInside if Path(path).name == "nothing" else AnalyticShape
        return oracle(synthetic["kind"], synthetic["half"]), ORACLE_CONFIG, {}

    monkeypatch.setattr(pipeline, "load_checkpoint", load_oracle)
    # the scoring is under test, so the mesh is the oracle's own surface: without the point-cloud
    # safety net, whose carving balls round a box's corners between 500 sparse points
    monkeypatch.setattr(pipeline, "POINT_SUPPORT", None)
    reconstructor = Reconstructor("cpu")
    reconstructor.returned = []
    reconstruct_points = reconstructor.reconstruct_points

    def recording(points, options):
        reconstructor.returned.append(reconstruct_points(points, options))
        return reconstructor.returned[-1]

    reconstructor.reconstruct_points = recording
    return reconstructor


def eval_args(**kw):
    base = dict(seed=0, noise=None, num_points=None, view=0, threshold=0.5, surface_points=30000,
                fscore_threshold=0.01)
    return Namespace(**{**base, **kw})


def test_oracle_network_scores_near_perfect_through_the_pipeline(data_dir, oracle_pipeline):
    store = ShapeStore(data_dir, read_split(data_dir, "test"), surface=True, normals=True)
    rows = []
    for index in range(len(store)):
        shape = store.get(index)
        options = ReconstructOptions(checkpoint=str(data_dir / shape.shape_id), resolution=64, refine=False)
        row = evaluate_shape(oracle_pipeline, options, "points", shape, index, eval_args())
        assert row["faces"] == len(oracle_pipeline.returned[-1].faces)  # the pipeline's mesh is the one scored
        rows.append(row)
        assert row["iou"] > 0.998  # the oracle is the ground truth (up to float32 rounding at the boundary)
        assert row["chamfer_l1"] < 0.006 and row["chamfer_l1_x10"] == pytest.approx(10 * row["chamfer_l1"])
        assert row["fscore"] > 0.85 and row["normal_consistency"] > 0.95
        assert not row["empty_mesh"]
    summary = {s["class"]: s for s in class_means(rows)}
    assert set(summary) == {"box", "ellipsoid", "mean (classes)", "mean (shapes)"}
    assert summary["box"]["shapes"] == 2 and summary["mean (shapes)"]["iou"] > 0.998


def test_empty_prediction_is_scored_worst_case(data_dir, oracle_pipeline):
    store = ShapeStore(data_dir, read_split(data_dir, "test"), surface=True, normals=True)
    nothing = data_dir / "nothing"
    nothing.mkdir(exist_ok=True)
    (nothing / "shape.json").write_text(json.dumps({"synthetic": {"kind": "box", "half": [0.5, 0.5, 0.5]}}))
    options = ReconstructOptions(checkpoint=str(nothing), resolution=32, refine=False)
    row = evaluate_shape(oracle_pipeline, options, "points", store.get(0), 0, eval_args())
    assert row["empty_mesh"] and row["faces"] == 0
    assert row["chamfer_l1"] == EMPTY_MESH_DISTANCE and row["fscore"] == 0.0
    assert row["iou"] == 0.0


@pytest.mark.parametrize("model, refine, method", [
    ("tiny_points", False, "reconstruct_points"),
    ("tiny_points", True, "reconstruct_points"),
    ("tiny_image", False, "reconstruct_image"),
    ("tiny_pixel_image", False, "reconstruct_image"),  # viewer-centred
])
def test_cli_writes_per_shape_and_per_class_csv(data_dir, tmp_path, monkeypatch, capsys, model, refine, method):
    requests = []
    reconstruct = getattr(Reconstructor, method)

    def recording(self, observed, options):
        requests.append(options)
        return reconstruct(self, observed, options)

    monkeypatch.setattr(Reconstructor, method, recording)
    torch.manual_seed(0)
    cfg = preset(model)
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, build_model(cfg), cfg)
    out = tmp_path / "eval.csv"
    assert main([str(ckpt), str(data_dir), "--split", "test", "--resolution", "32", "--out", str(out),
                 "--max-shapes", "2", "--surface-points", "5000", "--device", "cpu"] + ["--refine"] * refine) == 0
    # Each shape's mesh came from the pipeline, refined only when asked.
    assert [(o.checkpoint, o.resolution, o.refine) for o in requests] == [(str(ckpt), 32, refine)] * 2
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and {"iou", "chamfer_l1", "chamfer_l1_x10", "normal_consistency", "fscore"} <= set(rows[0])
    for r in rows:
        assert float(r["chamfer_l1_x10"]) == pytest.approx(10 * float(r["chamfer_l1"]))
        assert 0.0 <= float(r["iou"]) <= 1.0
        if model == "tiny_pixel_image":  # viewer-centred: how far the predicted up is from the camera's
            assert r["up_error_deg"] == "nan" or 0.0 <= float(r["up_error_deg"]) <= 180.0
    classes = list(csv.DictReader(open(tmp_path / "eval_classes.csv")))
    assert classes[-1]["class"] == "mean (shapes)"
    assert "chamfer_l1_x10" in capsys.readouterr().out


def test_cli_names_a_bad_checkpoint_in_one_line(data_dir, tmp_path, capsys):
    assert main([str(tmp_path / "missing.safetensors"), str(data_dir), "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path / 'missing.safetensors'} does not exist"


def test_cli_dataset_keeps_only_that_datasets_shapes(data_dir, tmp_path, capsys):
    cfg = preset("tiny_points")
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, build_model(cfg), cfg)
    out = tmp_path / "eval.csv"
    common = [str(ckpt), str(data_dir), "--resolution", "32", "--surface-points", "2000", "--device", "cpu"]

    assert main(common + ["--dataset", "synthetic", "--out", str(out)]) == 0
    assert len(list(csv.DictReader(open(out)))) == len(read_split(data_dir, "test"))
    assert main(common + ["--dataset", "sweethome3d"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"error: no shapes from dataset 'sweethome3d' in split 'test' of {data_dir}"
