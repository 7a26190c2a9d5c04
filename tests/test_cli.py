"""`python -m backend reconstruct` end to end, as a real subprocess, and its one-line errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from conftest import make_octahedron_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "backend", "reconstruct", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def octahedron(tmp_path_factory):
    return make_octahedron_checkpoint(tmp_path_factory.mktemp("ckpt") / "octa.safetensors", radius=0.4)


@pytest.fixture(scope="module")
def image_octahedron(tmp_path_factory):
    return make_octahedron_checkpoint(tmp_path_factory.mktemp("ckpt") / "octa_img.safetensors", kind="image")


def cube_points(center=(3.0, -2.0, 5.0), size=2.0, n=2000):
    rng = np.random.default_rng(0)
    return rng.uniform(-size / 2, size / 2, (n, 3)) + np.asarray(center)


@pytest.mark.parametrize("suffix", [".xyz", ".npy", ".ply"])
def test_point_cloud_to_mesh_lands_where_the_points_were(tmp_path, octahedron, suffix):
    points = cube_points()
    src = tmp_path / f"points{suffix}"
    if suffix == ".xyz":
        np.savetxt(src, points)
    elif suffix == ".npy":
        np.save(src, points)
    else:
        trimesh.PointCloud(points).export(src)
    out = tmp_path / "mesh.ply"
    # --no-refine: this checks where the network's own surface lands (the refinement would pull it
    # onto these points, which fill a volume rather than sample a surface).
    proc = run_cli(src, "-o", out, "--checkpoint", octahedron, "--resolution", "64", "--no-refine")
    assert proc.returncode == 0, proc.stderr
    assert "faces" in proc.stdout and "network evaluations" in proc.stdout
    mesh = trimesh.load(out, process=False)
    assert mesh.is_watertight
    # The octahedron |x|+|y|+|z| < 0.4 of the canonical box, mapped back by the input's own scale.
    scale = np.ptp(points, axis=0).max()
    center = (points.min(0) + points.max(0)) / 2
    assert np.allclose(mesh.bounds, [center - 0.4 * scale, center + 0.4 * scale], atol=0.02 * scale)


@pytest.mark.parametrize("fmt", [".obj", ".glb", ".stl"])
def test_output_formats(tmp_path, octahedron, fmt):
    src = tmp_path / "p.npy"
    np.save(src, cube_points())
    out = tmp_path / f"m{fmt}"
    proc = run_cli(src, "-o", out, "--checkpoint", octahedron, "--resolution", "32", "--faces", "200", "--quiet")
    assert proc.returncode == 0, proc.stderr
    mesh = trimesh.load(out, force="mesh")
    assert 0 < len(mesh.faces) <= 200


def test_image_to_mesh(tmp_path, image_octahedron):
    rgba = np.zeros((90, 120, 4), np.uint8)
    rgba[20:70, 30:90] = (200, 50, 50, 255)
    Image.fromarray(rgba).save(tmp_path / "in.png")
    proc = run_cli(tmp_path / "in.png", "-o", tmp_path / "out.obj", "--checkpoint", image_octahedron,
                   "--resolution", "32")
    assert proc.returncode == 0, proc.stderr
    assert trimesh.load(tmp_path / "out.obj", process=False).is_watertight


def test_no_default_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from backend import cli, defaults
    np.save(tmp_path / "p.npy", cube_points())
    monkeypatch.setitem(defaults.DEFAULT_CHECKPOINTS, "points", tmp_path / "not_installed.safetensors")
    assert cli.main(["reconstruct", str(tmp_path / "p.npy"), "-o", str(tmp_path / "o.obj"), "--quiet"]) == 1
    assert "no default point-cloud model is installed" in capsys.readouterr().err


def write(path: Path, content) -> Path:
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content)
    return path


BAD_INPUTS = [
    ("missing.xyz", None, "no such file"),
    ("broken.png", b"\x89PNG\r\n\x1a\nthis is not really a png", "cannot read the image"),
    ("empty.xyz", b"", "expected lines of at least three numbers"),
    ("nan.npy", np.array([[0, 0, 0], [1, np.nan, 0], [1, 1, 1]], float), "NaN or infinite"),
    ("flat.npy", np.zeros((10, 3)), "span no volume"),
    ("cloud.abc", b"1 2 3", "unknown input format '.abc'"),
    ("words.xyz", b"a b c\nd e f\n", "cannot read points"),
]


@pytest.mark.parametrize("name,content,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_clear_line(tmp_path, octahedron, name, content, message):
    src = tmp_path / name if content is None else write(tmp_path / name, content)
    proc = run_cli(src, "-o", tmp_path / "o.obj", "--checkpoint", octahedron, "--quiet")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "o.obj").exists()


def test_bad_checkpoint_is_named(tmp_path):
    np.save(tmp_path / "p.npy", cube_points())
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    proc = run_cli(tmp_path / "p.npy", "-o", tmp_path / "o.obj", "--checkpoint", tmp_path / "bad.safetensors")
    assert proc.returncode == 1 and "bad.safetensors" in proc.stderr and "not a safetensors checkpoint" in proc.stderr


def test_image_given_to_point_model_is_refused(tmp_path, octahedron):
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "i.png")
    proc = run_cli(tmp_path / "i.png", "-o", tmp_path / "o.obj", "--checkpoint", octahedron)
    assert proc.returncode == 1 and "is a model for points input, but the input is an image" in proc.stderr


def test_bad_output_format_is_refused_before_any_work(tmp_path, octahedron):
    np.save(tmp_path / "p.npy", cube_points())
    proc = run_cli(tmp_path / "p.npy", "-o", tmp_path / "o.xyz", "--checkpoint", octahedron)
    assert proc.returncode == 1 and "unknown mesh format '.xyz'" in proc.stderr
