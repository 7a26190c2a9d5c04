"""Headless batch conversion: images and point clouds -> meshes, through the same backend client
and mesh builder as the add-on.

    python -m blender_occnet.batch INPUTS... --out DIR [--blend scene.blend] [--format glb|obj|ply]
                                   [--resolution N]
    blender -b --python-expr "import sys; from blender_occnet.batch import main; sys.exit(main())" \\
        -- INPUTS... --out DIR

INPUTS are files or folders (every supported file in a folder). Each input becomes an object in
the scene; ``--format`` writes one file per input into DIR, ``--blend`` saves the scene. A bad
input is reported and skipped; the exit status is 1 when any input failed (2 for usage errors).
"""

import argparse
import os
import sys
import time

from . import client as client_mod
from . import pointio, wire

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m blender_occnet.batch",
        description="Reconstruct meshes from images and point clouds with the OccNet backend, "
                    "headless (needs the bpy module or blender -b).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image or point-cloud files, or folders holding them "
                        f"(point clouds: {' '.join(pointio.POINT_EXTENSIONS)}; "
                        f"images: {' '.join(pointio.IMAGE_EXTENSIONS)})")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--blend", help="also save all results in this .blend file "
                                   "(a relative path is inside --out)")
    p.add_argument("--format", choices=("glb", "obj", "ply"),
                   help="write one mesh file per input (default: glb when --blend is not given)")
    p.add_argument("--resolution", type=int, default=128, choices=(32, 64, 128, 256, 512),
                   help="grid resolution per axis (default 128)")
    p.add_argument("--threshold", type=float, default=0.5, help="surface occupancy probability")
    p.add_argument("--max-faces", type=int, default=None, help="face budget per mesh")
    p.add_argument("--checkpoint-points", help="point-cloud model (default: the shipped one)")
    p.add_argument("--checkpoint-image", help="image model (default: the shipped one)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: automatic)")
    p.add_argument("--python", help="Python that runs the backend (default: detected)")
    return p


def expand_inputs(inputs):
    """Files in the order given; folders contribute their supported files, sorted."""
    out = []
    for item in inputs:
        if os.path.isdir(item):
            for name in sorted(os.listdir(item)):
                path = os.path.join(item, name)
                if os.path.isfile(path) and pointio.input_kind(path) is not None:
                    out.append(path)
        else:
            out.append(item)
    return out


class Progress:
    def __init__(self, prefix):
        self.prefix = prefix
        self.last = None

    def __call__(self, req):
        key = (req.stage, int(req.fraction * 10))
        if key != self.last:
            self.last = key
            print(f"{self.prefix} {req.stage} {req.fraction:4.0%}", flush=True)


def load_input(bpy, path):
    kind = pointio.input_kind(path)
    if kind is None:
        raise ValueError(f"unsupported file type {os.path.splitext(path)[1]!r} "
                         f"(point clouds: {', '.join(pointio.POINT_EXTENSIONS)}; "
                         f"images: {', '.join(pointio.IMAGE_EXTENSIONS)})")
    if not os.path.isfile(path):
        raise ValueError("file not found")
    if kind == "points":
        return kind, pointio.load_points(path)
    from .operators import InputProblem, load_image_file
    try:
        return kind, load_image_file(path)
    except InputProblem as exc:
        raise ValueError(str(exc)) from None


def export_object(bpy, obj, path, fmt):
    for o in bpy.context.view_layer.objects:
        o.select_set(o == obj)
    bpy.context.view_layer.objects.active = obj
    if fmt == "glb":
        res = bpy.ops.export_scene.gltf(filepath=path, export_format="GLB", use_selection=True)
    elif fmt == "obj":
        res = bpy.ops.wm.obj_export(filepath=path, export_selected_objects=True,
                                    export_materials=False)
    else:
        res = bpy.ops.wm.ply_export(filepath=path, export_selected_objects=True)
    if "FINISHED" not in res or not os.path.isfile(path):
        raise RuntimeError(f"exporting {path} failed")


