"""Command line: `python -m backend reconstruct ...` and `python -m backend serve`.

The one place that turns failures into how the process ends: one line `error: ...` on stderr and
exit code 1 (2 for a usage error, 130 when interrupted); library code raises typed errors."""

import argparse
import importlib
import sys
import time

from .errors import Cancelled, MissingPackageError, OccnetError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
USAGE_ERROR_CODES = ("bad_option",)  # OccnetError codes that mean the command line itself is wrong


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `error: ...` (exit code 2) like every failure."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m backend", description="Occupancy-network reconstruction.")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct", help="image or point cloud (or a fitted field) -> mesh file")
    rec.add_argument("input", nargs="?",
                     help="point cloud (.ply .las .laz .e57 .pcd .xyz .txt .pts .csv .npy .npz .obj .off) "
                          "or image (.png .jpg ...); none for a field fitted to one object (--checkpoint, "
                          "python -m training.dvr)")
    rec.add_argument("-o", "--output", required=True, help="mesh file: .obj .ply .glb .stl .off")
    rec.add_argument("--checkpoint", help="model checkpoint (.safetensors); default: the shipped model for the input")
    rec.add_argument("--resolution", type=int, default=128, choices=(32, 64, 128, 256, 512))
    rec.add_argument("--threshold", type=float, default=0.5, help="occupancy probability of the surface (0..1)")
    rec.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    rec.add_argument("--faces", type=int, default=None,
                     help="decimate to at most this many faces (needs the fast-simplification package)")
    rec.add_argument("--normals", action="store_true", help="write vertex normals from the network's gradient")
    rec.add_argument("--no-colour", action="store_true",
                     help="write no vertex colours (by default: the model's texture head, or the points' colours)")
    rec.add_argument("--no-refine", action="store_true",
                     help="point clouds: keep the network's surface as extracted (no pull onto the points, no smoothing)")
    rec.add_argument("--keep-stray", action="store_true",
                     help="point clouds: keep points that lie far from every other point (by default a scan's stray "
                          "points are left out, and the summary says how many)")
    rec.add_argument("--mask", help="images: the object's mask, a picture of the same size (white or opaque = "
                                    "object); default: the alpha channel, else an estimate from the background")
    rec.add_argument("--focal-length", type=float, metavar="MM",
                     help="images: 35 mm equivalent focal length of the camera; default: the photo's EXIF "
                          "value, else 50 mm")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("serve", help="answer requests over stdin/stdout (used by the Blender add-on); "
                                 "see python -m backend serve --help")
    return parser


def require_decimation(faces: int | None) -> None:
    """--faces needs fast-simplification: say so before minutes of reconstruction, not after."""
    if faces is None:
        return
    try:
        importlib.import_module("fast_simplification")
    except ImportError as exc:
        raise MissingPackageError("--faces", "fast-simplification") from exc


def reconstruct_command(args) -> int:
    from tqdm import tqdm

    from .inputs import exif_focal_35mm, input_kind, load_image, load_mask
    from .mesh_io import check_output_path, save_mesh
    from .pipeline import Reconstructor, ReconstructOptions
    from .pointclouds import load_point_cloud

    start = time.perf_counter()
    options = ReconstructOptions(checkpoint=args.checkpoint, resolution=args.resolution, threshold=args.threshold,
                                 max_faces=args.faces, normals=args.normals, refine=not args.no_refine,
                                 colours=not args.no_colour, keep_stray=args.keep_stray)
    options.validate()
    if args.input is None and args.checkpoint is None:
        raise OccnetError("bad_option", "give an input, or the --checkpoint of a fitted field")
    require_decimation(args.faces)
    check_output_path(args.output)
    kind = "none" if args.input is None else input_kind(args.input)
    data, extra = None, {}
    if kind == "points":
        cloud = load_point_cloud(args.input)
        data = cloud.points
        extra.update(colors=cloud.colors, normals=cloud.normals)
    elif kind == "image":
        data = load_image(args.input)
        options.focal_length = args.focal_length or exif_focal_35mm(args.input)
        options.validate()
        extra["mask"] = load_mask(args.mask) if args.mask else None
    reconstructor = Reconstructor(args.device)
    bar = tqdm(total=100, unit="%", file=sys.stderr, disable=args.quiet, leave=False,
               bar_format="{desc:<16}{percentage:3.0f}%|{bar}| {elapsed}")

    shown = {"stage": None, "percent": None}

    def progress(stage: str, fraction: float) -> None:
        percent = round(100 * fraction)
        if (stage, percent) != (shown["stage"], shown["percent"]):
            shown.update(stage=stage, percent=percent)
            bar.set_description_str(stage, refresh=False)
            bar.n = percent
            bar.refresh()

    try:
        run = {"points": reconstructor.reconstruct_points, "image": reconstructor.reconstruct_image,
               "none": reconstructor.reconstruct_field}[kind]
        result = run(data, options, progress=progress, **extra)
    finally:
        bar.close()
    for warning in result.stats.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    save_mesh(args.output, result.vertices, result.faces, result.normals, result.colors)
    stats = result.stats
    print(f"{args.output}: {stats['faces']} faces, {stats['vertices']} vertices, "
          f"{stats['evaluations']} network evaluations, {time.perf_counter() - start:.2f} s "
          f"(extract {stats['seconds'].get('extract', 0):.2f} s) on {stats['device']}")
    return EXIT_OK


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the server parses its own options
        from . import server
        return server.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return reconstruct_command(args)
    except OccnetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.code in USAGE_ERROR_CODES else EXIT_FAILED
    except Cancelled:
        print("error: cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("error: out of memory; try a lower --resolution", file=sys.stderr)
        return EXIT_FAILED
