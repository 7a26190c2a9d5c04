"""Evaluation end to end: an oracle network (the analytic shape) scores near-perfectly, an empty
prediction gets the defined worst case, and the CLI writes per-shape and per-class CSVs."""

import csv
import json
from argparse import Namespace

import numpy as np
import pytest
import torch
from torch import nn

from backend.checkpoint import save_checkpoint
from backend.models import build_model, preset
from training.dataset import ShapeStore, read_split
from training.evaluate import class_means, evaluate_shape, main
from training.metrics import EMPTY_MESH_DISTANCE

from helpers_data import make_prepared_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_prepared_dataset(tmp_path_factory.mktemp("prepared_eval"), n_train=2, n_val=1, n_test=4,
                                 points_per_shape=30000, views=1, image_size=32)


class AnalyticShape(nn.Module):
    """A stand-in network whose logits are the synthetic shape's exact inside test (scaled)."""

    input_kind = "points"

    def __init__(self, kind: str, half):
        super().__init__()
        self.kind, self.half = kind, torch.tensor(half, dtype=torch.float32)

    def encode(self, inputs):
        return None

    def decode(self, p, c):
        q = p / self.half
        if self.kind == "ellipsoid":
            return 20.0 * (1.0 - (q ** 2).sum(-1))
        return 20.0 * (1.0 - q.abs().max(dim=-1).values)


class NothingInside(AnalyticShape):
    def decode(self, p, c):
        return torch.full(p.shape[:-1], -5.0)


def eval_args(**kw):
    base = dict(seed=0, noise=None, num_points=None, view=0, threshold=0.5, resolution=64,
                surface_points=30000, fscore_threshold=0.01)
    return Namespace(**{**base, **kw})


def test_oracle_network_scores_near_perfect(data_dir):
    store = ShapeStore(data_dir, read_split(data_dir, "test"), surface=True, normals=True)
    config = {"input": {"kind": "points", "num_points": 500, "noise": 0.0}}
    rows = []
    for index in range(len(store)):
        shape = store.get(index)
        synthetic = json.loads((data_dir / shape.shape_id / "shape.json").read_text())["synthetic"]
        oracle = AnalyticShape(synthetic["kind"], synthetic["half"])
        row = evaluate_shape(oracle, config, shape, index, eval_args(), torch.device("cpu"))
        rows.append(row)
        assert row["iou"] > 0.998  # the oracle is the ground truth (up to float32 rounding at the boundary)
        assert row["chamfer_l1"] < 0.006 and row["chamfer_l1_x10"] == pytest.approx(10 * row["chamfer_l1"])
        assert row["fscore"] > 0.85 and row["normal_consistency"] > 0.95
        assert not row["empty_mesh"]
    summary = {s["class"]: s for s in class_means(rows)}
    assert set(summary) == {"box", "ellipsoid", "mean (classes)", "mean (shapes)"}
    assert summary["box"]["shapes"] == 2 and summary["mean (shapes)"]["iou"] > 0.998


def test_empty_prediction_is_scored_worst_case(data_dir):
    store = ShapeStore(data_dir, read_split(data_dir, "test"), surface=True, normals=True)
    config = {"input": {"kind": "points", "num_points": 100, "noise": 0.0}}
    row = evaluate_shape(NothingInside("box", [0.5, 0.5, 0.5]), config, store.get(0), 0, eval_args(resolution=32),
                         torch.device("cpu"))
    assert row["empty_mesh"] and row["faces"] == 0
    assert row["chamfer_l1"] == EMPTY_MESH_DISTANCE and row["fscore"] == 0.0
    assert row["iou"] == 0.0


@pytest.mark.parametrize("kind", ["points", "image"])
def test_cli_writes_per_shape_and_per_class_csv(data_dir, tmp_path, kind, capsys):
    torch.manual_seed(0)
    cfg = preset("tiny_points" if kind == "points" else "tiny_image")
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, build_model(cfg), cfg)
    out = tmp_path / "eval.csv"
    assert main([str(ckpt), str(data_dir), "--split", "test", "--resolution", "32", "--out", str(out),
                 "--max-shapes", "2", "--surface-points", "5000", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and {"iou", "chamfer_l1", "chamfer_l1_x10", "normal_consistency", "fscore"} <= set(rows[0])
    for r in rows:
        assert float(r["chamfer_l1_x10"]) == pytest.approx(10 * float(r["chamfer_l1"]))
        assert 0.0 <= float(r["iou"]) <= 1.0
    classes = list(csv.DictReader(open(tmp_path / "eval_classes.csv")))
    assert classes[-1]["class"] == "mean (shapes)"
    assert "chamfer_l1_x10" in capsys.readouterr().out
