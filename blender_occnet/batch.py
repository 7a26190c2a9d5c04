"""Headless batch conversion: images and point clouds -> meshes, through the same input gathering,
session and mesh builder as the add-on's operators.

    python -m blender_occnet.batch INPUTS... --out DIR [--blend scene.blend] [--format glb|obj|ply]
                                   [--resolution N] [--overwrite]
    blender -b --python-exit-code 2 --python <add-on folder>/batch_launcher.py -- INPUTS... --out DIR

INPUTS are files or folders (every supported file in a folder). Each input becomes an object in
the scene; ``--format`` writes one file per input into DIR, ``--blend`` saves the scene. Output
names are the inputs' names, told apart where two inputs share one (``a/chair.xyz`` and
``b/chair.xyz`` give ``a_chair`` and ``b_chair``; ``good.xyz`` and ``good.png`` give ``good_xyz``
and ``good_png``); an existing file is never replaced without ``--overwrite``. A bad input is
reported and skipped; the exit status is 1 when any input failed, 2 for usage errors (nothing is
converted then).
"""

import argparse
import os
import sys
import time
from collections import defaultdict

from . import filetypes, interpreter, request_options
from .client import BackendError
from .session import Session

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m blender_occnet.batch",
        description="Reconstruct meshes from images and point clouds with the OccNet backend, "
                    "headless (needs the bpy module or blender -b).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image or point-cloud files, or folders holding them "
                        f"(point clouds: {' '.join(filetypes.POINT_EXTENSIONS)}; "
                        f"images: {' '.join(filetypes.IMAGE_EXTENSIONS)})")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--blend", help="also save all results in this .blend file "
                                   "(a relative path is inside --out)")
    p.add_argument("--format", choices=("glb", "obj", "ply"),
                   help="write one mesh file per input (default: glb when --blend is not given)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    p.add_argument("--resolution", type=int, default=request_options.DEFAULT_RESOLUTION,
                   choices=request_options.RESOLUTIONS,
                   help=f"grid resolution per axis (default {request_options.DEFAULT_RESOLUTION})")
    p.add_argument("--threshold", type=float, default=request_options.DEFAULT_THRESHOLD,
                   help=f"surface occupancy probability, {request_options.THRESHOLD_MIN}.."
                        f"{request_options.THRESHOLD_MAX}")
    p.add_argument("--max-faces", type=int, default=None,
                   help=f"face budget per mesh (at least {request_options.MIN_FACE_BUDGET})")
    p.add_argument("--checkpoint-points", help="point-cloud model (default: the shipped one)")
    p.add_argument("--checkpoint-image", help="image model (default: the shipped one)")
    p.add_argument("--device", default=None,
                   help=f"{', '.join(request_options.DEVICES)} (default: automatic)")
    p.add_argument("--python", help="Python that runs the backend (default: detected)")
    return p


def expand_inputs(inputs):
    """Files in the order given, each once; folders contribute their supported files, sorted."""
    out, seen = [], set()
    for item in inputs:
        if os.path.isdir(item):
            paths = [os.path.join(item, name) for name in sorted(os.listdir(item))]
            paths = [p for p in paths if os.path.isfile(p) and filetypes.input_kind(p) is not None]
        else:
            paths = [item]
        for path in paths:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                out.append(path)
    return out


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _stem_ext(path):
    return f"{_stem(path)}_{os.path.splitext(path)[1].lstrip('.').lower()}"


def _parent_stem(path):
    return f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}_{_stem(path)}"


def _parent_stem_ext(path):
    return f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}_{_stem_ext(path)}"


def output_names(paths):
    """One output name per input, unique ignoring case (file systems that ignore it would merge
    the files) and the same on every run: the file's stem; where stems collide, the first of
    stem_ext, parent_stem, parent_stem_ext that tells the colliding inputs apart; a number only
    as the last resort."""
    names = [_stem(p) for p in paths]
    collisions = defaultdict(list)
    for i, name in enumerate(names):
        collisions[name.casefold()].append(i)
    for members in collisions.values():
        if len(members) < 2:
            continue
        for style in (_stem_ext, _parent_stem, _parent_stem_ext):
            candidates = [style(paths[i]) for i in members]
            if len({c.casefold() for c in candidates}) == len(candidates):
                break
        for i, candidate in zip(members, candidates):
            names[i] = candidate
    taken = set()
    for i, name in enumerate(names):  # a told-apart name may equal another input's own stem
        unique, n = name, 2
        while unique.casefold() in taken:
            unique, n = f"{name}_{n}", n + 1
        taken.add(unique.casefold())
        names[i] = unique
    return names


def check_out_dir(out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} is a file, not a folder")


def blend_path(args):
    if not args.blend:
        return None
    return os.path.abspath(args.blend if os.path.isabs(args.blend) else os.path.join(args.out, args.blend))


def check_not_overwriting(paths, overwrite):
    existing = [p for p in paths if p and os.path.exists(p)]
    if existing and not overwrite:
        raise UsageError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} "
                         "(pass --overwrite to replace)")


def request_options_for(args, kind):
    ck = args.checkpoint_points if kind == "points" else args.checkpoint_image
    return request_options.make_options(
        checkpoint=os.path.abspath(ck) if ck else None, resolution=args.resolution,
        threshold=args.threshold, max_faces=args.max_faces, device=args.device)


def backend_python(args):
    try:
        if args.python:
            return interpreter.require_usable(args.python).python
        return interpreter.find_usable().python
    except interpreter.InterpreterProblem as exc:
        raise UsageError(f"{exc} (pass --python)") from None


