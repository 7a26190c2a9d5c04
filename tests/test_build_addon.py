"""build_addon.py: the extension zip (validated by Blender's own tool) and the legacy zip hold an
explicit allow-list and the vendored wire format, and both install into an isolated Blender user
folder and run a reconstruction with the bundled backend."""

import json
import os
import subprocess
import sys
import zipfile

import pytest


from conftest import REPO_ROOT, pid_alive, require_bpy  # noqa: E402

require_bpy()

sys.path.insert(0, str(REPO_ROOT))
import build_addon  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    cp = subprocess.run([sys.executable, str(REPO_ROOT / "build_addon.py"), "--out", str(out)],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "validated" in cp.stdout
    version = build_addon.read_version()
    ext, legacy = out / f"blender_occnet-{version}.zip", out / f"blender_occnet-{version}-legacy.zip"
    assert ext.is_file() and legacy.is_file()
    return ext, legacy


def expected_names():
    """Every file the zips may hold, from the build's own allow-list of the real source tree."""
    addon = {str(p.as_posix()) for p in build_addon.addon_files()}
    backend = {"bundled/backend/" + p.as_posix() for p in build_addon.backend_files()}
    return addon | backend | {"bundled/README.txt"}


def test_zip_contents(built):
    ext, legacy = built
    with zipfile.ZipFile(ext) as zf:
        names = set(zf.namelist())
        assert zf.read("wire.py") == (REPO_ROOT / "backend" / "wire.py").read_bytes()
    assert names == expected_names()
    assert {"blender_manifest.toml", "__init__.py", "wire.py", "client.py", "operators.py",
            "bundled/backend/server.py", "bundled/backend/pipeline.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    src_weights = sorted(p.name for p in (REPO_ROOT / "backend" / "weights").glob("*.safetensors"))
    assert sorted(n.rsplit("/", 1)[1] for n in names
                  if n.startswith("bundled/backend/weights/") and n.endswith(".safetensors")) == src_weights
    with zipfile.ZipFile(legacy) as zf:
        lnames = set(zf.namelist())
    assert {"blender_occnet/" + n for n in names} == lnames
    # Blender's validator accepts the extension and refuses a broken one
    tool = build_addon.find_blender_ext()
    build_addon.run_ext_tool(tool, "validate", str(ext))
    broken = ext.parent / "broken.zip"
    with zipfile.ZipFile(ext) as src, zipfile.ZipFile(broken, "w") as dst:
        for n in src.namelist():
            data = src.read(n)
            if n == "blender_manifest.toml":
                data = data.replace(b'type = "add-on"', b'type = "plug-in"')
            dst.writestr(n, data)
    with pytest.raises(build_addon.BuildError, match="validate failed"):
        build_addon.run_ext_tool(tool, "validate", str(broken))


def test_version_mismatch_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "blender_occnet"
    fake.mkdir()
    (fake / "blender_manifest.toml").write_text('id = "blender_occnet"\nversion = "9.9.9"\n')
    (fake / "__init__.py").write_text('bl_info = {"version": (0, 1, 0)}\n__version__ = "0.1.0"\n')
    monkeypatch.setattr(build_addon, "ADDON_SRC", fake)
    with pytest.raises(build_addon.BuildError, match="versions disagree"):
        build_addon.read_version()


INSTALL_AND_RUN = r"""
import json, os, sys
import bpy, addon_utils
mode, zip_path, ckpt = sys.argv[1:4]
for o in list(bpy.data.objects):
    bpy.data.objects.remove(o)
if mode == "extension":
    res = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default",
                                                   enable_on_install=True)
    module = "bl_ext.user_default.blender_occnet"
else:
    res = bpy.ops.preferences.addon_install(filepath=zip_path)
    module = "blender_occnet"
    addon_utils.enable(module, default_set=True, handle_error=None)
assert res == {"FINISHED"}, res
mod = sys.modules[module]
prefs = bpy.context.preferences.addons[module].preferences
prefs.checkpoint_points = ckpt
bpy.ops.mesh.primitive_cube_add(location=(2.0, 0.0, 0.0))
assert bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32") == {"FINISHED"}
obj = bpy.context.active_object
rt = sys.modules[module + ".runtime"]
info = rt.session.client.info()
pid = rt.session.client.proc.pid
addon_utils.disable(module, default_set=True)
print("RESULT " + json.dumps({"file": mod.__file__, "faces": len(obj.data.polygons),
                               "location": list(obj.location), "backend_path": info["backend_path"],
                               "pid": pid}))
"""


@pytest.mark.parametrize("mode", ["extension", "legacy"])
def test_installs_and_runs_with_bundled_backend(built, tiny_checkpoints, tmp_path, mode):
    ext, legacy = built
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["BLENDER_USER_RESOURCES"] = str(tmp_path / "user")  # an isolated Blender user folder
    script = tmp_path / "run.py"
    script.write_text(INSTALL_AND_RUN)
    cp = subprocess.run([sys.executable, str(script), mode, str(ext if mode == "extension" else legacy),
                         str(tiny_checkpoints["points"])], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=240)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    res = json.loads(cp.stdout.split("RESULT ", 1)[1].splitlines()[0])
    user = str(tmp_path / "user")
    assert res["file"].startswith(user), res  # the installed copy, not the source tree
    assert res["backend_path"].startswith(user) and res["backend_path"].endswith(
        os.path.join("blender_occnet", "bundled", "backend"))
    assert res["faces"] >= 8  # the tiny model's octahedron, decimated to the spacing of a cube's 8 corners
    assert res["location"] == pytest.approx([2.0, 0.0, 0.0], abs=1e-5)
    assert not pid_alive(res["pid"])


JUNK = [".env", ".cache/state.json", "__pycache__/operators.cpython-311.pyc", "scene.blend1",
        "notes.txt", "scratch/tool.py", "dist/old.zip"]
BACKEND_JUNK = ["weights/experiment_epoch3.safetensors", "weights/model_best.pt", ".env",
                "models/__pycache__/layers.cpython-311.pyc", "runs/events.out", "wire.py.orig"]


def test_stage_packs_the_allow_list_and_nothing_else(tmp_path, monkeypatch):
    """Whatever a developer leaves in the source folders (secrets, caches, Blender backups,
    experiment weights, scratch scripts outside the packages) stays out of the add-on."""
    import shutil

    src = tmp_path / "src"
    for name in ("blender_occnet", "backend"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in JUNK:
        (src / "blender_occnet" / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / "blender_occnet" / rel).write_text("junk")
    for rel in BACKEND_JUNK:
        (src / "backend" / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / "backend" / rel).write_text("junk")
    (src / "blender_occnet" / "wire.py").write_text("# a stale copy\n")
    monkeypatch.setattr(build_addon, "ADDON_SRC", src / "blender_occnet")
    monkeypatch.setattr(build_addon, "BACKEND_SRC", src / "backend")
    staged = build_addon.stage(tmp_path / "stage")
    names = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert names == expected_names()
    assert (staged / "wire.py").read_bytes() == (src / "backend" / "wire.py").read_bytes()


def test_a_missing_listed_file_stops_the_build(tmp_path, monkeypatch):
    import shutil

    src = tmp_path / "backend"
    shutil.copytree(REPO_ROOT / "backend", src, ignore=shutil.ignore_patterns("__pycache__", "weights"))
    monkeypatch.setattr(build_addon, "BACKEND_SRC", src)
    with pytest.raises(build_addon.BuildError, match="MODEL_CARD.md is missing"):
        build_addon.stage(tmp_path / "stage")


def test_sync_wire_makes_the_addon_copy_identical(tmp_path, monkeypatch):
    (tmp_path / "backend").mkdir()
    (tmp_path / "addon").mkdir()
    (tmp_path / "backend" / "wire.py").write_bytes(b"PROTOCOL_VERSION = 2\n")
    (tmp_path / "addon" / "wire.py").write_bytes(b"PROTOCOL_VERSION = 1\n")
    monkeypatch.setattr(build_addon, "BACKEND_SRC", tmp_path / "backend")
    monkeypatch.setattr(build_addon, "ADDON_SRC", tmp_path / "addon")
    assert build_addon.sync_wire() is True
    assert (tmp_path / "addon" / "wire.py").read_bytes() == b"PROTOCOL_VERSION = 2\n"
    assert build_addon.sync_wire() is False