def _argv_from_blender():
    argv = sys.argv
    if "--" in argv:
        return argv[argv.index("--") + 1:]
    return argv[1:]


def main(argv=None):
    args = build_parser().parse_args(_argv_from_blender() if argv is None else argv)
    try:
        import bpy
    except ImportError:
        print("error: the batch command needs Blender's bpy module (pip install bpy) or "
              "blender -b --python-expr", file=sys.stderr)
        return EXIT_USAGE
    from . import mesh_builder

    fmt = args.format or (None if args.blend else "glb")
    os.makedirs(args.out, exist_ok=True)
    inputs = expand_inputs(args.inputs)
    if not inputs:
        print("error: no supported inputs found in " + ", ".join(args.inputs), file=sys.stderr)
        return EXIT_USAGE

    if not bpy.data.filepath:
        # a fresh session: start from an empty scene rather than the default cube, light, camera
        bpy.ops.wm.read_factory_settings(use_empty=True)
    python = args.python
    if not python:
        found = client_mod.detect_interpreter()
        if not found["ok"]:
            print(f"error: {found['error']}; pass --python", file=sys.stderr)
            return EXIT_USAGE
        python = found["path"]
    cl = client_mod.BackendClient(python=python)
    t_start = time.perf_counter()
    failures = []
    written = []
    n = len(inputs)
    try:
        try:
            cl.start()
            print(f"backend: {python} (pid {cl.proc.pid})", flush=True)
        except client_mod.BackendError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        for i, path in enumerate(inputs, 1):
            name = os.path.splitext(os.path.basename(path))[0]
            prefix = f"[{i}/{n}] {os.path.basename(path)}:"
            print(f"{prefix} reading", flush=True)
            t0 = time.perf_counter()
            try:
                kind, data = load_input(bpy, path)
                ck = args.checkpoint_points if kind == "points" else args.checkpoint_image
                opts = wire.options_dict(checkpoint=os.path.abspath(ck) if ck else None,
                                         resolution=args.resolution, threshold=args.threshold,
                                         max_faces=args.max_faces, device=args.device)
                req = cl.reconstruct(kind, data, opts)
                cl.wait(req, on_progress=Progress(prefix))
                if req.error is not None:
                    raise RuntimeError(f"{req.error.message} [{req.error.code}]")
                origin = pointio.bbox_center(data) if kind == "points" else None
                obj = mesh_builder.object_from_result(bpy.context, name, req.result, origin=origin,
                                                      location=tuple(bpy.context.scene.cursor.location)
                                                      if kind == "image" else None)
                if fmt:
                    out_path = os.path.join(args.out, f"{name}.{fmt}")
                    export_object(bpy, obj, out_path, fmt)
                    written.append(out_path)
                print(f"{prefix} done: {len(obj.data.vertices)} vertices, {len(obj.data.polygons)} faces "
                      f"in {time.perf_counter() - t0:.2f} s", flush=True)
            except Exception as exc:  # carry on past a bad input
                failures.append((path, str(exc)))
                print(f"{prefix} FAILED: {exc}", flush=True)
        if args.blend:
            blend = args.blend if os.path.isabs(args.blend) else os.path.join(args.out, args.blend)
            try:
                bpy.ops.wm.save_as_mainfile(filepath=os.path.abspath(blend), check_existing=False)
                written.append(blend)
                print(f"saved {blend}", flush=True)
            except RuntimeError as exc:
                failures.append((blend, f"cannot save the .blend file: {exc}"))
                print(f"FAILED to save {blend}: {exc}", flush=True)
    finally:
        cl.stop()
    ok = n - sum(1 for p, _ in failures if p in inputs)
    print(f"summary: {ok} of {n} inputs converted in {time.perf_counter() - t_start:.1f} s, "
          f"{len(failures)} failed, {len(written)} files written to {args.out}", flush=True)
    for path, err in failures:
        print(f"  failed: {err if err.startswith(path) else f'{path}: {err}'}", flush=True)
    return EXIT_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
