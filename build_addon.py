"""Build the Blender add-on packages from the sources.

    python build_addon.py [--out dist] [--blender-ext PATH] [--no-validate]

Writes
  dist/blender_occnet-<version>.zip         the extension (Blender 4.2+: drag and drop, or
                                            Preferences > Get Extensions > Install from Disk)
  dist/blender_occnet-<version>-legacy.zip  the same add-on as a legacy add-on zip
                                            (Preferences > Add-ons > Install from Disk)

Both carry a copy of the backend (``blender_occnet/bundled/backend``, with the shipped
``weights/*.safetensors``) so that the add-on can start ``python -m backend serve`` with any Python
that has PyTorch. The extension is built and validated with Blender's own extension tool
(``scripts/addons_core/bl_pkg/cli/blender_ext.py``), found inside the installed ``bpy`` module or
given with --blender-ext; it runs standalone, without importing bpy.
"""

import argparse
import ast
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON_SRC = ROOT / "blender_occnet"
BACKEND_SRC = ROOT / "backend"
ADDON_ID = "blender_occnet"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".DS_Store", "bundled", "*.zip")
WEIGHT_PATTERNS = ("*.safetensors", "*.md")


class BuildError(Exception):
    pass


def read_version():
    manifest = tomllib.loads((ADDON_SRC / "blender_manifest.toml").read_text("utf-8"))
    version = manifest["version"]
    if manifest["id"] != ADDON_ID:
        raise BuildError(f"blender_manifest.toml id is {manifest['id']!r}, expected {ADDON_ID!r}")
    tree = ast.parse((ADDON_SRC / "__init__.py").read_text("utf-8"))
    bl_version = init_version = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "bl_info":
                bl_version = ast.literal_eval(node.value)["version"]
            elif name == "__version__":
                init_version = ast.literal_eval(node.value)
    expect = tuple(int(x) for x in version.split("."))
    if bl_version != expect or init_version != version:
        raise BuildError(f"versions disagree: blender_manifest.toml {version}, bl_info {bl_version}, "
                         f"__version__ {init_version}; update them together")
    return version


def find_blender_ext():
    env = os.environ.get("BLENDER_EXT_PY")
    if env:
        return env
    spec = importlib.util.find_spec("bpy")  # locates the wheel without importing it
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "*", "scripts", "addons_core", "bl_pkg", "cli",
                                             "blender_ext.py")))
        if hits:
            return hits[-1]
    raise BuildError("cannot find Blender's extension tool blender_ext.py: install the bpy module "
                     "(pip install bpy) or pass --blender-ext PATH")


def stage(tmp):
    """Copy the add-on sources and the bundled backend into tmp/blender_occnet."""
    dst = Path(tmp) / ADDON_ID
    shutil.copytree(ADDON_SRC, dst, ignore=IGNORE)
    bundled = dst / "bundled" / "backend"
    shutil.copytree(BACKEND_SRC, bundled,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "weights"))
    weights = bundled / "weights"
    weights.mkdir()
    for pattern in WEIGHT_PATTERNS:
        for f in sorted((BACKEND_SRC / "weights").glob(pattern)):
            shutil.copy2(f, weights / f.name)
    (dst / "bundled" / "README.txt").write_text(
        "A copy of the blender-occnet backend. The add-on runs it as a separate process:\n"
        "  <python with torch> -m backend serve\n"
        "with this folder and the add-on's parent folder on PYTHONPATH.\n", "utf-8")
    return dst


def run_ext_tool(tool, *args):
    cp = subprocess.run([sys.executable, tool, *args], capture_output=True, text=True)
    out = (cp.stdout + cp.stderr).strip()
    if cp.returncode != 0:
        raise BuildError(f"blender_ext.py {args[0]} failed (exit {cp.returncode}):\n{out}")
    return out


def write_legacy_zip(staged, path):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(staged.rglob("*")):
            if f.is_file():
                zf.write(f, Path(ADDON_ID) / f.relative_to(staged))


def check_legacy_zip(path):
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        init = f"{ADDON_ID}/__init__.py"
        if init not in names:
            raise BuildError(f"{path}: no {init}")
        tree = ast.parse(zf.read(init))
        if not any(isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "bl_info"
                   for n in tree.body):
            raise BuildError(f"{path}: {init} has no bl_info (legacy add-ons need it)")
        for need in (f"{ADDON_ID}/wire.py", f"{ADDON_ID}/bundled/backend/server.py"):
            if need not in names:
                raise BuildError(f"{path}: {need} is missing")
        bad = [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        if bad:
            raise BuildError(f"{path}: contains compiled files {bad[:3]}")


def build(out_dir, blender_ext=None, validate=True):
    version = read_version()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ext_zip = out_dir / f"{ADDON_ID}-{version}.zip"
    legacy_zip = out_dir / f"{ADDON_ID}-{version}-legacy.zip"
    tool = blender_ext or find_blender_ext()
    with tempfile.TemporaryDirectory(prefix="occnet_build_") as tmp:
        staged = stage(tmp)
        for z in (ext_zip, legacy_zip):
            if z.exists():
                z.unlink()
        run_ext_tool(tool, "build", "--source-dir", str(staged), "--output-filepath", str(ext_zip))
        write_legacy_zip(staged, legacy_zip)
    if validate:
        run_ext_tool(tool, "validate", str(ext_zip))
        check_legacy_zip(legacy_zip)
    return ext_zip, legacy_zip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "dist"), help="output folder (default: dist/)")
    p.add_argument("--blender-ext", help="path of Blender's blender_ext.py "
                                         "(default: found in the installed bpy module)")
    p.add_argument("--no-validate", action="store_true", help="skip validation")
    args = p.parse_args(argv)
    try:
        ext_zip, legacy_zip = build(args.out, args.blender_ext, validate=not args.no_validate)
    except BuildError as exc:
        print(f"build_addon: error: {exc}", file=sys.stderr)
        return 1
    for z in (ext_zip, legacy_zip):
        print(f"{z} ({z.stat().st_size / 1e6:.2f} MB)")
    if not args.no_validate:
        print("extension validated with Blender's blender_ext.py; legacy zip checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
