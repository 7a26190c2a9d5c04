"""Turn folders of meshes into the prepared training data of docs/CONTRACTS.md.

    python -m training.prepare MESH_DIR [MESH_DIR ...] OUT_DIR [--views N] [--workers K]
        [--limit N] [--max-shapes-per-dir N] [--image-size S] [--points N] [--near-sigmas S ...]
        [--only-prepared]

Per shape there are two stages, each resumable on its own:
  samples  shape.json, points.npz, pointcloud.npz   (the shape folder appears atomically)
  renders  images/, cameras.npz, looks.npz, depth.npz   (depth.npz is moved in last: it marks done)
depth.npz holds per view the camera z of the first surface hit through each pixel ("depth") and of
where the ray last leaves the shape ("back"); looks.npz each view's random look and surface points
at which its albedo is known (training.looks). Renders made before "back" or the looks were kept
gain them as stages of their own (the looks by replaying the render seed). A run does, per shape,
only the stages that are missing, so `--views 0` first and
`--views 12` later adds renders to already sampled shapes.

Each shape is processed in a spawned worker process. Real meshes can crash native geometry code
outright (a segfault, not an exception); such a worker death is recorded as that shape's failure,
the worker is replaced and the run goes on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from backend.sampling import sample_triangles
from training import meshprep

FORMAT_VERSION = 1
PADDING = 0.1
NEAR_SIGMAS = (0.01, 0.03)
LOOK_POINTS = 4096  # surface points per shape at which looks.npz knows every view's albedo
SPLIT_NAMES = ("train", "val", "test")
# Folders without a classification file: one class for the whole folder.
FOLDER_CLASSES = {"blocks": "block"}
TMP_DIR_NAME = ".tmp"


@dataclass(frozen=True)
class ShapeSource:
    id: str
    source: str
    dataset: str
    class_name: str


# ---------------------------------------------------------------------------------------------
# Finding shapes


def read_psb_classes(cla_path: Path) -> dict[str, str]:
    """Map model id -> class name from a Princeton Shape Benchmark .cla file.

    Format: "PSB 1", "<classes> <models>", then per class "<name> <parent> <count>" followed by
    <count> model ids. Ids are returned both bare ("12") and as file stems ("m12").
    """
    tokens = cla_path.read_text().split()
    if tokens[:2] != ["PSB", "1"]:
        raise ValueError(f"{cla_path}: not a PSB 1 classification file")
    classes: dict[str, str] = {}
    position = 4  # after "PSB 1 <classes> <models>"
    for _ in range(int(tokens[2])):
        name, count = tokens[position], int(tokens[position + 2])
        for model_id in tokens[position + 3 : position + 3 + count]:
            classes[model_id] = classes[f"m{model_id}"] = name
        position += 3 + count
    return classes


def find_sources(mesh_dirs: list[Path], max_per_dir: int | None) -> tuple[list[ShapeSource], list[dict]]:
    """Meshes under each folder (recursively, sorted by path), at most max_per_dir per folder.

    Returns the sources and failure records for files whose id collides with an earlier one.
    """
    sources: list[ShapeSource] = []
    failures: list[dict] = []
    seen: dict[str, str] = {}
    for mesh_dir in mesh_dirs:
        dataset = mesh_dir.resolve().name
        classes: dict[str, str] = {}
        for cla_path in sorted(mesh_dir.rglob("*.cla")):
            classes.update(read_psb_classes(cla_path))
        paths = sorted(
            (p for p in mesh_dir.rglob("*") if p.is_file() and p.suffix.lower() in meshprep.MESH_SUFFIXES),
            key=lambda p: p.relative_to(mesh_dir).as_posix(),
        )
        if max_per_dir is not None:
            paths = paths[:max_per_dir]
        for path in paths:
            shape_id = f"{dataset}_{path.stem}"
            if shape_id in seen:
                failures.append({"id": shape_id, "source": str(path), "error": f"duplicate id: also {seen[shape_id]}"})
                continue
            seen[shape_id] = str(path)
            class_name = classes.get(path.stem, FOLDER_CLASSES.get(dataset, dataset))
            sources.append(ShapeSource(shape_id, str(path), dataset, class_name))
    return sources, failures


def split_of(shape_id: str) -> str:
    """Deterministic ~80/10/10 train/val/test assignment from a hash of the id."""
    bucket = int(hashlib.sha1(shape_id.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def stable_seed(*parts: str) -> int:
    """Seed that depends only on its parts, so re-running gives the same samples and cameras."""
    return int(hashlib.sha1(":".join(parts).encode()).hexdigest()[:16], 16)


# ---------------------------------------------------------------------------------------------
# Per-shape work (runs in worker processes)


def samples_done(shape_dir: Path) -> bool:
    # The shape folder only ever appears by an atomic rename of a complete temp folder.
    return (shape_dir / "shape.json").is_file()


def renders_done(shape_dir: Path, views: int, image_size: int) -> bool:
    depth_path = shape_dir / "depth.npz"
    if not depth_path.is_file():
        return False
    try:
        with np.load(depth_path) as depth:
            return depth["depth"].shape == (views, image_size, image_size)
    except Exception:  # a corrupt file means: render again
        return False


def back_depth_done(shape_dir: Path) -> bool:
    try:
        with np.load(shape_dir / "depth.npz") as depth:
            return "back" in depth.files
    except Exception:
        return False


def normalised_mesh(source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Vertices (V, 3) in the canonical box, faces (F, 3), center (3,) and scale."""
    vertices, faces = meshprep.load_mesh(source)
    center, scale = meshprep.normalisation(vertices)
    return meshprep.apply_normalisation(vertices, center, scale), faces, center, scale


