"""The add-on's pure logic (no bpy): request options, batch output names, the backend environment
setup, the interpreter probe and the Blender version check."""

import ast
import os
import sys
import tomllib

import pytest

from conftest import REPO_ROOT
from helpers_addon import python_without_torch

from blender_occnet import batch, interpreter, request_options, setup_env


# -- one definition of a request ------------------------------------------------------------

def test_request_options_are_what_the_pipeline_accepts():
    from backend.pipeline import RESOLUTIONS
    assert request_options.RESOLUTIONS == RESOLUTIONS
    assert [int(i[0]) for i in request_options.resolution_items()] == list(RESOLUTIONS)
    opts = request_options.make_options(resolution=64, threshold=0.3, max_faces=0, device="auto")
    assert opts["resolution"] == 64 and opts["max_faces"] is None and opts["device"] is None
    assert request_options.make_options(device="cuda:1")["device"] == "cuda:1"
    for bad in ({"resolution": 100}, {"resolution": 1024}, {"threshold": 0.0}, {"threshold": 1.0},
                {"max_faces": 3}, {"device": "tpu"}, {"device": "cpu:1"}):
        with pytest.raises(request_options.OptionError):
            request_options.make_options(**bad)


# -- batch output names ---------------------------------------------------------------------

@pytest.mark.parametrize("inputs, names", [
    (["a/chair.xyz", "b/chair.xyz"], ["a_chair", "b_chair"]),
    (["d/good.xyz", "d/good.png"], ["good_xyz", "good_png"]),
    (["a/x.ply", "b/x.ply", "a/x.png"], ["a_x_ply", "b_x_ply", "a_x_png"]),
    (["d/Chair.xyz", "d/chair.ply"], ["Chair_xyz", "chair_ply"]),  # same name to macOS, Windows
    (["d/good.xyz", "d/good.png", "d/good_xyz.ply"], ["good_xyz", "good_png", "good_xyz_2"]),
    (["d/one.xyz", "d/two.png"], ["one", "two"]),
])
def test_output_names_are_unique_and_deterministic(inputs, names):
    assert batch.output_names(inputs) == names
    assert batch.output_names(list(inputs)) == names


# -- Set Up Backend Environment -------------------------------------------------------------

def test_backend_requirements_agree_with_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["mesh"]
    assert setup_env.backend_requirements() == expected, (
        "blender_occnet/backend_requirements.txt must list pyproject.toml's dependencies and its "
        "'mesh' extra, in that order")


@pytest.mark.parametrize("text", ["open3d", "open3d>=0.18", "scikit-image[data] >=0.21, <1",
                                  "fast_simplification==0.1.*"])
def test_plain_requirements_are_accepted(text):
    assert setup_env.check_requirement(text) == text


@pytest.mark.parametrize("text", ["--index-url https://example.com/simple", "-e .", "open3d --pre",
                                  "torch --extra-index-url=https://example.com",
                                  "pkg @ https://example.com/pkg.whl", "../pkg.whl",
                                  "open3d; python_version < '3'", "git+https://example.com/x.git"])
def test_options_urls_and_paths_are_refused(text):
    with pytest.raises(setup_env.SetupError, match="not a package requirement"):
        setup_env.parse_requirements(text)


def test_plan_hands_each_requirement_to_pip_as_one_argument():
    torch = setup_env.torch_build("linux", nvidia=False)
    plan = setup_env.Plan("/usr/bin/python3", "/tmp/v", ["torch>=2.1", "numpy>=1.24"]
                          + setup_env.parse_requirements("open3d>=0.18, rich"), torch)
    steps = dict(plan.commands())
    torch_step = steps[f"Installing {torch.label}"]
    assert torch_step[-3:] == ["--index-url", setup_env.CPU_INDEX, "torch>=2.1"]
    assert steps["Installing the backend's packages"][-3:] == ["numpy>=1.24", "open3d>=0.18", "rich"]
    assert "--progress-bar" in torch_step
    with pytest.raises(setup_env.SetupError):
        setup_env.Plan("/usr/bin/python3", "/tmp/v", ["numpy --index-url=https://example.com"])
    only_venv = setup_env.Plan("/usr/bin/python3", "/tmp/v", [], torch).commands()
    assert [s for s, _ in only_venv] == ["Creating the venv"] and "--without-pip" in only_venv[0][1]