class Progress:
    def __init__(self, prefix):
        self.prefix = prefix
        self.last = None

    def __call__(self, req):
        key = (req.stage, int(req.fraction * 10))
        if key != self.last:
            self.last = key
            print(f"{self.prefix} {req.stage} {req.fraction:4.0%}", flush=True)


def export_object(bpy, obj, path, fmt):
    for o in bpy.context.view_layer.objects:
        o.select_set(o == obj)
    bpy.context.view_layer.objects.active = obj
    if fmt == "glb":
        res = bpy.ops.export_scene.gltf(filepath=path, export_format="GLB", use_selection=True)
    elif fmt == "obj":
        res = bpy.ops.wm.obj_export(filepath=path, export_selected_objects=True,
                                    export_materials=False, export_colors=True)
    else:
        res = bpy.ops.wm.ply_export(filepath=path, export_selected_objects=True)
    if "FINISHED" not in res or not os.path.isfile(path):
        raise RuntimeError(f"exporting {path} failed")


def _argv_from_blender():
    argv = sys.argv
    if "--" in argv:
        return argv[argv.index("--") + 1:]
    return argv[1:]


class Plan:
    """Everything checked before any work: inputs, output names and paths, options."""

    def __init__(self, args):
        check_out_dir(args.out)
        self.inputs = expand_inputs(args.inputs)
        if not self.inputs:
            raise UsageError("no supported inputs found in " + ", ".join(args.inputs))
        self.format = args.format or (None if args.blend else "glb")
        self.names = output_names(self.inputs)
        self.outputs = [os.path.join(args.out, f"{n}.{self.format}") if self.format else None
                        for n in self.names]
        self.blend = blend_path(args)
        check_not_overwriting(self.outputs + [self.blend], args.overwrite)
        try:
            self.options = {kind: request_options_for(args, kind) for kind in request_options.INPUT_KINDS}
        except request_options.OptionError as exc:
            raise UsageError(str(exc)) from None


def convert_one(bpy, session, python, plan, i, prefix):
    """Reconstruct input i and export it; returns the object. Raises on failure."""
    from . import gather  # imports bpy: only once main() has found it

    found = gather.load_file(plan.inputs[i], lambda path: session.read_points(python, path),
                             lambda path: session.read_image(python, path))
    origin = gather.bbox_center(found.data) if found.kind == "points" else None
    location = tuple(bpy.context.scene.cursor.location) if found.kind == "image" else None
    options = dict(plan.options[found.kind])
    if found.focal_length:  # a photo's lens, from its EXIF
        options["focal_length"] = found.focal_length
    session.start_job(python, found.kind, found.data, options, plan.names[i], origin=origin,
                      location=location, colors=found.colors)
    session.wait(on_progress=Progress(prefix))
    outcome = session.finish_job(bpy.context)
    if outcome.obj is None:
        raise RuntimeError(outcome.error or "cancelled")
    if plan.format:
        export_object(bpy, outcome.obj, plan.outputs[i], plan.format)
    return outcome.obj


def run(bpy, args, plan, python):
    session = Session()
    t_start = time.perf_counter()
    failures, written = [], []
    n = len(plan.inputs)
    try:
        try:
            client = session.client_for(python)
            client.start()
        except BackendError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"backend: {python} (pid {client.proc.pid})", flush=True)
        for i, path in enumerate(plan.inputs):
            prefix = f"[{i + 1}/{n}] {os.path.basename(path)}:"
            print(f"{prefix} reading", flush=True)
            t0 = time.perf_counter()
            try:
                obj = convert_one(bpy, session, python, plan, i, prefix)
            except Exception as exc:  # carry on past a bad input
                failures.append((path, str(exc)))
                print(f"{prefix} FAILED: {exc}", flush=True)
                continue
            if plan.format:
                written.append(plan.outputs[i])
            print(f"{prefix} done: {len(obj.data.vertices)} vertices, {len(obj.data.polygons)} "
                  f"faces in {time.perf_counter() - t0:.2f} s"
                  + (f" -> {plan.outputs[i]}" if plan.format else ""), flush=True)
        if plan.blend:
            try:
                bpy.ops.wm.save_as_mainfile(filepath=plan.blend, check_existing=False)
                written.append(plan.blend)
                print(f"saved {plan.blend}", flush=True)
            except RuntimeError as exc:
                failures.append((plan.blend, f"cannot save the .blend file: {exc}"))
                print(f"FAILED to save {plan.blend}: {exc}", flush=True)
    finally:
        session.shutdown()
    converted = n - sum(1 for p, _ in failures if p in plan.inputs)
    print(f"summary: {converted} of {n} inputs converted in {time.perf_counter() - t_start:.1f} s, "
          f"{len(failures)} failed, {len(written)} files written to {args.out}", flush=True)
    for path in written:
        print(f"  wrote: {path}", flush=True)
    for path, err in failures:
        print(f"  failed: {err if err.startswith(path) else f'{path}: {err}'}", flush=True)
    return EXIT_FAILED if failures else EXIT_OK


def main(argv=None):
    args = build_parser().parse_args(_argv_from_blender() if argv is None else argv)
    try:
        import bpy
    except ImportError:
        print("error: the batch command needs Blender's bpy module (pip install bpy) or "
              "blender -b --python <add-on folder>/batch_launcher.py", file=sys.stderr)
        return EXIT_USAGE
    try:
        plan = Plan(args)
        python = backend_python(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    os.makedirs(args.out, exist_ok=True)
    if not bpy.data.filepath:
        # a fresh session: start from an empty scene rather than the default cube, light, camera
        bpy.ops.wm.read_factory_settings(use_empty=True)
    return run(bpy, args, plan, python)


if __name__ == "__main__":
    sys.exit(main())
