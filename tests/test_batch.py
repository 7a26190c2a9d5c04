"""Headless batch conversion (python -m blender_occnet.batch) on a folder with one bad file."""

import json
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh")

from conftest import REPO_ROOT, backend_env, edges_watertight, pid_alive, require_bpy  # noqa: E402

require_bpy()


def write_png(path, rgba):
    """A minimal RGBA PNG writer (stdlib only)."""
    h, w, _ = rgba.shape
    raw = b"".join(b"\0" + rgba[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def test_batch_folder_with_one_bad_file(tmp_path, tiny_checkpoints):
    src = tmp_path / "inputs"
    src.mkdir()
    rng = np.random.default_rng(0)
    cloud_a = rng.uniform(-1, 1, (400, 3)) + [10.0, 0.0, 0.0]
    np.savetxt(src / "a_cloud.xyz", cloud_a)
    cloud_b = rng.uniform(-2, 2, (400, 3))
    np.save(src / "b_cloud.npy", cloud_b.astype(np.float32))
    (src / "c_broken.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 10\nproperty float x\n"
                                       b"end_header\n1\n2\n")
    img = np.zeros((32, 32, 4), np.uint8)
    img[6:26, 8:24] = (200, 120, 60, 255)
    write_png(src / "d_photo.png", img)
    (src / "notes.md").write_text("ignored: not an input type")
    out = tmp_path / "out"

    cmd = [sys.executable, "-m", "blender_occnet.batch", str(src), "--out", str(out),
           "--blend", "scene.blend", "--format", "glb", "--resolution", "32",
           "--checkpoint-points", str(tiny_checkpoints["points"]),
           "--checkpoint-image", str(tiny_checkpoints["image"]), "--device", "cpu"]
    cp = subprocess.run(cmd, cwd=tmp_path, env=backend_env(), capture_output=True, text=True,
                        timeout=300)
    log = cp.stdout + cp.stderr
    assert cp.returncode == 1, log
    assert "[4/4]" in log and "notes.md" not in log
    assert re.search(r"c_broken\.ply: FAILED: .*c_broken\.ply", log), log
    assert "summary: 3 of 4 inputs converted" in log and "1 failed" in log, log
    assert re.search(r"a_cloud\.xyz: extract +\d+%", log)  # progress is printed
    pid = int(re.search(r"backend: .* \(pid (\d+)\)", log).group(1))
    assert not pid_alive(pid), "the batch command left its backend running"

    assert sorted(p.name for p in out.iterdir()) == ["a_cloud.glb", "b_cloud.glb", "d_photo.glb",
                                                     "scene.blend"]
    for name, cloud in (("a_cloud", cloud_a), ("b_cloud", cloud_b)):
        mesh = trimesh.load(out / f"{name}.glb", force="mesh")
        assert edges_watertight(mesh.faces)
        center = (cloud.min(0) + cloud.max(0)) / 2
        # glTF is Y-up: Blender (x, y, z) -> (x, z, -y)
        c = mesh.bounds.mean(axis=0)
        np.testing.assert_allclose([c[0], -c[2], c[1]], center, atol=0.05 * np.ptp(cloud, axis=0).max())

    code = ("import bpy, json, sys\n"
            "bpy.ops.wm.open_mainfile(filepath=sys.argv[1])\n"
            "print('OBJS ' + json.dumps({o.name: [len(o.data.polygons), list(o.location)] "
            "for o in bpy.data.objects}))\n")
    cp = subprocess.run([sys.executable, "-c", code, str(out / "scene.blend")], capture_output=True,
                        text=True, timeout=120, check=True)
    objs = json.loads(cp.stdout.split("OBJS ", 1)[1].splitlines()[0])
    assert sorted(objs) == ["a_cloud", "b_cloud", "d_photo"]
    assert all(n_faces > 100 for n_faces, _ in objs.values())
    np.testing.assert_allclose(objs["a_cloud"][1], (cloud_a.min(0) + cloud_a.max(0)) / 2, atol=1e-4)


def test_batch_usage_errors(tmp_path):
    cp = subprocess.run([sys.executable, "-m", "blender_occnet.batch", str(tmp_path), "--out",
                         str(tmp_path / "o")], cwd=REPO_ROOT, env=backend_env(), capture_output=True,
                        text=True, timeout=120)
    assert cp.returncode == 2 and "no supported inputs" in cp.stderr
    cp = subprocess.run([sys.executable, "-m", "blender_occnet.batch", "--out", "x"], cwd=REPO_ROOT,
                        env=backend_env(), capture_output=True, text=True, timeout=120)
    assert cp.returncode == 2 and "INPUT" in cp.stderr


def test_arguments_after_double_dash_when_run_inside_blender(monkeypatch):
    """`blender -b --python-expr "...main()" -- INPUTS --out DIR`: Blender's own options are skipped."""
    from blender_occnet import batch
    monkeypatch.setattr(sys, "argv", ["blender", "-b", "--python-expr", "x", "--", "a.ply", "b",
                                      "--out", "o", "--format", "obj"])
    args = batch.build_parser().parse_args(batch._argv_from_blender())
    assert args.inputs == ["a.ply", "b"] and args.out == "o" and args.format == "obj"
    monkeypatch.setattr(sys, "argv", ["python -m blender_occnet.batch", "c.xyz", "--out", "p"])
    args = batch.build_parser().parse_args(batch._argv_from_blender())
    assert args.inputs == ["c.xyz"] and args.out == "p" and args.resolution == 128


def _run_batch(args, cwd, env=None, timeout=300):
    cp = subprocess.run([sys.executable, "-m", "blender_occnet.batch", *map(str, args)], cwd=cwd,
                        env=env or backend_env(), capture_output=True, text=True, timeout=timeout)
    return cp.returncode, cp.stdout + cp.stderr


def test_inputs_with_the_same_name_get_their_own_outputs(tmp_path, tiny_checkpoints):
    rng = np.random.default_rng(1)
    for folder, shift in (("a", 0.0), ("b", 10.0)):
        (tmp_path / folder).mkdir()
        np.savetxt(tmp_path / folder / "chair.xyz", rng.uniform(-1, 1, (300, 3)) + shift)
    np.savetxt(tmp_path / "a" / "good.xyz", rng.uniform(-1, 1, (300, 3)))
    img = np.zeros((32, 32, 4), np.uint8)
    img[6:26, 8:24] = (200, 120, 60, 255)
    write_png(tmp_path / "a" / "good.png", img)
    out = tmp_path / "out"
    args = [tmp_path / "a" / "chair.xyz", tmp_path / "b" / "chair.xyz", tmp_path / "a" / "good.xyz",
            tmp_path / "a" / "good.png", "--out", out, "--format", "obj", "--resolution", "32",
            "--checkpoint-points", tiny_checkpoints["points"],
            "--checkpoint-image", tiny_checkpoints["image"], "--device", "cpu"]
    code, log = _run_batch(args, tmp_path)
    assert code == 0, log
    names = ["a_chair.obj", "b_chair.obj", "good_png.obj", "good_xyz.obj"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert "4 files written" in log and all(f"wrote: {out / n}" in log for n in names), log
    # each file holds its own input's mesh: b's cloud lies 10 units further along every axis
    centers = {n: trimesh.load(out / n, force="mesh").bounds.mean(axis=0) for n in names[:2]}
    np.testing.assert_allclose(np.abs(centers["b_chair.obj"] - centers["a_chair.obj"]), 10.0,
                               atol=0.5)  # (OBJ is Y-up: the signs differ, the distances do not)

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, log = _run_batch(args, tmp_path)  # the same command again: nothing is replaced
    assert code == 2 and "already exist" in log and "--overwrite" in log, log
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    code, log = _run_batch(args + ["--overwrite"], tmp_path)
    assert code == 0 and "4 files written" in log, log


def test_out_naming_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "cloud.xyz").write_text("0 0 0\n1 0 0\n0 1 0\n0 0 1\n")
    (tmp_path / "taken").write_text("a file, not a folder")
    code, log = _run_batch([tmp_path / "cloud.xyz", "--out", tmp_path / "taken"], tmp_path)
    assert code == 2 and "is a file, not a folder" in log, log
    code, log = _run_batch([tmp_path / "cloud.xyz", "--out", tmp_path / "o", "--threshold", "1.5"],
                           tmp_path)
    assert code == 2 and "threshold must lie in" in log, log


def test_launcher_runs_the_batch_of_an_extension_install(tmp_path, tiny_checkpoints):
    """Blender 4.2+ installs the add-on as bl_ext.<repository>.blender_occnet, where a fixed
    ``from blender_occnet.batch import main`` fails. The launcher finds it whichever way; it runs
    here as Blender's --python runs a script (the bpy module has no --python)."""
    import shutil
    user = tmp_path / "user"
    addon = user / "extensions" / "user_default" / "blender_occnet"
    shutil.copytree(REPO_ROOT / "blender_occnet", addon,
                    ignore=shutil.ignore_patterns("__pycache__"))
    np.savetxt(tmp_path / "cloud.xyz", np.random.default_rng(2).uniform(-1, 1, (300, 3)))
    launcher = addon / "batch_launcher.py"
    code = (
        "import runpy, sys\n"
        "import bpy\n"
        "sys.argv = ['blender', '-b', '--python-exit-code', '2', '--python', sys.argv[1], '--'] "
        "+ sys.argv[2:]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[5], run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    print('RAN', [m for m in sys.modules if m.endswith('blender_occnet.batch')])\n"
        "    sys.exit(exc.code)\n")
    env = backend_env()
    env.pop("PYTHONPATH")
    env["BLENDER_USER_RESOURCES"] = str(user)
    common = [sys.executable, "-c", code, str(launcher)]
    cp = subprocess.run(common + [str(tmp_path / "cloud.xyz"), "--out", str(tmp_path / "out"),
                                  "--resolution", "32", "--device", "cpu",
                                  "--checkpoint-points", str(tiny_checkpoints["points"])],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = cp.stdout + cp.stderr
    assert cp.returncode == 0, log
    assert "RAN ['bl_ext.user_default.blender_occnet.batch']" in log, log
    assert (tmp_path / "out" / "cloud.glb").is_file()
    (tmp_path / "empty").mkdir()
    cp = subprocess.run(common + [str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert cp.returncode == 2 and "no supported inputs" in cp.stderr, cp.stdout + cp.stderr


def glb_vertices_and_colours(path):
    """POSITION (V, 3) and COLOR_0 (V, 3|4) in [0, 1] of a GLB's first primitive (trimesh drops
    COLOR_0 when the primitive has a material, as Blender's exports do)."""
    import json

    data = path.read_bytes()
    json_length = struct.unpack_from("<I", data, 12)[0]
    gltf = json.loads(data[20:20 + json_length])
    binary = data[20 + json_length + 8:]
    components = {5126: np.float32, 5123: np.uint16, 5121: np.uint8}
    sizes = {"VEC3": 3, "VEC4": 4}

    def accessor(index):
        acc = gltf["accessors"][index]
        view = gltf["bufferViews"][acc["bufferView"]]
        dtype = components[acc["componentType"]]
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        values = np.frombuffer(binary, dtype, acc["count"] * sizes[acc["type"]], start).reshape(acc["count"], -1)
        return values / np.iinfo(dtype).max if dtype != np.float32 else values

    attributes = gltf["meshes"][0]["primitives"][0]["attributes"]
    return accessor(attributes["POSITION"]), accessor(attributes["COLOR_0"])


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_batch_files_carry_the_colours(tmp_path, tiny_checkpoints, fmt):
    """A coloured scan of a ball (red where x < 0, blue above) gives a file with those vertex colours.
    (2000 points: a vertex's 8 nearest of 600 reach about 0.3 away, as far as the margins below.)"""
    points = np.random.default_rng(2).normal(size=(2000, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    colours = np.where(points[:, :1] < 0, [255, 0, 0], [0, 0, 255])
    np.savetxt(tmp_path / "cloud.xyz", np.hstack([points, colours]), fmt=["%.6f"] * 3 + ["%d"] * 3)
    code, log = _run_batch([tmp_path / "cloud.xyz", "--out", tmp_path / "out", "--format", fmt,
                            "--resolution", "32", "--checkpoint-points", tiny_checkpoints["points"],
                            "--device", "cpu"], tmp_path)
    assert code == 0, log
    path = tmp_path / "out" / f"cloud.{fmt}"
    if fmt == "glb":
        vertices, rgb = glb_vertices_and_colours(path)
    else:
        mesh = trimesh.load(path, force="mesh", process=False)
        vertices, rgb = mesh.vertices, np.asarray(mesh.visual.vertex_colors) / 255.0
    x, rgb = np.asarray(vertices)[:, 0], rgb[:, :3]
    np.testing.assert_allclose(rgb[x < -0.3], [[1, 0, 0]] * int((x < -0.3).sum()), atol=0.01)
    np.testing.assert_allclose(rgb[x > 0.3], [[0, 0, 1]] * int((x > 0.3).sum()), atol=0.01)
