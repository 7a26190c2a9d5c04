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