def is_watertight(vertices: np.ndarray, faces: np.ndarray) -> bool:
    import trimesh

    # process=True merges duplicate vertices (OBJ often splits them at seams); safe after validation.
    return bool(trimesh.Trimesh(vertices, faces, process=True, validate=False).is_watertight)


def fresh_temp_dir(out_dir: Path, name: str) -> Path:
    temp = out_dir / TMP_DIR_NAME / f"{name}.{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    return temp


def prepared_mesh(shape: ShapeSource, out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) and faces (F, 3) of an already sampled shape, normalised as its shape.json
    records (the later stages must see the mesh exactly as the samples did)."""
    info = json.loads((out_dir / shape.id / "shape.json").read_text())
    raw_vertices, faces = meshprep.load_mesh(shape.source)
    return meshprep.apply_normalisation(raw_vertices, np.array(info["center"]), info["scale"]), faces


def write_samples(shape: ShapeSource, out_dir: Path, points_per_shape: int,
                  near_sigmas: tuple[float, ...] = NEAR_SIGMAS) -> None:
    """Sample one shape into a temp folder and rename it to OUT_DIR/<id> in one step."""
    vertices, faces, center, scale = normalised_mesh(shape.source)
    rng = np.random.default_rng(stable_seed(shape.id, "samples"))
    samples = meshprep.shape_samples(vertices, faces, rng, points_per_shape, PADDING, near_sigmas)
    temp = fresh_temp_dir(out_dir, shape.id)
    info = {
        "id": shape.id,
        "source": shape.source,
        "class": shape.class_name,
        "center": [float(c) for c in center],
        "scale": scale,
        "watertight_input": is_watertight(vertices, faces),
    }
    (temp / "shape.json").write_text(json.dumps(info, indent=1))
    np.savez(
        temp / "points.npz",
        points=samples["points"],
        occupancies=samples["occupancies"],
        near_points=samples["near_points"],
        near_occupancies=samples["near_occupancies"],
    )
    np.savez(temp / "pointcloud.npz", points=samples["surface_points"], normals=samples["surface_normals"])
    target = out_dir / shape.id
    if target.exists():  # only possible if someone left a folder without shape.json there
        shutil.rmtree(target)
    os.rename(temp, target)


def write_renders(shape: ShapeSource, out_dir: Path, views: int, image_size: int) -> None:
    """Render views of an already sampled shape; depth.npz is moved in last as the done marker."""
    from training import render

    shape_dir = out_dir / shape.id
    vertices, faces = prepared_mesh(shape, out_dir)
    rng = np.random.default_rng(stable_seed(shape.id, "renders", str(views)))
    world_mats, camera_mats = render.random_cameras(rng, views, image_size)
    temp = fresh_temp_dir(out_dir, f"{shape.id}.render")
    renderer = render.renderer_for(image_size)
    depth, drawn = renderer.render_views(vertices, faces, world_mats, camera_mats, rng, temp / "images")
    write_looks(temp, drawn, renderer.polygons(), vertices, shape.id)
    back = render.back_depth(vertices, faces, world_mats, camera_mats, depth)
    np.savez(temp / "cameras.npz", world_mat=world_mats.astype(np.float32), camera_mat=camera_mats.astype(np.float32))
    np.savez(temp / "depth.npz", depth=depth.astype(np.float16), back=back.astype(np.float16))
    (shape_dir / "depth.npz").unlink(missing_ok=True)
    shutil.rmtree(shape_dir / "images", ignore_errors=True)
    os.rename(temp / "images", shape_dir / "images")
    os.replace(temp / "cameras.npz", shape_dir / "cameras.npz")
    os.replace(temp / "looks.npz", shape_dir / "looks.npz")
    os.replace(temp / "depth.npz", shape_dir / "depth.npz")
    shutil.rmtree(temp, ignore_errors=True)


def write_looks(folder: Path, drawn: list, polygons: np.ndarray, vertices: np.ndarray, shape_id: str) -> None:
    """folder/looks.npz: each view's look (training.looks, as JSON), LOOK_POINTS surface points
    (N, 3) on the rendered triangles polygons (P, 3) of vertices (V, 3), and each view's colour
    there (views, N, 3) uint8 sRGB: what the surface looks like in that view's look flat-lit, the
    side the picture does not show included."""
    from training import looks

    vertices = np.asarray(vertices, np.float64)
    points, polygon = sample_triangles(np.random.default_rng(stable_seed(shape_id, "looks")), vertices, polygons,
                                       LOOK_POINTS)
    corners = vertices[polygons[polygon]]
    colours = np.stack([looks.albedo(look, points, corners, polygon, len(polygons)) for look in drawn])
    np.savez(folder / "looks.npz", looks=np.array(json.dumps([asdict(look) for look in drawn])),
             points=points.astype(np.float32), colours=np.round(255 * colours).astype(np.uint8))


def looks_done(shape_dir: Path) -> bool:
    return (shape_dir / "looks.npz").is_file()


def write_replayed_looks(shape: ShapeSource, out_dir: Path, views: int, image_size: int) -> None:
    """looks.npz for renders made before looks were recorded: the render seed replayed through the
    cameras and the looks draws the same looks again (training.looks.draw_look)."""
    from training import looks, render

    shape_dir = out_dir / shape.id
    vertices, faces = prepared_mesh(shape, out_dir)
    rng = np.random.default_rng(stable_seed(shape.id, "renders", str(views)))
    render.random_cameras(rng, views, image_size)
    renderer = render.renderer_for(image_size)
    drawn = [looks.draw_look(rng, len(renderer.studio_lights), len(renderer.matcaps)) for _ in range(views)]
    renderer.set_mesh(vertices, faces)
    temp = fresh_temp_dir(out_dir, f"{shape.id}.looks")
    write_looks(temp, drawn, renderer.polygons(), vertices, shape.id)
    os.replace(temp / "looks.npz", shape_dir / "looks.npz")
    shutil.rmtree(temp, ignore_errors=True)


def write_back_depth(shape: ShapeSource, out_dir: Path) -> None:
    """Add "back" to the depth.npz of renders made before it existed (rewritten atomically)."""
    import bpy  # noqa: F401  (mathutils, for the ray casts, comes with it)

    from training import render

    shape_dir = out_dir / shape.id
    vertices, faces = prepared_mesh(shape, out_dir)
    with np.load(shape_dir / "cameras.npz") as cameras, np.load(shape_dir / "depth.npz") as stored:
        world_mats, camera_mats = cameras["world_mat"].astype(np.float64), cameras["camera_mat"].astype(np.float64)
        front = stored["depth"]
    back = render.back_depth(vertices, faces, world_mats, camera_mats, front.astype(np.float32))
    temp = fresh_temp_dir(out_dir, f"{shape.id}.back")
    np.savez(temp / "depth.npz", depth=front, back=back.astype(np.float16))
    os.replace(temp / "depth.npz", shape_dir / "depth.npz")
    shutil.rmtree(temp, ignore_errors=True)


def prepare_shape(task: dict) -> dict:
    """Worker entry: run the stages this shape still lacks. Returns {"id", "stages": [...]}."""
    shape = ShapeSource(**task["shape"])
    out_dir = Path(task["out_dir"])
    stages = []
    if not samples_done(out_dir / shape.id):
        write_samples(shape, out_dir, task["points"], tuple(task["near_sigmas"]))
        stages.append("samples")
    if task["views"] > 0 and not renders_done(out_dir / shape.id, task["views"], task["image_size"]):
        write_renders(shape, out_dir, task["views"], task["image_size"])
        stages.append("renders")
    elif task["views"] > 0:
        if not back_depth_done(out_dir / shape.id):
            write_back_depth(shape, out_dir)
            stages.append("back depth")
        if not looks_done(out_dir / shape.id):
            write_replayed_looks(shape, out_dir, task["views"], task["image_size"])
            stages.append("looks")
    return {"id": shape.id, "stages": stages}


# ---------------------------------------------------------------------------------------------
# A process pool that survives dying workers


def _worker_loop(connection, function) -> None:
    # Blender prints a line per rendered image to stdout; the parent's progress bar is on stderr.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    while True:
        task = connection.recv()
        if task is None:
            return
        try:
            connection.send(("ok", function(task)))
        except Exception as exc:
            connection.send(("error", f"{type(exc).__name__}: {exc}"))


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"worker process died with signal {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"worker process died (exit code {exitcode})"


def without_blender_script_paths(paths: list[str]) -> list[str]:
    """paths without the folders an imported bpy module put on sys.path (Blender's scripts and the
    user's): a spawned worker starts from its parent's sys.path, and with Blender's scripts/modules
    on it the worker's own `import bpy` finds the scripts' pure-Python bpy package instead of the
    module and fails (No module named '_bpy')."""
    bpy = sys.modules.get("bpy")
    if bpy is None:
        return list(paths)
    roots = [Path(p).resolve() for p in bpy.utils.script_paths()] + [Path(bpy.utils.resource_path("USER")).resolve()]
    return [p for p in paths if not any(Path(p).resolve().is_relative_to(root) for root in roots)]


class _Worker:
    def __init__(self, context, function):
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(child_end, function), daemon=True)
        inherited = sys.path[:]
        sys.path[:] = without_blender_script_paths(inherited)   # what the spawned child starts from
        try:
            self.process.start()
        finally:
            sys.path[:] = inherited
        child_end.close()
        self.task = None
        self.started = 0.0

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.connection.send(None)
            except OSError:
                pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def run_isolated(function, tasks: list, workers: int, timeout_s: float | None = None):
    """Yield (task, ok, result_or_error_message) for each task, in completion order.

    function runs in `workers` spawned processes (it must be importable). A task whose worker
    dies (segfault, out of memory) or exceeds timeout_s yields ok=False and the worker is replaced.
    """
    context = multiprocessing.get_context("spawn")
    pending = list(reversed(tasks))
    pool = [_Worker(context, function) for _ in range(max(1, min(workers, len(tasks))))]
    try:
        while pending or any(w.task is not None for w in pool):
            for worker in pool:
                if worker.task is None and pending:
                    worker.task, worker.started = pending.pop(), time.monotonic()
                    worker.connection.send(worker.task)
            busy = [w for w in pool if w.task is not None]
            ready = multiprocessing.connection.wait(
                [w.connection for w in busy] + [w.process.sentinel for w in busy], timeout=1.0
            )
            for index, worker in enumerate(pool):
                if worker.task is None:
                    continue
                outcome, replace = None, False
                if worker.connection in ready or worker.process.sentinel in ready:
                    try:
                        status, payload = worker.connection.recv()
                        outcome = (status == "ok", payload)
                    except (EOFError, OSError):
                        worker.process.join(timeout=5)
                        outcome, replace = (False, describe_exit(worker.process.exitcode)), True
                elif timeout_s is not None and time.monotonic() - worker.started > timeout_s:
                    outcome, replace = (False, f"timed out after {timeout_s:.0f} s"), True
                if outcome is None:
                    continue
                task, worker.task = worker.task, None
                if replace:
                    worker.stop(kill=True)
                    pool[index] = _Worker(context, function)
                yield task, outcome[0], outcome[1]
    finally:
        for worker in pool:
            worker.stop(kill=worker.task is not None)


# ---------------------------------------------------------------------------------------------
# Whole run


def completed_shape_ids(out_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in out_dir.glob("*/shape.json"))


def write_splits(out_dir: Path) -> dict[str, int]:
    """split/{train,val,test}.txt over every sampled shape in OUT_DIR; returns the counts."""
    ids = completed_shape_ids(out_dir)
    split_dir = out_dir / "split"
    split_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in SPLIT_NAMES:
        members = [i for i in ids if split_of(i) == name]
        (split_dir / f"{name}.txt").write_text("".join(f"{i}\n" for i in members))
        counts[name] = len(members)
    return counts


def sampled_near_sigmas(out_dir: Path) -> list[float] | None:
    """The near-surface noise the samples in out_dir were drawn with (its meta.json), or None when
    the folder holds no samples yet."""
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file() or not any(samples_done(shape) for shape in out_dir.iterdir() if shape.is_dir()):
        return None
    return [float(sigma) for sigma in json.loads(meta_path.read_text()).get("near_sigmas", NEAR_SIGMAS)]


def write_meta(out_dir: Path, args: argparse.Namespace) -> None:
    meta_path = out_dir / "meta.json"
    previous = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    views, image_size = args.views, args.image_size
    if views == 0 and previous.get("views"):  # a samples-only run leaves earlier renders valid
        views, image_size = previous["views"], previous["image_size"]
    from training import render

    meta = {
        "format": FORMAT_VERSION,
        "points_per_shape": args.points,
        "padding": PADDING,
        "near_sigmas": list(args.near_sigmas),
        "views": views,
        "image_size": image_size,
        "inside": "generalised winding number > 0.5",
        "camera": {
            "distance": "fits the canonical box's bounding sphere for each view's lens",
            "focal_fraction_range": list(render.FOCAL_FRACTION_RANGE),
            "elevation_range_deg": list(render.ELEVATION_RANGE_DEG),
            "up_axis": "z",
            "pixel_centres": "integer (OpenCV)",
        },
    }
    meta_path.write_text(json.dumps(meta, indent=1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="MESH_DIR ... OUT_DIR",
                        help="one or more mesh folders (searched recursively), then the output folder")
    parser.add_argument("--views", type=int, default=24, help="renders per shape; 0 skips rendering")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--points", type=int, default=100_000, help="points per sample set")
    parser.add_argument("--near-sigmas", type=float, nargs="+", default=list(NEAR_SIGMAS),
                        help="noise of the near-surface samples (canonical units), each for an equal share")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--limit", type=int, default=None, help="at most N shapes in total")
    parser.add_argument("--max-shapes-per-dir", type=int, default=None,
                        help="at most N shapes from each MESH_DIR (first N by path)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per shape before it is failed")
    parser.add_argument("--only-prepared", action="store_true",
                        help="only shapes OUT_DIR already holds: add the stages they lack, never new shapes")
    args = parser.parse_args(argv)
    if len(args.paths) < 2:
        parser.error("need at least one MESH_DIR and an OUT_DIR")
    for mesh_dir in args.paths[:-1]:
        if not mesh_dir.is_dir():
            parser.error(f"not a folder: {mesh_dir}")
    if args.views < 0 or args.image_size < 8 or args.points < 8:
        parser.error("--views must be >= 0, --image-size and --points >= 8")
    if not all(0.0 < sigma < 0.5 for sigma in args.near_sigmas):
        parser.error("--near-sigmas must lie between 0 and 0.5")
    return args


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    mesh_dirs, out_dir = args.paths[:-1], args.paths[-1]
    drawn_with = sampled_near_sigmas(out_dir)
    if drawn_with is not None and drawn_with != args.near_sigmas:
        # one folder, one recipe: meta.json could not say which shapes were drawn with which noise
        print(f"error: {out_dir}'s near-surface samples were drawn with --near-sigmas "
              f"{' '.join(map(str, drawn_with))}; pass the same, or prepare into another folder", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    sources, failures = find_sources(mesh_dirs, args.max_shapes_per_dir)
    if args.limit is not None:
        sources = sources[: args.limit]
    if args.only_prepared:
        sources = [shape for shape in sources if samples_done(out_dir / shape.id)]

    tasks = []
    for shape in sources:
        shape_dir = out_dir / shape.id
        need_samples = not samples_done(shape_dir)
        need_renders = args.views > 0 and (need_samples or not renders_done(shape_dir, args.views, args.image_size)
                                           or not back_depth_done(shape_dir) or not looks_done(shape_dir))
        if need_samples or need_renders:
            tasks.append({"shape": asdict(shape), "out_dir": str(out_dir), "points": args.points,
                          "near_sigmas": args.near_sigmas, "views": args.views, "image_size": args.image_size})
    print(f"{len(sources)} shapes found, {len(sources) - len(tasks)} already complete, "
          f"{len(tasks)} to process with {args.workers} workers", file=sys.stderr, flush=True)

    started = time.monotonic()
    stage_counts = {"samples": 0, "renders": 0, "back depth": 0, "looks": 0}
    with tqdm(total=len(tasks), unit="shape", file=sys.stderr) as progress:
        for task, ok, result in run_isolated(prepare_shape, tasks, args.workers, args.timeout):
            if ok:
                for stage in result["stages"]:
                    stage_counts[stage] += 1
            else:
                failures.append({"id": task["shape"]["id"], "source": task["shape"]["source"], "error": result})
                progress.set_postfix(failed=len(failures))
            progress.update()
    shutil.rmtree(out_dir / TMP_DIR_NAME, ignore_errors=True)

    failures.sort(key=lambda f: f["id"])
    (out_dir / "failures.json").write_text(json.dumps(failures, indent=1))
    counts = write_splits(out_dir)
    write_meta(out_dir, args)
    elapsed = time.monotonic() - started
    print(f"done in {elapsed:.1f} s: sampled {stage_counts['samples']}, rendered {stage_counts['renders']}, "
          f"back depth added {stage_counts['back depth']}, looks replayed {stage_counts['looks']}, "
          f"failed {len(failures)}; split {counts}", file=sys.stderr)
    for failure in failures:
        print(f"  FAILED {failure['id']} ({failure['source']}): {failure['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
