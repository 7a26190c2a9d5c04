"""Shared pytest fixtures."""
# --- blender-occnet add-on / server fixtures (owner: add-on) ---------------------------------
import os as _os
from pathlib import Path as _Path

import pytest as _pytest

REPO_ROOT = _Path(__file__).resolve().parents[1]


def make_octahedron_checkpoint(path, kind="points", radius=0.4):
    """Save a tiny checkpoint (the registry's tiny preset) whose decision boundary is known:
    logit(p) = radius - (|x| + |y| + |z|) in canonical coordinates, whatever the input. The
    reconstruction is then a watertight octahedron centred in the input's canonical box."""
    import torch

    from backend.checkpoint import save_checkpoint
    from backend.models import build_model, preset

    config = preset("tiny_points" if kind == "points" else "tiny_image")
    model = build_model(config)
    dec = model.decoder
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        for m in dec.modules():  # conditional batch norms: gamma = 1, beta = 0
            if hasattr(m, "conv_gamma"):
                m.conv_gamma.bias.fill_(1.0)
        w = dec.fc_p.weight  # Linear (H, 3) or Conv1d (H, 3, 1)
        hidden = w.shape[0]
        assert hidden >= 6, "the tiny preset needs at least 6 hidden units for the octahedron"
        w6 = torch.zeros(hidden, 3)
        for axis in range(3):
            w6[2 * axis, axis] = 1.0
            w6[2 * axis + 1, axis] = -1.0
        w.copy_(w6.reshape(w.shape))
        out = torch.zeros(hidden)
        out[:6] = -1.0
        # batch norm in eval mode divides by sqrt(1 + eps); scale so |x|+|y|+|z| stays exact
        eps = getattr(getattr(dec, "bn", None), "bn", None)
        scale = (1.0 + eps.eps) ** 0.5 if eps is not None else 1.0
        dec.fc_out.weight.copy_((out * scale).reshape(dec.fc_out.weight.shape))
        dec.fc_out.bias.fill_(radius)
    model.eval()
    save_checkpoint(path, model, config, metadata={"purpose": "test octahedron", "radius": radius})
    return _Path(path)


def make_solid_pixel_checkpoint(path, texture_rgb=None):
    """Save a tiny viewer-centred image checkpoint (the registry's tiny_pixel_image) that calls
    every point inside and sees a level camera (up = -y): whatever the picture, the result is its
    mask extruded through the viewer box, so placement and outline can be checked exactly.
    texture_rgb (3 values, each 0 or 1): a texture head besides, saying that colour everywhere."""
    import torch

    from backend.checkpoint import save_checkpoint
    from backend.models import build_model, preset

    config = preset("tiny_pixel_image")
    config["decoder"]["texture"] = texture_rgb is not None
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.decoder.parameters():
            parameter.zero_()
        model.decoder.fc_out.bias.fill_(10.0)
        if texture_rgb is not None:
            model.decoder.colour_head[-1].bias.copy_(20.0 * torch.tensor(texture_rgb, dtype=torch.float32) - 10.0)
        last = model.encoder.up_head[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, -1.0, 0.0]))
    save_checkpoint(path, model.eval(), config, metadata={"purpose": "test: solid, level camera"})
    return _Path(path)


@_pytest.fixture(scope="session")
def solid_pixel_checkpoint(tmp_path_factory):
    return str(make_solid_pixel_checkpoint(tmp_path_factory.mktemp("solid") / "solid.safetensors"))


@_pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{"points": path, "image": path}: tiny octahedron checkpoints (see make_octahedron_checkpoint)."""
    d = tmp_path_factory.mktemp("tiny_ckpt")
    return {kind: make_octahedron_checkpoint(d / f"octa_{kind}.safetensors", kind)
            for kind in ("points", "image")}


# the red of a textured field's colour: sigmoid(TEXTURE_SLOPE * x), so red for x > 0, cyan below
TEXTURE_SLOPE = 8.0


def make_textured_field_checkpoint(path, radius=0.4):
    """Save a fitted-field checkpoint (input kind none, decoder textured_field with its texture
    head) whose surface and colour are known: logit = radius - (|x| + |y| + |z|) (an octahedron),
    RGB = (s, 1 - s, 1 - s) with s = sigmoid(TEXTURE_SLOPE * x)."""
    import torch

    from backend.checkpoint import save_checkpoint
    from backend.models import build_model

    config = {"input": {"kind": "none"}, "encoder": {"name": "none"},
              "decoder": {"name": "textured_field", "hidden": 6, "n_blocks": 0, "texture": True}}
    model = build_model(config)
    dec = model.decoder
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        for axis in range(3):  # hidden units 2 a and 2 a + 1: relu(x_a), relu(-x_a)
            dec.fc_p.weight[2 * axis, axis] = 1.0
            dec.fc_p.weight[2 * axis + 1, axis] = -1.0
        dec.fc_out.weight[0] = -1.0
        dec.fc_out.bias[0] = radius
        x = torch.tensor([1.0, -1.0, 0, 0, 0, 0]) * TEXTURE_SLOPE  # TEXTURE_SLOPE * x
        dec.fc_out.weight[1], dec.fc_out.weight[2], dec.fc_out.weight[3] = x, -x, -x
    save_checkpoint(path, model.eval(), config, metadata={"purpose": "test: coloured octahedron"})
    return _Path(path)


@_pytest.fixture(scope="session")
def textured_field(tmp_path_factory):
    return make_textured_field_checkpoint(tmp_path_factory.mktemp("field") / "field.safetensors")


def backend_env():
    """Environment for a child `python -m backend serve` run from the source tree."""
    env = dict(_os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.setdefault("TQDM_DISABLE", "1")
    return env


def pid_alive(pid):
    """True while a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            _os.kill(pid, 0)
            return True
        except OSError:
            return False
# --- end of add-on fixtures ----------------------------------------------------------------


def edges_watertight(faces):
    """Every undirected edge of a closed 2-manifold triangle mesh is used by exactly 2 faces."""
    import numpy as np

    faces = np.asarray(faces)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e.sort(axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return len(faces) > 0 and bool((counts == 2).all())


def import_bpy():
    """Import the bpy module in the test process, or skip. bpy *prepends* Blender's script folders
    to sys.path; one of them holds Blender's internal ``bpy`` package, so a process spawned later
    (multiprocessing "spawn" copies sys.path) would import that one and fail on ``_bpy``. Move
    those folders behind site-packages: same modules in this process, the real bpy in children."""
    import sys

    before = list(sys.path)
    bpy = _pytest.importorskip("bpy")
    added = [p for p in sys.path if p not in before]
    if added:
        rest = [p for p in sys.path if p not in added]
        sys.path[:] = rest + added
    return bpy


def require_bpy():
    """Skip unless the bpy module is installed, without importing it here."""
    import importlib.util

    if importlib.util.find_spec("bpy") is None:
        _pytest.skip("the bpy module is not installed (pip install bpy==5.0.1)", allow_module_level=True)
