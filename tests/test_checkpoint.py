"""backend.checkpoint against forged and damaged files: a CheckpointError naming the problem,
before anything big is allocated; and the atomic write behind save_checkpoint."""

import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.atomic import atomic_write
from backend.checkpoint import load_checkpoint, read_header, save_checkpoint
from backend.errors import CheckpointError
from backend.models import build_model, preset

REPO = Path(__file__).resolve().parents[1]


def forge(path: Path, config, tensors=None) -> Path:
    """A safetensors file with an occnet header holding config (any JSON) and the given
    {name: shape} of float32 zeros; a few hundred bytes."""
    tensors = tensors or {"w": [2]}
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "occnet-checkpoint/1", "config": json.dumps(config), "metadata": "{}"}
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))
    return path


def with_size(key: str, value) -> dict:
    config = preset("tiny_points")
    config["decoder"][key] = value
    return config


@pytest.mark.parametrize("config,message", [
    ([1, 2, 3], "its config must be a JSON object, found list"),
    ("tiny_points", "its config must be a JSON object, found str"),
    ({"encoder": {}}, "its configuration lacks the 'input' section"),
    (with_size("hidden", -5), r"decoder.hidden = -5 is not a whole number from 1 to 16384"),
    (with_size("hidden", 10**9), r"decoder.hidden = 1000000000 is not a whole number"),
    (with_size("hidden", 40000), r"decoder.hidden = 40000 is not a whole number"),
    (with_size("hidden", 8.5), r"decoder.hidden = 8.5 is not a whole number"),
    (with_size("n_blocks", 10**6), r"decoder.n_blocks = 1000000 is not a whole number from 0 to 64"),
    (with_size("name", "nope"), "unknown decoder 'nope'"),
    (with_size("surprise", 1), "bad model configuration"),
])
def test_forged_configurations_are_refused_by_name(tmp_path, config, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(forge(tmp_path / "forged.safetensors", config))


def test_a_forged_file_fails_before_anything_big_is_allocated(tmp_path):
    """Within every size limit, yet its decoder would hold a billion bytes of weights: the shapes
    are compared on the meta device, so refusing the 1 KB file costs no memory."""
    path = forge(tmp_path / "forged.safetensors", with_size("hidden", 8192), {"decoder.fc_p.weight": [8192, 3]})
    probe = ("import resource; from backend.checkpoint import load_checkpoint; from backend.errors import CheckpointError\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             f"try:\n    load_checkpoint({str(path)!r})\nexcept CheckpointError as exc:\n    print(exc)\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    message, grown_kib = out.stdout.strip().splitlines()
    assert "weights do not match the configuration" in message and "missing tensors" in message, out.stderr
    assert int(grown_kib) < 50 * 1024, f"grew by {int(grown_kib) / 1024:.0f} MiB"


def test_half_precision_checkpoint_keeps_its_values(tmp_path):
    config = preset("tiny_image")
    model = build_model(config).eval()
    with torch.no_grad():  # away from the initialisation (whose zeros hide the image), in values
        for p in model.parameters():  # a half holds exactly, so that the comparison can be exact
            p.copy_((p + 0.05 * torch.randn_like(p)).half().float())
    save_checkpoint(tmp_path / "h.safetensors", model, config, dtype=torch.float16)
    loaded, _, _ = load_checkpoint(tmp_path / "h.safetensors")
    for name, value in loaded.state_dict().items():
        assert value.dtype == model.state_dict()[name].dtype
        assert torch.equal(value, model.state_dict()[name]), name
    images, points = torch.rand(2, 3, 64, 64), torch.rand(2, 20, 3) - 0.5
    with torch.no_grad():  # the non-persistent buffers (image mean and std) are right too
        code = model.encode(images)
        assert torch.equal(loaded.encode(images), code) and code.std() > 0
        logits = model.decode(points, code)
        assert torch.isfinite(logits).all() and torch.equal(loaded.decode(points, code), logits)


def test_non_finite_weights_are_refused_by_name(tmp_path):
    config = preset("tiny_points")
    model = build_model(config)
    with torch.no_grad():
        model.decoder.fc_out.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "diverged.safetensors", model, config)
    with pytest.raises(CheckpointError, match="tensor decoder.fc_out.weight has 1 NaN or infinite values"):
        load_checkpoint(tmp_path / "diverged.safetensors")


def test_a_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "m.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        read_header(tmp_path / "m.safetensors")


def test_header_metadata_that_is_not_an_object_is_refused(tmp_path):
    path = forge(tmp_path / "m.safetensors", preset("tiny_points"))
    text = path.read_bytes().replace(b'"metadata": "{}"', b'"metadata": "[]"')
    path.write_bytes(text)
    with pytest.raises(CheckpointError, match="its metadata must be a JSON object, found list"):
        read_header(path)


# --- atomic writes ------------------------------------------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_checkpoint_gets_the_mode_of_any_new_file(tmp_path, umask_022):
    config = preset("tiny_points")
    save_checkpoint(tmp_path / "m.safetensors", build_model(config), config)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old")

    def fail(temp):
        Path(temp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_atomic_write_never_touches_files_beside_the_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("m.safetensors.part", "m.safetensors.tmp", ".m.safetensors.tmp"):
        (tmp_path / name).symlink_to(victim)
    atomic_write(tmp_path / "m.safetensors", lambda temp: Path(temp).write_bytes(b"new"))
    assert victim.read_text() == "precious"
    assert (tmp_path / "m.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".m.safetensors.tmp", "m.safetensors", "m.safetensors.part", "m.safetensors.tmp", "victim.txt"])