def test_torch_build_fits_the_machine():
    cpu = setup_env.torch_build("linux", nvidia=False)
    cuda = setup_env.torch_build("linux", nvidia=True)
    assert cpu.index_url == setup_env.CPU_INDEX == "https://download.pytorch.org/whl/cpu"
    assert cuda.index_url.startswith("https://download.pytorch.org/whl/cu")
    assert setup_env.torch_build("win32", nvidia=False).index_url == setup_env.CPU_INDEX
    assert setup_env.torch_build("darwin", nvidia=False).index_url is None
    assert "MB" in cpu.download and "GB" in cuda.download


def test_pip_output_becomes_progress():
    progress = setup_env.Progress()
    progress.steps = 4
    progress.begin_step(2, "Installing PyTorch")
    progress.feed("Collecting torch>=2.1\n")
    assert progress.snapshot()[:2] == ("Collecting torch>=2.1", 0.5)
    progress.feed("  Downloading https://download.pytorch.org/whl/cpu/torch-2.5.1%2Bcpu-cp311-cp311-"
                  "linux_x86_64.whl (174.7 MB)\n")
    progress.feed("Progress 87350000 of 174700000\n")
    status, fraction, lines = progress.snapshot()
    assert status == "Downloading torch (174.7 MB)" and fraction == pytest.approx(2.5 / 4)
    assert lines[-1] == "Progress 87350000 of 174700000"
    progress.feed("Installing collected packages: torch\n")
    assert progress.snapshot()[0] == "Installing torch"
    progress.finish(error="pip failed")
    assert progress.done and progress.snapshot()[0] == "Failed: pip failed"


# -- the interpreter probe ------------------------------------------------------------------

def test_probe_says_what_is_missing_and_how_to_fix_it(tmp_path):
    python = python_without_torch(tmp_path)
    found = interpreter.probe(python)
    assert not found.ok and found.missing_required == ["torch"]
    assert found.versions["numpy"]  # the rest is there: only torch is named
    problem = found.problem()
    assert "lacks torch" in problem and f'"{python}" -m pip install torch' in problem
    assert "Set Up Backend Environment" in problem
    with pytest.raises(interpreter.InterpreterProblem, match="lacks torch"):
        interpreter.require_usable(python)
    good = interpreter.probe(sys.executable)
    assert good.ok and good.versions["torch"].startswith("2.") and "torch" in good.summary()
    assert not interpreter.probe(str(tmp_path / "nope")).ok


# -- Blender version ------------------------------------------------------------------------

def test_blender_below_the_minimum_is_refused_by_name():
    import blender_occnet
    with pytest.raises(RuntimeError, match=r"needs Blender 4\.2 or newer; this is Blender 3\.6\.5"):
        blender_occnet.check_blender_version((3, 6, 5))
    blender_occnet.check_blender_version((4, 2, 0))
    manifest = tomllib.loads((REPO_ROOT / "blender_occnet" / "blender_manifest.toml").read_text())
    init = ast.parse((REPO_ROOT / "blender_occnet" / "__init__.py").read_text())
    bl_info = next(ast.literal_eval(n.value) for n in init.body if isinstance(n, ast.Assign)
                   and getattr(n.targets[0], "id", "") == "bl_info")
    assert bl_info["blender"] == blender_occnet.MIN_BLENDER == (4, 2, 0)
    assert manifest["blender_version_min"] == ".".join(map(str, blender_occnet.MIN_BLENDER))
    assert "4.2" in (REPO_ROOT / "README.md").read_text()


def test_manifest_declares_network_and_file_permissions():
    manifest = tomllib.loads((REPO_ROOT / "blender_occnet" / "blender_manifest.toml").read_text())
    permissions = manifest["permissions"]
    assert {"network", "files"} <= set(permissions)
    assert "pip" in permissions["network"]
    tools = list((REPO_ROOT / ".venv").glob("lib/python*/site-packages/bpy/*/scripts/addons_core/"
                                           "bl_pkg/cli/blender_ext.py"))
    if not tools:
        pytest.skip("Blender's extension tool (from the bpy module) is not installed")
    import importlib.util
    spec = importlib.util.spec_from_file_location("blender_ext", tools[0])
    blender_ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blender_ext)
    assert blender_ext.pkg_manifest_validate_field_permissions(permissions, True) is None
    assert os.path.isfile(setup_env.REQUIREMENTS_FILE)
