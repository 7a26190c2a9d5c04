"""Build the Blender add-on packages from the sources.

    python build_addon.py [--out dist] [--blender-ext PATH] [--no-validate]
    python build_addon.py --sync-wire     refresh blender_occnet/wire.py from backend/wire.py

Writes
  dist/blender_occnet-<version>.zip         the extension (Blender 4.2+: drag and drop, or
                                            Preferences > Get Extensions > Install from Disk)
  dist/blender_occnet-<version>-legacy.zip  the same add-on as a legacy add-on zip
                                            (Preferences > Add-ons > Install from Disk)

Both carry a copy of the backend (``blender_occnet/bundled/backend``, with the shipped default
models named in ``backend/defaults.py``) so that the add-on can start ``python -m backend serve``
with any Python that has PyTorch, and the wire format vendored from its one home,
``backend/wire.py``, as ``blender_occnet/wire.py``. The zips hold an explicit allow-list (the
packages' modules, named data files, the shipped models), never whatever else lies in the source
folders (.env files, caches, .blend1 backups, experiment weights). The extension is built and
validated with Blender's own extension tool (``scripts/addons_core/bl_pkg/cli/blender_ext.py``),
found inside the installed ``bpy`` module or given with --blender-ext; it runs standalone, without
importing bpy.
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
WIRE = "wire.py"  # backend/wire.py is the source; the add-on carries a byte-identical copy
ADDON_DATA = ("blender_manifest.toml", "backend_requirements.txt")
BACKEND_DATA = ("weights/MODEL_CARD.md",)


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


def package_modules(package):
    """The .py files of a package and of its subpackages (folders with an __init__.py), relative
    to package: code that ships by kind, while anything else in the folders stays behind."""
    package = Path(package)
    found = [p.relative_to(package) for p in sorted(package.glob("*.py"))]
    for sub in sorted(p for p in package.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / "__init__.py").is_file()):
        found += [sub.name / rel for rel in package_modules(sub)]
    return found


def shipped_weights():
    """The default models backend/defaults.py names, relative to the backend folder."""
    from backend.defaults import DEFAULT_CHECKPOINTS
    return [Path("weights") / Path(p).name for p in DEFAULT_CHECKPOINTS.values()]


def addon_files():
    return package_modules(ADDON_SRC) + [Path(name) for name in ADDON_DATA]


def backend_files():
    return package_modules(BACKEND_SRC) + [Path(name) for name in BACKEND_DATA] + shipped_weights()


def copy_listed(src, dst, files):
    for rel in files:
        if not (src / rel).is_file():
            raise BuildError(f"{src / rel} is missing (it is on the list of files the add-on ships)")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)


def sync_wire():
    """Make the add-on's copy of the wire format identical to backend/wire.py; True if it changed."""
    source = (BACKEND_SRC / WIRE).read_bytes()
    copy = ADDON_SRC / WIRE
    if copy.is_file() and copy.read_bytes() == source:
        return False
    copy.write_bytes(source)
    return True


def stage(tmp):
    """Copy the add-on's allow-listed files, the wire format and the bundled backend into
    tmp/blender_occnet."""
    dst = Path(tmp) / ADDON_ID
    copy_listed(ADDON_SRC, dst, addon_files())
    shutil.copy2(BACKEND_SRC / WIRE, dst / WIRE)  # vendored from its one home
    copy_listed(BACKEND_SRC, dst / "bundled" / "backend", backend_files())
    (dst / "bundled" / "README.txt").write_text(
        "A copy of the blender-occnet backend. The add-on runs it as a separate process:\n"
        "  <python with torch> -I -c <bootstrap> serve\n"
        "in isolated mode, with this folder as the only addition to its sys.path.\n", "utf-8")
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
    p.add_argument("--sync-wire", action="store_true",
                   help="only copy backend/wire.py to blender_occnet/wire.py (the add-on's copy)")
    args = p.parse_args(argv)
    if args.sync_wire:
        changed = sync_wire()
        print(f"{ADDON_SRC / WIRE} {'updated from' if changed else 'already matches'} {BACKEND_SRC / WIRE}")
        return 0
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
