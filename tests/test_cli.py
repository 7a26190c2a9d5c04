"""`python -m backend reconstruct` end to end, as a real subprocess, and its one-line errors."""

import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from conftest import TEXTURE_SLOPE, make_octahedron_checkpoint

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


FOLDER = "a folder"


def write(path: Path, content) -> Path:
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif content is FOLDER:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


BAD_INPUTS = [
    ("missing.xyz", None, "no such file"),
    ("scans.xyz", FOLDER, "scans.xyz: is a folder, not a file"),
    ("photo.png", FOLDER, "photo.png: is a folder, not a file"),
    ("notes.png", b"shopping list: eggs, milk", "cannot read the image: it is not a PNG, JPEG"),
    ("huge.npy", np.array([[1e38, 0, 0], [-1e38, 1e38, 0], [0, 0, -1e38]]), "coordinates reach 1e+38"),
    ("broken.png", b"\x89PNG\r\n\x1a\nthis is not really a png", "cannot read the image"),
    ("empty.xyz", b"", "expected lines of at least three numbers"),
    ("nan.npy", np.array([[0, 0, 0], [1, np.nan, 0], [1, 1, 1]], float), "NaN or infinite"),
    ("flat.npy", np.zeros((10, 3)), "span no volume (all 10 lie at one place)"),
    ("pair.npy", np.array([[0.0, 0, 0], [1, 1, 1]]), "a point cloud needs at least 3 points, got 2"),
    ("pair_repeated.npy", np.tile([[0.0, 0, 0], [1, 1, 1]], (500, 1)), "only 2 distinct points (its other 998"),
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


def test_nan_weights_are_named_not_blamed_on_the_threshold(tmp_path):
    import torch

    from backend.checkpoint import load_checkpoint, save_checkpoint
    model, config, _ = load_checkpoint(make_octahedron_checkpoint(tmp_path / "ok.safetensors"))
    with torch.no_grad():
        model.decoder.fc_out.bias.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.safetensors", model, config)
    np.save(tmp_path / "p.npy", cube_points())
    proc = run_cli(tmp_path / "p.npy", "-o", tmp_path / "o.obj", "--checkpoint", tmp_path / "nan.safetensors", "--quiet")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "decoder.fc_out.bias has 1 NaN or infinite values" in proc.stderr and "threshold" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--threshold", "2"], "threshold must lie strictly between 0 and 1"),
    (["--faces", "2"], "face budget must be at least 4"),
    (["--faces", "many"], "argument --faces: invalid int value: 'many'"),
    (["--resolution", "100"], "argument --resolution: invalid choice"),
])
def test_usage_errors_are_one_line_and_exit_code_2(tmp_path, args, message):
    np.save(tmp_path / "p.npy", cube_points())
    proc = run_cli(tmp_path / "p.npy", "-o", tmp_path / "o.obj", *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_missing_decimation_package_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    from backend import cli
    monkeypatch.setitem(sys.modules, "fast_simplification", None)  # makes its import fail
    # The input does not even exist: the package is checked first, before minutes of work.
    code = cli.main(["reconstruct", str(tmp_path / "later.npy"), "-o", str(tmp_path / "o.obj"), "--faces", "100"])
    assert code == 1
    assert capsys.readouterr().err == ("error: --faces needs the fast-simplification package "
                                       "(pip install fast-simplification)\n")


# --- the output file ----------------------------------------------------------------------------

def test_output_that_is_a_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "mesh.obj").mkdir()
    proc = run_cli(tmp_path / "missing.npy", "-o", tmp_path / "mesh.obj")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "mesh.obj: is a folder; name a mesh file to write" in proc.stderr


def unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot create files in: permission bits for a normal user; for
    root (which ignores them) /proc, where no one can create files."""
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir(mode=0o555)
        return folder
    if not Path("/proc/self").is_dir():
        pytest.skip("running as root without /proc: no folder is unwritable")
    return Path("/proc")


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path):
    out = unwritable_folder(tmp_path) / "mesh.obj"
    proc = run_cli(tmp_path / "missing.npy", "-o", out)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert f"{out}: cannot write into {out.parent}" in proc.stderr, proc.stderr


def limit_file_size():
    """In the child: files may not grow past 4 KB, and exceeding that is an error (EFBIG), not a
    signal; the way a full disk or a quota shows itself to a program."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_full_disk_while_writing_is_one_line_and_keeps_the_old_file(tmp_path, octahedron):
    np.save(tmp_path / "p.npy", cube_points())
    out = tmp_path / "mesh.ply"
    out.write_bytes(b"the previous mesh")
    proc = subprocess.run([sys.executable, "-m", "backend", "reconstruct", str(tmp_path / "p.npy"), "-o", str(out),
                           "--checkpoint", str(octahedron), "--resolution", "32", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"error: {out}: cannot write the mesh (File too large)" in proc.stderr
    assert out.read_bytes() == b"the previous mesh"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.ply", "p.npy"]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_mesh_is_written_atomically_without_touching_neighbours(tmp_path, umask_022):
    """The old writer used OUT.part: a symlink there redirected the write into another file,
    and a user's own OUT.part was deleted."""
    from backend.mesh_io import save_mesh
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "mesh.ply.part").symlink_to(victim)
    (tmp_path / "notes.obj.part").write_text("mine")
    octahedron_mesh = trimesh.creation.icosphere(subdivisions=1)
    save_mesh(tmp_path / "mesh.ply", octahedron_mesh.vertices, octahedron_mesh.faces)
    save_mesh(tmp_path / "notes.obj", octahedron_mesh.vertices, octahedron_mesh.faces)
    assert victim.read_text() == "precious" and (tmp_path / "notes.obj.part").read_text() == "mine"
    assert len(trimesh.load(tmp_path / "mesh.ply", process=False).faces) == len(octahedron_mesh.faces)
    assert stat.S_IMODE((tmp_path / "mesh.ply").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mesh.ply", "mesh.ply.part", "notes.obj", "notes.obj.part", "victim.txt"]


def expected_texture(vertices):
    """RGBA (V, 4) of conftest's textured field at vertices (V, 3)."""
    red = 1.0 / (1.0 + np.exp(-TEXTURE_SLOPE * vertices[:, 0]))
    return np.stack([red, 1 - red, 1 - red, np.ones_like(red)], axis=1)


@pytest.mark.parametrize("fmt", ["ply", "glb", "obj"])
def test_fitted_field_gives_a_mesh_with_its_texture_colours(tmp_path, textured_field, fmt):
    """No input, only the checkpoint of a fitted field: its surface with the texture head's colours
    in the file (PLY red/green/blue/alpha, GLB COLOR_0, OBJ v x y z r g b)."""
    out = tmp_path / f"field.{fmt}"
    proc = run_cli("--checkpoint", textured_field, "-o", out, "--resolution", "32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    mesh = trimesh.load(out, force="mesh", process=False)
    assert np.abs(mesh.vertices).sum(axis=1).max() < 0.4 + 0.05  # the octahedron of radius 0.4
    colours = np.asarray(mesh.visual.vertex_colors) / 255.0
    np.testing.assert_allclose(colours, expected_texture(np.asarray(mesh.vertices)), atol=1.5 / 255)
    assert colours[:, 0].min() < 0.1 and colours[:, 0].max() > 0.9


def test_no_colour_drops_the_texture(tmp_path, textured_field):
    out = tmp_path / "plain.ply"
    proc = run_cli("--checkpoint", textured_field, "-o", out, "--resolution", "32", "--quiet", "--no-colour")
    assert proc.returncode == 0, proc.stderr
    assert b"red" not in out.read_bytes().split(b"end_header")[0]


def test_fitted_field_and_input_models_are_not_mixed_up(tmp_path, textured_field, octahedron):
    np.save(tmp_path / "pts.npy", cube_points())
    proc = run_cli(tmp_path / "pts.npy", "--checkpoint", textured_field, "-o", tmp_path / "a.ply")
    assert proc.returncode == 1 and "fitted field" in proc.stderr and "without an input" in proc.stderr
    proc = run_cli("--checkpoint", octahedron, "-o", tmp_path / "b.ply")
    assert proc.returncode == 1 and "needs one" in proc.stderr
    proc = run_cli("-o", tmp_path / "c.ply")
    assert proc.returncode == 2 and "give an input" in proc.stderr
